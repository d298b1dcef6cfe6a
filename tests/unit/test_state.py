"""The chain checkpoint: atomic, self-checking, never used when torn; the site's stored last link."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from weckd.client.linkstore import LinkOutput, LinkStore, link_key
from weckd.server.relay import Relay
from weckd.server.state import ChainState, LinkRecord, StateError, discard_state, load_state, new_state, save_state

from .fake_grid import federation


def _state(tmp_path: Path) -> tuple[ChainState, Path]:
    fed = federation(tmp_path, ["A", "B"])
    state = new_state(fed)
    state.links.append(LinkRecord(0, "A", "test_resnet", "scratch", {"val-accuracy": 0.7, "epoch-ce": [1.0]},
                                  3.5, 100, 200, {"B": {"accuracy": 0.6, "n": 10, "confusion": [1, 2, 3, 4]}}))
    state.next_slot = 1
    state.relay = Relay(0, "A", {"weights:B": b"\x01" * 64, "weights:A": b"\x02" * 64}, True)
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
    state.relay = Relay(1, "B", {"weights:A": b"\x03" * 8}, True)
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
