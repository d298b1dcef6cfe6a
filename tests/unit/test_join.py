"""A site started before its coordinator waits for it; only a definite reason ends the wait.

``probe_coordinator`` tells apart "nothing answers" (wait), "answers with a certificate the pinned CA
did not sign" (definite: wrong CA) and "answers" (the key must be registered within a grace period).
Real TLS listeners on loopback, certificates from ``weckd certs``.
"""
from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path
from typing import Iterator

import pytest
from weckd.chain.certs import make_ca, make_server_cert
from weckd.chain.errors import WeckdError
from weckd.chain.procs import free_port
from weckd.client import cli as client_cli
from weckd.client.cli import Joining, Reach, probe_coordinator
from weckd.client.site import SiteConfig


def _serve_tls(certs: Path) -> Iterator[int]:
    """A TLS listener on loopback with the coordinator certificate in ``certs`` (answers every handshake)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    ctx.set_alpn_protocols(["h2"])
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def loop() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@pytest.fixture
def federation_ca(tmp_path: Path) -> Path:
    make_ca(tmp_path / "ca")
    make_server_cert(tmp_path / "ca")
    return tmp_path / "ca"


@pytest.fixture
def coordinator(federation_ca: Path) -> Iterator[int]:
    yield from _serve_tls(federation_ca)


def _site(port: int, ca: Path, max_wait: float = 60.0) -> SiteConfig:
    return SiteConfig(site="A", superlink=f"127.0.0.1:{port}", ca=str(ca), max_wait=max_wait)


def test_nothing_listening_is_unreachable(federation_ca: Path) -> None:
    assert probe_coordinator(f"127.0.0.1:{free_port()}", str(federation_ca / "ca.crt")) is Reach.UNREACHABLE


def test_a_coordinator_signed_by_the_pinned_ca_is_up(coordinator: int, federation_ca: Path) -> None:
    assert probe_coordinator(f"127.0.0.1:{coordinator}", str(federation_ca / "ca.crt")) is Reach.UP


def test_a_coordinator_signed_by_another_ca_is_wrong_ca(coordinator: int, tmp_path: Path) -> None:
    make_ca(tmp_path / "other")
    assert probe_coordinator(f"127.0.0.1:{coordinator}", str(tmp_path / "other" / "ca.crt")) is Reach.WRONG_CA


def test_while_nothing_answers_the_site_waits_with_backoff_then_gives_up_after_max_wait(
        federation_ca: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(client_cli.time, "monotonic", lambda: clock[0])
    joining = Joining(_site(free_port(), federation_ca / "ca.crt", max_wait=100.0))
    waits = []
    for _ in range(4):
        waits.append(joining.next_wait(1))
        clock[0] += 20.0
    assert waits == [1.0, 2.0, 4.0, 4.0]  # backoff (at most 4 s), and no error within max_wait
    clock[0] += 30.0
    with pytest.raises(WeckdError, match=r"did not answer for 100s \(max_wait\).*\(unreachable\)"):
        joining.next_wait(1)


def test_max_wait_zero_waits_forever(federation_ca: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(client_cli.time, "monotonic", lambda: clock[0])
    joining = Joining(_site(free_port(), federation_ca / "ca.crt", max_wait=0.0))
    clock[0] = 7 * 86_400.0
    assert joining.next_wait(1) == 1.0


def test_a_wrong_ca_is_definite_at_once(coordinator: int, tmp_path: Path) -> None:
    make_ca(tmp_path / "other")
    with pytest.raises(WeckdError, match=r"did not sign.*\(wrong-ca\)"):
        Joining(_site(coordinator, tmp_path / "other" / "ca.crt")).next_wait(1)


def test_a_wrong_ca_ends_the_start_before_the_executor_loads_torch_and_the_data(
        coordinator: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_ca(tmp_path / "other")
    started: list[str] = []
    monkeypatch.setattr(client_cli.Group, "start", lambda self, name, *a, **k: started.append(name))
    group = client_cli.Group(tmp_path / "logs", 1.0)
    with pytest.raises(WeckdError, match=r"\(wrong-ca\)"):
        client_cli._start(_site(coordinator, tmp_path / "other" / "ca.crt"), group, tmp_path, tmp_path / "secret")
    assert started == []


def test_a_coordinator_not_up_yet_is_no_reason_to_refuse_the_start(federation_ca: Path) -> None:
    Joining(_site(free_port(), federation_ca / "ca.crt")).refuse_wrong_ca()  # nothing answers: no error, no wait


def test_a_coordinator_that_answers_but_never_admits_means_the_key_is_not_registered(
        coordinator: int, federation_ca: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(client_cli.time, "monotonic", lambda: clock[0])
    joining = Joining(_site(coordinator, federation_ca / "ca.crt"))
    assert joining.next_wait(1) == 1.0  # the coordinator may still be registering the sites' keys
    clock[0] = client_cli.KEY_GRACE_S - 1
    assert joining.next_wait(1) == 2.0
    clock[0] = client_cli.KEY_GRACE_S + 1
    with pytest.raises(WeckdError, match=r"auth key .* is not registered there under the name 'A'"):
        joining.next_wait(1)


def test_a_site_starts_no_supernode_until_its_coordinator_answers(coordinator: int, federation_ca: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(client_cli.time, "sleep", slept.append)
    Joining(_site(coordinator, federation_ca / "ca.crt")).wait_until_up()  # answers: no wait
    assert slept == []
    clock = [0.0]
    monkeypatch.setattr(client_cli.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(client_cli.time, "sleep", lambda s: (slept.append(s), clock.__setitem__(0, clock[0] + s)))
    with pytest.raises(WeckdError, match=r"did not answer for 20s \(max_wait\)"):
        Joining(_site(free_port(), federation_ca / "ca.crt", max_wait=20.0)).wait_until_up()
    assert slept == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]  # backoff up to 4 s, then max_wait (21 s waited)


def test_the_key_grace_runs_from_the_first_supernode_the_coordinator_answered(
        coordinator: int, federation_ca: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SuperNode that itself retried past the grace before exiting: the site stops at its first exit."""
    clock = [0.0]
    monkeypatch.setattr(client_cli.time, "monotonic", lambda: clock[0])
    joining = Joining(_site(coordinator, federation_ca / "ca.crt"), up_since=0.0)
    clock[0] = client_cli.KEY_GRACE_S + 30
    with pytest.raises(WeckdError, match=r"\(key-not-registered\)"):
        joining.next_wait(1)
