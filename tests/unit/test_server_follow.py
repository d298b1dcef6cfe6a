"""weckd-server follows its run from the ServerApp's progress file and watches the ServerApp's own process (the
``started`` event's pid), so that Flower's CLI is asked only when the run ended or the app is gone."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from weckd.chain.errors import WeckdError
from weckd.chain.protocol import Event
from weckd.server.cli import _serverapp_alive


def _started(pid: int) -> list[dict[str, object]]:
    return [{"event": Event.STARTED.value, "pid": pid, "t": time.time()},
            {"event": Event.SITES_ONLINE.value, "sites": ["A"]}]


def test_before_the_serverapp_started_it_counts_as_alive() -> None:
    assert _serverapp_alive([]) and _serverapp_alive([{"event": Event.STARTED.value, "pid": "not a pid"}])


def test_a_running_serverapp_is_alive() -> None:
    assert _serverapp_alive(_started(os.getpid()))


def test_a_serverapp_that_exited_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not _serverapp_alive(_started(child.pid))


def test_a_serverapp_its_launcher_did_not_reap_yet_is_gone() -> None:
    """Flower's SuperExec does not wait for the ServerApp it launched: an exited one stays a zombie a while."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            with open(f"/proc/{child.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.02)
        assert not _serverapp_alive(_started(child.pid))
    finally:
        child.wait()


def test_the_last_start_counts() -> None:
    """A resumed run: the ServerApp of the earlier start is gone, the one that started last runs."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert _serverapp_alive(_started(child.pid) + _started(os.getpid()))


def _follow_with(tmp_path, monkeypatch, events, statuses, deadline_s=30.0, launchers=()):  # type: ignore[no-untyped-def]
    """weckd-server's _follow on a progress file holding ``events``, Flower answering ``statuses`` in turn."""
    import json
    from types import SimpleNamespace

    from weckd.server import cli
    from weckd.server.metrics import ServerMetrics

    progress = tmp_path / "progress-1.jsonl"
    progress.write_text("".join(json.dumps(e) + "\n" for e in events))
    asked: list[float] = []
    answers = iter(statuses)
    monkeypatch.setattr(cli, "run_status", lambda paths, run_id: (asked.append(time.monotonic()), next(answers))[1])
    monkeypatch.setattr(cli, "GONE_STATUS_S", 0.05)
    monkeypatch.setattr(cli, "GONE_GRACE_S", 0.3)
    monkeypatch.setattr(cli, "FOLLOW_WAIT_S", 0.05)
    monkeypatch.setattr(cli, "stop_run", lambda paths, run_id: None)
    fed = SimpleNamespace(settings=SimpleNamespace(discovery_timeout=deadline_s, link_timeout=0.0),
                          chain=SimpleNamespace(n_links=1))
    group = SimpleNamespace(exited=lambda: None, running=lambda name: list(launchers) if name == "superexec" else [])
    out = cli._follow(fed, SimpleNamespace(logs=tmp_path), group, 1, progress,  # type: ignore[arg-type]
                      ServerMetrics(1, ["A"], 60.0))
    return out, asked


def test_a_serverapp_gone_without_a_word_fails_the_run_once_flower_stays_silent(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    out, asked = _follow_with(tmp_path, monkeypatch, _started(child.pid), [("running", "")] * 100)
    assert out == ("finished:failed", "the ServerApp exited without reporting the end of the run")
    assert 2 <= len(asked) < 50  # asked every GONE_STATUS_S, not in a tight loop


def test_a_serverapp_gone_is_what_flower_says_once_it_has_finished_the_run(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    out, asked = _follow_with(tmp_path, monkeypatch, _started(child.pid),
                              [("running", ""), ("finished:failed", "ServerApp exited with code 1")])
    assert out == ("finished:failed", "ServerApp exited with code 1") and len(asked) == 2


def test_flower_is_not_asked_while_the_serverapp_runs(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Its own process alive and no end reported: no `flwr ls` before STATUS_EVERY_S (here: past the deadline)."""
    out, asked = _follow_with(tmp_path, monkeypatch, _started(os.getpid()), [], deadline_s=0.5)
    assert out[0] == "timed out" and asked == []


def test_a_superexec_that_exits_before_the_serverapp_started_fails_the_run_at_once(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """It is transient (it ends as the run's ServerApp), so the group forgets it: its exit before the ``started``
    event is the failure, told at once with its log, not at Flower's next status check or the deadline."""
    launcher = subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])
    launcher.wait()
    t0 = time.monotonic()
    with pytest.raises(WeckdError, match=r"SuperExec exited with code 2 before the run's ServerApp started; "
                                         r"see .*superexec\.log"):
        _follow_with(tmp_path, monkeypatch, [], [], deadline_s=30.0, launchers=[launcher])
    assert time.monotonic() - t0 < 5.0


def test_a_superexec_that_became_the_serverapp_may_exit_with_the_run(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Once the ``started`` event is there, the launcher's exit is the ServerApp's: the run's end is Flower's word."""
    launcher = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    launcher.wait()
    out, asked = _follow_with(tmp_path, monkeypatch, _started(launcher.pid) + [{"event": Event.FAILED.value}],
                              [("finished:failed", "ServerApp exited with code 1")], launchers=[launcher])
    assert out == ("finished:failed", "ServerApp exited with code 1") and len(asked) == 1


def test_a_superexec_still_waiting_does_not_fail_the_run(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        out, asked = _follow_with(tmp_path, monkeypatch, [], [], deadline_s=0.5, launchers=[launcher])
        assert out[0] == "timed out" and asked == []
    finally:
        launcher.kill()
        launcher.wait()


def test_flower_is_asked_for_an_ended_run_once_its_serverapp_has_exited(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The `flwr ls` process (~100 MB) is not held beside the exiting ServerApp: it runs after that exit."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.8)"])
    exited: list[float] = []
    import threading

    threading.Thread(target=lambda: (child.wait(), exited.append(time.monotonic())), daemon=True).start()
    out, asked = _follow_with(tmp_path, monkeypatch, _started(child.pid) + [{"event": Event.COMPLETED.value}],
                              [("finished:completed", "")])
    assert out == ("finished:completed", "") and len(asked) == 1 and asked[0] >= exited[0]


def test_flower_is_asked_for_an_ended_run_whose_serverapp_lingers_after_exit_wait(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from weckd.server import cli

    monkeypatch.setattr(cli, "EXIT_WAIT_S", 0.3)
    t0 = time.monotonic()
    out, asked = _follow_with(tmp_path, monkeypatch, _started(os.getpid()) + [{"event": Event.COMPLETED.value}],
                              [("finished:completed", "")])
    assert out == ("finished:completed", "") and len(asked) == 1 and 0.3 <= asked[0] - t0 < 5.0
