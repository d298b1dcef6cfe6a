"""The Flower adapter's quiet waiting: a SuperNode that signals new tasks to its executor, and polls that slow
down the longer a site idles."""
from __future__ import annotations

from pathlib import Path

import flwr.supernode.start_client_internal as sci
import pytest
from weckd.chain import flower
from weckd.chain.flower import IdlePoll, signal_new_tasks, task_signal_mtime


def test_the_supernode_touches_the_signal_only_when_it_stored_a_message(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([None, 7, None])
    monkeypatch.setattr(sci, "_pull_and_store_message", lambda **kwargs: next(answers))
    signal = tmp_path / "task-signal"
    signal_new_tasks(signal)
    assert sci._pull_and_store_message(state=None) is None and task_signal_mtime(signal) is None
    assert sci._pull_and_store_message(state=None) == 7  # the run id goes through unchanged
    first = task_signal_mtime(signal)
    assert first is not None
    assert sci._pull_and_store_message(state=None) is None and task_signal_mtime(signal) == first


def test_polls_slow_down_in_steps_the_longer_a_site_idles(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(flower._time, "monotonic", lambda: now[0])
    poll = IdlePoll(0.2, 1.0, 10.0, 3.0, 60.0)
    waits = []
    for idle in (0.0, 9.9, 10.0, 59.9, 60.0, 3600.0):
        now[0] = 1000.0 + idle
        waits.append(poll.wait())
    assert waits == [0.2, 0.2, 1.0, 1.0, 3.0, 3.0]
    poll.worked()
    assert poll.wait() == 0.2
