"""The coordinator's chain checkpoint: written after every link, read by a restarted ``weckd-server``.

``<state_dir>/chain/`` holds ``state.json`` and the last good link's relay blobs (``relay-<link>-<n>.bin``,
sealed for their recipients where the federation seals, so the checkpoint is as unreadable to the
coordinator as the wire). Every file is written by :func:`weckd.chain.files.atomic_write` (0600, never
through a link; the folder 0700); the blobs first, ``state.json`` last, so a crash at any point leaves
either the previous checkpoint or the new one.

``state.json`` carries an HMAC-SHA256 of its body keyed with ``<state_dir>/chain.key``: 32 random bytes
made 0600 on first use, local to the coordinator, never sent anywhere. The body names every blob's
SHA-256. :func:`load_state` checks the HMAC, then every field's type and range, every blob's file name
(only names :func:`save_state` writes) and that the blob is a plain file in the folder: a torn,
truncated, edited or forged checkpoint is reported (:class:`StateError`) and never used. A checkpoint
of a weckd without the HMAC cannot be verified and is reported the same way. ``weckd-server --fresh``
moves the folder (and its key) aside and starts over.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from weckd.chain.config import config_to_mapping
from weckd.chain.errors import WeckdError
from weckd.chain.files import RUN_ID, atomic_write, check_run_id, inside, private_dir

from .relay import Relay
from .settings import Federation

log = logging.getLogger(__name__)

FORMAT = "weckd-chain-state"
VERSION = 3  # 1: unkeyed SHA-256 of the body; 2: sealed relay blobs per recipient (now one per kind)
FOLDER = "chain"
STATE_FILE = "state.json"
KEY_FILE = "chain.key"
KEY_BYTES = 32
MAC_FIELD = "hmac-sha256"
BLOB_FILE = re.compile(r"relay-(0|[1-9][0-9]{0,8})-(0|[1-9][0-9]{0,8})\.bin")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_OPEN = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


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
    """The chain checkpoint is torn, damaged, forged or belongs to another chain config."""


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
    delivered: bool = False  # the final model went out (the last link's, or a hand-over after skipped links)


def config_hash(fed: Federation) -> str:
    """SHA-256 of the chain config (what the sites train), not of the coordinator's own settings."""
    body = json.dumps(config_to_mapping(fed.chain), sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(body).hexdigest()


def new_run_id(now: dt.datetime | None = None) -> str:
    """A time-ordered run id (``20250101T120000Z-<12 hex>``): sites refuse a run older than their latest."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return check_run_id(f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(6)}")


def new_state(fed: Federation) -> ChainState:
    return ChainState(run_id=new_run_id(), config_sha256=config_hash(fed))


def folder(state_dir: Path) -> Path:
    return Path(state_dir) / FOLDER


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _mac(key: bytes, body: Any) -> str:
    return hmac.new(key, _canonical(body), hashlib.sha256).hexdigest()


def _read_plain(path: Path, limit: int = -1) -> bytes:
    """The bytes of a regular file, never through a symbolic link (OSError otherwise)."""
    fd = os.open(path, _OPEN)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise IsADirectoryError(0, "not a regular file", str(path))
        return fh.read(limit)


def _key(state_dir: Path, create: bool) -> bytes:
    """The coordinator's checkpoint key; made (0600) when ``create`` and missing; StateError when unusable."""
    path = Path(state_dir) / KEY_FILE
    if create and not os.path.lexists(path):
        atomic_write(path, secrets.token_bytes(KEY_BYTES), 0o600, replace=False)
        log.info("checkpoint key created: %s", path)
    try:
        data = _read_plain(path, KEY_BYTES + 1)
    except FileNotFoundError:
        raise StateError(f"{path}: the key that signs the chain checkpoint is missing, so the checkpoint cannot be "
                         "verified and is not used; start over with weckd-server --fresh") from None
    except OSError as err:
        raise StateError(f"{path}: cannot read the checkpoint key ({err.strerror or err}; a symbolic link is refused); "
                         "remove it and start over with weckd-server --fresh") from None
    if len(data) != KEY_BYTES:
        raise StateError(f"{path}: not a {KEY_BYTES}-byte checkpoint key ({len(data)} bytes); remove it and start "
                         "over with weckd-server --fresh")
    return data


def save_state(state_dir: Path, state: ChainState) -> None:
    """Checkpoint ``state`` atomically (blobs, then state.json), then drop blobs it no longer names."""
    d = private_dir(folder(private_dir(Path(state_dir))))
    key = _key(state_dir, create=True)
    state.updated = time.time()
    blobs: dict[str, dict[str, str]] = {}
    held = state.relay.blobs if state.relay is not None else None
    if isinstance(held, CheckpointBlobs) and held.folder == d:  # held on disk already: its files stay as they are
        blobs = dict(held.refs)
    elif state.relay is not None:
        for i, (name, data) in enumerate(sorted(state.relay.blobs.items())):
            file = f"relay-{state.relay.link}-{i}.bin"
            atomic_write(d / file, data)
            blobs[name] = {"file": file, "sha256": hashlib.sha256(data).hexdigest()}
        state.relay.saved = (d, blobs)
    body = {"format": FORMAT, "version": VERSION, "run_id": state.run_id, "config_sha256": state.config_sha256,
            "links": [asdict(r) for r in state.links], "skipped": state.skipped, "next_slot": state.next_slot,
            "completed": state.completed, "updated": state.updated, "delivered": state.delivered,
            "relay": None if state.relay is None else {"link": state.relay.link, "site": state.relay.site,
                                                      "sealed": state.relay.sealed, "blobs": blobs}}
    doc = {"body": body, MAC_FIELD: _mac(key, body)}
    atomic_write(d / STATE_FILE, json.dumps(doc, indent=1).encode("utf-8"))
    keep = {b["file"] for b in blobs.values()}
    for old in d.glob("relay-*.bin"):
        if old.name not in keep:
            old.unlink(missing_ok=True)


# ---------------------------------------------------------------- reading and checking


class _Bad(Exception):
    """A field of the checkpoint is missing, of the wrong type or out of range (becomes a StateError)."""


def _finite(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v) and v >= 0


KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "str": ("a string", lambda v: isinstance(v, str)),
    "bool": ("true or false", lambda v: type(v) is bool),
    "count": ("a whole number >= 0", lambda v: type(v) is int and v >= 0),
    "seconds": ("a finite number >= 0", _finite),
    "object": ("an object", lambda v: isinstance(v, dict)),
    "list": ("a list", lambda v: isinstance(v, list)),
    "sha256": ("64 lowercase hex digits", lambda v: isinstance(v, str) and _SHA256.fullmatch(v) is not None),
    "run-id": ("a plain run id", lambda v: isinstance(v, str) and RUN_ID.fullmatch(v) is not None),
    "blob-file": ("a file name relay-<link>-<n>.bin",
                  lambda v: isinstance(v, str) and BLOB_FILE.fullmatch(v) is not None),
    "relay": ("null or an object", lambda v: v is None or isinstance(v, dict)),
}
BODY = {"format": "str", "version": "count", "run_id": "run-id", "config_sha256": "sha256", "links": "list",
        "skipped": "list", "next_slot": "count", "completed": "bool", "updated": "seconds", "relay": "relay",
        "delivered": "bool"}
LINK = {"index": "count", "site": "str", "arch": "str", "init": "str", "metrics": "object", "round_trip_s": "seconds",
        "bytes_to_site": "count", "bytes_from_site": "count", "evaluations": "object"}
RELAY = {"link": "count", "site": "str", "sealed": "bool", "blobs": "object"}
BLOB = {"file": "blob-file", "sha256": "sha256"}


def _check(value: Any, kind: str, name: str) -> Any:
    what, ok = KINDS[kind]
    if not ok(value):
        raise _Bad(f"{name} is {type(value).__name__} {str(value)[:40]!r}, expected {what}")
    return value


def _fields(obj: Any, spec: dict[str, str], name: str) -> dict[str, Any]:
    """``obj`` as an object with exactly the keys of ``spec``, each of its kind."""
    _check(obj, "object", name)
    if set(obj) != set(spec):
        odd = sorted(set(obj) ^ set(spec))
        raise _Bad(f"{name} has missing or unknown keys {', '.join(map(str, odd))[:120]}")
    return {k: _check(obj[k], kind, f"{name}.{k}") for k, kind in spec.items()}


def _body(doc: Any, key: bytes) -> dict[str, Any]:
    """The body of a parsed state.json whose HMAC verifies under ``key``, its fields checked."""
    top = _fields(doc, {"body": "object", MAC_FIELD: "sha256"}, "the file")
    if not hmac.compare_digest(_mac(key, top["body"]), top[MAC_FIELD]):
        raise _Bad(f"its {MAC_FIELD} does not match its content under {KEY_FILE} (edited, forged or of another "
                   "state dir)")
    body = _fields({"delivered": False, **top["body"]}, BODY, "body")  # checkpoints before "delivered": not yet
    if body["format"] != FORMAT or body["version"] != VERSION:
        raise _Bad(f"format {body['format'][:40]} v{body['version']}, expected {FORMAT} v{VERSION}")
    for i, link in enumerate(body["links"]):
        for site, ev in _fields(link, LINK, f"links[{i}]")["evaluations"].items():
            _check(ev, "object", f"links[{i}].evaluations.{site[:40]}")
    for i, site in enumerate(body["skipped"]):
        _check(site, "str", f"skipped[{i}]")
    if body["relay"] is not None:
        relay = _fields(body["relay"], RELAY, "relay")
        for name, ref in relay["blobs"].items():
            blob = _fields(ref, BLOB, f"relay.blobs.{name[:40]}")
            match = BLOB_FILE.fullmatch(blob["file"])
            assert match is not None  # checked by _fields
            if not name or match.group(1) != str(relay["link"]):
                raise _Bad(f"relay.blobs.{name[:40]!r}: file {blob['file']} is not a blob of link {relay['link']}")
    return body


def load_state(state_dir: Path, fed: Federation) -> ChainState | None:
    """The checkpoint in ``state_dir``, None if there is none; StateError if it cannot be trusted."""
    d = folder(state_dir)
    path = d / STATE_FILE
    if not os.path.lexists(path):
        return None
    where = f"{path}"
    try:
        doc = json.loads(_read_plain(path))
    except (OSError, ValueError) as err:
        raise _torn(where, f"not a complete checkpoint ({type(err).__name__}: {str(err)[:80]})") from None
    if isinstance(doc, dict) and MAC_FIELD not in doc and "sha256" in doc:
        raise StateError(f"{where}: chain checkpoint of an earlier weckd, without an HMAC: it cannot be verified and "
                         "is not used. Start over with weckd-server --fresh")
    key = _key(state_dir, create=False)
    try:
        body = _body(doc, key)
    except _Bad as err:
        raise _torn(where, str(err)) from None
    if body["config_sha256"] != config_hash(fed):
        raise StateError(f"{where}: the chain config changed since this checkpoint was written (links "
                         f"{len(body['links'])} done); restore the config, or start over with weckd-server --fresh")
    state = ChainState(run_id=body["run_id"], config_sha256=body["config_sha256"],
                       links=[LinkRecord(**r) for r in body["links"]], skipped=list(body["skipped"]),
                       next_slot=body["next_slot"], completed=body["completed"], updated=float(body["updated"]),
                       delivered=body["delivered"])
    if body["relay"] is not None:
        state.relay = _load_relay(d, body["relay"], where)
    return state


def _load_relay(d: Path, meta: dict[str, Any], where: str) -> Relay:
    """The relay blobs the (already checked) body names, each a plain file in ``d`` matching its SHA-256."""
    refs = {name: {"file": ref["file"], "sha256": ref["sha256"]} for name, ref in meta["blobs"].items()}
    blobs = {name: _read_blob(d, ref, where) for name, ref in refs.items()}
    return Relay(meta["link"], meta["site"], blobs, meta["sealed"], saved=(d, refs))


def _read_blob(d: Path, ref: dict[str, str], where: str) -> bytes:
    try:
        data = _read_plain(inside(d, ref["file"]))
    except OSError as err:
        raise _torn(where, f"relay file {ref['file']} is unreadable ({err.strerror or err})") from None
    except WeckdError:
        raise _torn(where, f"relay file {ref['file']} leads out of the folder (a symbolic link?)") from None
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise _torn(where, f"relay file {ref['file']} does not match its recorded SHA-256")
    return data


class CheckpointBlobs(Mapping[str, bytes]):
    """A checkpointed relay's blobs, each read from its file when a message needs it again (and checked against
    the SHA-256 recorded for it when it was written, as :func:`load_state` checks it)."""

    def __init__(self, folder: Path, refs: dict[str, dict[str, str]]) -> None:
        self.folder, self.refs = folder, refs

    def __getitem__(self, name: str) -> bytes:
        return _read_blob(self.folder, self.refs[name], str(self.folder / STATE_FILE))

    def __iter__(self) -> Iterator[str]:
        return iter(self.refs)

    def __len__(self) -> int:
        return len(self.refs)


def held_on_disk(relay: Relay | None) -> Relay | None:
    """``relay`` as its checkpoint holds it: the same link, site and kinds, each blob read from its file when a
    message needs it again (a retry, the link after a skipped site, the final model of a chain whose last link
    was skipped). While a link trains, the ServerApp then does not hold its teacher payload beside the reply it
    pulls (a payload less at its peak). ``relay`` itself where :func:`save_state` never wrote it."""
    if relay is None or relay.saved is None or isinstance(relay.blobs, CheckpointBlobs):
        return relay
    d, refs = relay.saved
    return Relay(relay.link, relay.site, CheckpointBlobs(d, refs), relay.sealed, saved=relay.saved)


def _torn(where: str, why: str) -> StateError:
    return StateError(f"{where}: torn or damaged chain checkpoint: {why}; it is not used. Move the folder aside to "
                      "inspect it, or start over with weckd-server --fresh")


def discard_state(state_dir: Path) -> Path | None:
    """Move the checkpoint folder aside (``chain.discarded-<time>``), with the key that signed it; return where.

    A completed chain's relay blobs go: its outputs are in the output folder, and a coordinator that runs
    chain after chain would otherwise keep one final model per chain. An unfinished chain keeps them (it
    can still be inspected and resumed by hand)."""
    d = folder(state_dir)
    if not os.path.lexists(d):
        return None
    target = d.with_name(f"{FOLDER}.discarded-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}")
    os.replace(d, target)
    if not target.is_dir() or target.is_symlink():
        return target
    key = Path(state_dir) / KEY_FILE
    if os.path.lexists(key):
        os.replace(key, target / KEY_FILE)  # a fresh chain gets a fresh key
    if _completed(target / STATE_FILE):
        for blob in target.glob("relay-*.bin"):
            if BLOB_FILE.fullmatch(blob.name):
                blob.unlink(missing_ok=True)
    return target


def _completed(path: Path) -> bool:
    """Whether the checkpoint at ``path`` says its chain is complete (False where it cannot be read)."""
    try:
        body = json.loads(_read_plain(path)).get("body", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(body, dict) and body.get("completed") is True
