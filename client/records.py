"""Payloads in and out of Flower records (both sides use this; ``weckd.chain.payload`` stays Flower-free)."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from weckd.chain.errors import PayloadError
from weckd.chain.payload import KEY_ARRAYS, KEY_HEADER, payload_from_bytes


def payload_records_from_bytes(data: bytes, header_key: str = KEY_HEADER, arrays_key: str = KEY_ARRAYS
                               ) -> dict[str, Any]:
    """A payload (``chain.payload.payload_bytes``) as a ConfigRecord (header) and an ArrayRecord (arrays)."""
    header, buffers = payload_from_bytes(data)
    arrays = ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in buffers.items()})
    return {header_key: ConfigRecord(header), arrays_key: arrays}


def read_payload(content: RecordDict, where: str, header_key: str = KEY_HEADER,
                 arrays_key: str = KEY_ARRAYS) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """(header, arrays) of a received payload, or None when the message carries none."""
    if header_key not in content.config_records:
        return None
    if arrays_key not in content.array_records:
        raise PayloadError(f"{where}: payload header without arrays; upgrade weckd on both sides")
    header = dict(content.config_records[header_key])
    arrays = {name: arr.numpy() for name, arr in content.array_records[arrays_key].items()}
    return header, arrays


def config_dict(content: RecordDict, key: str, where: str) -> Mapping[str, Any]:
    """A ConfigRecord that must be present (a missing one means mismatched weckd versions)."""
    if key not in content.config_records:
        raise PayloadError(f"{where}: message lacks {key!r}; upgrade weckd on both sides")
    return dict(content.config_records[key])
