"""Weights mode across three real sites over gRPC + TLS + SuperNode auth: the chain learns, the model
is delivered, impostors are refused, and the federation reproduces the in-process chain exactly."""
from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import x25519
from weckd.chain.artifacts import image_spec_of_card, load_model_files
from weckd.chain.config import config_from_mapping, merge_mappings
from weckd.chain.link import model_from_state
from weckd.chain.runner import run_chain
from weckd.chain.schema import Origin
from weckd.server.settings import load_federation

from .conftest import FederatedRun

pytestmark = pytest.mark.slow


def test_every_link_completes(weights_run: FederatedRun) -> None:
    assert weights_run.server_rc == 0
    links = weights_run.results["links"]
    assert [(r["link"], r["site"]) for r in links] == [(1, "A"), (2, "B"), (3, "C")]
    assert all(len(r["epochs"]) == 4 for r in links)
    assert [r["init"] for r in links] == ["scratch", "predecessor", "predecessor"]


def test_last_link_beats_link_one_on_every_sites_validation_data(weights_run: FederatedRun) -> None:
    summary = weights_run.results["summary"]
    assert summary["last_eval_accuracy"] > summary["link1_eval_accuracy"]
    assert summary["last_eval_accuracy"] > 0.4  # four classes: chance is 0.25


def test_delivered_model_loads_and_predicts(weights_run: FederatedRun) -> None:
    card, state = load_model_files(weights_run.out / "model")
    spec = image_spec_of_card(card)
    model = model_from_state(card["arch"], state, spec, torch.device("cpu"))
    logits = model(torch.zeros(5, spec.channels, spec.size, spec.size))
    assert logits.shape == (5, len(card["classes"]))
    assert card["provenance"]["federated"] is True


@pytest.mark.parametrize("impostor", ["wrong-ca", "unregistered", "insecure"])
def test_impostor_supernode_is_refused_while_the_run_completes(weights_run: FederatedRun, impostor: str) -> None:
    assert weights_run.server_rc == 0
    assert weights_run.refused[impostor] == 1  # weckd-client (or the bare plaintext SuperNode) exits 1: refused


def test_federation_matches_the_in_process_chain(weights_run: FederatedRun) -> None:
    fed = load_federation(weights_run.scaffold.federation)
    # the in-process view of the same chain: the scaffold's config, whose chain part is federation.yaml's
    scaffold = weights_run.scaffold
    cfg = config_from_mapping(merge_mappings(scaffold.chain, {"runtime": {"threads": 1, "device": "cpu"},
                                                              "baselines": {"sites": False, "pooled": False}}),
                              Origin(str(scaffold.federation), scaffold.root))
    assert (cfg.seed, cfg.chain, cfg.link, cfg.links) == (fed.chain.seed, fed.chain.chain, fed.chain.link,
                                                          fed.chain.links)
    local = run_chain(cfg)
    assert (cfg.link.lr_schedule, cfg.link.do_no_harm, cfg.chain.deliver) == ("chain", True, "best")
    for row, remote in zip(local.links, weights_run.results["links"], strict=True):
        assert remote["val"]["accuracy"] == pytest.approx(row.result.val.accuracy, abs=1e-5)
        assert remote["samples"]["train"] == row.result.samples["train"]
        for mine, theirs in zip(row.result.epochs, remote["epochs"], strict=True):
            expected = pytest.approx((mine.loss, mine.ce, mine.kd), abs=1e-5)
            assert (theirs["loss"], theirs["ce"], theirs["kd"]) == expected
        if row.result.teacher_val is not None:  # do no harm: the same teacher score and decision at the site
            assert remote["do_no_harm"]["kept"] == row.result.kept
            assert remote["do_no_harm"]["teacher_val_accuracy"] == pytest.approx(row.result.teacher_val.accuracy)
    # the same link is delivered (best over all sites' validation splits), with the same weights
    delivered = weights_run.results["delivered"]
    assert delivered["link"] == local.delivered + 1
    assert delivered["pooled_val_accuracy"] == pytest.approx(local.pooled_val, abs=1e-6)
    _, state = load_model_files(weights_run.out / "model")
    assert set(state) == set(local.final.result.state)
    assert all(torch.equal(torch.as_tensor(state[k]).float(), local.final.result.state[k].float()) for k in state)


def test_coordinator_writes_the_run_report(weights_run: FederatedRun) -> None:
    for name in ("report.md", "report.html", "accuracy_per_link.png", "loss_curves.png", "confusion_matrix.png"):
        assert (weights_run.out / name).is_file(), name
    results = weights_run.results
    final = results["links"][-1]["test"]
    assert final["n"] == sum(e["n"] for e in results["links"][-1]["evaluations"].values())
    assert sum(map(sum, final["confusion"])) == final["n"]
    assert "federated evaluation" in (weights_run.out / "report.md").read_text()


def test_coordinator_opens_only_its_own_slot_of_what_it_relays_and_checkpoints(weights_run: FederatedRun) -> None:
    """What the coordinator stored (its chain checkpoint, sealed/final-model.sealed) is the delivered link's
    model (chain.deliver: best), handed over by its site and encrypted once for the recipients of the final
    model, site A and the coordinator. The coordinator opens its own slot, and that is the model it wrote;
    with its X25519 key no other recipient's slot unwraps, and posing as a site fails the header check."""
    from weckd.chain.keys import load_x25519_private
    from weckd.chain.seal import Expectation, SealError, _parse, _wrap_key, open_sealed, read_header
    from weckd.server.settings import load_federation as load

    fed = load(weights_run.scaffold.federation)
    assert fed.settings.sealing is not None
    own = load_x25519_private(Path(fed.settings.sealing.keys) / "site-coordinator.x25519.key")
    stored = sorted((weights_run.scaffold.root / "state" / "server" / "chain").glob("relay-*.bin"))
    stored += [weights_run.out / "sealed" / "final-model.sealed"]
    assert len(stored) == 2 and stored[0].read_bytes() == stored[1].read_bytes()
    blob = stored[1].read_bytes()
    h = read_header(blob)
    assert sorted(h.recipients) == ["A", "coordinator"] and h.link == weights_run.results["delivered"]["link"] - 1
    opened = open_sealed(blob, own, _pinned(fed, h.sender), Expectation(h.run_id, h.link, h.sender, "coordinator"))
    assert hashlib.sha256(opened.payload).hexdigest() == h.payload_sha256
    for site in ("A", "B", "C"):
        with pytest.raises(SealError) as err:
            open_sealed(blob, own, _pinned(fed, h.sender), Expectation(h.run_id, h.link, h.sender, site))
        assert err.value.reason == "wrong-recipient"
    frame = _parse(blob, 1 << 30)
    shared = own.exchange(x25519.X25519PublicKey.from_public_bytes(frame.ephemeral))
    for i in [h.recipients.index("A")]:  # the slot of A
        kek = _wrap_key(shared, frame.ephemeral, base64.b64decode(h.recipient_keys[i]), h.version)
        with pytest.raises(InvalidTag):
            kek.decrypt(frame.slots[i][:12], frame.slots[i][12:], frame.header_bytes)


def _pinned(fed: Any, site: str) -> Any:
    from weckd.chain.keys import key_files, load_ed25519_public

    return load_ed25519_public(key_files(site, Path(fed.settings.sealing.peers[site])).ed25519_pub)


# Peak RSS budgets of the coordinator's processes (they relay bytes and metrics; they never train): weckd-server,
# and the SuperLink, in whose process each run's ServerApp runs as a thread.
BUDGET_MB = {"weckd-server": 100.0, "superlink": 340.0}


def test_only_the_site_executors_load_torch(weights_run: FederatedRun) -> None:
    """Sampled from /proc while the federation ran: torch's library is mapped into each site's executor and
    into no other process (coordinator, SuperLink with its ServerApp, site supervisors, SuperNodes)."""
    assert weights_run.procs is not None
    roles = weights_run.procs.by_role()
    assert set(roles) >= {"weckd-server", "superlink", "site-supervisor", "supernode", "executor"}, roles
    executors = roles["executor"]  # the three sites' and the refused impostors'
    assert len(executors) >= 3 and all(s.torch for s in executors)  # the probe sees torch where it is
    loaded = sorted(role for role, seen in roles.items() if role != "executor" and any(s.torch for s in seen))
    assert loaded == []


def test_the_coordinator_stays_within_its_memory_budget(weights_run: FederatedRun) -> None:
    assert weights_run.procs is not None
    roles = weights_run.procs.by_role()
    assert not {"serverapp", "superexec"} & set(roles), roles  # the ServerApp runs in the SuperLink's process
    peaks = {role: round(max(s.peak_rss_mb for s in roles[role])) for role in ("weckd-server", "superlink")}
    print(f"\ncoordinator peak RSS (MB): {peaks}, total {sum(peaks.values())}")
    over = {role: mb for role, mb in peaks.items() if role in BUDGET_MB and mb > BUDGET_MB[role]}
    assert not over, f"over budget {BUDGET_MB}: {over}"
