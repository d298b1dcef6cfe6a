"""weckd certs / weckd keys: CA, server certificate SANs, site auth keys, file modes, no silent overwrite,
never a write through a symbolic link."""
from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from weckd.chain.certs import certs_command, make_ca, make_server_cert, make_site_key
from weckd.chain.errors import ConfigError, SecurityError
from weckd.chain.keys import generate_site_keys


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_has_given_and_loopback_sans_signed_by_the_ca(tmp_path: Path) -> None:
    make_ca(tmp_path)
    make_server_cert(tmp_path, names=["coord.example.org"], ips=["10.0.0.5"])
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"coord.example.org", "localhost"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("10.0.0.5"),
                                                             ipaddress.ip_address("127.0.0.1")}
    cert.verify_directly_issued_by(ca)


def test_private_keys_are_0600(tmp_path: Path) -> None:
    make_ca(tmp_path)
    make_server_cert(tmp_path)
    private, public = make_site_key("A", tmp_path)
    assert _mode(tmp_path / "ca.key") == _mode(tmp_path / "server.key") == _mode(private) == 0o600
    assert _mode(public) & 0o044  # the public key is readable


def test_site_key_is_p384_openssh(tmp_path: Path) -> None:
    private, public = make_site_key("A", tmp_path)
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_existing_files_are_not_overwritten_without_force(tmp_path: Path) -> None:
    make_site_key("A", tmp_path)
    before = (tmp_path / "site-A").read_bytes()
    with pytest.raises(ConfigError, match="already exists; pass --force"):
        make_site_key("A", tmp_path)
    make_site_key("A", tmp_path, force=True)
    assert (tmp_path / "site-A").read_bytes() != before


def test_cli_refuses_overwrite_with_exit_2(tmp_path: Path) -> None:
    assert certs_command(["ca", "--out", str(tmp_path)]) == 0
    assert certs_command(["ca", "--out", str(tmp_path)]) == 2
    assert certs_command(["ca", "--out", str(tmp_path), "--force"]) == 0


def test_server_cert_without_ca_is_a_clear_error(tmp_path: Path) -> None:
    assert certs_command(["server", "--ca-dir", str(tmp_path)]) == 1


@pytest.mark.usefixtures("umask_022")
def test_ca_key_is_0600_and_certificate_0644_under_umask_022(tmp_path: Path) -> None:
    make_ca(tmp_path)
    assert (_mode(tmp_path / "ca.key"), _mode(tmp_path / "ca.crt")) == (0o600, 0o644)


@pytest.mark.usefixtures("umask_022")
def test_sealing_keys_are_0600_and_public_keys_0644_under_umask_022(tmp_path: Path) -> None:
    files = generate_site_keys("A", tmp_path / "keys")
    assert _mode(files.x25519_key) == _mode(files.ed25519_key) == 0o600
    assert _mode(files.x25519_pub) == _mode(files.ed25519_pub) == 0o644
    assert _mode(tmp_path / "keys") == 0o700


def test_ca_certificate_is_not_written_through_a_dangling_symlink(tmp_path: Path) -> None:
    out, target = tmp_path / "certs", tmp_path / "elsewhere" / "ca.crt"
    out.mkdir()
    target.parent.mkdir()
    (out / "ca.crt").symlink_to(target)
    assert certs_command(["ca", "--out", str(out), "--force"]) == 1
    assert not target.exists() and (out / "ca.crt").is_symlink()


def test_dangling_symlink_counts_as_an_existing_file_without_force(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="already exists; pass --force"):
        make_ca(tmp_path)
    assert not (tmp_path / "nowhere").exists()


def test_private_key_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    make_site_key("A", tmp_path)
    (tmp_path / "site-A").unlink()
    (tmp_path / "site-A").symlink_to(target)
    with pytest.raises(SecurityError, match="symbolic link"):
        make_site_key("A", tmp_path, force=True)
    assert target.read_bytes() == b"keep me"


def test_sealing_key_symlink_is_refused_with_force(tmp_path: Path) -> None:
    files = generate_site_keys("A", tmp_path)
    files.ed25519_key.unlink()
    files.ed25519_key.symlink_to(tmp_path / "nowhere")
    before = files.x25519_key.read_bytes()
    with pytest.raises(SecurityError, match="symbolic link"):
        generate_site_keys("A", tmp_path, force=True)
    assert not (tmp_path / "nowhere").exists() and files.x25519_key.read_bytes() == before  # nothing replaced
