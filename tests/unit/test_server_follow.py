"""weckd-server follows its run from the ServerApp's progress file and from the SuperLink's ServerApp host, which
writes the id of each run whose ServerApp has ended (``weckd.chain.flower.SERVERAPP_ENDED``), so that Flower's
CLI is asked only when the run ended or its ServerApp is gone."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from weckd.chain.flower import SERVERAPP_ENDED
from weckd.chain.protocol import Event
from weckd.server.superlink import Paths

RUN = 1


def _started() -> list[dict[str, object]]:
    return [{"event": Event.STARTED.value, "pid": 4242, "t": time.time()},
            {"event": Event.SITES_ONLINE.value, "sites": ["A"]}]


def _end(tmp_path: Path, run_id: int = RUN) -> None:
    (tmp_path / SERVERAPP_ENDED).write_text(f"{run_id}\n")


def test_a_run_whose_serverapp_the_host_did_not_end_is_alive(tmp_path: Path) -> None:
    paths = Paths.under(tmp_path)
    assert not paths.serverapp_ended(RUN)
    _end(tmp_path, RUN + 1)  # an earlier run's
    assert not paths.serverapp_ended(RUN)


def test_a_run_whose_serverapp_the_host_ended_is_gone(tmp_path: Path) -> None:
    _end(tmp_path)
    assert Paths.under(tmp_path).serverapp_ended(RUN)


def _follow_with(tmp_path, monkeypatch, events, statuses, deadline_s=30.0):  # type: ignore[no-untyped-def]
    """weckd-server's _follow on a progress file holding ``events``, Flower answering ``statuses`` in turn."""
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
    group = SimpleNamespace(exited=lambda: None)
    out = cli._follow(fed, Paths.under(tmp_path), group, RUN, progress,  # type: ignore[arg-type]
                      ServerMetrics(1, ["A"], 60.0))
    return out, asked


def test_a_serverapp_gone_without_a_word_fails_the_run_once_flower_stays_silent(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _end(tmp_path)
    out, asked = _follow_with(tmp_path, monkeypatch, _started(), [("running", "")] * 100)
    assert out == ("finished:failed", "the ServerApp exited without reporting the end of the run")
    assert 2 <= len(asked) < 50  # asked every GONE_STATUS_S, not in a tight loop


def test_a_serverapp_gone_is_what_flower_says_once_it_has_finished_the_run(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _end(tmp_path)
    out, asked = _follow_with(tmp_path, monkeypatch, _started(),
                              [("running", ""), ("finished:failed", "ServerApp failed with exception: boom")])
    assert out == ("finished:failed", "ServerApp failed with exception: boom") and len(asked) == 2


def test_flower_is_not_asked_while_the_serverapp_runs(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Not ended and no end reported: no `flwr ls` before STATUS_EVERY_S (here: past the deadline)."""
    out, asked = _follow_with(tmp_path, monkeypatch, _started(), [], deadline_s=0.5)
    assert out[0] == "timed out" and asked == []


def test_an_earlier_runs_ended_serverapp_does_not_end_this_one(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _end(tmp_path, RUN + 1)
    out, asked = _follow_with(tmp_path, monkeypatch, _started(), [], deadline_s=0.5)
    assert out[0] == "timed out" and asked == []


def test_flower_is_asked_for_an_ended_run_once_its_serverapp_has_ended(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The `flwr ls` process (~100 MB) is not held beside the ending ServerApp: it runs after the host's word."""
    ended: list[float] = []

    def end_later() -> None:
        time.sleep(0.8)
        ended.append(time.monotonic())
        _end(tmp_path)

    threading.Thread(target=end_later, daemon=True).start()
    out, asked = _follow_with(tmp_path, monkeypatch, _started() + [{"event": Event.COMPLETED.value}],
                              [("finished:completed", "")])
    assert out == ("finished:completed", "") and len(asked) == 1 and asked[0] >= ended[0]


def test_flower_is_asked_for_an_ended_run_whose_serverapp_lingers_after_exit_wait(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from weckd.server import cli

    monkeypatch.setattr(cli, "EXIT_WAIT_S", 0.3)
    t0 = time.monotonic()
    out, asked = _follow_with(tmp_path, monkeypatch, _started() + [{"event": Event.COMPLETED.value}],
                              [("finished:completed", "")])
    assert out == ("finished:completed", "") and len(asked) == 1 and 0.3 <= asked[0] - t0 < 5.0
