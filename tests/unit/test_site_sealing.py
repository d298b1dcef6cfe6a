"""A site opens only what its pinned predecessor sealed for it, for this run and link; the bad-input
matrix for sealing keys in a site config (one line each, exit 2, nothing written)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import Array, ArrayRecord, RecordDict
from weckd.chain.errors import PayloadError
from weckd.chain.flower import payload_records
from weckd.chain.keys import generate_site_keys
from weckd.chain.payload import encode_state, payload_bytes, payload_from_bytes
from weckd.chain.peers import Party, SealingSettings, load_party
from weckd.chain.protocol import KEY_PLAIN, PAYLOAD_ENTRY, Reason, reason_of
from weckd.chain.seal import SealError
from weckd.client import cli as client_cli
from weckd.client.app import receive
from weckd.client.metrics import SiteStatus
from weckd.server.relay import Relay
from weckd.server.scaffold import chain_settings, write_site_config

RUN = "0123456789abcdef"


@pytest.fixture(scope="module")
def parties(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Party]:
    root = tmp_path_factory.mktemp("keys")
    public = root / "public"
    public.mkdir()
    for name in ("A", "B", "C", "Z"):
        files = generate_site_keys(name, root / name)
        for pub in (files.x25519_pub, files.ed25519_pub):
            shutil.copyfile(pub, public / pub.name)
    pinned = {"A": ["B", "C"], "B": ["A", "C"], "C": ["A", "B"], "Z": ["A", "B", "C"]}  # nobody pins Z
    return {name: load_party(name, SealingSettings(str(root / name), {p: str(public) for p in peers}), "test.yaml")
            for name, peers in pinned.items()}


def _weights(link: int) -> bytes:
    return payload_bytes(encode_state({"w": torch.arange(6.0).reshape(2, 3)}, "test_resnet", link))


def _message(sender: Party, recipient: str, link: int, run: str = RUN) -> RecordDict:
    blob = sender.seal_for([recipient], _weights(link), run_id=run, link=link, kind="weights")
    return RecordDict(Relay(link, sender.name, {"weights": blob}, True).records("weights", recipient))


def _flip(content: RecordDict, at: int) -> RecordDict:
    arr = content.array_records["sealed"]["payload"].numpy().copy()
    arr[at] ^= 0x01
    return RecordDict({"sealed": ArrayRecord({"payload": Array(arr)})})


def test_the_pinned_predecessors_payload_opens(parties: dict[str, Party]) -> None:
    got = receive(_message(parties["A"], "B", 0), parties["B"], "weights", "A", RUN, 0, "site B link 2")
    assert got is not None and payload_from_bytes(_weights(0))[0] == got.header


def test_one_flipped_ciphertext_byte_is_refused(parties: dict[str, Party]) -> None:
    content = _flip(_message(parties["A"], "B", 0), -100)  # inside the ciphertext, before the signature
    with pytest.raises(SealError, match="signature does not verify|altered") as err:
        receive(content, parties["B"], "weights", "A", RUN, 0, "site B link 2")
    assert err.value.reason == "tampered"


def test_a_payload_sealed_for_another_site_is_refused(parties: dict[str, Party]) -> None:
    with pytest.raises(SealError, match="sealed for site C") as err:
        receive(_message(parties["A"], "C", 0), parties["B"], "weights", "A", RUN, 0, "site B link 2")
    assert err.value.reason == "wrong-recipient"


def test_link_k_minus_1_payload_replayed_at_link_k_plus_1_is_refused(parties: dict[str, Party]) -> None:
    # A sealed link 1's output (index 0) for C, e.g. for C to evaluate it; at link 3 (index 2) C expects
    # link 2's output from B: the coordinator hands it the older one instead.
    with pytest.raises(SealError, match="stale or replayed") as err:
        receive(_message(parties["A"], "C", 0), parties["C"], "weights", "A", RUN, 1, "site C link 3")
    assert err.value.reason == "replay"


def test_a_payload_of_an_earlier_chain_run_is_refused(parties: dict[str, Party]) -> None:
    with pytest.raises(SealError) as err:
        receive(_message(parties["A"], "B", 0, run="ffffffffffffffff"), parties["B"], "weights", "A", RUN, 0, "B")
    assert err.value.reason == "replay"


def test_a_payload_signed_by_an_unpinned_key_is_refused(parties: dict[str, Party]) -> None:
    forged = Party("A", parties["Z"]._x25519, parties["Z"]._ed25519, dict(parties["Z"].peers))  # Z posing as A
    with pytest.raises(SealError, match="not by site A's pinned key") as err:
        receive(_message(forged, "B", 0), parties["B"], "weights", "A", RUN, 0, "site B link 2")
    assert err.value.reason == "unexpected-sender"


def test_a_sender_other_than_the_predecessor_is_refused(parties: dict[str, Party]) -> None:
    with pytest.raises(SealError) as err:
        receive(_message(parties["C"], "B", 0), parties["B"], "weights", "A", RUN, 0, "site B link 2")
    assert err.value.reason in ("unexpected-sender", "tampered")


def test_a_predecessor_nobody_pinned_is_unknown(parties: dict[str, Party]) -> None:
    with pytest.raises(SealError, match="no pinned keys for 'Z'") as err:
        receive(_message(parties["Z"], "B", 0), parties["B"], "weights", "Z", RUN, 0, "site B link 2")
    assert err.value.reason == "unknown-peer"


def test_an_unsealed_payload_at_a_sealing_site_is_refused(parties: dict[str, Party]) -> None:
    plain = RecordDict(Relay(0, "A", {"weights": _weights(0)}, False).records("weights", "B"))
    with pytest.raises(SealError, match="accepts sealed payloads only") as err:
        receive(plain, parties["B"], "weights", "A", RUN, 0, "site B link 2")
    assert err.value.reason == "unsealed"


def test_a_message_with_sealed_and_plain_payloads_is_refused(parties: dict[str, Party]) -> None:
    sealed = Relay(0, "A", {"weights": parties["A"].seal_for(["B"], _weights(0), run_id=RUN, link=0,
                                                                kind="weights")}, True).records("weights", "B")
    plain = Relay(0, "A", {"weights": _weights(0)}, False).records("weights", "B")
    with pytest.raises(PayloadError, match="both sealed and plain payloads") as err:
        receive(RecordDict({**sealed, **plain}), parties["B"], "weights", "A", RUN, 0, "site B link 2")
    assert reason_of(err.value) is Reason.MALFORMED_PAYLOAD


def test_a_payload_record_that_is_not_bytes_or_holds_two_payloads_is_refused(parties: dict[str, Party]) -> None:
    floats = RecordDict({KEY_PLAIN: ArrayRecord({PAYLOAD_ENTRY: Array(np.zeros(8, dtype=np.float32))})})
    with pytest.raises(PayloadError, match="is not a byte array"):
        receive(floats, None, "weights", "A", RUN, 0, "site B link 2")
    two = RecordDict(payload_records(False, {PAYLOAD_ENTRY: _weights(0), "extra": _weights(0)}))
    with pytest.raises(SealError, match="exactly one 'payload' entry") as err:
        receive(two, None, "weights", "A", RUN, 0, "site B link 2")
    assert err.value.reason == "malformed"


def test_a_plain_payload_reaches_an_unsealed_site_as_the_exact_bytes_sent() -> None:
    data = _weights(0)
    got = receive(RecordDict(payload_records(False, {PAYLOAD_ENTRY: data})), None, "weights", "A", RUN, 0, "site B")
    assert got is not None and got.raw == data and got.header["link"] == 0


def test_refusals_are_counted_by_reason_at_the_site(parties: dict[str, Party], tmp_path: Path) -> None:
    status = SiteStatus(tmp_path / "metrics.json")
    content = _message(parties["A"], "C", 0)
    with pytest.raises(SealError):
        status.checked(lambda: receive(content, parties["B"], "weights", "A", RUN, 0, "site B link 2"))
    assert status.data["rejected"] == {"wrong-recipient": 1}


# -- the bad-input matrix for sealing keys in a site config ------------------------------------------------


@pytest.fixture
def site_config(tmp_path: Path) -> Path:
    for name in ("A", "B"):
        generate_site_keys(name, tmp_path / "keys" / name)
    shutil.copytree(tmp_path / "keys" / "B", tmp_path / "keys" / "public")
    for key in (tmp_path / "keys" / "public").glob("*.key"):
        key.unlink()
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.crt").write_text("a CA certificate\n")  # --check tests for presence only
    (tmp_path / "keys" / "site-A").write_text("an auth key\n")
    sealing = {"keys": "keys/A", "peers": {"B": "keys/public"}}
    chain = chain_settings({"data": {"synthetic": {"samples": 80}}})
    return write_site_config(tmp_path, "A", chain, "127.0.0.1:9", 1, sealing=sealing)


def _check(cfg: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = client_cli.main(["--site", "A", "-c", str(cfg), "--check"])
    return code, capsys.readouterr().err.strip()


def test_site_with_good_sealing_keys_checks_ok(site_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _check(site_config, capsys)[0] == 0


def test_missing_own_key_file_is_one_line_naming_config_and_file(site_config: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (site_config.parent / "keys" / "A" / "site-A.x25519.key").unlink()
    code, err = _check(site_config, capsys)
    assert code == 2 and "\n" not in err
    assert "site-A.yaml: sealing.keys:" in err and "site-A.x25519.key" in err and "not found" in err


def test_missing_pinned_peer_key_names_the_peer(site_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (site_config.parent / "keys" / "public" / "site-B.ed25519.pub").unlink()
    code, err = _check(site_config, capsys)
    assert code == 2 and "sealing.peers.B:" in err and "site-B.ed25519.pub" in err


def test_wrong_key_type_pinned_is_refused(site_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    public = site_config.parent / "keys" / "public"
    shutil.copyfile(public / "site-B.x25519.pub", public / "site-B.ed25519.pub")  # encryption key as signing key
    code, err = _check(site_config, capsys)
    assert code == 2 and "expected an Ed25519 public key" in err and "\n" not in err


def test_private_key_pinned_as_a_peer_is_refused(site_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    public = site_config.parent / "keys" / "public"
    shutil.copyfile(site_config.parent / "keys" / "B" / "site-B.ed25519.key", public / "site-B.ed25519.pub")
    code, err = _check(site_config, capsys)
    assert code == 2 and "holds a private key" in err


def test_private_key_readable_by_others_warns(site_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = site_config.parent / "keys" / "A" / "site-A.ed25519.key"
    os.chmod(key, 0o644)
    code, err = _check(site_config, capsys)
    assert code == 0
    warning = [line for line in err.splitlines() if "WARNING" in line and "readable by group/others" in line]
    assert len(warning) == 1 and f"chmod 600 {key}" in warning[0]


def test_unknown_sealing_key_is_a_did_you_mean(site_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site_config.write_text(site_config.read_text().replace("  peers:", "  peer:"))
    code, err = _check(site_config, capsys)
    assert code == 2 and "sealing: unknown key 'peer'; did you mean 'peers'?" in err


def test_bad_site_data_is_one_line_from_the_data_check(site_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """weckd-client reads no data itself: its check runs the executor's, and shows that one line and exit code."""
    raw = yaml.safe_load(site_config.read_text())
    raw["data"].pop("dataset", None)
    raw.pop("split", None)
    raw["data"]["sites"] = {"A": str(site_config.parent / "no-such-data")}
    site_config.write_text(yaml.safe_dump(raw))
    code, err = _check(site_config, capsys)
    missing = site_config.parent / "no-such-data"
    errors = [line for line in err.splitlines() if line.startswith("weckd: error:")]
    assert code == 1 and errors == [f"weckd: error: {missing}: data not found; check the data path in the config"]
