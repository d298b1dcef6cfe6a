"""``weckd-server --hold``: after a completed chain (this run, or the checkpoint found at start) it keeps serving
the final metrics until SIGTERM and exits 0; without ``--hold`` a complete checkpoint is refused (exit 2) and a
failed run exits 1 with or without it. No SuperLink is started: the checkpoint path never needs one, and the
"this run" path replaces the federation step (``_federate``) with its outcome."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from weckd.chain.errors import LinkError
from weckd.server import cli
from weckd.server.metrics import ServerMetrics
from weckd.server.state import LinkRecord, new_state, save_state

from .fake_grid import federation

COMPLETED = 'weckd_run_state{weckd_run_state="completed"} 1.0'


@pytest.fixture(autouse=True)
def _restore_sigterm() -> Iterator[None]:
    """weckd-server installs its own SIGTERM handler in this process; put pytest's back afterwards."""
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _coordinator(tmp_path: Path, complete: bool) -> tuple[Path, int]:
    """A federation config whose TLS files and site keys exist (their content is not read before the SuperLink
    starts), with a complete chain checkpoint of two links when ``complete``; the config and a free metrics port."""
    fed = federation(tmp_path, ["A", "B"], ca="certs/ca.crt", cert="certs/server.pem", key="certs/server.key",
                     state_dir="state", output_dir="runs")  # given, so they resolve against tmp_path
    for name in ("certs/ca.crt", "certs/server.pem", "certs/server.key", "keys/site-A.pub", "keys/site-B.pub"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("unused\n")
    if complete:
        state = new_state(fed)
        for k, site in enumerate(("A", "B")):
            state.links.append(LinkRecord(k, site, "test_resnet", "scratch", {"val-accuracy": 0.7}, 1.0, 10, 20))
        state.next_slot, state.completed = 2, True
        save_state(tmp_path / "state", state)
    return tmp_path / "federation.yaml", _free_port()


class Scraper(threading.Thread):
    """Scrapes ``/metrics`` until it shows a completed run, then sends SIGTERM to this process (also at the
    deadline, so a hold that never shows it cannot hang the test), unless the CLI returned first."""

    def __init__(self, port: int, deadline_s: float = 30.0) -> None:
        super().__init__(daemon=True)
        self.url, self.deadline = f"http://127.0.0.1:{port}/metrics", time.monotonic() + deadline_s
        self.body, self.returned, self.signalled = "", threading.Event(), False

    def run(self) -> None:
        while time.monotonic() < self.deadline and not self.returned.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=2) as reply:
                    self.body = reply.read().decode()
            except OSError:
                pass
            if COMPLETED in self.body:
                time.sleep(0.3)  # still up a moment later: held, not exiting
                break
            time.sleep(0.05)
        if not self.returned.is_set():
            self.signalled = True
            os.kill(os.getpid(), signal.SIGTERM)


def _serve_until_sigterm(config: Path, port: int, *extra: str) -> tuple[int, Scraper]:
    scraper = Scraper(port)
    scraper.start()
    try:
        code = cli.main(["-c", str(config), "--set", f"federation.metrics_port={port}", *extra])
    finally:
        scraper.returned.set()
        scraper.join()
    return code, scraper


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_hold_on_a_complete_checkpoint_serves_its_state_until_sigterm_then_exits_0(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, port = _coordinator(tmp_path, complete=True)

    code, scraper = _serve_until_sigterm(config, port, "--hold")

    assert code == 0 and scraper.signalled
    assert COMPLETED in scraper.body and "weckd_chain_links_completed 2.0" in scraper.body
    err = capsys.readouterr().err
    assert "is complete (2 links); holding (--hold)" in err and "stopped while holding" in err
    assert not _listening(port)  # /metrics closed on the way out


def test_hold_after_this_run_completed_serves_until_sigterm_then_exits_0(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    config, port = _coordinator(tmp_path, complete=False)

    def completed_run(*args: object) -> int:
        metrics = next(a for a in args if isinstance(a, ServerMetrics))
        metrics.observe({"event": "completed", "seconds": 1.0})
        return 0

    monkeypatch.setattr(cli, "_federate", completed_run)

    code, scraper = _serve_until_sigterm(config, port, "--hold")

    assert code == 0 and scraper.signalled and COMPLETED in scraper.body
    assert "the chain completed; holding (--hold)" in capsys.readouterr().err


def test_without_hold_a_completed_run_exits_0_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, port = _coordinator(tmp_path, complete=False)
    monkeypatch.setattr(cli, "_federate", lambda *args: 0)

    code, scraper = _serve_until_sigterm(config, port)

    assert code == 0 and not scraper.signalled  # returned by itself, before any SIGTERM


def test_without_hold_a_complete_checkpoint_is_refused_with_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, port = _coordinator(tmp_path, complete=True)

    code = cli.main(["-c", str(config), "--set", f"federation.metrics_port={port}"])

    assert code == 2 and "pass --fresh to start a new chain" in capsys.readouterr().err


def test_hold_does_not_hide_a_failed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    config, port = _coordinator(tmp_path, complete=False)

    def failed_run(*args: object) -> int:
        raise LinkError("run 1 finished:failed: site B refused the request")

    monkeypatch.setattr(cli, "_federate", failed_run)

    code, scraper = _serve_until_sigterm(config, port, "--hold")

    assert code == 1 and not scraper.signalled
    err = capsys.readouterr().err
    assert "site B refused the request" in err and "holding" not in err
