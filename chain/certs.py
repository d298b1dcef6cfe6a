"""``weckd certs``: the federation CA, the coordinator's TLS certificate and per-site auth keys.

* ``weckd certs ca --out DIR`` → ``ca.crt`` + ``ca.key`` (EC P-384, self-signed, 10 years)
* ``weckd certs server --ca-dir DIR --name HOST --ip IP`` → ``server.pem`` + ``server.key`` whose
  SANs hold the given names and IPs plus ``localhost`` and ``127.0.0.1`` (the SuperLink's own
  processes connect to 127.0.0.1)
* ``weckd certs site --site A --out DIR`` → ``site-A`` (private, OpenSSH) + ``site-A.pub``: the
  SuperNode auth key pair Flower 1.39 accepts (EC P-384; ed25519 is refused)

Private keys are written 0600, public files 0644, each atomically and never through a symbolic link;
nothing is overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import logging
import os
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import ConfigError, SecurityError
from .files import atomic_write, private_dir, refuse_symlink

log = logging.getLogger(__name__)

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write(path: Path, data: bytes, private: bool, force: bool) -> None:
    """Private keys 0600, the rest 0644; atomic, never through a link, never over a file without ``force``."""
    if os.path.lexists(path) and not force:
        raise ConfigError(f"{path}: already exists; pass --force to overwrite it")
    private_dir(path.parent)
    atomic_write(path, data, 0o600 if private else 0o644, replace=force)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(out: Path, name: str = "weckd federation CA", force: bool = False) -> Path:
    """Create the federation CA in ``out``; return the certificate's path."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    usage = x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=True,
        crl_sign=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )
    return _write_cert_and_key(out / CA_CERT, out / CA_KEY, cert, key, force)


def _write_cert_and_key(cert_path: Path, key_path: Path, cert: x509.Certificate,
                        key: ec.EllipticCurvePrivateKey, force: bool) -> Path:
    """Write a private key (0600) and its certificate, refusing to overwrite either without ``force``."""
    for path in (cert_path, key_path):
        if os.path.lexists(path) and not force:
            raise ConfigError(f"{path}: already exists; pass --force to overwrite it")
        refuse_symlink(path)  # before either file is replaced
    _write(key_path, _pem_key(key), private=True, force=force)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False, force=force)
    return cert_path


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise SecurityError(
            f"{ca_dir}: cannot read {CA_CERT}/{CA_KEY}: {err}; create them with 'weckd certs ca --out DIR'"
        ) from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SecurityError(f"{ca_dir / CA_KEY}: expected an EC private key")
    return cert, key


def make_server_cert(
    ca_dir: Path,
    names: Sequence[str] = (),
    ips: Sequence[str] = (),
    out: Path | None = None,
    days: int = 825,
    force: bool = False,
) -> Path:
    """Issue the coordinator's TLS certificate; SANs = names + ips + localhost + 127.0.0.1."""
    out = out or ca_dir
    ca_cert, ca_key = _load_ca(ca_dir)
    dns = list(dict.fromkeys([*names, "localhost"]))
    try:
        addrs = [ipaddress.ip_address(i) for i in dict.fromkeys([*ips, "127.0.0.1"])]
    except ValueError as err:
        raise ConfigError(f"--ip: {err}; give an IPv4 or IPv6 address, host names go to --name") from err
    key = ec.generate_private_key(ec.SECP384R1())
    sans = [x509.DNSName(n) for n in dns] + [x509.IPAddress(a) for a in addrs]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _write_cert_and_key(out / SERVER_CERT, out / SERVER_KEY, cert, key, force)


def make_site_key(site: str, out: Path, force: bool = False) -> tuple[Path, Path]:
    """A SuperNode auth key pair (EC P-384, OpenSSH format): ``site-<name>`` and ``site-<name>.pub``."""
    if not site or not site.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"--site {site!r}: use letters, digits, '-' or '_'")
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = out / f"site-{site}", out / f"site-{site}.pub"
    for path in (private, public):
        if os.path.lexists(path) and not force:
            raise ConfigError(f"{path}: already exists; pass --force to overwrite it")
        refuse_symlink(path)  # before either file is replaced
    _write(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
        private=True,
        force=force,
    )
    _write(
        public,
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n",
        private=False,
        force=force,
    )
    return private, public


def certs_command(argv: Sequence[str]) -> int:
    """Create the federation CA, the coordinator's TLS certificate and site auth keys."""
    from .cli import run_command, setup_logging

    parser = argparse.ArgumentParser(prog="weckd certs", description=certs_command.__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    ca = sub.add_parser("ca", help="create the federation CA (ca.crt, ca.key)")
    ca.add_argument("--out", required=True, help="folder for ca.crt and ca.key")
    srv = sub.add_parser("server", help="issue the coordinator's TLS certificate (server.pem, server.key)")
    srv.add_argument("--ca-dir", required=True, help="folder holding ca.crt and ca.key")
    srv.add_argument("--name", action="append", default=[], help="DNS name of the coordinator (repeatable)")
    srv.add_argument("--ip", action="append", default=[], help="IP address of the coordinator (repeatable)")
    srv.add_argument("--out", help="output folder (default: --ca-dir)")
    site = sub.add_parser("site", help="create a site's SuperNode auth key pair (site-NAME, site-NAME.pub)")
    site.add_argument("--site", required=True, help="site name, as in chain.order")
    site.add_argument("--out", required=True, help="output folder")
    for p in (ca, srv, site):
        p.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    setup_logging()
    return run_command(lambda: _certs(args))


def _certs(args: argparse.Namespace) -> int:
    if args.what == "ca":
        path = make_ca(Path(args.out), force=args.force)
    elif args.what == "server":
        path = make_server_cert(
            Path(args.ca_dir), args.name, args.ip, Path(args.out) if args.out else None, force=args.force
        )
    else:
        path = make_site_key(args.site, Path(args.out), force=args.force)[1]
    print(f"wrote {path}")
    return 0
