"""Sealed site-to-site payloads: the coordinator relays them but cannot read or forge them.

Each site holds an X25519 key pair (encryption) and an Ed25519 key pair (signing), made locally by
``weckd keys``. A payload is sealed for exactly one recipient and signed by its sender:

* ephemeral-static X25519 → HKDF-SHA256 (salt = ephemeral pub ‖ recipient pub, info names the
  seal version) → AES-256-GCM, with the header's bytes as associated data;
* Ed25519 over every byte of the blob before the signature (magic, version, lengths, header,
  ephemeral pub, nonce, ciphertext).

Blob (big-endian)::

    b"WKSL" | version u8 | header_len u32 | header (canonical JSON) | ephemeral pub 32 B
            | nonce 12 B | ciphertext_len u64 | ciphertext (incl. 16 B GCM tag) | signature 64 B

The header travels in clear (a relay may route on it, see :func:`read_header`) but is signed and
bound to the ciphertext. The receiver checks the size, the framing and the signature under the
*pinned* key of its predecessor before anything else; then sender, recipient, run and link; only then
decrypts, and finally compares the plaintext's SHA-256. Every refusal is a :class:`SealError`
(a ``SecurityError``) with a short ``reason``; nothing partial is returned.

The keys themselves are read and written by :mod:`weckd.chain.keys`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import struct
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import PayloadError, SecurityError

log = logging.getLogger(__name__)

FORMAT = "weckd-seal"
VERSION = 1
MAGIC = b"WKSL"
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB; AES-GCM in `cryptography` takes at most 2**31 - 1 bytes
MAX_HEADER_BYTES = 64 * 1024
_PREFIX = struct.Struct(">4sBI")  # magic, version, header length
_CT_LEN = struct.Struct(">Q")
_PUB, _NONCE, _SIG, _TAG = 32, 12, 64, 16
_HKDF_INFO = b"weckd-seal v%d X25519 HKDF-SHA256 AES-256-GCM"

REASONS = (
    "too-large", "malformed", "bad-version", "bad-signature", "tampered",
    "unexpected-sender", "wrong-recipient", "replay", "wrong-model", "bad-hash", "unknown-peer", "unsealed",
)  # fmt: skip


class SealError(SecurityError):
    """A sealed payload was refused; ``reason`` is one of :data:`REASONS` (for metrics and the server)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class SealSizeError(PayloadError):
    """A sealed payload over the size limit, refused before any parsing."""

    reason = "too-large"


@dataclass(frozen=True)
class SealHeader:
    """What a sealed payload says about itself, in clear but signed.

    ``link`` is the index of the link whose output this is (as in ``chain.payload``). The caller of
    :func:`seal` gives run_id, link, sender, recipient and model; ``seal`` fills in the payload's
    SHA-256 and both parties' public keys (base64 of the raw 32 bytes).
    """

    run_id: str
    link: int
    sender: str
    recipient: str
    model: str
    payload_sha256: str = ""
    sender_key: str = ""
    recipient_key: str = ""
    version: int = VERSION

    def to_bytes(self) -> bytes:
        """Canonical JSON: sorted keys, no spaces, ASCII only."""
        return _canonical({"format": FORMAT, **asdict(self)})

    @classmethod
    def from_bytes(cls, data: bytes) -> SealHeader:
        try:
            obj = json.loads(data.decode("ascii"))
        except (UnicodeDecodeError, ValueError) as err:
            raise SealError("malformed", f"sealed payload: header is not JSON ({err})") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise SealError("malformed", "sealed payload: header is not a weckd seal header")
        if obj.get("version") != VERSION:
            raise SealError(
                "bad-version",
                f"sealed payload: header v{obj.get('version')}, expected v{VERSION}; upgrade weckd on both sides",
            )
        names = {f.name: f.type for f in fields(cls)}
        if set(obj) != {"format", *names}:
            raise SealError("malformed", f"sealed payload: header keys {sorted(obj)}, expected {sorted(names)}")
        obj.pop("format")
        for key, value in obj.items():
            want = int if key in ("link", "version") else str
            if type(value) is not want:
                raise SealError("malformed", f"sealed payload: header {key!r} must be {want.__name__}")
        if _canonical({"format": FORMAT, **obj}) != bytes(data):
            raise SealError("malformed", "sealed payload: header is not in canonical form")
        return cls(**obj)


@dataclass(frozen=True)
class Expectation:
    """What the receiver expects: its own name, its pinned predecessor, the run and the link."""

    run_id: str
    link: int
    sender: str
    recipient: str
    model: str | None = None  # None: any model name


class Opened(NamedTuple):
    header: SealHeader
    payload: bytes


class _Frame(NamedTuple):
    header_bytes: bytes
    ephemeral: bytes
    nonce: bytes
    ciphertext: bytes
    signed: memoryview  # every byte before the signature
    signature: bytes


def _canonical(obj: dict[str, object]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def raw_b64(key: x25519.X25519PublicKey | ed25519.Ed25519PublicKey) -> str:
    """A public key as base64 of its raw 32 bytes (as in the header)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def fingerprint(key: x25519.X25519PublicKey | ed25519.Ed25519PublicKey) -> str:
    """Short SHA-256 fingerprint of a public key, for logs and for comparing pins by eye."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _aead_key(shared: bytes, ephemeral: bytes, recipient: bytes, version: int) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=_HKDF_INFO % version)
    return AESGCM(hkdf.derive(shared))


def seal(
    payload: bytes,
    header: SealHeader,
    recipient_x25519_pub: x25519.X25519PublicKey,
    sender_ed25519_priv: ed25519.Ed25519PrivateKey,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> bytes:
    """Encrypt ``payload`` for one recipient and sign it; the header's derived fields are filled in."""
    if not header.run_id or not header.sender or not header.recipient or type(header.link) is not int:
        raise PayloadError(f"seal: header needs run_id, sender, recipient and an int link, got {header}")
    full = replace(
        header,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        sender_key=raw_b64(sender_ed25519_priv.public_key()),
        recipient_key=raw_b64(recipient_x25519_pub),
        version=VERSION,
    )
    blob = _seal_frame(payload, full, recipient_x25519_pub, sender_ed25519_priv)
    if len(blob) > max_bytes:
        raise SealSizeError(
            f"seal: sealed payload of {len(blob)} bytes for site {header.recipient} link {header.link} is over "
            f"the limit of {max_bytes} bytes; raise the limit on both sides or use a smaller model"
        )
    return blob


def _seal_frame(
    payload: bytes, header: SealHeader, recipient: x25519.X25519PublicKey, signer: ed25519.Ed25519PrivateKey
) -> bytes:
    """Frame and sign with the header exactly as given (tests use it to forge bad headers)."""
    header_bytes = header.to_bytes()
    eph = x25519.X25519PrivateKey.generate()
    eph_raw = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    rcpt_raw = recipient.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    nonce = os.urandom(_NONCE)
    ciphertext = _aead_key(eph.exchange(recipient), eph_raw, rcpt_raw, header.version).encrypt(
        nonce, payload, header_bytes
    )
    body = b"".join(
        (
            _PREFIX.pack(MAGIC, header.version, len(header_bytes)),
            header_bytes,
            eph_raw,
            nonce,
            _CT_LEN.pack(len(ciphertext)),
            ciphertext,
        )
    )
    return body + signer.sign(body)


def _parse(blob: bytes, max_bytes: int) -> _Frame:
    if len(blob) > max_bytes:
        raise SealSizeError(
            f"sealed payload of {len(blob)} bytes is over the limit of {max_bytes} bytes; refused unread "
            "(raise the limit on both sides if the model really is that large)"
        )
    view = memoryview(blob)
    if len(blob) < _PREFIX.size or bytes(view[:4]) != MAGIC:
        raise SealError("malformed", "not a weckd sealed payload (bad magic bytes); is the peer running weckd?")
    _, version, header_len = _PREFIX.unpack_from(view)
    if version != VERSION:
        raise SealError("bad-version", f"sealed payload v{version}, expected v{VERSION}; upgrade weckd on both sides")
    pos = _PREFIX.size
    fixed = header_len + _PUB + _NONCE + _CT_LEN.size
    if header_len > MAX_HEADER_BYTES or len(blob) < pos + fixed + _TAG + _SIG:
        raise SealError("malformed", f"sealed payload: truncated or bad header length ({len(blob)} bytes)")
    header_bytes = bytes(view[pos : pos + header_len])
    pos += header_len
    ephemeral, nonce = bytes(view[pos : pos + _PUB]), bytes(view[pos + _PUB : pos + _PUB + _NONCE])
    pos += _PUB + _NONCE
    (ct_len,) = _CT_LEN.unpack_from(view, pos)
    pos += _CT_LEN.size
    if ct_len < _TAG or pos + ct_len + _SIG != len(blob):
        raise SealError("malformed", f"sealed payload: lengths do not add up to its {len(blob)} bytes; truncated?")
    return _Frame(header_bytes, ephemeral, nonce, bytes(view[pos : pos + ct_len]), view[:-_SIG], bytes(view[-_SIG:]))


def read_header(blob: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> SealHeader:
    """The header of a sealed payload, UNVERIFIED: for a relay to route and log, never to trust."""
    return SealHeader.from_bytes(_parse(blob, max_bytes).header_bytes)


def open_sealed(
    blob: bytes,
    recipient_x25519_priv: x25519.X25519PrivateKey,
    expected_sender_ed25519_pub: ed25519.Ed25519PublicKey,
    expected: Expectation,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Opened:
    """Verify, then decrypt a payload sealed for this site by its pinned predecessor."""
    frame = _parse(blob, max_bytes)
    where = f"site {expected.recipient}, payload of link {expected.link + 1}"
    _verify_signature(frame, expected_sender_ed25519_pub, expected.sender, where)
    header = SealHeader.from_bytes(frame.header_bytes)
    _check_header(header, expected, expected_sender_ed25519_pub, recipient_x25519_priv.public_key(), where)
    try:
        shared = recipient_x25519_priv.exchange(x25519.X25519PublicKey.from_public_bytes(frame.ephemeral))
        rcpt_raw = recipient_x25519_priv.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        payload = _aead_key(shared, frame.ephemeral, rcpt_raw, header.version).decrypt(
            frame.nonce, frame.ciphertext, frame.header_bytes
        )
    except (InvalidTag, ValueError):
        raise SealError(
            "tampered", f"{where}: payload from site {header.sender} does not decrypt; altered in transit"
        ) from None
    if hashlib.sha256(payload).hexdigest() != header.payload_sha256:
        raise SealError(
            "bad-hash", f"{where}: payload from site {header.sender} does not match its header's SHA-256; refused"
        )
    return Opened(header, payload)


def _verify_signature(frame: _Frame, pinned: ed25519.Ed25519PublicKey, sender: str, where: str) -> None:
    """Check the signature under the pinned key; on failure, say as precisely as we can why."""
    try:
        pinned.verify(frame.signature, frame.signed)
        return
    except InvalidSignature:
        pass
    try:  # diagnosis only: the header is untrusted here
        claimed = SealHeader.from_bytes(frame.header_bytes).sender_key
    except SealError:
        claimed = ""
    if not claimed or claimed == raw_b64(pinned):
        raise SealError(
            "tampered",
            f"{where}: signature does not verify under site {sender}'s pinned key "
            f"{fingerprint(pinned)}; the payload was altered in transit or forged",
        )
    try:
        other = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(claimed, validate=True))
        other.verify(frame.signature, frame.signed)
    except (ValueError, InvalidSignature):
        raise SealError(
            "bad-signature",
            f"{where}: signature verifies under no key, neither site {sender}'s pinned key nor the one it names",
        ) from None
    raise SealError(
        "unexpected-sender",
        f"{where}: signed by key {fingerprint(other)}, not by site {sender}'s pinned key "
        f"{fingerprint(pinned)}; check the peer keys pinned in this site's config",
    )


def _check_header(
    header: SealHeader,
    expected: Expectation,
    pinned: ed25519.Ed25519PublicKey,
    own: x25519.X25519PublicKey,
    where: str,
) -> None:
    if header.sender != expected.sender or header.sender_key != raw_b64(pinned):
        raise SealError(
            "unexpected-sender", f"{where}: payload is from site {header.sender}, expected site {expected.sender}"
        )
    if header.recipient != expected.recipient or header.recipient_key != raw_b64(own):
        raise SealError(
            "wrong-recipient",
            f"{where}: payload is sealed for site {header.recipient} (key {header.recipient_key[:8]}…), "
            f"not for this site; the coordinator routed it wrongly",
        )
    if header.run_id != expected.run_id or header.link != expected.link:
        raise SealError(
            "replay",
            f"{where}: payload is from run {header.run_id!r} link {header.link}, expected run "
            f"{expected.run_id!r} link {expected.link}; a stale or replayed payload",
        )
    if expected.model is not None and header.model != expected.model:
        raise SealError("wrong-model", f"{where}: payload holds model {header.model!r}, expected {expected.model!r}")
