"""Payload bytes taken apart and put back together, to forge hostile payloads in tests."""
from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
from weckd.chain.payload import Payload, payload_bytes, payload_from_bytes


def wire(payload: Payload) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, arrays) as a receiver decodes ``payload`` after the wire."""
    return payload_from_bytes(payload_bytes(payload))


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """A payload's parsed JSON header and its data section."""
    (n,) = struct.unpack_from("<Q", data)
    return json.loads(data[8:8 + n]), data[8 + n:]


def framed(head: bytes, body: bytes = b"") -> bytes:
    """Raw header bytes and a data section in the payload layout (8-byte little-endian header length)."""
    return struct.pack("<Q", len(head)) + head + body


def forged(head: dict[str, Any], body: bytes) -> bytes:
    return framed(json.dumps(head).encode(), body)
