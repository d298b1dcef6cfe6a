"""A link's output as the coordinator holds it, and the part of it each message to a site carries.

A reply holds one payload per kind (``weights`` or ``logits``), each a uint8 array in one record
(``chain.flower.read_payloads``). Sealed federations (``federation.sealing``): the producing site
encrypts each output once for every recipient the coordinator names (``chain.seal``: one ciphertext,
the key wrapped per recipient); the coordinator stores and forwards the same blob to each recipient
and cannot open it. Unsealed federations: the payload bytes themselves (``chain.payload``), in the same
layout. Either way a :class:`Relay` is bytes (read-only views into the reply's own arrays, which the messages
that hand it on carry as they are), so it checkpoints as files (``server.state``) and survives a coordinator
restart.
"""
from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weckd.chain.errors import LinkError, PayloadError
from weckd.chain.flower import payload_key, read_payloads, request_payload

if TYPE_CHECKING:  # Flower and numpy load with the first message (weckd-server reads checkpoints without them)
    from flwr.app import RecordDict


@dataclass
class Relay:
    """Link ``link``'s output (produced at ``site``): one blob per kind, sealed for its recipients or plain."""

    link: int
    site: str
    # views into the reply's arrays (``read_payloads(view=True)``), bytes, or the checkpoint's files
    # (``server.state.CheckpointBlobs``)
    blobs: Mapping[str, bytes | memoryview]
    sealed: bool
    _records: weakref.WeakValueDictionary[str, Any] = field(default_factory=weakref.WeakValueDictionary,
                                                             repr=False, compare=False)
    # where ``server.state.save_state`` wrote these blobs: its folder, and each blob's file and SHA-256
    saved: tuple[Path, dict[str, dict[str, str]]] | None = field(default=None, repr=False, compare=False)

    def blob(self, kind: str, recipient: str) -> bytes | memoryview:
        """The blob that hands this output to ``recipient``: sealed, one blob names all its recipients."""
        data = self.blobs.get(kind)  # looked up once: a relay held on disk reads its file for each lookup
        if data is None or (self.sealed and recipient not in _sealed_for(data)):
            what = f"sealed for {recipient}" if self.sealed else "in the reply"
            raise LinkError(f"link {self.link + 1} (site {self.site}): no {kind} payload {what}; the site did not "
                            "return what the coordinator asked for (mismatched weckd versions?)")
        return data

    def recipients(self, kind: str) -> tuple[str, ...]:
        """Whom the ``kind`` blob is sealed for, as its header says (unverified: for routing and the audit
        log; each recipient checks the signed header itself). Empty where it is missing or unsealed."""
        data = self.blobs.get(kind) if self.sealed else None
        return () if data is None else _sealed_for(data)

    def records(self, kind: str, recipient: str) -> dict[str, Any]:
        """The records that hand this output to ``recipient`` (a teacher or a model to evaluate): the same record
        object for every recipient (the blob is the same), so the ServerApp holds one copy of it however many
        messages carry it, and Flower pushes it once. The relay holds it only while a message does (Flower caches
        the chunks it cut it into there): a relay kept as the checkpoint does not keep its last exchange's record."""
        data = self.blob(kind, recipient)
        held = self._records.get(kind)
        if held is None:
            held = self._records[kind] = request_payload(self.sealed, data)[self.record_key]
        return {self.record_key: held}

    @property
    def record_key(self) -> str:
        return payload_key(self.sealed)


def _sealed_for(blob: bytes | memoryview) -> tuple[str, ...]:
    """The recipients a sealed blob's header names (unverified), empty where it has no readable header."""
    from weckd.chain.seal import SealError, read_header

    try:
        return read_header(blob).recipients
    except (SealError, PayloadError):
        return ()


def relay_from_reply(content: RecordDict, link: int, site: str, sealed: bool) -> Relay:
    """What a site's train reply carries, as views into the reply's arrays (no payload is opened, decoded or
    copied here): the messages that hand it on carry those same arrays."""
    try:
        got = read_payloads(content, f"link {link + 1} (site {site})", view=True)
    except PayloadError as err:
        raise LinkError(str(err)) from err
    if got is not None and got[0] != sealed:
        what = "plain" if sealed else "sealed"
        fix = ("give that site a sealing: section" if sealed else
               "the federation does not seal: remove that site's sealing: section or set federation.sealing")
        raise LinkError(f"link {link + 1}: site {site} replied with {what} payloads; {fix}")
    if got is None and sealed:
        raise LinkError(f"link {link + 1}: site {site} replied without sealed payloads; the federation requires "
                        "sealing: give that site a sealing: section")
    return Relay(link, site, got[1] if got else {}, sealed)
