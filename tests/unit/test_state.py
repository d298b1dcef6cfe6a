"""The chain checkpoint: atomic, private, keyed (HMAC), never used when torn or forged; the site's stored
last link."""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from weckd.chain.files import check_run_id
from weckd.client.linkstore import LinkOutput, LinkStore, link_key
from weckd.server.relay import Relay
from weckd.server.state import (
    ChainState,
    CheckpointBlobs,
    LinkRecord,
    StateError,
    discard_state,
    held_on_disk,
    load_state,
    new_run_id,
    new_state,
    save_state,
)

from .fake_grid import federation


def _state(tmp_path: Path) -> tuple[ChainState, Path]:
    fed = federation(tmp_path, ["A", "B"])
    state = new_state(fed)
    state.links.append(LinkRecord(0, "A", "test_resnet", "scratch", {"val-accuracy": 0.7, "epoch-ce": [1.0]},
                                  3.5, 100, 200, {"B": {"accuracy": 0.6, "n": 10, "confusion": [1, 2, 3, 4]}}))
    state.next_slot = 1
    state.relay = Relay(0, "A", {"weights": b"\x01" * 64, "logits": b"\x02" * 64}, True)
    save_state(tmp_path / "state", state)
    return state, tmp_path / "state" / "chain"


def test_checkpoint_round_trips(tmp_path: Path) -> None:
    state, _ = _state(tmp_path)
    got = load_state(tmp_path / "state", federation(tmp_path, ["A", "B"]))
    assert got is not None
    assert (got.run_id, got.links, got.next_slot, got.relay) == (state.run_id, state.links, 1, state.relay)


def test_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert load_state(tmp_path / "nothing", federation(tmp_path, ["A", "B"])) is None


@pytest.mark.parametrize("damage", ["truncate", "edit", "empty"])
def test_torn_or_edited_state_file_is_reported_never_used(tmp_path: Path, damage: str) -> None:
    _, d = _state(tmp_path)
    path = d / "state.json"
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "edit":
        path.write_text(text.replace('"next_slot": 1', '"next_slot": 2'))
    else:
        path.write_text("")
    with pytest.raises(StateError, match="torn or damaged chain checkpoint.*--fresh"):
        load_state(tmp_path / "state", federation(tmp_path, ["A", "B"]))


def test_damaged_or_missing_relay_blob_is_reported(tmp_path: Path) -> None:
    _, d = _state(tmp_path)
    blob = sorted(d.glob("relay-*.bin"))[0]
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
    with pytest.raises(StateError, match="does not match its recorded SHA-256"):
        load_state(tmp_path / "state", federation(tmp_path, ["A", "B"]))
    blob.unlink()
    with pytest.raises(StateError, match="unreadable"):
        load_state(tmp_path / "state", federation(tmp_path, ["A", "B"]))


def test_checkpoint_of_another_chain_config_is_refused(tmp_path: Path) -> None:
    _state(tmp_path)
    with pytest.raises(StateError, match="chain config changed"):
        load_state(tmp_path / "state", federation(tmp_path, ["B", "A"]))


def test_a_new_checkpoint_drops_the_previous_relay_files(tmp_path: Path) -> None:
    state, d = _state(tmp_path)
    state.relay = Relay(1, "B", {"weights": b"\x03" * 8}, True)
    save_state(tmp_path / "state", state)
    assert [p.name for p in d.glob("relay-*.bin")] == ["relay-1-0.bin"]
    assert json.loads((d / "state.json").read_text())["body"]["relay"]["link"] == 1


def test_fresh_moves_the_checkpoint_aside(tmp_path: Path) -> None:
    _, d = _state(tmp_path)
    moved = discard_state(tmp_path / "state")
    assert moved is not None and (moved / "state.json").is_file() and not d.exists()
    assert load_state(tmp_path / "state", federation(tmp_path, ["A", "B"])) is None


def test_site_answers_the_same_link_request_from_its_store(tmp_path: Path) -> None:
    store = LinkStore(tmp_path)
    key = link_key({"link": 1, "run-id": "r", "seal-for": "weights:C"}, {"epochs": 2}, b"teacher")
    out = LinkOutput({"weights": b"w" * 10}, {"val-accuracy": 0.5}, {"arch": "test_resnet"})
    store.put(key, out)
    assert store.get(key) == out
    same = link_key({"link": 1, "run-id": "r", "seal-for": "weights:A,weights:C"}, {"epochs": 2}, b"teacher")
    assert same == key  # whom to seal for is routing, not part of what was trained
    assert store.get(link_key({"link": 1, "run-id": "r"}, {"epochs": 2}, b"other teacher")) is None
    assert store.get(link_key({"link": 2, "run-id": "r"}, {"epochs": 2}, b"teacher")) is None


def test_site_store_with_a_damaged_payload_trains_again(tmp_path: Path) -> None:
    store = LinkStore(tmp_path)
    store.put("k", LinkOutput({"weights": b"w" * 10}, {}, {}))
    (tmp_path / "last-link" / "weights.bin").write_bytes(b"x" * 10)
    assert store.get("k") is None


# ---------------------------------------------------------------- keyed checkpoint, run ids, modes


def _doc(d: Path) -> dict[str, Any]:
    return json.loads((d / "state.json").read_text())


def _write_signed(tmp_path: Path, body: Any) -> None:
    """What only a holder of chain.key could write: a body with a valid HMAC."""
    key = (tmp_path / "state" / "chain.key").read_bytes()
    mac = hmac.new(key, json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), hashlib.sha256).hexdigest()
    (tmp_path / "state" / "chain" / "state.json").write_text(json.dumps({"body": body, "hmac-sha256": mac}))


def _load(tmp_path: Path) -> ChainState | None:
    return load_state(tmp_path / "state", federation(tmp_path, ["A", "B"]))


def test_new_run_ids_are_time_ordered_plain_names() -> None:
    early = new_run_id(dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc))
    late = new_run_id(dt.datetime(2025, 1, 1, 12, 0, 1, tzinfo=dt.timezone.utc))
    assert early.startswith("20250101T120000Z-") and len(early) == 29 and early < late
    assert check_run_id(early) == early


def test_checkpoint_files_are_private_under_umask_022(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        _, d = _state(tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [d, tmp_path / "state" / "chain.key", *d.iterdir()]}
    assert modes.pop("chain") == 0o700 and set(modes.values()) == {0o600}
    assert len((tmp_path / "state" / "chain.key").read_bytes()) == 32


def test_edited_checkpoint_with_recomputed_checksum_is_refused(tmp_path: Path) -> None:
    _, d = _state(tmp_path)
    doc = _doc(d)
    doc["body"]["next_slot"] = 2
    doc["hmac-sha256"] = hashlib.sha256(json.dumps(doc["body"], sort_keys=True, separators=(",", ":")).encode()
                                        ).hexdigest()
    (d / "state.json").write_text(json.dumps(doc))
    with pytest.raises(StateError, match="torn or damaged chain checkpoint: its hmac-sha256 does not match"):
        _load(tmp_path)


def test_blob_name_outside_the_folder_is_refused_and_never_read(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, d = _state(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"coordinator secret")
    body = _doc(d)["body"]
    ref = next(iter(body["relay"]["blobs"].values()))
    ref["file"], ref["sha256"] = "../../secret.txt", hashlib.sha256(secret.read_bytes()).hexdigest()
    _write_signed(tmp_path, body)
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    with pytest.raises(StateError, match="torn or damaged.*relay-<link>-<n>.bin"):
        _load(tmp_path)
    assert not any("secret" in p for p in opened)


@pytest.mark.parametrize("content", ["[1, 2]", '"body"', "null"])
def test_state_file_of_the_wrong_json_type_is_a_typed_refusal(tmp_path: Path, content: str) -> None:
    _, d = _state(tmp_path)
    (d / "state.json").write_text(content)
    with pytest.raises(StateError, match="torn or damaged chain checkpoint: the file is .*expected an object"):
        _load(tmp_path)


@pytest.mark.parametrize("body", [["format", 2], "weckd-chain-state", 7])
def test_signed_body_of_the_wrong_json_type_is_a_typed_refusal(tmp_path: Path, body: Any) -> None:
    _state(tmp_path)
    _write_signed(tmp_path, body)
    with pytest.raises(StateError, match="torn or damaged chain checkpoint: the file.body is .*expected an object"):
        _load(tmp_path)


@pytest.mark.parametrize("field, value", [("next_slot", "1"), ("next_slot", -1), ("completed", 1),
                                          ("links", {}), ("run_id", "../../x"), ("updated", None)])
def test_signed_field_of_the_wrong_type_or_range_is_refused(tmp_path: Path, field: str, value: Any) -> None:
    _, d = _state(tmp_path)
    body = _doc(d)["body"]
    body[field] = value
    _write_signed(tmp_path, body)
    with pytest.raises(StateError, match=f"torn or damaged chain checkpoint: body.{field} is"):
        _load(tmp_path)


def test_checkpoint_with_its_key_file_missing_is_refused(tmp_path: Path) -> None:
    _state(tmp_path)
    (tmp_path / "state" / "chain.key").unlink()
    with pytest.raises(StateError, match="chain.key: the key that signs the chain checkpoint is missing.*--fresh"):
        _load(tmp_path)


def test_checkpoint_without_an_hmac_is_reported_not_verifiable(tmp_path: Path) -> None:
    _, d = _state(tmp_path)
    body = _doc(d)["body"]
    old = {"body": body, "sha256": hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
                                                  ).hexdigest()}
    (d / "state.json").write_text(json.dumps(old))
    with pytest.raises(StateError, match="without an HMAC: it cannot be verified.*weckd-server --fresh"):
        _load(tmp_path)


def test_relay_blob_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    _, d = _state(tmp_path)
    blob = sorted(d.glob("relay-*.bin"))[0]
    (tmp_path / "elsewhere.bin").write_bytes(blob.read_bytes())
    blob.unlink()
    blob.symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(StateError, match=r"relay file relay-\d+-\d+\.bin leads out of the folder"):
        _load(tmp_path)


def test_fresh_start_after_discard_gets_a_new_key(tmp_path: Path) -> None:
    _state(tmp_path)
    key = (tmp_path / "state" / "chain.key").read_bytes()
    moved = discard_state(tmp_path / "state")
    assert moved is not None and (moved / "chain.key").read_bytes() == key
    _state(tmp_path)
    assert (tmp_path / "state" / "chain.key").read_bytes() != key and _load(tmp_path) is not None


def test_fresh_drops_a_completed_chains_relay_files_and_keeps_an_unfinished_ones(tmp_path: Path) -> None:
    state, d = _state(tmp_path)
    assert sorted(p.name for p in d.glob("relay-*.bin")) == ["relay-0-0.bin", "relay-0-1.bin"]
    unfinished = discard_state(tmp_path / "state")
    assert unfinished is not None and len(list(unfinished.glob("relay-*.bin"))) == 2  # resumable by hand
    state, d = _state(tmp_path)
    state.completed = True
    save_state(tmp_path / "state", state)
    done = discard_state(tmp_path / "state")
    assert done is not None and list(done.glob("relay-*.bin")) == []  # its outputs are in out/
    assert json.loads((done / "state.json").read_text())["body"]["completed"] is True


def test_a_relay_shares_one_record_among_its_messages_and_keeps_none_after_them() -> None:
    """Every message that carries a relayed payload holds the same record (one copy in the ServerApp); once no
    message does, the relay, kept as the checkpoint, holds only its bytes, not a second copy in a record."""
    import gc

    from weckd.server.wire import content_bytes

    relay = Relay(0, "A", {"weights": b"\x05" * 4096}, False)
    to_b, to_c = relay.records("weights", "B"), relay.records("weights", "C")
    assert list(to_b) == ["plain"] and to_b["plain"] is to_c["plain"]
    del to_b, to_c
    gc.collect()
    assert len(relay._records) == 0
    again = relay.records("weights", "B")
    from flwr.app import RecordDict

    assert content_bytes(RecordDict(again)) == 4096  # counted from dtype and shape, the payload not decoded


def test_a_relay_held_on_disk_reads_each_blob_from_its_file_checked(tmp_path: Path) -> None:
    state, d = _state(tmp_path)
    assert state.relay is not None
    held = held_on_disk(state.relay)
    assert held is not None and isinstance(held.blobs, CheckpointBlobs)
    assert (held.link, held.site, held.sealed, dict(held.blobs)) == (0, "A", True, dict(state.relay.blobs))
    blob = d / state.relay.saved[1]["weights"]["file"]  # type: ignore[index]
    blob.write_bytes(b"\x09" * 64)
    with pytest.raises(StateError, match="does not match its recorded SHA-256"):
        held.blobs["weights"]


def test_saving_a_relay_held_on_disk_keeps_its_files(tmp_path: Path) -> None:
    state, d = _state(tmp_path)
    state.relay = held_on_disk(state.relay)
    before = {p.name: p.stat().st_ino for p in d.glob("relay-*.bin")}
    state.skipped.append("B")
    save_state(tmp_path / "state", state)
    assert {p.name: p.stat().st_ino for p in d.glob("relay-*.bin")} == before
    got = load_state(tmp_path / "state", federation(tmp_path, ["A", "B"]))
    assert got is not None and got.skipped == ["B"] and got.relay is not None
    assert dict(got.relay.blobs) == {"weights": b"\x01" * 64, "logits": b"\x02" * 64}


def test_a_relay_never_checkpointed_is_held_as_it_is() -> None:
    relay = Relay(0, "A", {"weights": b"\x01"}, False)
    assert held_on_disk(relay) is relay and held_on_disk(None) is None
