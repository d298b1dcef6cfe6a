"""weckd-server follows its run from the ServerApp's progress file and watches the ServerApp's own process (the
``started`` event's pid), so that Flower's CLI is asked only when the run ended or the app is gone."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from weckd.chain.protocol import Event
from weckd.server.cli import _serverapp_alive


def _started(pid: int) -> list[dict[str, object]]:
    return [{"event": Event.STARTED.value, "pid": pid, "t": time.time()}, {"event": Event.SITES_ONLINE.value}]


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
