"""The coordinator's chain checkpoint: written after every link, read by a restarted ``weckd-server``.

``<state_dir>/chain/`` holds ``state.json`` and the last good link's relay blobs (``relay-<link>-<n>.bin``,
sealed for their recipients where the federation seals, so the checkpoint is as unreadable to the
coordinator as the wire). Every file is written to a temp file, flushed, fsync'd and renamed; the
blobs first, ``state.json`` last, so a crash at any point leaves either the previous checkpoint or
the new one. ``state.json`` carries the SHA-256 of its own body and of every blob: a torn, truncated
or edited checkpoint is reported (:class:`StateError`) and never used. ``weckd-server --fresh``
moves the folder aside and starts over.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from weckd.chain.config import config_to_mapping
from weckd.chain.errors import WeckdError

from .relay import Relay
from .settings import Federation

log = logging.getLogger(__name__)

FORMAT = "weckd-chain-state"
VERSION = 1
FOLDER = "chain"
STATE_FILE = "state.json"


@dataclass
class LinkRecord:
    """What the coordinator learned about one link (aggregates only)."""

    index: int
    site: str
    arch: str
    init: str
    metrics: dict[str, Any]
    round_trip_s: float
    bytes_to_site: int
    bytes_from_site: int
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)


class StateError(WeckdError):
    """The chain checkpoint is torn, damaged or belongs to another chain config."""


@dataclass
class ChainState:
    """Where the chain stands: completed links, skipped sites, the next slot of the schedule, the last relay."""

    run_id: str
    config_sha256: str
    links: list[LinkRecord] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    next_slot: int = 0
    relay: Relay | None = None
    completed: bool = False
    updated: float = 0.0


def config_hash(fed: Federation) -> str:
    """SHA-256 of the chain config (what the sites train), not of the coordinator's own settings."""
    body = json.dumps(config_to_mapping(fed.chain), sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(body).hexdigest()


def new_state(fed: Federation) -> ChainState:
    return ChainState(run_id=os.urandom(8).hex(), config_sha256=config_hash(fed))


def folder(state_dir: Path) -> Path:
    return Path(state_dir) / FOLDER


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def save_state(state_dir: Path, state: ChainState) -> None:
    """Checkpoint ``state`` atomically (blobs, then state.json), then drop blobs it no longer names."""
    d = folder(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    state.updated = time.time()
    blobs: dict[str, dict[str, str]] = {}
    if state.relay is not None:
        for i, (key, data) in enumerate(sorted(state.relay.blobs.items())):
            name = f"relay-{state.relay.link}-{i}.bin"
            _write_atomic(d / name, data)
            blobs[key] = {"file": name, "sha256": hashlib.sha256(data).hexdigest()}
    body = {"format": FORMAT, "version": VERSION, "run_id": state.run_id, "config_sha256": state.config_sha256,
            "links": [asdict(r) for r in state.links], "skipped": state.skipped, "next_slot": state.next_slot,
            "completed": state.completed, "updated": state.updated,
            "relay": None if state.relay is None else {"link": state.relay.link, "site": state.relay.site,
                                                      "sealed": state.relay.sealed, "blobs": blobs}}
    doc = {"body": body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()}
    _write_atomic(d / STATE_FILE, json.dumps(doc, indent=1).encode("utf-8"))
    _fsync_dir(d)
    keep = {b["file"] for b in blobs.values()}
    for old in d.glob("relay-*.bin"):
        if old.name not in keep:
            old.unlink(missing_ok=True)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_state(state_dir: Path, fed: Federation) -> ChainState | None:
    """The checkpoint in ``state_dir``, None if there is none; StateError if it cannot be trusted."""
    path = folder(state_dir) / STATE_FILE
    if not path.is_file():
        return None
    where = f"{path}"
    try:
        doc = json.loads(path.read_bytes())
        body = doc["body"]
        ok = hashlib.sha256(_canonical(body)).hexdigest() == doc["sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise _torn(where, f"not a complete checkpoint ({type(err).__name__}: {err})") from None
    if not ok:
        raise _torn(where, "its checksum does not match its content")
    if body.get("format") != FORMAT or body.get("version") != VERSION:
        raise _torn(where, f"format {body.get('format')} v{body.get('version')}, expected {FORMAT} v{VERSION}")
    if body["config_sha256"] != config_hash(fed):
        raise StateError(f"{where}: the chain config changed since this checkpoint was written (links "
                         f"{len(body['links'])} done); restore the config, or start over with weckd-server --fresh")
    state = ChainState(run_id=body["run_id"], config_sha256=body["config_sha256"],
                       links=[LinkRecord(**r) for r in body["links"]], skipped=list(body["skipped"]),
                       next_slot=int(body["next_slot"]), completed=bool(body["completed"]),
                       updated=float(body["updated"]))
    if body["relay"] is not None:
        state.relay = _load_relay(folder(state_dir), body["relay"], where)
    return state


def _load_relay(d: Path, meta: dict[str, Any], where: str) -> Relay:
    blobs = {}
    for key, ref in meta["blobs"].items():
        p = d / ref["file"]
        try:
            data = p.read_bytes()
        except OSError as err:
            raise _torn(where, f"relay file {p.name} is unreadable ({err.strerror})") from None
        if hashlib.sha256(data).hexdigest() != ref["sha256"]:
            raise _torn(where, f"relay file {p.name} does not match its recorded SHA-256")
        blobs[key] = data
    return Relay(int(meta["link"]), str(meta["site"]), blobs, bool(meta["sealed"]))


def _torn(where: str, why: str) -> StateError:
    return StateError(f"{where}: torn or damaged chain checkpoint: {why}; it is not used. Move the folder aside to "
                      "inspect it, or start over with weckd-server --fresh")


def discard_state(state_dir: Path) -> Path | None:
    """Move the checkpoint folder aside (``chain.discarded-<time>``); return where it went."""
    d = folder(state_dir)
    if not d.exists():
        return None
    target = d.with_name(f"{FOLDER}.discarded-{time.strftime('%Y%m%dT%H%M%S')}")
    os.replace(d, target)
    return target
