"""What travels between the sites: the payload format and its codec.

A payload is a model's weights (weights mode) or its logits on the shared proxy set (logits mode), as
one byte string in the safetensors format: a JSON header naming every tensor (dtype, shape, byte range)
with the payload's identity in its ``__metadata__`` (format, version, kind, model architecture, link
index, wire dtype), then the raw tensor bytes. No pickle anywhere. The same bytes are sealed
(``chain.seal``), relayed as one uint8 array per hop, and checkpointed by the coordinator; the decoder
checks every limit and the header before any array is made. Floating tensors travel in the chain's
wire dtype (``chain.wire_dtype``: float32 or float16, halving the bytes) and are decoded back to
float32; integer tensors travel as int64, untouched. The in-process chain rounds its teacher through the
same cast (:func:`round_state`), so both give the same links.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

import numpy as np

from .errors import PayloadError, shown

if TYPE_CHECKING:  # torch loads where tensors are made: the coordinator relays payloads without it
    import torch

FORMAT = "weckd-payload"
VERSION = 3  # v3: the safetensors layout (v2: a weckd-specific header + per-dtype buffers)
KINDS = ("weights", "logits")
WIRE_DTYPES = ("float32", "float16")
DTYPES = (*WIRE_DTYPES, "int64")
_ITEMSIZE = {dt: np.dtype(dt).itemsize for dt in DTYPES}
LOGITS_KEY = "logits"
MAX_PAYLOAD_BYTES = 1 << 30  # 1 GiB: a payload declaring more is refused before anything is allocated
# Header limits, checked before the header is parsed or any array is shaped. A ResNet-18 header is
# ~8 KB (122 tensors); a header may hold at most _HEADER_BASE + _HEADER_PER_TENSOR bytes per tensor.
MAX_HEADER_BYTES = 1 << 20  # 1 MiB, whatever the tensor count
MAX_TENSORS = 10_000
MAX_NAME_CHARS = 512
MAX_NDIM = 8
MAX_HEADER_DEPTH = 3  # JSON nesting: the header object > a tensor's entry > its shape
_HEADER_BASE = 4096
_HEADER_PER_TENSOR = 1024
LEGACY_MAGIC = b"WKPB"  # how a v2 payload starts: named in the error a site of a newer weckd gives
_LENGTH = struct.Struct("<Q")  # safetensors: the header's length, 8 bytes little-endian
_DTYPE_OF = {"F32": "float32", "F16": "float16", "I64": "int64"}  # safetensors dtype names
_DECIMAL = re.compile(r"[0-9]{1,9}")



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

    def metadata(self) -> dict[str, str]:
        """The identity fields as they travel (safetensors metadata holds strings)."""
        return {"format": FORMAT, "version": str(VERSION), "kind": self.kind, "arch": self.arch,
                "link": str(self.link), "wire-dtype": self.wire_dtype}


def _wire_tensor(tensor: torch.Tensor, wire_dtype: str) -> torch.Tensor:
    """One tensor as it travels: floating → the wire dtype, integer/bool → int64."""
    import torch

    t = tensor.detach().cpu()
    return t.to(getattr(torch, wire_dtype)) if t.is_floating_point() else t.long()


class PayloadSizeError(PayloadError):
    """A payload, its header or a declared tensor over the size limit, refused before allocation."""

    reason = "too-large"


def check_wire_dtype(wire_dtype: object, where: str = "payload") -> str:
    if type(wire_dtype) is not str or wire_dtype not in WIRE_DTYPES:
        raise PayloadError(f"{where}: wire dtype {shown(wire_dtype)} unknown; use one of {', '.join(WIRE_DTYPES)}")
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
    if not isinstance(header, Mapping):
        raise PayloadError(f"{where}: payload header is a {type(header).__name__}, not a mapping; "
                           "is the peer running weckd?")
    if header.get("format") != FORMAT:
        raise PayloadError(
            f"{where}: not a weckd payload (format {shown(header.get('format'))}); is the peer running weckd?"
        )
    version = header.get("version")
    if type(version) is not int or version != VERSION:
        raise PayloadError(f"{where}: payload v{shown(version)}, expected v{VERSION}; upgrade weckd on both sides")
    if header.get("kind") != kind:
        raise PayloadError(
            f"{where}: payload kind {shown(header.get('kind'))}, expected {kind!r}; "
            "do both sides use the same chain.mode?"
        )
    got_link = header.get("link")
    if type(got_link) is not int or got_link < 0 or (link is not None and got_link != link):
        raise PayloadError(
            f"{where}: payload is for link {shown(got_link)}, expected link {link}; "
            "a stale or replayed message? restart the run"
        )
    got_arch = header.get("arch")
    if type(got_arch) is not str or len(got_arch) > MAX_NAME_CHARS or (arch is not None and got_arch != arch):
        raise PayloadError(f"{where}: payload architecture {shown(got_arch)}, expected {arch!r}")
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
    import torch

    got, named = decode_arrays(header, arrays, link=link, arch=arch, where=where)
    return got, {name: torch.from_numpy(a) for name, a in named.items()}


def decode_arrays(
    header: Mapping[str, object],
    arrays: Mapping[str, np.ndarray],
    *,
    link: int | None = None,
    arch: str | None = None,
    where: str = "payload",
) -> tuple[str, dict[str, np.ndarray]]:
    """A weights payload back to (arch, named arrays: floating ones float32, the rest int64), checked as
    :func:`decode_state` checks it; for the coordinator, which writes a delivered model without torch."""
    meta = check_header(header, kind="weights", link=link, arch=arch, where=where)
    if not arrays:
        raise PayloadError(f"{where}: weights payload carries no arrays")
    wire = check_wire_dtype(header.get("wire-dtype"), where)
    named = _known_dtypes(arrays, where)
    if any(a.dtype.kind == "f" and str(a.dtype) != wire for a in named.values()):
        raise PayloadError(f"{where}: floating tensors not in the declared wire dtype {wire}; the payload is damaged")
    check_finite(named, where)
    return meta.arch, {name: a.astype(np.float32) if a.dtype.kind == "f" else a for name, a in named.items()}


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
    named = _known_dtypes(arrays, where)
    if set(named) != {LOGITS_KEY}:
        raise PayloadError(f"{where}: logits payload must hold exactly one array {LOGITS_KEY!r}, got {sorted(named)}")
    logits = named[LOGITS_KEY]
    if logits.shape != (n_proxy, n_classes) or logits.dtype != np.float32:
        raise PayloadError(
            f"{where}: logits of shape {logits.shape} {logits.dtype}, expected ({n_proxy}, "
            f"{n_classes}) float32; do all sites hold the same proxy set and classes?"
        )
    check_finite(named, where)
    import torch

    return meta.arch, torch.from_numpy(np.array(logits, copy=True))


def _known_dtypes(arrays: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    bad = sorted(name for name, a in arrays.items() if not isinstance(a, np.ndarray) or str(a.dtype) not in DTYPES)
    if bad:
        raise PayloadError(f"{where}: tensor(s) {shown(bad[:4], 120)} not of a wire dtype ({', '.join(DTYPES)}); "
                           "the payload is damaged")
    return dict(arrays)


def check_finite(arrays: Mapping[str, np.ndarray], where: str) -> None:
    """Refuse NaN or ±Inf in any floating tensor (a diverged or poisoned model must not be loaded)."""
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            raise PayloadError(f"{where}: tensor {name!r} holds {bad} NaN/Inf value(s); the sender's model diverged "
                               "or the payload is poisoned; refused before loading")


class TensorEntry(NamedTuple):
    """One tensor of a payload's index: its name, dtype and shape, and where its bytes lie, checked."""

    name: str
    dtype: str  # numpy name: float32, float16 or int64
    shape: tuple[int, ...]
    size: int  # values
    begin: int  # byte offsets in the data section
    end: int


class PayloadIndex(NamedTuple):
    """What a payload's header says, checked: its identity fields (typed) and its tensors, in byte order."""

    header: dict[str, Any]
    tensors: list[TensorEntry]
    data_start: int  # where the data section starts in the payload bytes: the header's bytes, length included


def payload_bytes(payload: Payload) -> bytes:
    """A payload as one byte string in the safetensors format (what gets sealed, relayed and checkpointed):
    the identity fields in its ``__metadata__``, every tensor by name. Written by the safetensors library,
    so any safetensors reader opens it."""
    from safetensors.numpy import save

    return save({name: np.require(a, requirements="C") for name, a in payload.arrays.items()},  # keeps 0-d arrays 0-d
                metadata=payload.metadata())


def payload_from_bytes(data: bytes, where: str = "payload", max_bytes: int = MAX_PAYLOAD_BYTES
                       ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, named arrays) from :func:`payload_bytes` output, ready for :func:`decode_state`.

    Read by :func:`read_index`, which checks every limit before anything is allocated; each array is
    then one copy of its byte range (writable, so torch can take it as it is)."""
    index = read_index(data, where, max_bytes)
    arrays = {t.name: np.frombuffer(data, dtype=t.dtype, count=t.size, offset=index.data_start + t.begin)
              .reshape(t.shape).copy() for t in index.tensors}
    return index.header, arrays


def read_index(data: bytes, where: str = "payload", max_bytes: int = MAX_PAYLOAD_BYTES) -> PayloadIndex:
    """A payload's header and tensor index, checked without reading any tensor: for the decoder and for
    the coordinator's wire log (which lists an unsealed payload's tensors without decoding it).

    The safetensors layout (8-byte little-endian header length, JSON header, data section), read with
    this product's limits rather than the library's: the header is size-capped and depth-checked before
    it is parsed; every field has its exact type (a bool is not an int); only the wire dtypes are
    accepted; every size is multiplied out in Python ints, so numpy never sees a shape it cannot hold;
    the tensors tile the data section exactly (no gap, overlap or trailing byte)."""
    if len(data) > max_bytes + MAX_HEADER_BYTES + _LENGTH.size:
        raise PayloadSizeError(f"{where}: payload of {len(data)} bytes is over the limit of {max_bytes} bytes; "
                               "refused")
    if data[:4] == LEGACY_MAGIC:
        raise PayloadError(f"{where}: payload v2, expected v{VERSION}; upgrade weckd on both sides")
    if len(data) < _LENGTH.size:
        raise PayloadError(f"{where}: not a weckd payload ({len(data)} bytes); is the peer running weckd?")
    (head_len,) = _LENGTH.unpack_from(data)
    if head_len > MAX_HEADER_BYTES:
        raise PayloadSizeError(f"{where}: payload header of {head_len} bytes is over the limit of "
                               f"{MAX_HEADER_BYTES} bytes; refused before parsing")
    start = _LENGTH.size + head_len
    if start > len(data):
        raise PayloadError(f"{where}: payload header runs past its {len(data)} bytes; truncated or damaged")
    raw = bytes(data[_LENGTH.size:start])
    _check_depth(raw, where)
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an over-long integer literal
        raise PayloadError(f"{where}: payload header is not readable ({shown(str(err), 120)}); "
                           "is the peer running weckd?") from None
    if type(parsed) is not dict:
        raise PayloadError(f"{where}: payload header is a JSON {type(parsed).__name__}, not an object; "
                           "is the peer running weckd?")
    header = _metadata(parsed.pop("__metadata__", None), where)
    if len(parsed) > MAX_TENSORS:
        raise PayloadSizeError(f"{where}: payload declares {len(parsed)} tensors, over the limit of {MAX_TENSORS}; "
                               "refused before loading")
    if head_len > _HEADER_BASE + _HEADER_PER_TENSOR * len(parsed):
        raise PayloadSizeError(f"{where}: payload header of {head_len} bytes is too large for its {len(parsed)} "
                               f"tensor(s) (at most {_HEADER_BASE} + {_HEADER_PER_TENSOR} per tensor); refused")
    tensors = sorted((_entry(name, spec, where, max_bytes) for name, spec in parsed.items()), key=lambda t: t.begin)
    total = sum(t.end - t.begin for t in tensors)
    if total > max_bytes:
        raise PayloadSizeError(f"{where}: payload of {total} bytes is over the limit of {max_bytes} bytes; refused "
                               "before loading (raise the limit on both sides if the model really is that large)")
    pos = 0
    for t in tensors:
        if t.begin != pos:
            raise PayloadError(f"{where}: tensor {shown(t.name, 80)} does not start where the one before it ends; "
                               "the payload is damaged")
        pos = t.end
    if start + pos != len(data):
        raise PayloadError(f"{where}: payload tensors do not add up to its {len(data)} bytes; truncated or damaged")
    return PayloadIndex(header, tensors, start)


def _metadata(meta: Any, where: str) -> dict[str, Any]:
    """The payload's identity fields from the safetensors ``__metadata__`` (strings only there), typed."""
    if type(meta) is not dict or any(type(v) is not str or len(v) > MAX_NAME_CHARS for v in meta.values()):
        raise PayloadError(f"{where}: payload header lacks its metadata (string fields); is the peer running weckd?")
    if meta.get("format") != FORMAT:
        raise PayloadError(f"{where}: not a weckd payload (format {shown(meta.get('format'))}); "
                           "is the peer running weckd?")
    header: dict[str, Any] = dict(meta)
    for key in ("version", "link"):  # decimal numbers; anything else stays a string, which check_header refuses
        value = meta.get(key)
        if type(value) is str and _DECIMAL.fullmatch(value):
            header[key] = int(value)
    return header


def _entry(name: Any, spec: Any, where: str, max_bytes: int) -> TensorEntry:
    """One tensor's header entry ({"dtype", "shape", "data_offsets"}), checked."""
    if type(name) is not str or not name or len(name) > MAX_NAME_CHARS:
        raise PayloadError(f"{where}: payload tensor names must be strings of 1-{MAX_NAME_CHARS} characters; "
                           "is the peer running weckd?")
    if type(spec) is not dict or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise PayloadError(f"{where}: tensor {shown(name, 80)} lacks its dtype, shape or data offsets; "
                           "is the peer running weckd?")
    dtype = _DTYPE_OF.get(spec["dtype"]) if type(spec["dtype"]) is str else None
    if dtype is None:
        raise PayloadError(f"{where}: tensor {shown(name, 80)} declares dtype {shown(spec['dtype'], 40)}; this "
                           f"weckd reads {', '.join(_DTYPE_OF)}; upgrade weckd on both sides")
    shape, offsets = spec["shape"], spec["data_offsets"]
    if (type(shape) is not list or len(shape) > MAX_NDIM or any(type(d) is not int or d < 0 for d in shape)
            or type(offsets) is not list or len(offsets) != 2 or any(type(o) is not int or o < 0 for o in offsets)):
        raise PayloadError(f"{where}: tensor {shown(name, 80)} declares a negative or non-integer dimension or "
                           f"offset, or more than {MAX_NDIM} dimensions; the payload is damaged")
    size, extent, itemsize = 1, 1, _ITEMSIZE[dtype]
    for x in shape:  # extent: zeros count as 1, so (2**40, 2**40, 0) is refused, not handed to numpy
        size *= x
        extent *= max(x, 1)
        if extent * itemsize > max_bytes:
            raise PayloadSizeError(f"{where}: tensor {shown(name, 80)} declares dimensions {shown(tuple(shape), 80)}, "
                                   f"over the limit of {max_bytes} bytes; refused before loading")
    begin, end = offsets
    if end - begin != size * itemsize:
        raise PayloadError(f"{where}: tensor {shown(name, 80)} spans {end - begin} bytes, its shape {size * itemsize}; "
                           "the payload is damaged")
    return TensorEntry(name, dtype, tuple(shape), size, begin, end)


_CHEAP_OPENERS = 64
_JSON_TOKENS = re.compile(rb'\\.|["\[\]{}]', re.S)  # an escape pair, a quote or a bracket


def _check_depth(raw: bytes, where: str) -> None:
    """Refuse JSON nested deeper than MAX_HEADER_DEPTH before the parser recurses into it (one linear scan).

    Fast path: with at most _CHEAP_OPENERS brackets in all, the parser cannot recurse deeper than that;
    :func:`_check_flat` and :func:`_buffer_index` then hold the parsed header to its real depth of 3."""
    if raw.count(b"[") + raw.count(b"{") <= _CHEAP_OPENERS:
        return
    depth, in_string = 0, False
    for match in _JSON_TOKENS.finditer(raw):
        tok = match.group()
        if tok == b'"':
            in_string = not in_string
        elif in_string or len(tok) == 2:
            continue
        elif tok in (b"[", b"{"):
            depth += 1
            if depth > MAX_HEADER_DEPTH:
                raise PayloadError(f"{where}: payload header nests deeper than {MAX_HEADER_DEPTH} levels; "
                                   "refused before parsing; is the peer running weckd?")
        else:
            depth -= 1
