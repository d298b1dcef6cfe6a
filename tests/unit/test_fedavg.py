"""FedAvg across the sites: the coordinator's rounds and average, and every field a site reads from a
FedAvg request checked against its own policy and ledger (the coordinator is not trusted)."""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from weckd.chain.audit import AuditLog
from weckd.chain.errors import LinkError, PayloadError
from weckd.chain.flower import payload_records
from weckd.chain.keys import generate_site_keys
from weckd.chain.payload import Payload, decode_state, encode_state, payload_bytes
from weckd.chain.peers import COORDINATOR, Party, SealingSettings, load_party
from weckd.chain.protocol import (
    KEY_CONFIG,
    KEY_INFO,
    KEY_METRICS,
    MSG_ROUND,
    MSG_ROUND_EVALUATE,
    EvalMetrics,
    Failure,
    LinkInfo,
    LinkMetrics,
    Reason,
    Refused,
)
from weckd.chain.rounds import RoundEvaluateRequest, RoundRequest
from weckd.chain.seal import SealError
from weckd.client.admit import admit_round, admit_round_evaluate, admit_train
from weckd.client.exchange import receive
from weckd.client.policy import SitePolicy
from weckd.client.runstate import RunState
from weckd.client.site import SiteConfig
from weckd.server.fedavg import FedAvgRun, average, rounds_of
from weckd.server.relay import Relay
from weckd.server.report import results
from weckd.server.schedule import ChainOutcome
from weckd.server.state import load_state, new_state
from weckd.server.transport import Exchange, Reply, Timing, Transport
from weckd.server.wire import WireLog

from .fake_grid import FakeGrid, federation

RUN = "20261130T090000Z-aaaaaaaaaaaa"
LATER = "20261130T100000Z-bbbbbbbbbbbb"


# -- the coordinator ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("keys")
    for name in ("A", "B", COORDINATOR, "Z"):
        files = generate_site_keys(name, root / name)
        for pub in (files.x25519_pub, files.ed25519_pub):
            (root / "public").mkdir(exist_ok=True)
            shutil.copyfile(pub, root / "public" / pub.name)
    return root


def _party(keys: Path, name: str, peers: tuple[str, ...] = ("A", "B", COORDINATOR)) -> Party:
    return load_party(name, SealingSettings(str(keys / name), {p: str(keys / "public") for p in peers if p != name}),
                      "test.yaml")


class FakeRounds(Transport):
    """Sites that answer FedAvg rounds as weckd sites do: the received average is opened with the site's own
    receive(); each update is that average's ``w`` + the site's offset (round 0: the offset alone)."""

    def __init__(self, offsets: dict[str, float], n_train: dict[str, int], parties: dict[str, Party] | None = None,
                 update: Any = None) -> None:
        super().__init__(FakeGrid(set(offsets)), {}, Timing(60.0, 60.0, 0.01), WireLog(""))
        self.offsets, self.n_train, self.parties = offsets, n_train, parties or {}
        self.update = update or (lambda site, r, w: {"w": torch.full((2,), w + self.offsets[site]),
                                                     "steps": torch.tensor(5)})
        self.received: list[tuple[str, str, int, float]] = []  # (kind, site, round, w of the model received)
        self.delivered: list[str] = []

    def _open(self, content: RecordDict, site: str, run_id: str, link: int) -> float | None:
        got = receive(content, self.parties.get(site), "weights", COORDINATOR, run_id, link, f"site {site}")
        if got is None:
            return None
        return float(decode_state(got.header, got.arrays, link=link)[1]["w"][0])

    def exchange_all(self, kind: str, contents: dict[str, RecordDict], group: str, timeout: float | None = None
                     ) -> Exchange:
        replies = {}
        for site, content in contents.items():
            config = dict(content.config_records[KEY_CONFIG])
            if kind == MSG_ROUND:
                req = RoundRequest.from_config(config, site)
                w = self._open(content, site, req.run_id, req.round - 1)
                self.received.append((kind, site, req.round, -1.0 if w is None else w))
                replies[site] = self._update(site, req, 0.0 if w is None else w)
            else:
                assert kind == MSG_ROUND_EVALUATE
                ev = RoundEvaluateRequest.from_config(config, site)
                w = self._open(content, site, ev.run_id, ev.round)
                self.received.append((kind, site, ev.round, float(w or 0.0)))
                if ev.deliver:
                    self.delivered.append(site)
                metrics = EvalMetrics(0.5 + ev.round / 10, 10, (0.5, 0.5), (3, 2, 2, 3)).to_record()
                replies[site] = Reply(site, SimpleNamespace(content=RecordDict({KEY_METRICS: MetricRecord(metrics)})),
                                      0.1, 10, 20)
        return Exchange(replies, {})

    def _update(self, site: str, req: RoundRequest, w: float) -> Reply:
        data = payload_bytes(encode_state(self.update(site, req.round, w), "test_resnet", req.round, req.wire_dtype))
        metrics = LinkMetrics(0.6, 10, (0.5, 0.5), (3, 2, 2, 3), (1.0,), (1.0,), (0.0,), (0.1,), 0.1, 100.0,
                              {"train": self.n_train[site]})
        init = "given" if req.round else "scratch"
        records: dict[str, Any] = {KEY_METRICS: MetricRecord(metrics.to_record()),
                                   KEY_INFO: ConfigRecord(LinkInfo(site, "test_resnet", init).to_record())}
        if site in self.parties:
            blob = self.parties[site].seal_for([r for _, r in req.seal_for], data, run_id=req.run_id, link=req.round,
                                               kind="weights")
            records.update(payload_records(True, {"weights": blob}))
        else:
            records.update(payload_records(False, {"weights": data}))
        return Reply(site, SimpleNamespace(content=RecordDict(records)), 0.1, 100, 200)


def _run(tmp_path: Path, sites: FakeRounds, **settings: Any) -> tuple[FedAvgRun, list[dict[str, Any]]]:
    fed = federation(tmp_path, ["A", "B"], link={"arch": "test_resnet", "epochs": 2}, algorithm="fedavg", **settings)
    events: list[dict[str, Any]] = []
    infos = {s: {"counts": {"train": sites.n_train[s], "val": 10}} for s in ("A", "B")}
    run = FedAvgRun(sites, fed, infos, events.append, new_state(fed), tmp_path / "state", AuditLog(tmp_path / "a.log"))
    return run, events


def test_each_round_starts_every_site_from_the_average_weighted_by_training_images(tmp_path: Path) -> None:
    sites = FakeRounds({"A": 1.0, "B": 3.0}, {"A": 10, "B": 30})
    run, events = _run(tmp_path, sites)
    outcome = run.run()
    trained = [(site, r, w) for kind, site, r, w in sites.received if kind == MSG_ROUND]
    # round 1: no model (one seed); round 2: (10·1 + 30·3) / 40 = 2.5 at both sites
    assert trained == [("A", 0, -1.0), ("B", 0, -1.0), ("A", 1, 2.5), ("B", 1, 2.5)]
    # the delivered model: (10·3.5 + 30·5.5) / 40 = 5.0, in float32, with the integer buffer kept
    assert outcome.final is not None and not outcome.final.sealed
    final = decode_state(*_plain(outcome.final), link=1)[1]
    assert float(final["w"][0]) == 5.0 and final["w"].dtype == torch.float32 and int(final["steps"]) == 5
    assert [(r.index, r.site, len(r.metrics["epoch-loss"])) for r in outcome.links] == [(0, "all", 2), (1, "all", 2)]
    assert [r.init for r in outcome.links] == ["scratch", "average"]  # round 1 as the sites started it
    assert [e["link"] for e in events if e["event"] == "link-done"] == [1, 2]


def _plain(relay: Relay) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from weckd.chain.payload import payload_from_bytes

    return payload_from_bytes(relay.blobs["weights"])


def test_rounds_give_each_site_the_chains_site_epochs(tmp_path: Path) -> None:
    fed = federation(tmp_path, ["A", "B", "C"], cycles=2, link={"arch": "test_resnet", "epochs": 3},
                     algorithm="fedavg")
    assert rounds_of(fed) == 6  # the chain: 3 sites × 2 cycles × 3 epochs = 18 site-epochs = 3 sites × 6 rounds


def test_the_run_checkpoints_every_round_and_resumes_at_the_next(tmp_path: Path) -> None:
    sites = FakeRounds({"A": 1.0, "B": 3.0}, {"A": 10, "B": 30})
    run, _ = _run(tmp_path, sites)
    run._round(0)
    state = load_state(tmp_path / "state", run.fed)
    assert state is not None and state.next_slot == 1 and state.relay is not None and state.relay.site == COORDINATOR
    resumed = FedAvgRun(sites, run.fed, run.infos, lambda e: None, state, tmp_path / "state",
                        AuditLog(tmp_path / "a.log"))
    sites.received.clear()
    resumed.run()
    assert [(s, r, w) for k, s, r, w in sites.received if k == MSG_ROUND] == [("A", 1, 2.5), ("B", 1, 2.5)]


def test_sealed_rounds_open_under_the_pinned_keys_and_deliver_to_the_listed_sites(tmp_path: Path, keys: Path) -> None:
    parties = {s: _party(keys, s) for s in ("A", "B")}
    sites = FakeRounds({"A": 1.0, "B": 3.0}, {"A": 10, "B": 30}, parties)
    run, _ = _run(tmp_path, sites, sealing={"deliver_to": [COORDINATOR, "A"], "keys": str(keys / COORDINATOR),
                                            "peers": {"A": str(keys / "public"), "B": str(keys / "public")}})
    outcome = run.run()
    assert ("A", 1, 2.5) in [(s, r, w) for k, s, r, w in sites.received if k == MSG_ROUND]
    assert sites.delivered == ["A"]
    assert outcome.final is not None and outcome.final.sealed
    assert set(outcome.final.recipients("weights")) == {"A", "B", COORDINATOR}
    doc = results(run.fed, ChainOutcome(outcome.sites, outcome.links, outcome.final), 1.0)
    assert doc["algorithm"] == {"name": "fedavg", "rounds": 2, "epochs_per_round": 1}
    assert doc["links"][-1]["eval_accuracy"] == pytest.approx(0.6)


def test_an_update_with_non_finite_weights_stops_the_run_as_refused(tmp_path: Path) -> None:
    sites = FakeRounds({"A": 1.0, "B": 3.0}, {"A": 10, "B": 30},
                       update=lambda site, r, w: {"w": torch.tensor([float("nan"), 1.0])})
    run, _ = _run(tmp_path, sites)
    with pytest.raises(LinkError, match="site A: the update is refused") as err:
        run.run()
    assert err.value.failure == Failure.SITE_REFUSED.value


def test_updates_of_different_models_are_not_averaged(tmp_path: Path) -> None:
    sites = FakeRounds({"A": 1.0, "B": 3.0}, {"A": 10, "B": 30},
                       update=lambda site, r, w: {"w": torch.zeros(2 if site == "A" else 3)})
    run, _ = _run(tmp_path, sites)
    with pytest.raises(LinkError, match="is not the model site A trained"):
        run.run()


def test_an_update_claiming_other_training_images_than_declared_stops_the_run(tmp_path: Path) -> None:
    sites = FakeRounds({"A": 1.0, "B": 3.0}, {"A": 10, "B": 30})
    run, _ = _run(tmp_path, sites)
    run.infos["B"]["counts"]["train"] = 3  # B declared 3 at discovery and now weighs in with 30
    with pytest.raises(LinkError, match="site B: the update claims 30 training images, the site declared 3"):
        run.run()


def test_the_average_is_flowers_weighted_mean() -> None:
    def up(w: float, n: int) -> Any:
        metrics = LinkMetrics(0.5, 1, (1.0,), (1,), (), (), (), (), 0.0, 0.0, {"train": n})
        return SimpleNamespace(arch="m", arrays={"w": np.full(3, w, np.float32), "k": np.array(4)}, metrics=metrics)

    arch, mean = average({"A": up(0.0, 1), "B": up(4.0, 3)})
    assert arch == "m" and mean["w"].tolist() == [3.0, 3.0, 3.0] and int(mean["k"]) == 4


# -- a site ------------------------------------------------------------------------------------------


def _cfg(tmp_path: Path, **policy: Any) -> SiteConfig:
    return SiteConfig(site="B", state_dir=str(tmp_path / "state"), policy=SitePolicy(**{"allow_fedavg": True,
                                                                                          **policy}))


def _round(**over: Any) -> dict[str, Any]:
    base = RoundRequest(RUN, 1, 4, ("A", "B", "C"), 7, "float16", False, (("weights", COORDINATOR),))
    return {**base.to_config(), **over}


def _link(**over: Any) -> dict[str, Any]:
    return {"arch": "test_resnet", "epochs": 1, "batch_size": 16, "lr": 0.05, **over}


SEALED = SimpleNamespace(peers={"A": 0, "B": 0, "C": 0, COORDINATOR: 0})  # the pins admission looks at


def _admit(tmp_path: Path, config: dict[str, Any] | None = None, link: dict[str, Any] | None = None,
           payload: bool = True, party: Any = SEALED, **policy: Any) -> Any:
    cfg = _cfg(tmp_path, **policy)
    return admit_round(cfg, SimpleNamespace(site=SimpleNamespace(train=[0] * 100)), party,
                       RunState(cfg.state_dir, cfg.policy), config or _round(), link or _link(), payload)


def _refused(reason: Reason, fn: Any, *args: Any, **kwargs: Any) -> Refused:
    with pytest.raises(Refused) as err:
        fn(*args, **kwargs)
    assert err.value.reason is reason, str(err.value)
    return err.value


@pytest.mark.parametrize("req", [RoundRequest(RUN, 2, 5, ("A", "B"), 3, "float32", True, ()),
                                 RoundEvaluateRequest(RUN, 4, 5, ("A",), True)])
def test_fedavg_requests_round_trip(req: Any) -> None:
    assert type(req).from_config(req.to_config(), "test") == req


def test_a_round_inside_the_policy_is_admitted(tmp_path: Path) -> None:
    ok = _admit(tmp_path)
    assert (ok.req.round, ok.req.sites, ok.settings.epochs) == (1, ("A", "B", "C"), 1)


def test_fedavg_is_refused_unless_the_site_policy_allows_it(tmp_path: Path) -> None:
    _refused(Reason.FEDAVG_NOT_ALLOWED, _admit, tmp_path, allow_fedavg=False)
    cfg = _cfg(tmp_path, allow_fedavg=False)
    evaluate = RoundEvaluateRequest(RUN, 1, 4, ("A", "B"), False).to_config()
    _refused(Reason.FEDAVG_NOT_ALLOWED, admit_round_evaluate, cfg, SEALED, RunState(cfg.state_dir, cfg.policy),
             evaluate)


@pytest.mark.parametrize("seal_for", ["weights:coordinator,weights:C", "weights:A", ""])
def test_an_update_is_sealed_for_the_coordinator_alone(tmp_path: Path, seal_for: str) -> None:
    _refused(Reason.RECIPIENT_NOT_ALLOWED, _admit, tmp_path, _round(**{"seal-for": seal_for}))


def test_an_unsealed_site_seals_for_nobody(tmp_path: Path) -> None:
    _refused(Reason.RECIPIENT_NOT_ALLOWED, _admit, tmp_path, party=None)
    assert _admit(tmp_path, _round(**{"seal-for": ""}), party=None).req.seal_for == ()


@pytest.mark.parametrize(("sites", "reason"), [(["A", "C"], Reason.BAD_REQUEST),  # this site is not taking part
                                               (["A", "B", COORDINATOR], Reason.BAD_REQUEST),
                                               (["A", "B", "Q"], Reason.UNKNOWN_PEER),  # a site it never pinned
                                               (["A", "B", "B"], Reason.BAD_REQUEST), ([], Reason.BAD_REQUEST)])
def test_the_participants_are_pinned_sites_with_this_one_among_them(tmp_path: Path, sites: list[str],
                                                                    reason: Reason) -> None:
    _refused(reason, _admit, tmp_path, _round(sites=sites))


def test_participants_outside_the_agreed_order_are_refused(tmp_path: Path) -> None:
    _refused(Reason.NOT_PREDECESSOR, _admit, tmp_path, order=("A", "B"))


def test_more_rounds_than_the_policy_allows_are_refused(tmp_path: Path) -> None:
    _refused(Reason.LINKS_OVER_LIMIT, _admit, tmp_path, max_links_per_run=3)


@pytest.mark.parametrize(("link", "reason"), [(_link(epochs=500), Reason.EPOCHS_OVER_LIMIT),
                                              (_link(arch="vit_huge_patch14_224"), Reason.ARCH_NOT_ALLOWED),
                                              (_link(weights="/etc/shadow"), Reason.WEIGHTS_FROM_WIRE)])
def test_round_settings_outside_the_policy_are_refused(tmp_path: Path, link: dict[str, Any], reason: Reason) -> None:
    _refused(reason, _admit, tmp_path, link=link)


@pytest.mark.parametrize("change", [{"round": 4}, {"round": -1}, {"rounds": 0}, {"round": True},
                                    {"wire-dtype": "int8"}, {"seal-for": "logits:coordinator"}, {"extra": 1}])
def test_malformed_round_fields_are_refused(tmp_path: Path, change: dict[str, Any]) -> None:
    _refused(Reason.BAD_REQUEST, _admit, tmp_path, _round(**change))


def test_round_one_carries_no_model_and_later_rounds_carry_the_average(tmp_path: Path) -> None:
    _refused(Reason.BAD_REQUEST, _admit, tmp_path, _round(round=0), payload=True)
    _refused(Reason.MISSING_TEACHER, _admit, tmp_path, _round(round=2), payload=False)


def _commit(tmp_path: Path, rnd: int, sites: tuple[str, ...] = ("A", "B", "C"), run: str = RUN) -> RunState:
    cfg = _cfg(tmp_path)
    runs = RunState(cfg.state_dir, cfg.policy)
    runs.commit_round(run, runs.admit_round(run, rnd, sites, None, "test"), rnd, sites, trained=True)
    return runs


def test_rounds_only_move_forward_and_no_site_joins_later(tmp_path: Path) -> None:
    _commit(tmp_path, 2, ("A", "B"))
    _refused(Reason.LINK_NOT_FORWARD, _admit, tmp_path, _round(round=1, sites=["A", "B"]))
    _refused(Reason.BAD_REQUEST, _admit, tmp_path, _round(round=3, sites=["A", "B", "C"]))
    assert _admit(tmp_path, _round(round=3, sites=["B"])).req.sites == ("B",)  # a site dropped: allowed


def test_a_chain_run_cannot_turn_into_a_fedavg_run_or_back(tmp_path: Path) -> None:
    _commit(tmp_path, 1)
    cfg = _cfg(tmp_path)
    chain_train = {"link": 1, "n-links": 3, "seed": 7, "mode": "weights", "wire-dtype": "float16", "augment": False,
                   "deliver": False, "run-id": RUN, "schedule": ["A", "B", "C"], "seal-for": "weights:C"}
    _refused(Reason.BAD_REQUEST, admit_train, cfg, SimpleNamespace(site=SimpleNamespace(train=[0] * 100)), None,
             RunState(cfg.state_dir, cfg.policy), chain_train, _link(), True)


def test_a_run_the_site_left_is_refused_for_fedavg_too(tmp_path: Path) -> None:
    _commit(tmp_path, 0, run=LATER)
    _refused(Reason.STALE_RUN, _admit, tmp_path)


def test_evaluations_beyond_the_policy_are_refused_for_fedavg_too(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, max_evaluations_per_run=1)
    runs = RunState(cfg.state_dir, cfg.policy)
    ask = RoundEvaluateRequest(RUN, 0, 4, ("A", "B"), False).to_config()
    req, record = admit_round_evaluate(cfg, SEALED, runs, ask)
    runs.commit_round(RUN, record, 0, req.sites, evaluated=True)
    _refused(Reason.EVALUATIONS_OVER_LIMIT, admit_round_evaluate, cfg, SEALED, RunState(cfg.state_dir, cfg.policy),
             ask)


def test_a_chain_run_is_not_evaluated_as_a_fedavg_run(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    runs = RunState(cfg.state_dir, cfg.policy)
    runs.commit(RUN, runs.admit_train(RUN, 0, ("B", "C"), None, "test"), 0, ("B", "C"), trained=True)
    ask = RoundEvaluateRequest(RUN, 0, 1, ("B", "C"), True).to_config()  # would keep a model as this run's own
    _refused(Reason.BAD_REQUEST, admit_round_evaluate, cfg, SEALED, RunState(cfg.state_dir, cfg.policy), ask)


def test_only_the_last_rounds_average_is_delivered(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    bad = RoundEvaluateRequest(RUN, 1, 4, ("A", "B"), False).to_config() | {"deliver": True}
    _refused(Reason.BAD_REQUEST, admit_round_evaluate, cfg, SEALED, RunState(cfg.state_dir, cfg.policy), bad)


# -- the model a site trains from: only the coordinator's, for this run and round --------------------------


def _sealed_model(sender: Party, recipient: str, link: int, run: str = RUN, w: float = 1.0) -> RecordDict:
    data = payload_bytes(Payload("weights", "test_resnet", link, {"w": np.full(2, w, np.float16)}, "float16"))
    blob = sender.seal_for([recipient], data, run_id=run, link=link, kind="weights")
    return RecordDict(Relay(link, sender.name, {"weights": blob}, True).records("weights", recipient))


def test_the_coordinators_average_opens_at_a_site(keys: Path) -> None:
    got = receive(_sealed_model(_party(keys, COORDINATOR), "B", 0), _party(keys, "B"), "weights", COORDINATOR, RUN,
                  0, "site B fedavg round 2")
    assert got is not None and float(decode_state(got.header, got.arrays, link=0)[1]["w"][0]) == 1.0


@pytest.mark.parametrize(("sender", "link", "run", "reason"), [
    ("A", 0, RUN, "unexpected-sender"),  # another site passing its model off as the average
    ("Z", 0, RUN, "unexpected-sender"),  # a party this site never pinned
    (COORDINATOR, 1, RUN, "replay"),  # another round's average
    (COORDINATOR, 0, LATER, "replay"),  # another run's
])
def test_a_model_not_the_coordinators_for_this_run_and_round_is_refused(keys: Path, sender: str, link: int,
                                                                        run: str, reason: str) -> None:
    with pytest.raises(SealError) as err:
        receive(_sealed_model(_party(keys, sender, ("A", "B", COORDINATOR, "Z")), "B", link, run), _party(keys, "B"),
                "weights", COORDINATOR, RUN, 0, "site B fedavg round 2")
    assert err.value.reason == reason


def test_a_site_that_did_not_pin_the_coordinator_cannot_take_its_model(keys: Path) -> None:
    with pytest.raises(SealError) as err:
        receive(_sealed_model(_party(keys, COORDINATOR), "B", 0), _party(keys, "B", ("A",)), "weights", COORDINATOR,
                RUN, 0, "site B fedavg round 2")
    assert err.value.reason == "unknown-peer"


def test_a_non_finite_average_is_refused_before_training(keys: Path) -> None:
    got = receive(_sealed_model(_party(keys, COORDINATOR), "B", 0, w=float("inf")), _party(keys, "B"), "weights",
                  COORDINATOR, RUN, 0, "site B fedavg round 2")
    assert got is not None
    with pytest.raises(PayloadError, match="non-finite|NaN|inf"):
        decode_state(got.header, got.arrays, link=0)
