"""A link's output as the coordinator holds it, and the part of it each message to a site carries.

Sealed federations (``federation.sealing``): the producing site encrypts each output once for every
recipient the coordinator names (``chain.seal``: one ciphertext, the key wrapped per recipient); the
reply's ``sealed`` ArrayRecord holds one uint8 array per blob, keyed by its kind (``weights`` or
``logits``). The coordinator stores and forwards the same blob to each recipient; it cannot open it.
Unsealed federations: the payload itself, as bytes (``chain.payload.pack_bytes``),
keyed by its kind. Either way a :class:`Relay` is plain bytes, so it checkpoints as files
(``server.state``) and survives a coordinator restart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from weckd.chain.errors import LinkError, PayloadError
from weckd.chain.flower import payload_records_from_bytes

if TYPE_CHECKING:  # Flower and numpy load with the first message (weckd-server reads checkpoints without them)
    from flwr.app import RecordDict
from weckd.chain.protocol import (
    KEY_ARRAYS,
    KEY_HEADER,
    KEY_MODEL_ARRAYS,
    KEY_MODEL_HEADER,
    KEY_SEALED,
    SEALED_ENTRY,
)


@dataclass
class Relay:
    """Link ``link``'s output (produced at ``site``): one blob per kind, sealed for its recipients or plain."""

    link: int
    site: str
    blobs: dict[str, bytes]
    sealed: bool

    def blob(self, kind: str, recipient: str) -> bytes:
        """The blob that hands this output to ``recipient``: sealed, one blob names all its recipients."""
        data = self.blobs.get(kind)
        if data is None or (self.sealed and recipient not in self.recipients(kind)):
            what = f"sealed for {recipient}" if self.sealed else "in the reply"
            raise LinkError(f"link {self.link + 1} (site {self.site}): no {kind} payload {what}; the site did not "
                            "return what the coordinator asked for (mismatched weckd versions?)")
        return data

    def recipients(self, kind: str) -> tuple[str, ...]:
        """Whom the ``kind`` blob is sealed for, as its header says (unverified: for routing and the audit
        log; each recipient checks the signed header itself). Empty where it is missing or unsealed."""
        if not self.sealed or kind not in self.blobs:
            return ()
        from weckd.chain.seal import SealError, read_header

        try:
            return read_header(self.blobs[kind]).recipients
        except (SealError, PayloadError):
            return ()

    def records(self, kind: str, recipient: str) -> dict[str, Any]:
        """The records that hand this output to ``recipient`` (a teacher or a model to evaluate)."""
        import numpy as np
        from flwr.app import Array, ArrayRecord

        data = self.blob(kind, recipient)
        if self.sealed:
            return {KEY_SEALED: ArrayRecord({SEALED_ENTRY: Array(np.frombuffer(data, dtype=np.uint8))})}
        return payload_records_from_bytes(data)


def relay_from_reply(content: RecordDict, link: int, site: str, sealed: bool) -> Relay:
    """What a site's train reply carries, as bytes (no payload is opened or decoded here)."""
    if sealed:
        if KEY_SEALED not in content.array_records:
            raise LinkError(f"link {link + 1}: site {site} replied without sealed payloads; the federation requires "
                            "sealing: give that site a sealing: section")
        blobs = {name: arr.numpy().tobytes() for name, arr in content.array_records[KEY_SEALED].items()}
        return Relay(link, site, blobs, True)
    plain: dict[str, bytes] = {}
    for hkey, akey in ((KEY_HEADER, KEY_ARRAYS), (KEY_MODEL_HEADER, KEY_MODEL_ARRAYS)):
        if hkey in content.config_records and akey in content.array_records:
            header = dict(content.config_records[hkey])
            buffers = {name: arr.numpy() for name, arr in content.array_records[akey].items()}
            from weckd.chain.payload import pack_bytes

            plain[str(header.get("kind"))] = pack_bytes(header, buffers)
    return Relay(link, site, plain, False)
