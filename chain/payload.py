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
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

import numpy as np

from .errors import PayloadError, shown

if TYPE_CHECKING:  # torch loads where tensors are made: the coordinator relays payloads without it
    import torch

FORMAT = "weckd-payload"
VERSION = 2  # v2: floating tensors in the header's wire dtype (float32 or float16)
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
MAX_HEADER_DEPTH = 4  # JSON nesting: the header object > "buffers" > [dtype, bytes]
_HEADER_BASE = 4096
_HEADER_PER_TENSOR = 1024
BYTES_MAGIC = b"WKPB"
_BYTES_PREFIX = struct.Struct(">4sI")  # magic, header length



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
    named = unpack(header, arrays, where)
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
    import torch

    return meta.arch, torch.from_numpy(np.array(logits, copy=True))


def check_finite(arrays: Mapping[str, np.ndarray], where: str) -> None:
    """Refuse NaN or ±Inf in any floating tensor (a diverged or poisoned model must not be loaded)."""
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            raise PayloadError(f"{where}: tensor {name!r} holds {bad} NaN/Inf value(s); the sender's model diverged "
                               "or the payload is poisoned; refused before loading")


class TensorEntry(NamedTuple):
    """One tensor of a header's index: its name, dtype and shape, checked."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    size: int  # values


def tensor_index(header: Mapping[str, Any], where: str = "payload",
                 max_bytes: int = MAX_PAYLOAD_BYTES) -> list[TensorEntry]:
    """The header's tensor index, every field checked with exact types (a bool is not an int) and every
    size multiplied out in Python ints, so numpy never sees a shape it cannot hold."""
    fields = [header.get(k) for k in ("names", "dtypes", "ndims", "dims")]
    if any(type(f) is not list for f in fields):
        raise PayloadError(f"{where}: payload header lacks its tensor index (names, dtypes, ndims, dims lists); "
                           "upgrade weckd on both sides")
    names, dtypes, ndims, dims = fields
    if len(names) > MAX_TENSORS:
        raise PayloadSizeError(f"{where}: payload declares {len(names)} tensors, over the limit of {MAX_TENSORS}; "
                               "refused before loading")
    if (not (len(names) == len(dtypes) == len(ndims))
            or any(type(n) is not str or not n or len(n) > MAX_NAME_CHARS for n in names)
            or len(set(names)) != len(names)):
        raise PayloadError(f"{where}: inconsistent tensor index in the payload header (names must be unique strings "
                           f"of 1-{MAX_NAME_CHARS} characters); upgrade weckd on both sides")
    unknown = sorted({shown(dt, 40) for dt in dtypes if type(dt) is not str or dt not in DTYPES})
    if unknown:
        raise PayloadError(f"{where}: payload declares dtype(s) [{', '.join(unknown[:4])}]; this weckd reads "
                           f"{', '.join(DTYPES)}; upgrade weckd on both sides")
    if (any(type(n) is not int or not 0 <= n <= MAX_NDIM for n in ndims)
            or any(type(d) is not int or d < 0 for d in dims)):
        raise PayloadError(f"{where}: payload header declares a negative or non-integer tensor dimension, "
                           f"or more than {MAX_NDIM} dimensions; the payload is damaged")
    if sum(ndims) != len(dims):
        raise PayloadError(f"{where}: inconsistent tensor index in the payload header; upgrade weckd on both sides")
    out: list[TensorEntry] = []
    total, d = 0, 0
    for name, dt, nd in zip(names, dtypes, ndims):
        shape = tuple(dims[d:d + nd])
        d += nd
        size, extent, itemsize = 1, 1, _ITEMSIZE[dt]
        for x in shape:  # extent: zeros count as 1, so (2**40, 2**40, 0) is refused, not handed to numpy
            size *= x
            extent *= max(x, 1)
            if extent * itemsize > max_bytes:
                raise PayloadSizeError(f"{where}: tensor {shown(name, 80)} declares dimensions {shown(shape, 80)}, "
                                       f"over the limit of {max_bytes} bytes; refused before loading")
        total += size * itemsize
        out.append(TensorEntry(name, dt, shape, size))
    if total > max_bytes:
        raise PayloadSizeError(f"{where}: payload of {total} bytes is over the limit of {max_bytes} bytes; refused "
                               "before loading (raise the limit on both sides if the model really is that large)")
    return out


def unpack(header: Mapping[str, Any], buffers: Mapping[str, np.ndarray],
           where: str = "payload", max_bytes: int = MAX_PAYLOAD_BYTES) -> dict[str, np.ndarray]:
    """Split the flat per-dtype buffers back into named arrays of the shapes the header declares."""
    index = tensor_index(header, where, max_bytes)
    held = sum(int(np.asarray(b).nbytes) for b in buffers.values())
    if held > max_bytes:
        raise PayloadSizeError(f"{where}: payload of {held} bytes is over the limit of {max_bytes} bytes; refused "
                               "before loading (raise the limit on both sides if the model really is that large)")
    if set(buffers) != {t.dtype for t in index}:
        raise PayloadError(f"{where}: payload buffers {shown(sorted(buffers, key=str))} do not match the declared "
                           f"dtypes {sorted({t.dtype for t in index})}")
    offsets = dict.fromkeys(buffers, 0)
    out: dict[str, np.ndarray] = {}
    for t in index:
        flat = np.asarray(buffers[t.dtype]).ravel()
        start = offsets[t.dtype]
        if flat.dtype != np.dtype(t.dtype) or start + t.size > flat.size:
            raise PayloadError(f"{where}: buffer {t.dtype} too short or of dtype {flat.dtype} for tensor "
                               f"{shown(t.name, 80)}")
        out[t.name] = np.array(flat[start:start + t.size], copy=True).reshape(t.shape)
        offsets[t.dtype] += t.size
    sizes = {dt: int(np.asarray(b).size) for dt, b in buffers.items()}
    left = {dt: sizes[dt] - n for dt, n in offsets.items() if sizes[dt] != n}
    if left:
        raise PayloadError(f"{where}: {left} values left over after the declared tensors; the payload is damaged")
    return out


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
    """(header, per-dtype buffers) from :func:`payload_bytes` output, ready for :func:`decode_state`.

    The header is size-capped and depth-checked before it is parsed, and its values must be scalars or
    flat lists (what a Flower ConfigRecord holds); the tensor index itself is checked by :func:`unpack`.
    """
    if len(data) > max_bytes + MAX_HEADER_BYTES:
        raise PayloadSizeError(f"{where}: payload of {len(data)} bytes is over the limit of {max_bytes} bytes; "
                               "refused")
    if len(data) < _BYTES_PREFIX.size or data[:4] != BYTES_MAGIC:
        raise PayloadError(f"{where}: not a weckd payload (bad magic bytes); is the peer running weckd?")
    _, head_len = _BYTES_PREFIX.unpack_from(data)
    if head_len > MAX_HEADER_BYTES:
        raise PayloadSizeError(f"{where}: payload header of {head_len} bytes is over the limit of "
                               f"{MAX_HEADER_BYTES} bytes; refused before parsing")
    start = _BYTES_PREFIX.size + head_len
    if start > len(data):
        raise PayloadError(f"{where}: payload header runs past its {len(data)} bytes; truncated or damaged")
    raw = bytes(data[_BYTES_PREFIX.size:start])
    _check_depth(raw, where)
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an over-long integer literal
        raise PayloadError(f"{where}: payload header is not readable ({shown(str(err), 120)}); "
                           "upgrade weckd on both sides") from None
    if type(header) is not dict:
        raise PayloadError(f"{where}: payload header is a JSON {type(header).__name__}, not an object; "
                           "is the peer running weckd?")
    index = _buffer_index(header.pop("buffers", None), where)
    _check_flat(header, where)
    names = header.get("names")
    n_tensors = len(names) if type(names) is list else 0
    if head_len > _HEADER_BASE + _HEADER_PER_TENSOR * n_tensors:
        raise PayloadSizeError(f"{where}: payload header of {head_len} bytes is too large for its {n_tensors} "
                               f"tensor(s) (at most {_HEADER_BASE} + {_HEADER_PER_TENSOR} per tensor); refused")
    if start + sum(n for _, n in index) != len(data):
        raise PayloadError(f"{where}: payload buffers do not add up to its {len(data)} bytes; truncated or damaged")
    buffers, pos = {}, start
    for dt, n in index:
        if n % np.dtype(dt).itemsize:
            raise PayloadError(f"{where}: buffer {dt} of {n} bytes is not a whole number of values")
        buffers[dt] = np.frombuffer(data, dtype=dt, count=n // np.dtype(dt).itemsize, offset=pos).copy()
        pos += n
    return header, buffers


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


_SCALARS = (str, int, float, bool)


def _check_flat(header: dict[str, Any], where: str) -> None:
    """Header values are scalars or flat lists of one scalar type (what a Flower ConfigRecord holds)."""
    for key, value in header.items():
        kind = type(value)
        if kind is list and value:
            kind = type(value[0])
            flat = kind in _SCALARS and all(type(v) is kind for v in value)
        else:
            flat = kind is list or kind in _SCALARS
        if not flat:
            raise PayloadError(f"{where}: payload header field {shown(key, 60)} is not a scalar or a flat list; "
                               "is the peer running weckd?")


def _buffer_index(index: Any, where: str) -> list[tuple[str, int]]:
    """The header's ``buffers`` entry: [[dtype, byte length], …], one per known dtype."""
    if (type(index) is not list or len(index) > len(DTYPES)
            or any(type(e) is not list or len(e) != 2 or type(e[0]) is not str or e[0] not in DTYPES
                   or type(e[1]) is not int or e[1] < 0 for e in index)
            or len({e[0] for e in index}) != len(index)):
        raise PayloadError(f"{where}: payload header has no valid buffer index ([dtype, bytes] per dtype); "
                           "upgrade weckd on both sides")
    return [(e[0], e[1]) for e in index]
