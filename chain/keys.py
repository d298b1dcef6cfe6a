"""A site's sealing keys on disk: X25519 (receive) and Ed25519 (sign), made by ``weckd keys``.

Files, for site ``A``: ``site-A.x25519.key`` / ``.pub`` and ``site-A.ed25519.key`` / ``.pub``.
Private keys are PEM PKCS8, written 0600 by ``files.atomic_write`` (never through a symbolic link);
public keys are PEM SubjectPublicKeyInfo (not raw base64) so that a file holding the wrong kind of
key — a peer's X25519 key pinned as its signing key, the EC P-384 SuperNode key from ``weckd certs
site`` — is recognised and named. Every problem with a key file (missing, unreadable, wrong kind,
public where private is expected or the reverse) is a one-line ``ConfigError``: the site's config
points at the wrong file.
A private key readable by group or others loads, with a WARNING naming the ``chmod 600``.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import NamedTuple

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from .errors import ConfigError
from .files import atomic_write, private_dir, refuse_symlink

log = logging.getLogger(__name__)


class SiteKeys(NamedTuple):
    """A site's own private keys."""

    x25519: x25519.X25519PrivateKey
    ed25519: ed25519.Ed25519PrivateKey


class KeyFiles(NamedTuple):
    x25519_key: Path
    x25519_pub: Path
    ed25519_key: Path
    ed25519_pub: Path


def key_files(site: str, directory: Path) -> KeyFiles:
    """``site-<name>.x25519.key/.pub`` and ``site-<name>.ed25519.key/.pub`` in ``directory``."""
    if not site or not site.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"--site {site!r}: use letters, digits, '-' or '_'")
    d = Path(directory)
    return KeyFiles(*(d / f"site-{site}.{alg}.{ext}" for alg in ("x25519", "ed25519") for ext in ("key", "pub")))


def generate_site_keys(site: str, out: Path, *, force: bool = False) -> KeyFiles:
    """Create a site's X25519 and Ed25519 key pairs; nothing is overwritten without ``force``."""
    files = key_files(site, out)
    for path in files:
        if os.path.lexists(path) and not force:
            raise ConfigError(f"{path}: already exists; pass --force to replace the site's keys")
        refuse_symlink(path)  # before any key is replaced
    private_dir(Path(out))
    for priv, key_path, pub_path in (
        (x25519.X25519PrivateKey.generate(), files.x25519_key, files.x25519_pub),
        (ed25519.Ed25519PrivateKey.generate(), files.ed25519_key, files.ed25519_pub),
    ):
        pem = priv.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        pub = priv.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        atomic_write(key_path, pem, 0o600, replace=force)
        atomic_write(pub_path, pub, 0o644, replace=force)
    return files


def _read_pem(path: Path, want: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: {want} file not found; create the site's keys with 'weckd keys --site NAME --out DIR' "
            "or fix the path in the site config"
        ) from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the {want} ({err.strerror}); check the path and permissions") from None


def _describe(key: object) -> str:
    curve = getattr(key, "curve", None)
    name = type(key).__name__.lstrip("_").replace("PrivateKey", " private key").replace("PublicKey", " public key")
    return f"{name} ({curve.name})" if curve is not None else name


def _load_private(path: Path, want: str) -> object:
    data = _read_pem(path, want)
    try:
        if b"OPENSSH PRIVATE KEY" in data:  # e.g. the SuperNode key from 'weckd certs site'
            return serialization.load_ssh_private_key(data, password=None)
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{path}: the {want} is password-protected; weckd needs an unencrypted 0600 key") from None
    except (ValueError, UnsupportedAlgorithm):
        pass
    try:
        serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{path}: not a PEM {want}; give the .key file written by 'weckd keys'") from None
    raise ConfigError(f"{path}: holds a public key, expected an {want}; give the .key file, not the .pub")


def _load_public(path: Path, want: str) -> object:
    data = _read_pem(path, want)
    try:
        if data.startswith((b"ssh-", b"ecdsa-")):  # OpenSSH one-line public key
            return serialization.load_ssh_public_key(data)
        return serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        pass
    if b"PRIVATE KEY" in data:
        raise ConfigError(
            f"{path}: holds a private key where the {want} of a peer is expected; pin the peer's .pub "
            "file and keep its private key at that site only"
        )
    raise ConfigError(f"{path}: not a PEM {want}; pin the .pub file written by 'weckd keys'")


def _wrong_kind(path: Path, key: object, want: str) -> ConfigError:
    suffix = want.split()[0].lower() + (".key" if "private" in want else ".pub")
    return ConfigError(
        f"{path}: holds an {_describe(key)}, expected an {want}; use the site-NAME.{suffix} file written by "
        "'weckd keys' (the EC key from 'weckd certs site' is for SuperNode login, not for sealing)"
    )


def _warn_if_readable(path: Path) -> None:
    if os.name != "posix":
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s: private key is readable by group/others (mode %03o); run 'chmod 600 %s'", path, mode, path)


def load_x25519_private(path: Path) -> x25519.X25519PrivateKey:
    """This site's X25519 private key (to open what is sealed for it)."""
    key = _load_private(path, "X25519 private key")
    if not isinstance(key, x25519.X25519PrivateKey):
        raise _wrong_kind(path, key, "X25519 private key")
    _warn_if_readable(Path(path))
    return key


def load_ed25519_private(path: Path) -> ed25519.Ed25519PrivateKey:
    """This site's Ed25519 private key (to sign what it sends)."""
    key = _load_private(path, "Ed25519 private key")
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise _wrong_kind(path, key, "Ed25519 private key")
    _warn_if_readable(Path(path))
    return key


def load_x25519_public(path: Path) -> x25519.X25519PublicKey:
    """A peer's X25519 public key (to seal for it)."""
    key = _load_public(path, "X25519 public key")
    if not isinstance(key, x25519.X25519PublicKey):
        raise _wrong_kind(path, key, "X25519 public key")
    return key


def load_ed25519_public(path: Path) -> ed25519.Ed25519PublicKey:
    """A peer's pinned Ed25519 public key (to check what it sends)."""
    key = _load_public(path, "Ed25519 public key")
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise _wrong_kind(path, key, "Ed25519 public key")
    return key


def load_site_keys(site: str, directory: Path) -> SiteKeys:
    """A site's own private keys from the folder ``weckd keys`` wrote them to."""
    files = key_files(site, directory)
    return SiteKeys(load_x25519_private(files.x25519_key), load_ed25519_private(files.ed25519_key))
