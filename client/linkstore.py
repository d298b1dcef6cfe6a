"""The last link this site trained, kept so that a repeated request is answered without training twice.

A coordinator that restarts mid-link (or retries a link whose reply was lost) sends the same link of
the same chain run again, with the same teacher. The site then answers from ``<state_dir>/last-link/``:
the same payloads (re-sealed for whoever is asked for now), metrics and info. The key covers the chain
run id, the link, the teacher's bytes and every setting the message carries, so anything different is
trained anew. Only the latest link is kept; it is the site's own model, it never leaves the site
except as the payloads it already sent.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from weckd.chain.artifacts import staged_dir

log = logging.getLogger(__name__)

FOLDER = "last-link"


@dataclass(frozen=True)
class LinkOutput:
    """What a trained link sends back: payload bytes per kind, metrics and info (aggregates only)."""

    payloads: dict[str, bytes]
    metrics: dict[str, Any]
    info: dict[str, Any]


def link_key(run: Mapping[str, Any], settings: Mapping[str, Any], teacher: bytes) -> str:
    """Identity of a link request: the run config minus routing, the link settings and the teacher bytes."""
    routing = {"seal-for", "n-links", "schedule"}  # recomputed per request; the outputs do not depend on them
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in run.items() if k not in routing}, sort_keys=True, default=str).encode())
    h.update(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    h.update(hashlib.sha256(teacher).digest())
    return h.hexdigest()


class LinkStore:
    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir) / FOLDER

    def get(self, key: str) -> LinkOutput | None:
        try:
            meta = json.loads((self.dir / "meta.json").read_text(encoding="utf-8"))
            if meta["key"] != key:
                return None
            payloads = {kind: (self.dir / f"{kind}.bin").read_bytes() for kind in meta["kinds"]}
        except (OSError, ValueError, KeyError):
            return None
        if any(hashlib.sha256(payloads[k]).hexdigest() != h for k, h in meta["sha256"].items()):
            log.warning("%s: stored link does not match its checksums; training again", self.dir)
            return None
        return LinkOutput(payloads, meta["metrics"], meta["info"])

    def put(self, key: str, out: LinkOutput) -> None:
        """Replace the stored link whole (staged beside it, then renamed into place)."""
        with staged_dir(self.dir) as stage:
            for kind, data in out.payloads.items():
                (stage / f"{kind}.bin").write_bytes(data)
            meta = {"key": key, "kinds": list(out.payloads), "metrics": out.metrics, "info": out.info,
                    "sha256": {k: hashlib.sha256(d).hexdigest() for k, d in out.payloads.items()}}
            (stage / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
