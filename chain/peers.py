"""A party's sealing identity in the federation: its own keys and the peers' public keys it pins.

A *party* is a site (named as in ``chain.order``) or the coordinator (``coordinator``, only when the
federation delivers the final model to it). Each party's config names a ``sealing:`` section::

    sealing:
      keys: keys/own          # this party's site-<name>.x25519.key and site-<name>.ed25519.key
      peers:                  # pinned public keys: a folder holding site-<peer>.{x25519,ed25519}.pub
        B: keys/peers
        C: keys/peers

A party always pins itself (its public keys are derived from its private keys), so a site may
evaluate its own model through the same sealed path as everyone else's. Sealing for, or accepting
from, a party that is not pinned is refused with reason ``unknown-peer``: the config decides who is
trusted, never a message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from .errors import ConfigError
from .keys import key_files, load_ed25519_public, load_site_keys, load_x25519_public
from .seal import DEFAULT_MAX_BYTES, Expectation, SealError, SealHeader, fingerprint, open_sealed, seal

log = logging.getLogger(__name__)

COORDINATOR = "coordinator"


def _m(**meta: Any) -> Any:
    return meta


@dataclass(frozen=True)
class SealingSettings:
    """Where a party's sealing keys are (the ``sealing:`` section of a site's or the coordinator's config)."""

    keys: str = field(metadata=_m(path=True))
    peers: dict[str, str] = field(default_factory=dict, metadata=_m(path=True))
    max_payload_mb: float = field(default=1024.0, metadata=_m(gt=0.0, max=2047.0))


class PeerKeys(NamedTuple):
    x25519: x25519.X25519PublicKey
    ed25519: ed25519.Ed25519PublicKey


class Party:
    """Seals payloads for pinned peers and opens what pinned peers sealed for it."""

    def __init__(self, name: str, own_x25519: x25519.X25519PrivateKey, own_ed25519: ed25519.Ed25519PrivateKey,
                 peers: dict[str, PeerKeys], max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.name = name
        self._x25519, self._ed25519 = own_x25519, own_ed25519
        self.peers = {**peers, name: PeerKeys(own_x25519.public_key(), own_ed25519.public_key())}
        self.max_bytes = max_bytes

    @property
    def fingerprint(self) -> str:
        """This party's X25519 fingerprint (reported at discovery so operators can compare pins)."""
        return fingerprint(self._x25519.public_key())

    def _peer(self, name: str, where: str) -> PeerKeys:
        if name not in self.peers:
            raise SealError("unknown-peer", f"{where}: no pinned keys for {name!r} in {self.name}'s sealing.peers "
                            f"({', '.join(sorted(self.peers))}); add its .pub files to the config")
        return self.peers[name]

    def seal_for(self, recipients: Sequence[str], payload: bytes, *, run_id: str, link: int, kind: str) -> bytes:
        """``payload`` encrypted once for all ``recipients`` and signed by this party."""
        where = f"{self.name} sealing link {link + 1}"
        keys = {r: self._peer(r, where).x25519 for r in dict.fromkeys(recipients)}
        header = SealHeader(run_id=run_id, link=link, sender=self.name, model=kind)
        return seal(payload, header, keys, self._ed25519, max_bytes=self.max_bytes)

    def open_from(self, blob: bytes, *, sender: str, run_id: str, link: int, kind: str) -> bytes:
        """The payload ``sender`` sealed for this party at ``link`` of run ``run_id``; SealError otherwise."""
        where = f"{self.name} opening link {link + 1}"
        peer = self._peer(sender, where)
        expected = Expectation(run_id=run_id, link=link, sender=sender, recipient=self.name, model=kind)
        return open_sealed(blob, self._x25519, peer.ed25519, expected, max_bytes=self.max_bytes).payload


def load_party(name: str, settings: SealingSettings, source: str) -> Party:
    """Load a party's own keys and pinned peers; every problem is a ConfigError naming the config and key."""
    try:
        own = load_site_keys(name, Path(settings.keys))
    except ConfigError as err:
        raise ConfigError(f"{source}: sealing.keys: {err}") from None
    peers = {}
    for peer, folder in settings.peers.items():
        files = key_files(peer, Path(folder))
        try:
            peers[peer] = PeerKeys(load_x25519_public(files.x25519_pub), load_ed25519_public(files.ed25519_pub))
        except ConfigError as err:
            raise ConfigError(f"{source}: sealing.peers.{peer}: {err}") from None
    party = Party(name, own.x25519, own.ed25519, peers, int(settings.max_payload_mb * (1 << 20)))
    log.info("%s: sealing keys loaded (x25519 %s); pinned peers: %s", name, party.fingerprint,
             ", ".join(f"{p} {fingerprint(k.ed25519)}" for p, k in sorted(peers.items())) or "none")
    return party
