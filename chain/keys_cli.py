"""``weckd keys --site A --out DIR``: a site's sealing keys (X25519 to receive, Ed25519 to sign).

Writes ``site-A.x25519.key`` / ``.pub`` and ``site-A.ed25519.key`` / ``.pub``: private keys PEM
PKCS8 mode 0600 (they never leave the site), public keys PEM, to be pinned in the peers' configs.
Nothing is overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from .cli import run_command, setup_logging
from .keys import generate_site_keys, load_ed25519_public, load_x25519_public
from .seal import fingerprint


def keys_command(argv: Sequence[str]) -> int:
    """Create a site's sealing keys (X25519 encryption, Ed25519 signing)."""
    parser = argparse.ArgumentParser(prog="weckd keys", description=keys_command.__doc__)
    parser.add_argument("--site", required=True, help="site name, as in chain.order")
    parser.add_argument("--out", required=True, help="output folder (keep it on the site's machine)")
    parser.add_argument("--force", action="store_true", help="replace existing key files")
    args = parser.parse_args(argv)
    setup_logging()
    return run_command(lambda: _keys(args.site, Path(args.out), args.force))


def _keys(site: str, out: Path, force: bool) -> int:
    files = generate_site_keys(site, out, force=force)
    for path in files:
        print(f"wrote {path}")
    print(f"x25519 fingerprint {fingerprint(load_x25519_public(files.x25519_pub))}")
    print(f"ed25519 fingerprint {fingerprint(load_ed25519_public(files.ed25519_pub))}")
    print("share the two .pub files with the peers that pin this site; keep the .key files here")
    return 0
