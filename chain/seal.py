"""Sealed site-to-site payloads: the coordinator relays them but cannot read or forge them.

Each site holds an X25519 key pair (encryption) and an Ed25519 key pair (signing), made locally by
``weckd keys``. A payload is encrypted once, for every recipient it names, and signed by its sender:

* a fresh 256-bit content key encrypts the payload (AES-256-GCM, the header's bytes as associated data);
* that key is wrapped for each recipient: ephemeral-static X25519 → HKDF-SHA256 (salt = ephemeral pub ‖
  recipient pub, info names the seal version) → AES-256-GCM over the content key, again bound to the header;
* Ed25519 over every byte of the blob before the signature (magic, version, lengths, header, ephemeral
  pub, every wrapped key, nonce, ciphertext).

So the bytes a site sends are the payload once plus 60 bytes per recipient, whatever their number.

Blob (big-endian)::

    b"WKSL" | version u8 | header_len u32 | n_recipients u16 | header (canonical JSON) | ephemeral pub 32 B
            | n × (wrap nonce 12 B | wrapped content key 48 B) | nonce 12 B | ciphertext_len u64
            | ciphertext (incl. 16 B GCM tag) | signature 64 B

The header travels in clear (a relay may route on it, see :func:`read_header`) but is signed and
bound to the ciphertext and to every wrapped key; slot *i* belongs to ``header.recipients[i]``. The
receiver checks the size, the framing and the signature under the *pinned* key of its predecessor
before anything else; then sender, its own name *and key* among the recipients, run and link; only
then unwraps its slot, decrypts, and finally compares the plaintext's SHA-256. Every refusal is a
:class:`SealError` (a ``SecurityError``) with a short ``reason``; nothing partial is returned.

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
from typing import Mapping, NamedTuple

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import PayloadError, SecurityError

log = logging.getLogger(__name__)

FORMAT = "weckd-seal"
VERSION = 2  # v2: one ciphertext, the content key wrapped per recipient (v1 sealed a copy per recipient)
MAGIC = b"WKSL"
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB; AES-GCM in `cryptography` takes at most 2**31 - 1 bytes
MAX_HEADER_BYTES = 64 * 1024
MAX_RECIPIENTS = 256
_PREFIX = struct.Struct(">4sBIH")  # magic, version, header length, recipient count
_CT_LEN = struct.Struct(">Q")
_PUB, _NONCE, _SIG, _TAG, _KEY = 32, 12, 64, 16, 32
_SLOT = _NONCE + _KEY + _TAG  # one recipient's wrapped content key
_HKDF_INFO = b"weckd-seal v%d X25519 HKDF-SHA256 AES-256-GCM key wrap"

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
    :func:`seal` gives run_id, link, sender and model; ``seal`` fills in the recipients with their
    public keys (base64 of the raw 32 bytes, in slot order), the payload's SHA-256 and the sender's key.
    """

    run_id: str
    link: int
    sender: str
    model: str
    recipients: tuple[str, ...] = ()
    recipient_keys: tuple[str, ...] = ()
    payload_sha256: str = ""
    sender_key: str = ""
    version: int = VERSION

    def to_bytes(self) -> bytes:
        """Canonical JSON: sorted keys, no spaces, ASCII only."""
        obj = asdict(self)
        obj.update(recipients=list(self.recipients), recipient_keys=list(self.recipient_keys))
        return _canonical({"format": FORMAT, **obj})

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
        names = {f.name for f in fields(cls)}
        if set(obj) != {"format", *names}:
            raise SealError("malformed", f"sealed payload: header keys {sorted(obj)[:16]}, expected {sorted(names)}")
        obj.pop("format")
        for key, value in obj.items():
            if key in ("recipients", "recipient_keys"):
                if type(value) is not list or not all(type(v) is str for v in value):
                    raise SealError("malformed", f"sealed payload: header {key!r} must be a list of strings")
                obj[key] = tuple(value)
                continue
            want = int if key in ("link", "version") else str
            if type(value) is not want:
                raise SealError("malformed", f"sealed payload: header {key!r} must be {want.__name__}")
        n = len(obj["recipients"])
        if not 1 <= n <= MAX_RECIPIENTS or len(obj["recipient_keys"]) != n or len(set(obj["recipients"])) != n:
            raise SealError(
                "malformed",
                f"sealed payload: header must name 1 to {MAX_RECIPIENTS} distinct recipients, each with one key",
            )
        if _canonical(
            {
                "format": FORMAT,
                **{**obj, "recipients": list(obj["recipients"]), "recipient_keys": list(obj["recipient_keys"])},
            }
        ) != bytes(data):
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
    slots: tuple[bytes, ...]  # per recipient: wrap nonce ‖ wrapped content key (with its tag)
    nonce: bytes
    ciphertext: memoryview  # a view into the blob: a relay reading headers copies nothing
    signed: memoryview  # every byte before the signature
    signature: bytes


def _canonical(obj: dict[str, object]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _raw(key: x25519.X25519PublicKey | ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def raw_b64(key: x25519.X25519PublicKey | ed25519.Ed25519PublicKey) -> str:
    """A public key as base64 of its raw 32 bytes (as in the header)."""
    return base64.b64encode(_raw(key)).decode("ascii")


def fingerprint(key: x25519.X25519PublicKey | ed25519.Ed25519PublicKey) -> str:
    """Short SHA-256 fingerprint of a public key, for logs and for comparing pins by eye."""
    return hashlib.sha256(_raw(key)).hexdigest()[:16]


def _wrap_key(shared: bytes, ephemeral: bytes, recipient: bytes, version: int) -> AESGCM:
    """The key-encryption key of one recipient's slot."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=_HKDF_INFO % version)
    return AESGCM(hkdf.derive(shared))


def seal(
    payload: bytes,
    header: SealHeader,
    recipients: Mapping[str, x25519.X25519PublicKey],
    sender_ed25519_priv: ed25519.Ed25519PrivateKey,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> bytes:
    """Encrypt ``payload`` once for every recipient (name → X25519 public key) and sign it; the header's
    derived fields are filled in."""
    if not header.run_id or not header.sender or type(header.link) is not int:
        raise PayloadError(f"seal: header needs run_id, sender and an int link, got {header}")
    if not 1 <= len(recipients) <= MAX_RECIPIENTS or not all(recipients):
        raise PayloadError(f"seal: 1 to {MAX_RECIPIENTS} named recipients, got {sorted(recipients)[:8]}")
    full = replace(
        header,
        recipients=tuple(recipients),
        recipient_keys=tuple(raw_b64(k) for k in recipients.values()),
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        sender_key=raw_b64(sender_ed25519_priv.public_key()),
        version=VERSION,
    )
    blob = _seal_frame(payload, full, list(recipients.values()), sender_ed25519_priv)
    if len(blob) > max_bytes:
        raise SealSizeError(
            f"seal: sealed payload of {len(blob)} bytes for {', '.join(recipients)} link {header.link} is over "
            f"the limit of {max_bytes} bytes; raise the limit on both sides or use a smaller model"
        )
    return blob


def _seal_frame(
    payload: bytes, header: SealHeader, recipients: list[x25519.X25519PublicKey], signer: ed25519.Ed25519PrivateKey
) -> bytes:
    """Frame and sign with the header exactly as given (tests use it to forge bad headers)."""
    header_bytes = header.to_bytes()
    eph = x25519.X25519PrivateKey.generate()
    eph_raw = _raw(eph.public_key())
    content_key = AESGCM.generate_key(bit_length=256)
    slots = []
    for recipient in recipients:
        wrap_nonce = os.urandom(_NONCE)
        kek = _wrap_key(eph.exchange(recipient), eph_raw, _raw(recipient), header.version)
        slots.append(wrap_nonce + kek.encrypt(wrap_nonce, content_key, header_bytes))
    nonce = os.urandom(_NONCE)
    ciphertext = AESGCM(content_key).encrypt(nonce, payload, header_bytes)
    body = b"".join(
        (
            _PREFIX.pack(MAGIC, header.version, len(header_bytes), len(recipients)),
            header_bytes,
            eph_raw,
            *slots,
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
    if len(blob) < 5 or bytes(view[:4]) != MAGIC:
        raise SealError("malformed", "not a weckd sealed payload (bad magic bytes); is the peer running weckd?")
    if view[4] != VERSION:
        raise SealError("bad-version", f"sealed payload v{view[4]}, expected v{VERSION}; upgrade weckd on both sides")
    if len(blob) < _PREFIX.size:
        raise SealError("malformed", f"sealed payload: truncated ({len(blob)} bytes)")
    _, _, header_len, n = _PREFIX.unpack_from(view)
    pos = _PREFIX.size
    fixed = header_len + _PUB + n * _SLOT + _NONCE + _CT_LEN.size
    if header_len > MAX_HEADER_BYTES or not 1 <= n <= MAX_RECIPIENTS or len(blob) < pos + fixed + _TAG + _SIG:
        raise SealError("malformed", f"sealed payload: truncated or bad lengths ({len(blob)} bytes)")
    header_bytes = bytes(view[pos : pos + header_len])
    pos += header_len
    ephemeral = bytes(view[pos : pos + _PUB])
    pos += _PUB
    slots = tuple(bytes(view[pos + i * _SLOT : pos + (i + 1) * _SLOT]) for i in range(n))
    pos += n * _SLOT
    nonce = bytes(view[pos : pos + _NONCE])
    pos += _NONCE
    (ct_len,) = _CT_LEN.unpack_from(view, pos)
    pos += _CT_LEN.size
    if ct_len < _TAG or pos + ct_len + _SIG != len(blob):
        raise SealError("malformed", f"sealed payload: lengths do not add up to its {len(blob)} bytes; truncated?")
    return _Frame(header_bytes, ephemeral, slots, nonce, view[pos : pos + ct_len], view[:-_SIG], bytes(view[-_SIG:]))


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
    """Verify, then decrypt a payload sealed (among others) for this site by its pinned predecessor."""
    frame = _parse(blob, max_bytes)
    where = f"site {expected.recipient}, payload of link {expected.link + 1}"
    _verify_signature(frame, expected_sender_ed25519_pub, expected.sender, where)
    header = SealHeader.from_bytes(frame.header_bytes)
    if len(header.recipients) != len(frame.slots):
        raise SealError(
            "malformed",
            f"{where}: the header names {len(header.recipients)} recipients for {len(frame.slots)} key slots",
        )
    own = recipient_x25519_priv.public_key()
    slot = _check_header(header, expected, expected_sender_ed25519_pub, own, where)
    try:
        wrapped = frame.slots[slot]
        kek = _wrap_key(
            recipient_x25519_priv.exchange(x25519.X25519PublicKey.from_public_bytes(frame.ephemeral)),
            frame.ephemeral,
            _raw(own),
            header.version,
        )
        content_key = kek.decrypt(wrapped[:_NONCE], wrapped[_NONCE:], frame.header_bytes)
        payload = AESGCM(content_key).decrypt(frame.nonce, frame.ciphertext, frame.header_bytes)
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
) -> int:
    """Check what the signed header says against what this receiver expects; its key slot's index."""
    if header.sender != expected.sender or header.sender_key != raw_b64(pinned):
        raise SealError(
            "unexpected-sender", f"{where}: payload is from site {header.sender}, expected site {expected.sender}"
        )
    if expected.recipient not in header.recipients:
        named = ", ".join(r[:32] for r in header.recipients[:8])
        raise SealError(
            "wrong-recipient",
            f"{where}: payload is sealed for site{'s' if len(header.recipients) > 1 else ''} {named}, not for this "
            "site; the coordinator routed it wrongly",
        )
    slot = header.recipients.index(expected.recipient)
    if header.recipient_keys[slot] != raw_b64(own):
        raise SealError(
            "wrong-recipient",
            f"{where}: payload is sealed for site {expected.recipient} under key {header.recipient_keys[slot][:8]}…, "
            "not this site's key; check the sender's pinned keys",
        )
    if header.run_id != expected.run_id or header.link != expected.link:
        raise SealError(
            "replay",
            f"{where}: payload is from run {header.run_id!r} link {header.link}, expected run "
            f"{expected.run_id!r} link {expected.link}; a stale or replayed payload",
        )
    if expected.model is not None and header.model != expected.model:
        raise SealError("wrong-model", f"{where}: payload holds model {header.model!r}, expected {expected.model!r}")
    return slot
