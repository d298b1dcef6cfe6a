"""What travels between the coordinator and the sites: message keys, the payload format and its codec.

A payload is a header (format version, kind, model architecture, link index) plus named numpy
arrays: a model's weights (weights mode) or its logits on the shared proxy set (logits mode). No
pickle anywhere: the federation wraps these arrays into Flower ``ArrayRecord``s, and the decoder
checks the header before any array is used. Floating tensors travel in the chain's wire dtype
(``chain.wire_dtype``: float32 or float16, halving the bytes) and are decoded back to float32;
integer tensors travel as int64, untouched. The in-process chain rounds its teacher through the same
cast (:func:`round_state`), so both give the same links.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from .errors import PayloadError

FORMAT = "weckd-payload"
VERSION = 2  # v2: floating tensors in the header's wire dtype (float32 or float16)
KINDS = ("weights", "logits")
WIRE_DTYPES = ("float32", "float16")
DTYPES = (*WIRE_DTYPES, "int64")
LOGITS_KEY = "logits"
MAX_PAYLOAD_BYTES = 1 << 30  # 1 GiB: a payload declaring more is refused before anything is allocated
BYTES_MAGIC = b"WKPB"
_BYTES_PREFIX = struct.Struct(">4sI")  # magic, header length

# Message types (Flower's reserved names) and the record keys inside a message's content.
MSG_QUERY = "query"
MSG_TRAIN = "train"
MSG_EVALUATE = "evaluate"
KEY_CONFIG = "config"  # ConfigRecord: what the federation sends (link index, seed, mode, augment)
KEY_LINK = "link-settings"  # ConfigRecord: the link's LinkSettings (chain.config.link_to_mapping)
KEY_HEADER = "payload-header"  # ConfigRecord: the payload header
KEY_ARRAYS = "payload-arrays"  # ArrayRecord: the payload's arrays
KEY_MODEL_HEADER = "model-header"  # ConfigRecord: header of the final link's weights (logits mode)
KEY_MODEL_ARRAYS = "model-arrays"  # ArrayRecord: the final link's weights (logits mode)
KEY_INFO = "info"  # ConfigRecord: what a site says about itself (version, classes, proxy hash)
KEY_METRICS = "metrics"  # MetricRecord: counts, accuracies, loss parts, seconds
KEY_SEALED = "sealed"  # ArrayRecord: sealed payloads (uint8), "<kind>:<recipient>" in replies, one in requests:
SEALED_ENTRY = "payload"  # the name of the one sealed blob in a request's KEY_SEALED record


@dataclass(frozen=True)
class Payload:
    """A decoded-or-to-be-encoded payload: header fields plus named arrays."""

    kind: str
    arch: str
    link: int
    arrays: dict[str, np.ndarray]
    wire_dtype: str = "float32"

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))

    def header(self) -> dict[str, Any]:
        """The header as it travels: identity fields plus every tensor's name, dtype and shape."""
        return {"format": FORMAT, "version": VERSION, "kind": self.kind, "arch": self.arch, "link": self.link,
                "wire-dtype": self.wire_dtype, "names": list(self.arrays),
                "dtypes": [str(a.dtype) for a in self.arrays.values()],
                "ndims": [a.ndim for a in self.arrays.values()],
                "dims": [int(d) for a in self.arrays.values() for d in a.shape]}

    def pack(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(header, one flat buffer per dtype): a model travels as 2 arrays instead of ~100, which
        saves one relay round trip per tensor at every hop."""
        buffers = {dt: np.concatenate([a.ravel() for a in self.arrays.values() if str(a.dtype) == dt])
                   for dt in dict.fromkeys(str(a.dtype) for a in self.arrays.values())}
        return self.header(), buffers


def _wire_tensor(tensor: torch.Tensor, wire_dtype: str) -> torch.Tensor:
    """One tensor as it travels: floating → the wire dtype, integer/bool → int64."""
    t = tensor.detach().cpu()
    return t.to(getattr(torch, wire_dtype)) if t.is_floating_point() else t.long()


def check_wire_dtype(wire_dtype: str, where: str = "payload") -> str:
    if wire_dtype not in WIRE_DTYPES:
        raise PayloadError(f"{where}: wire dtype {wire_dtype!r} unknown; use one of {', '.join(WIRE_DTYPES)}")
    return wire_dtype


def encode_state(state: Mapping[str, torch.Tensor], arch: str, link: int, wire_dtype: str = "float32") -> Payload:
    """A state_dict as a weights payload (floating tensors in ``wire_dtype``, integer/bool tensors as int64)."""
    check_wire_dtype(wire_dtype)
    arrays = {name: np.array(_wire_tensor(t, wire_dtype).contiguous().numpy(), copy=True)  # keeps 0-d tensors 0-d
              for name, t in state.items()}
    return Payload("weights", arch, link, arrays, wire_dtype)


def round_state(state: Mapping[str, torch.Tensor], wire_dtype: str) -> dict[str, torch.Tensor]:
    """A state_dict as the receiving site decodes it after the wire: floating tensors rounded through
    ``wire_dtype`` back to float32, integer tensors as int64 (what :func:`decode_state` returns)."""
    check_wire_dtype(wire_dtype)
    out = {}
    for name, tensor in state.items():
        t = _wire_tensor(tensor, wire_dtype)
        out[name] = t.float() if t.is_floating_point() else t.clone()
    return out


def encode_logits(logits: torch.Tensor, arch: str, link: int) -> Payload:
    """Logits on the proxy set (N × classes) as a logits payload."""
    return Payload("logits", arch, link, {LOGITS_KEY: np.ascontiguousarray(logits.detach().cpu().float().numpy())})


def check_header(
    header: Mapping[str, object], *, kind: str, link: int | None = None, arch: str | None = None, where: str = "payload"
) -> Payload:
    """Validate a received header; return an array-less Payload with its fields."""
    if header.get("format") != FORMAT:
        raise PayloadError(
            f"{where}: not a weckd payload (format {header.get('format')!r}); is the peer running weckd?"
        )
    version = header.get("version")
    if version != VERSION:
        raise PayloadError(f"{where}: payload v{version}, expected v{VERSION}; upgrade weckd on both sides")
    if header.get("kind") != kind:
        raise PayloadError(
            f"{where}: payload kind {header.get('kind')!r}, expected {kind!r}; do both sides use the same chain.mode?"
        )
    got_link = header.get("link")
    if not isinstance(got_link, int) or (link is not None and got_link != link):
        raise PayloadError(
            f"{where}: payload is for link {got_link}, expected link {link}; "
            "a stale or replayed message? restart the run"
        )
    got_arch = header.get("arch")
    if not isinstance(got_arch, str) or (arch is not None and got_arch != arch):
        raise PayloadError(f"{where}: payload architecture {got_arch!r}, expected {arch!r}")
    return Payload(kind, got_arch, got_link, {})


def decode_state(
    header: Mapping[str, object],
    arrays: Mapping[str, np.ndarray],
    *,
    link: int | None = None,
    arch: str | None = None,
    where: str = "payload",
) -> tuple[str, dict[str, torch.Tensor]]:
    """A weights payload back to (arch, state_dict); the header is checked first."""
    meta = check_header(header, kind="weights", link=link, arch=arch, where=where)
    if not arrays:
        raise PayloadError(f"{where}: weights payload carries no arrays")
    wire = check_wire_dtype(str(header.get("wire-dtype")), where)
    named = unpack(header, arrays, where)
    if any(a.dtype.kind == "f" and str(a.dtype) != wire for a in named.values()):
        raise PayloadError(f"{where}: floating tensors not in the declared wire dtype {wire}; the payload is damaged")
    check_finite(named, where)
    state = {name: torch.from_numpy(a.astype(np.float32) if a.dtype.kind == "f" else a) for name, a in named.items()}
    return meta.arch, state


def decode_logits(
    header: Mapping[str, object],
    arrays: Mapping[str, np.ndarray],
    *,
    n_classes: int,
    n_proxy: int,
    link: int | None = None,
    where: str = "payload",
) -> tuple[str, torch.Tensor]:
    """A logits payload back to (arch, N × classes tensor), checking its shape against the proxy set."""
    meta = check_header(header, kind="logits", link=link, where=where)
    named = unpack(header, arrays, where)
    if set(named) != {LOGITS_KEY}:
        raise PayloadError(f"{where}: logits payload must hold exactly one array {LOGITS_KEY!r}, got {sorted(named)}")
    logits = named[LOGITS_KEY]
    if logits.shape != (n_proxy, n_classes) or logits.dtype != np.float32:
        raise PayloadError(
            f"{where}: logits of shape {logits.shape} {logits.dtype}, expected ({n_proxy}, "
            f"{n_classes}) float32; do all sites hold the same proxy set and classes?"
        )
    check_finite(named, where)
    return meta.arch, torch.from_numpy(np.array(logits, copy=True))


def check_finite(arrays: Mapping[str, np.ndarray], where: str) -> None:
    """Refuse NaN or ±Inf in any floating tensor (a diverged or poisoned model must not be loaded)."""
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            raise PayloadError(f"{where}: tensor {name!r} holds {bad} NaN/Inf value(s); the sender's model diverged "
                               "or the payload is poisoned; refused before loading")


def unpack(header: Mapping[str, Any], buffers: Mapping[str, np.ndarray],
           where: str = "payload", max_bytes: int = MAX_PAYLOAD_BYTES) -> dict[str, np.ndarray]:
    """Split the flat per-dtype buffers back into named arrays of the shapes the header declares."""
    names, dtypes, ndims, dims = (list(header.get(k) or []) for k in ("names", "dtypes", "ndims", "dims"))
    if not (len(names) == len(dtypes) == len(ndims)) or sum(ndims) != len(dims) or len(set(names)) != len(names):
        raise PayloadError(f"{where}: inconsistent tensor index in the payload header; upgrade weckd on both sides")
    unknown = sorted({str(dt) for dt in dtypes} - set(DTYPES))
    if unknown:
        raise PayloadError(f"{where}: payload declares dtype(s) {unknown}; this weckd reads {', '.join(DTYPES)}; "
                           "upgrade weckd on both sides")
    if any(not isinstance(d, int) or d < 0 for d in dims) or any(not isinstance(n, int) or n < 0 for n in ndims):
        raise PayloadError(f"{where}: payload header declares a negative or non-integer tensor dimension")
    declared = _declared_bytes(dtypes, ndims, dims)
    held = sum(int(np.asarray(b).nbytes) for b in buffers.values())
    if max(declared, held) > max_bytes:
        raise PayloadError(f"{where}: payload of {max(declared, held)} bytes is over the limit of {max_bytes} bytes; "
                           "refused before loading (raise the limit on both sides if the model really is that large)")
    if set(buffers) != set(dtypes):
        raise PayloadError(f"{where}: payload buffers {sorted(buffers)} do not match the declared dtypes "
                           f"{sorted(set(dtypes))}")
    offsets = dict.fromkeys(buffers, 0)
    out: dict[str, np.ndarray] = {}
    d = 0
    for name, dt, nd in zip(names, dtypes, ndims):
        shape = tuple(int(x) for x in dims[d:d + nd])
        d += nd
        size = int(np.prod(shape, dtype=np.int64))
        flat = np.asarray(buffers[dt]).ravel()
        if flat.dtype != np.dtype(dt) or offsets[dt] + size > flat.size:
            raise PayloadError(f"{where}: buffer {dt} too short or of dtype {flat.dtype} for tensor {name!r}")
        out[name] = np.array(flat[offsets[dt]:offsets[dt] + size], copy=True).reshape(shape)
        offsets[dt] += size
    sizes = {dt: int(np.asarray(b).size) for dt, b in buffers.items()}
    left = {dt: sizes[dt] - n for dt, n in offsets.items() if sizes[dt] != n}
    if left:
        raise PayloadError(f"{where}: {left} values left over after the declared tensors; the payload is damaged")
    return out


def _declared_bytes(dtypes: list[Any], ndims: list[int], dims: list[int]) -> int:
    """Bytes the header's tensor index adds up to (Python ints: no overflow on hostile dimensions)."""
    total, d = 0, 0
    for dt, nd in zip(dtypes, ndims):
        size = 1
        for x in dims[d:d + nd]:
            size *= int(x)
        d += nd
        total += size * np.dtype(str(dt)).itemsize
    return total


def payload_bytes(payload: Payload) -> bytes:
    """A payload as one byte string (what gets sealed and checkpointed), see :func:`pack_bytes`."""
    return pack_bytes(*payload.pack())


def pack_bytes(header: Mapping[str, Any], buffers: Mapping[str, np.ndarray]) -> bytes:
    """(header, per-dtype buffers) as ``WKPB`` | header length | canonical JSON header (with each
    buffer's dtype and byte length) | the raw buffers."""
    index = [[dt, int(b.nbytes)] for dt, b in buffers.items()]
    head = json.dumps({**header, "buffers": index}, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return b"".join([_BYTES_PREFIX.pack(BYTES_MAGIC, len(head)), head,
                     *(np.ascontiguousarray(b).tobytes() for b in buffers.values())])


def payload_from_bytes(data: bytes, where: str = "payload", max_bytes: int = MAX_PAYLOAD_BYTES
                       ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, per-dtype buffers) from :func:`payload_bytes` output, ready for :func:`decode_state`."""
    if len(data) > max_bytes + (1 << 20):
        raise PayloadError(f"{where}: payload of {len(data)} bytes is over the limit of {max_bytes} bytes; refused")
    if len(data) < _BYTES_PREFIX.size or data[:4] != BYTES_MAGIC:
        raise PayloadError(f"{where}: not a weckd payload (bad magic bytes); is the peer running weckd?")
    _, head_len = _BYTES_PREFIX.unpack_from(data)
    start = _BYTES_PREFIX.size + head_len
    try:
        header = json.loads(data[_BYTES_PREFIX.size:start].decode("utf-8"))
        index = [(str(dt), int(n)) for dt, n in header.pop("buffers")]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise PayloadError(f"{where}: payload header is not readable ({err}); upgrade weckd on both sides") from None
    if any(dt not in DTYPES or n < 0 for dt, n in index) or start + sum(n for _, n in index) != len(data):
        raise PayloadError(f"{where}: payload buffers do not add up to its {len(data)} bytes; truncated or damaged")
    buffers, pos = {}, start
    for dt, n in index:
        if n % np.dtype(dt).itemsize:
            raise PayloadError(f"{where}: buffer {dt} of {n} bytes is not a whole number of values")
        buffers[dt] = np.frombuffer(data, dtype=dt, count=n // np.dtype(dt).itemsize, offset=pos).copy()
        pos += n
    return header, buffers
