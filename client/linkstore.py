"""The last link this site trained, kept so that a repeated request is answered without training twice.

A coordinator that restarts mid-link (or retries a link whose reply was lost) sends the same link of
the same chain run again, with the same teacher. The site then answers from ``<state_dir>/last-link/``:
the same payloads (re-sealed for whoever is asked for now), metrics and info. The key covers the chain
run id, the link, the teacher's bytes and every setting the message carries, so anything different is
trained anew. The latest link is kept there; the site's earlier links of the same run move to
``<state_dir>/kept-links/<link>/`` (any of them may be handed over as the chain's final model, see
``client.app``), and are removed when the site trains a link of another run. They are the site's own
models; they never leave the site except as the payloads it already sent.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from weckd.chain.files import atomic_write, atomic_write_text, inside, private_dir, staged_dir
from weckd.chain.payload import KINDS, MAX_HEADER_BYTES, MAX_PAYLOAD_BYTES

log = logging.getLogger(__name__)

FOLDER = "last-link"
KEPT = "kept-links"
MAX_META_BYTES = 1 << 20  # 1 MiB: a record is ~2 KB of metrics
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SCALARS = (str, int, float, bool)


@dataclass(frozen=True)
class LinkOutput:
    """What a trained link sends back: payload bytes per kind, metrics and info (aggregates only)."""

    payloads: dict[str, bytes]
    metrics: dict[str, Any]
    info: dict[str, Any]


def link_key(run: Mapping[str, Any], settings: Mapping[str, Any], teacher: bytes) -> str:
    """Identity of a link request: the run config minus routing, the link settings and the teacher bytes."""
    # recomputed per request; the outputs do not depend on them (the number of links does: with
    # lr_schedule: chain it sets this link's slice of the learning-rate schedule)
    routing = {"seal-for", "schedule"}
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in run.items() if k not in routing}, sort_keys=True, default=str).encode())
    h.update(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    h.update(hashlib.sha256(teacher).digest())
    return h.hexdigest()


class LinkStore:
    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir) / FOLDER

    def get(self, key: str) -> LinkOutput | None:
        """The stored link if it answers ``key``, else None. The store is only a cache: a damaged one
        (unreadable or malformed record, a payload missing, over size or off its checksum) is ignored
        with one warning and the link is trained anew."""
        meta = self._read_meta()
        if meta is None or meta["key"] != key:
            return None
        return _load(self.dir, meta)

    def _read_meta(self, folder: Path | None = None) -> dict[str, Any] | None:
        path = (folder or self.dir) / "meta.json"
        if not path.exists():
            return None  # nothing stored: the usual case
        raw = _read_capped(path, MAX_META_BYTES)
        try:
            meta = json.loads(raw.decode("utf-8")) if raw is not None else None
        except (ValueError, RecursionError):
            meta = None
        if not _valid_meta(meta):
            log.warning("%s: stored link record is unreadable or malformed; ignoring it and training again", path)
            return None
        return meta

    def get_link(self, run_id: str, link: int) -> LinkOutput | None:
        """The stored output of link ``link`` of run ``run_id`` (a hand-over of it as the final model), or None."""
        for folder in (self.dir, self.dir.parent / KEPT / str(link)):
            meta = self._read_meta(folder) if folder.is_dir() else None
            if meta is not None and meta.get("run") == run_id and meta.get("link") == link:
                return _load(folder, meta)
        return None

    def put(self, key: str, out: LinkOutput, run_id: str = "", link: int = -1) -> None:
        """Replace the stored link whole (staged beside it, then renamed into place). The link it replaces
        is kept under ``kept-links/`` when it is an earlier link of the same run; the kept links of
        other runs are removed."""
        kept = self.dir.parent / KEPT
        prev = self._read_meta() if self.dir.is_dir() else None
        same_run = prev is not None and bool(run_id) and prev.get("run") == run_id
        if not same_run and kept.exists():
            shutil.rmtree(kept)
        elif same_run and prev is not None and type(prev.get("link")) is int and 0 <= prev["link"] != link:
            target = private_dir(kept) / str(prev["link"])
            if target.exists():
                shutil.rmtree(target)
            os.replace(self.dir, target)
        with staged_dir(self.dir) as stage:
            for kind, data in out.payloads.items():
                atomic_write(inside(stage, f"{kind}.bin"), data)
            meta = {"key": key, "run": run_id, "link": link, "kinds": list(out.payloads), "metrics": out.metrics,
                    "info": out.info, "sha256": {k: hashlib.sha256(d).hexdigest() for k, d in out.payloads.items()}}
            atomic_write_text(stage / "meta.json", json.dumps(meta))


def _load(folder: Path, meta: dict[str, Any]) -> LinkOutput | None:
    payloads: dict[str, bytes] = {}
    for kind in meta["kinds"]:
        data = _read_capped(folder / f"{kind}.bin", MAX_PAYLOAD_BYTES + MAX_HEADER_BYTES)
        if data is None or hashlib.sha256(data).hexdigest() != meta["sha256"][kind]:
            log.warning("%s: stored link does not match its checksums; training again", folder)
            return None
        payloads[kind] = data
    return LinkOutput(payloads, meta["metrics"], meta["info"])


def _valid_meta(meta: Any) -> bool:
    """A record as :meth:`LinkStore.put` writes it: a checksum for every payload kind it lists."""
    if type(meta) is not dict or type(meta.get("key")) is not str:
        return False
    kinds, sums = meta.get("kinds"), meta.get("sha256")
    if type(kinds) is not list or not kinds or len(set(kinds)) != len(kinds) or not set(kinds) <= set(KINDS):
        return False
    if type(sums) is not dict or set(sums) != set(kinds):
        return False
    if not all(type(h) is str and _SHA256.fullmatch(h) for h in sums.values()):
        return False
    return _flat_record(meta.get("metrics")) and _flat_record(meta.get("info"))


def _flat_record(record: Any) -> bool:
    """A mapping of names to scalars or lists of scalars (what a Flower record holds)."""
    if type(record) is not dict:
        return False
    return all(type(v) in _SCALARS or (type(v) is list and all(type(x) in _SCALARS for x in v))
               for v in record.values())


def _read_capped(path: Path, limit: int) -> bytes | None:
    """The bytes of a regular file of at most ``limit`` bytes, else None."""
    try:
        with path.open("rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
                return None
            data = fh.read(limit + 1)
    except OSError:
        return None
    return data if len(data) <= limit else None
