"""Waiting for a file to change: woken by a touch, an append or a file that appears; a wait with no change
ends at its timeout; inotify where Linux has it, a stat poll otherwise (the same answers)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from weckd.chain import watch as watch_mod
from weckd.chain.watch import FileWatch, stamp_of


@pytest.fixture(params=["inotify", "poll"])
def make_watch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    if request.param == "poll":
        monkeypatch.setattr(watch_mod, "_inotify", lambda folders: None)
    made: list[FileWatch] = []

    def make(paths: list[Path]) -> FileWatch:
        w = FileWatch(paths, period=0.01)
        assert w.uses_inotify == (request.param == "inotify")
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


def _later(seconds: float, action) -> threading.Thread:  # type: ignore[no-untyped-def]
    t = threading.Thread(target=lambda: (time.sleep(seconds), action()))
    t.start()
    return t


def test_a_wait_without_a_change_ends_at_its_timeout(tmp_path: Path, make_watch) -> None:  # type: ignore[no-untyped-def]
    signal = tmp_path / "signal"
    signal.touch()
    w = make_watch([signal])
    (tmp_path / "another-file").write_text("x")  # the folder changes, the watched file does not
    start = time.monotonic()
    assert w.wait(0.3) is False
    assert 0.3 <= time.monotonic() - start < 2.0


def test_a_touch_ends_the_wait_at_once(tmp_path: Path, make_watch) -> None:  # type: ignore[no-untyped-def]
    signal = tmp_path / "signal"
    signal.touch()
    w = make_watch([signal])
    time.sleep(0.01)  # a later mtime than the one marked
    t = _later(0.1, signal.touch)
    start = time.monotonic()
    assert w.wait(10.0) is True
    t.join()
    assert time.monotonic() - start < 2.0
    assert w.wait(0.05) is False  # the change was marked: nothing new since


def test_a_file_that_appears_or_grows_counts_as_a_change(tmp_path: Path, make_watch) -> None:  # type: ignore[no-untyped-def]
    db, wal = tmp_path / "superlink.db", tmp_path / "superlink.db-wal"
    db.write_bytes(b"a")
    w = make_watch([db, wal])
    t = _later(0.05, lambda: wal.write_bytes(b"frame"))
    assert w.wait(10.0) is True
    t.join()
    with db.open("ab") as f:  # an append within the same mtime tick still changes the size
        f.write(b"b")
    assert w.wait(1.0) is True


def test_a_change_before_the_wait_is_not_missed(tmp_path: Path, make_watch) -> None:  # type: ignore[no-untyped-def]
    signal = tmp_path / "signal"
    w = make_watch([signal])
    signal.touch()  # after the mark, before waiting: the stamp tells
    start = time.monotonic()
    assert w.wait(10.0) is True and time.monotonic() - start < 1.0


def test_a_missing_file_stamps_as_absent(tmp_path: Path) -> None:
    assert stamp_of([tmp_path / "nothing"]) == (-1, -1)


def test_the_serverapp_pulls_when_the_superlink_wrote_and_at_least_every_few_seconds(tmp_path: Path) -> None:
    from weckd.chain.flower import superlink_files
    from weckd.server.transport import ChangeWait

    db = tmp_path / "superlink.db"
    db.write_bytes(b"x")
    changes = ChangeWait(FileWatch(superlink_files(db)), longest=1.0)
    t = _later(0.2, lambda: superlink_files(db)[1].write_bytes(b"a reply"))  # the write-ahead log grows
    start = time.monotonic()
    changes.wait(0.05)
    t.join()
    assert 0.15 < time.monotonic() - start < 0.9
    changes.before_pull()
    start = time.monotonic()
    changes.wait(0.05)  # nothing written: at most ``longest``
    assert 0.9 <= time.monotonic() - start < 1.8
