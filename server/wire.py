"""Message traffic as the coordinator sees it: relay byte counts and an optional wire log.

The wire log (one JSON line per message sent or received: every record, every array's name, shape,
dtype and size, the tensors each plain payload declares, every config/metric key) is how the tests
prove that only weights, logits and aggregate metrics cross the coordinator. It is switched on by the
``wire-log`` run-config key.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict
from weckd.chain.errors import PayloadError
from weckd.chain.files import append_text
from weckd.chain.payload import read_index
from weckd.chain.protocol import KEY_PLAIN


def content_bytes(content: RecordDict) -> int:
    """Bytes of every array in a message's content."""
    return sum(array_nbytes(arr) for rec in content.array_records.values() for arr in rec.values())


def array_nbytes(arr: Any) -> int:
    """The bytes an array holds, from its declared dtype and shape (``arr.numpy()`` would decode a copy of
    each relayed payload just to count it). An array whose dtype numpy does not know (a malformed reply,
    refused later by the relay with its reason) counts its serialised bytes."""
    import numpy as np

    try:
        return int(np.dtype(arr.dtype).itemsize * math.prod(arr.shape))
    except (TypeError, ValueError):
        return len(arr.data)


def describe(content: RecordDict) -> dict[str, Any]:
    """Every record of a message's content: arrays by name/shape/dtype/bytes, other records by key."""
    out: dict[str, Any] = {"arrays": {}, "configs": {}, "metrics": {}}
    for key, rec in content.array_records.items():
        out["arrays"][key] = [{"name": name, "shape": list(arr.shape), "dtype": str(arr.dtype),
                               "bytes": array_nbytes(arr)} for name, arr in rec.items()]
    if KEY_PLAIN in content.array_records:  # plain payloads: the tensors each declares, and its header's bytes
        for name, arr in content.array_records[KEY_PLAIN].items():
            try:
                index = read_index(arr.numpy().tobytes(), f"{KEY_PLAIN}/{name}")
            except PayloadError as err:  # the relay refuses it with its reason; the log says what it saw
                out.setdefault("unreadable", {})[f"{KEY_PLAIN}/{name}"] = getattr(err, "reason", "malformed-payload")
                continue
            out.setdefault("tensors", {})[f"{KEY_PLAIN}/{name}"] = [
                {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in index.tensors]
            out.setdefault("headers", {})[f"{KEY_PLAIN}/{name}"] = index.data_start
    for key, crec in content.config_records.items():
        out["configs"][key] = {k: _value_shape(v) for k, v in crec.items()}
    for key, mrec in content.metric_records.items():
        out["metrics"][key] = {k: _value_shape(v) for k, v in mrec.items()}
    return out


def _value_shape(value: Any) -> dict[str, Any]:
    if isinstance(value, (list, tuple)):
        return {"type": "list", "len": len(value)}
    if isinstance(value, (bytes, bytearray)):
        return {"type": "bytes", "len": len(value)}
    if isinstance(value, str):
        return {"type": "str", "len": len(value)}
    return {"type": type(value).__name__}


class WireLog:
    """Appends one JSON line per message to ``path``; a no-op without a path."""

    def __init__(self, path: str) -> None:
        self.path = Path(path) if path else None

    def record(self, direction: str, site: str, message: Message) -> None:
        if self.path is None or message.has_error():
            return
        line = {"t": time.time(), "direction": direction, "site": site,
                "type": message.metadata.message_type, **describe(message.content)}
        append_text(self.path, json.dumps(line) + "\n")
