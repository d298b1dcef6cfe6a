"""Sealed payloads: round trip, every refusal by reason, the coordinator as a blind relay, key files, `weckd keys`."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import stat
from pathlib import Path
from typing import NamedTuple

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from weckd.chain import seal as sealmod
from weckd.chain.cli import main
from weckd.chain.errors import ConfigError, PayloadError, SecurityError
from weckd.chain.keys import (
    generate_site_keys,
    key_files,
    load_ed25519_private,
    load_ed25519_public,
    load_site_keys,
    load_x25519_private,
    load_x25519_public,
)
from weckd.chain.seal import Expectation, SealError, SealHeader, open_sealed, read_header, seal

PAYLOAD = bytes(range(256)) * 8


class Site(NamedTuple):
    x_priv: x25519.X25519PrivateKey
    x_pub: x25519.X25519PublicKey
    s_priv: ed25519.Ed25519PrivateKey
    s_pub: ed25519.Ed25519PublicKey


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Site]:
    """Keys of sites A, B, C, an outsider M and the coordinator, written and read back as files."""
    out = tmp_path_factory.mktemp("keys")
    found = {}
    for name in ("A", "B", "C", "M", "coordinator"):
        files = generate_site_keys(name, out)
        own = load_site_keys(name, out)
        found[name] = Site(
            own.x25519, load_x25519_public(files.x25519_pub), own.ed25519, load_ed25519_public(files.ed25519_pub)
        )
    return found


def _header(link: int = 1, sender: str = "A", run: str = "run-1") -> SealHeader:
    return SealHeader(run_id=run, link=link, sender=sender, model="resnet18")


def _for(sites: dict[str, Site], *names: str) -> dict[str, x25519.X25519PublicKey]:
    return {name: sites[name].x_pub for name in names}


def _expect(link: int = 1, sender: str = "A", recipient: str = "B", run: str = "run-1") -> Expectation:
    return Expectation(run_id=run, link=link, sender=sender, recipient=recipient, model="resnet18")


def _sealed(
    sites: dict[str, Site], link: int = 1, sender: str = "A", recipient: str = "B", run: str = "run-1"
) -> bytes:
    return seal(PAYLOAD, _header(link, sender, run), _for(sites, recipient), sites[sender].s_priv)


def _open_at_b(sites: dict[str, Site], blob: bytes, expected: Expectation | None = None, pinned: str = "A"):
    return open_sealed(blob, sites["B"].x_priv, sites[pinned].s_pub, expected or _expect())


def _reason(sites: dict[str, Site], blob: bytes, expected: Expectation | None = None) -> str:
    with pytest.raises(SealError) as info:
        _open_at_b(sites, blob, expected)
    assert "\n" not in str(info.value)
    return info.value.reason


def _flip(blob: bytes, i: int) -> bytes:
    return blob[:i] + bytes([blob[i] ^ 0x01]) + blob[i + 1 :]


def _header_len(blob: bytes) -> int:
    return int.from_bytes(blob[5:9], "big")


def test_round_trip_returns_payload_and_filled_header(sites: dict[str, Site]) -> None:
    header, payload = _open_at_b(sites, _sealed(sites))
    assert payload == PAYLOAD
    assert (header.run_id, header.link, header.sender, header.recipients, header.model) == (
        "run-1", 1, "A", ("B",), "resnet18"
    )  # fmt: skip
    assert header.payload_sha256 == hashlib.sha256(PAYLOAD).hexdigest()
    assert header.version == sealmod.VERSION


def test_blob_starts_with_magic_and_version(sites: dict[str, Site]) -> None:
    blob = _sealed(sites)
    assert blob[:5] == b"WKSL\x02"
    assert PAYLOAD[:64] not in blob


def test_flipped_ciphertext_byte_is_tampered(sites: dict[str, Site]) -> None:
    blob = _sealed(sites)
    ct_start = 11 + _header_len(blob) + 32 + 60 + 12 + 8
    assert _reason(sites, _flip(blob, ct_start + 100)) == "tampered"


def test_flipped_header_byte_is_rejected(sites: dict[str, Site]) -> None:
    blob = _sealed(sites)
    header_pos = 11 + blob[11:].index(b'"link":1') + len('"link":')
    assert _reason(sites, _flip(blob, header_pos)) == "tampered"  # "link":0 — a forged link index


def test_every_single_byte_flip_is_refused(sites: dict[str, Site]) -> None:
    blob = seal(b"tiny", _header(), _for(sites, "B", "C"), sites["A"].s_priv)
    for i in range(len(blob)):
        with pytest.raises(SecurityError):
            _open_at_b(sites, _flip(blob, i))


def test_payload_sealed_for_c_opened_by_b_is_wrong_recipient(sites: dict[str, Site]) -> None:
    blob = _sealed(sites, recipient="C")
    assert _reason(sites, blob) == "wrong-recipient"


def test_payload_for_c_is_refused_at_b_even_if_b_expects_c(sites: dict[str, Site]) -> None:
    blob = _sealed(sites, recipient="C")
    assert _reason(sites, blob, _expect(recipient="C")) == "wrong-recipient"  # C's key is not B's


def test_earlier_link_replayed_later_is_replay(sites: dict[str, Site]) -> None:
    # order [A, B], two cycles: A→B at link 0 and again at link 2
    old = _sealed(sites, link=0)
    assert _reason(sites, old, _expect(link=2)) == "replay"


def test_payload_of_another_run_is_replay(sites: dict[str, Site]) -> None:
    assert _reason(sites, _sealed(sites, run="run-0"), _expect(run="run-1")) == "replay"


def test_payload_signed_by_unpinned_key_is_unexpected_sender(sites: dict[str, Site]) -> None:
    forged = seal(PAYLOAD, _header(sender="A"), _for(sites, "B"), sites["M"].s_priv)
    assert _reason(sites, forged) == "unexpected-sender"


def test_unpinned_key_claiming_the_pinned_one_is_refused(sites: dict[str, Site]) -> None:
    header = dataclasses.replace(
        _header(),
        payload_sha256=hashlib.sha256(PAYLOAD).hexdigest(),
        sender_key=sealmod.raw_b64(sites["A"].s_pub),
        recipients=("B",),
        recipient_keys=(sealmod.raw_b64(sites["B"].x_pub),),
    )
    forged = sealmod._seal_frame(PAYLOAD, header, [sites["B"].x_pub], sites["M"].s_priv)
    assert _reason(sites, forged) == "tampered"


def test_signature_valid_under_no_key_is_bad_signature(sites: dict[str, Site]) -> None:
    forged = seal(PAYLOAD, _header(), _for(sites, "B"), sites["M"].s_priv)
    assert _reason(sites, _flip(forged, len(forged) - 1)) == "bad-signature"


def test_pinned_key_signing_as_another_site_is_unexpected_sender(sites: dict[str, Site]) -> None:
    blob = seal(PAYLOAD, _header(sender="C"), _for(sites, "B"), sites["A"].s_priv)
    assert _reason(sites, blob) == "unexpected-sender"


def test_unknown_frame_version_is_bad_version(sites: dict[str, Site]) -> None:
    blob = _sealed(sites)
    assert _reason(sites, blob[:4] + b"\x03" + blob[5:]) == "bad-version"
    assert _reason(sites, blob[:4] + b"\x01" + blob[5:]) == "bad-version"  # a v1 blob (one copy per recipient)


def test_payload_sealed_by_a_newer_weckd_is_bad_version(sites: dict[str, Site]) -> None:
    header = dataclasses.replace(_header(), version=3, recipients=("B",),
                                 recipient_keys=(sealmod.raw_b64(sites["B"].x_pub),))
    blob = sealmod._seal_frame(PAYLOAD, header, [sites["B"].x_pub], sites["A"].s_priv)
    blob = blob[:4] + bytes([sealmod.VERSION]) + blob[5:-64]
    blob += sites["A"].s_priv.sign(blob)  # a frame this version reads, around a newer header
    assert _reason(sites, blob) == "bad-version"


def test_hash_mismatch_is_bad_hash(sites: dict[str, Site]) -> None:
    header = dataclasses.replace(
        _header(),
        payload_sha256=hashlib.sha256(b"something else").hexdigest(),
        sender_key=sealmod.raw_b64(sites["A"].s_pub),
        recipients=("B",),
        recipient_keys=(sealmod.raw_b64(sites["B"].x_pub),),
    )
    blob = sealmod._seal_frame(PAYLOAD, header, [sites["B"].x_pub], sites["A"].s_priv)
    assert _reason(sites, blob) == "bad-hash"


def test_wrong_model_is_refused(sites: dict[str, Site]) -> None:
    expected = dataclasses.replace(_expect(), model="vit_tiny")
    assert _reason(sites, _sealed(sites), expected) == "wrong-model"


def test_truncated_or_foreign_blob_is_malformed(sites: dict[str, Site]) -> None:
    blob = _sealed(sites)
    assert _reason(sites, blob[:-1]) == "malformed"
    assert _reason(sites, b"PK\x03\x04" + blob[4:]) == "malformed"


def test_oversized_blob_is_refused_before_parsing(sites: dict[str, Site]) -> None:
    with pytest.raises(PayloadError) as info:
        open_sealed(b"\x00" * 101, sites["B"].x_priv, sites["A"].s_pub, _expect(), max_bytes=100)
    assert not isinstance(info.value, SecurityError)
    assert "over the limit of 100 bytes" in str(info.value)


def test_sealing_over_the_limit_is_refused(sites: dict[str, Site]) -> None:
    with pytest.raises(PayloadError, match="over the limit"):
        seal(PAYLOAD, _header(), _for(sites, "B"), sites["A"].s_priv, max_bytes=len(PAYLOAD))


def test_relay_can_read_the_header_but_not_the_payload(sites: dict[str, Site]) -> None:
    header = read_header(_sealed(sites))
    assert (header.sender, header.recipients, header.link) == ("A", ("B",), 1)


def test_coordinator_cannot_open_with_anything_it_holds(sites: dict[str, Site]) -> None:
    """The coordinator holds every site's public keys and its own key pairs: none decrypts a relayed payload."""
    blob = seal(PAYLOAD, _header(), _for(sites, "B", "C"), sites["A"].s_priv)
    coordinator = sites["coordinator"]
    with pytest.raises(SealError) as info:
        open_sealed(blob, coordinator.x_priv, sites["A"].s_pub, _expect())
    assert info.value.reason == "wrong-recipient"
    # Below the header checks: no slot unwraps under any key the coordinator could try.
    frame = sealmod._parse(blob, sealmod.DEFAULT_MAX_BYTES)
    eph = x25519.X25519PublicKey.from_public_bytes(frame.ephemeral)
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    publics = [s.x_pub.public_bytes(*raw) for s in sites.values()]
    for slot in frame.slots:
        for salt_pub in publics:  # every recipient key it might assume, with its own X25519 secret
            kek = sealmod._wrap_key(coordinator.x_priv.exchange(eph), frame.ephemeral, salt_pub, sealmod.VERSION)
            with pytest.raises(InvalidTag):
                kek.decrypt(slot[:12], slot[12:], frame.header_bytes)
        for key_material in publics + [frame.ephemeral]:  # public bytes used as if they were the secret
            kek = sealmod._wrap_key(key_material, frame.ephemeral, publics[1], sealmod.VERSION)
            with pytest.raises(InvalidTag):
                kek.decrypt(slot[:12], slot[12:], frame.header_bytes)
    assert b"resnet18" in blob and PAYLOAD[:32] not in blob


# ------------------------------------------------------------------------ one ciphertext, many recipients


def test_every_recipient_opens_the_same_blob(sites: dict[str, Site]) -> None:
    blob = seal(PAYLOAD, _header(), _for(sites, "B", "C", "coordinator"), sites["A"].s_priv)
    for name in ("B", "C", "coordinator"):
        opened = open_sealed(blob, sites[name].x_priv, sites["A"].s_pub, _expect(recipient=name))
        assert opened.payload == PAYLOAD and opened.header.recipients == ("B", "C", "coordinator")


def test_bytes_are_the_payload_once_whatever_the_number_of_recipients(sites: dict[str, Site]) -> None:
    payload = os.urandom(1 << 20)
    one = len(seal(payload, _header(), _for(sites, "B"), sites["A"].s_priv))
    four = len(seal(payload, _header(), _for(sites, "A", "B", "C", "coordinator"), sites["A"].s_priv))
    assert one < len(payload) + 1024
    assert four - one < 4 * 1024  # three more key slots (60 B) and their names and keys in the header


def test_one_recipient_cannot_unwrap_anothers_slot(sites: dict[str, Site]) -> None:
    """B holds a valid slot of the blob; C's slot still only opens with C's secret."""
    blob = seal(PAYLOAD, _header(), _for(sites, "B", "C"), sites["A"].s_priv)
    frame = sealmod._parse(blob, sealmod.DEFAULT_MAX_BYTES)
    eph = x25519.X25519PublicKey.from_public_bytes(frame.ephemeral)
    c_pub = sites["C"].x_pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    kek = sealmod._wrap_key(sites["B"].x_priv.exchange(eph), frame.ephemeral, c_pub, sealmod.VERSION)
    with pytest.raises(InvalidTag):
        kek.decrypt(frame.slots[1][:12], frame.slots[1][12:], frame.header_bytes)


def test_swapped_key_slots_are_refused(sites: dict[str, Site]) -> None:
    blob = seal(PAYLOAD, _header(), _for(sites, "B", "C"), sites["A"].s_priv)
    start = 11 + _header_len(blob) + 32
    swapped = blob[:start] + blob[start + 60 : start + 120] + blob[start : start + 60] + blob[start + 120 :]
    assert _reason(sites, swapped) == "tampered"  # the signature covers every slot


def test_recipient_named_with_another_key_is_wrong_recipient(sites: dict[str, Site]) -> None:
    """A blob naming B but wrapped for M's key (a sender with a wrong pin): B refuses before decrypting."""
    header = dataclasses.replace(
        _header(),
        payload_sha256=hashlib.sha256(PAYLOAD).hexdigest(),
        sender_key=sealmod.raw_b64(sites["A"].s_pub),
        recipients=("B",),
        recipient_keys=(sealmod.raw_b64(sites["M"].x_pub),),
    )
    blob = sealmod._seal_frame(PAYLOAD, header, [sites["M"].x_pub], sites["A"].s_priv)
    assert _reason(sites, blob) == "wrong-recipient"


@pytest.mark.parametrize("recipients, keys", [((), ()), (("B", "B"), ("k", "k")), (("B",), ("k", "k"))])
def test_header_without_exactly_one_key_per_distinct_recipient_is_malformed(
    sites: dict[str, Site], recipients: tuple[str, ...], keys: tuple[str, ...]
) -> None:
    header = dataclasses.replace(_header(), recipients=recipients, recipient_keys=keys)
    blob = sealmod._seal_frame(PAYLOAD, header, [sites["B"].x_pub] * max(len(recipients), 1), sites["A"].s_priv)
    assert _reason(sites, blob) == "malformed"


def test_header_slot_count_mismatch_is_malformed(sites: dict[str, Site]) -> None:
    header = dataclasses.replace(
        _header(), recipients=("B", "C"), recipient_keys=(sealmod.raw_b64(sites["B"].x_pub),) * 2
    )
    blob = sealmod._seal_frame(PAYLOAD, header, [sites["B"].x_pub], sites["A"].s_priv)  # one slot for two names
    assert _reason(sites, blob) == "malformed"


# ------------------------------------------------------------------------------------------- key files


def _one_line_config_error(fn, path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        fn(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_key_file_names_file_and_fix(tmp_path: Path) -> None:
    message = _one_line_config_error(load_x25519_private, tmp_path / "site-A.x25519.key")
    assert "not found" in message and "weckd keys" in message


def test_ec_p384_key_where_x25519_expected_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "site-A.key"
    pem = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    os.chmod(path, 0o600)
    message = _one_line_config_error(load_x25519_private, path)
    assert "EC private key (secp384r1)" in message and "expected an X25519 private key" in message


def test_openssh_supernode_key_where_x25519_expected_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "site-A"
    pem = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    assert "weckd certs site" in _one_line_config_error(load_x25519_private, path)


def test_public_key_given_as_private_is_refused(tmp_path: Path) -> None:
    files = generate_site_keys("A", tmp_path)
    assert "holds a public key" in _one_line_config_error(load_ed25519_private, files.ed25519_pub)


def test_private_key_given_as_peer_public_is_refused(tmp_path: Path) -> None:
    files = generate_site_keys("A", tmp_path)
    assert "holds a private key" in _one_line_config_error(load_x25519_public, files.x25519_key)


def test_x25519_public_pinned_as_signing_key_is_refused(tmp_path: Path) -> None:
    files = generate_site_keys("A", tmp_path)
    message = _one_line_config_error(load_ed25519_public, files.x25519_pub)
    assert "holds an X25519 public key, expected an Ed25519 public key" in message


def test_garbage_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_text("hello\n")
    assert "not a PEM" in _one_line_config_error(load_x25519_private, path)


def test_private_key_readable_by_others_warns_with_chmod(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = generate_site_keys("A", tmp_path)
    os.chmod(files.x25519_key, 0o644)
    with caplog.at_level(logging.WARNING, logger="weckd.chain.keys"):
        load_x25519_private(files.x25519_key)
    [record] = caplog.records
    assert str(files.x25519_key) in record.getMessage() and "chmod 600" in record.getMessage()


def test_private_key_0600_loads_without_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = generate_site_keys("A", tmp_path)
    with caplog.at_level(logging.WARNING, logger="weckd.chain.keys"):
        load_site_keys("A", tmp_path)
    assert caplog.records == []
    assert stat.S_IMODE(files.ed25519_key.stat().st_mode) == 0o600


def test_existing_keys_are_not_overwritten_without_force(tmp_path: Path) -> None:
    files = generate_site_keys("A", tmp_path)
    before = files.x25519_key.read_bytes()
    message = _one_line_config_error(lambda out: generate_site_keys("A", out), tmp_path)
    assert "already exists" in message and "--force" in message
    assert files.x25519_key.read_bytes() == before


def test_force_replaces_keys_and_keeps_them_private(tmp_path: Path) -> None:
    files = generate_site_keys("A", tmp_path)
    before = files.ed25519_key.read_bytes()
    os.chmod(files.ed25519_key, 0o644)
    generate_site_keys("A", tmp_path, force=True)
    assert files.ed25519_key.read_bytes() != before
    assert stat.S_IMODE(files.ed25519_key.stat().st_mode) == 0o600


# ----------------------------------------------------------------------------------------- weckd keys


def test_weckd_keys_writes_four_files_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "--site", "A", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in key_files("A", tmp_path))
    assert "fingerprint" in capsys.readouterr().out


def test_weckd_keys_again_without_force_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["keys", "--site", "A", "--out", str(tmp_path)])
    capsys.readouterr()
    assert main(["keys", "--site", "A", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err


def test_weckd_keys_with_force_exits_0(tmp_path: Path) -> None:
    main(["keys", "--site", "A", "--out", str(tmp_path)])
    assert main(["keys", "--site", "A", "--out", str(tmp_path), "--force"]) == 0


def test_weckd_keys_bad_site_name_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "--site", "../A", "--out", str(tmp_path)]) == 2
    assert "--site" in capsys.readouterr().err


def test_weckd_keys_without_site_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["keys", "--out", str(tmp_path)])
    assert info.value.code == 2
