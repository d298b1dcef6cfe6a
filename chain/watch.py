"""Waiting for a file to change without waking up while nothing happens.

A federation waits a lot: a site's executor for its SuperNode's task signal, the coordinator's SuperExec for
weckd-server's run signal, the ServerApp for the SuperLink's database, weckd-server for the ServerApp's
progress file. :class:`FileWatch` blocks on Linux's inotify (through libc; the folder is watched, so the file
need not exist yet) and compares the file's ``(mtime, size)`` when the folder reports an event; where inotify
cannot be had it reads that stamp every ``period`` seconds instead. Either way a wait ends after its timeout,
so a missed event costs at most one timeout.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import time
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

# inotify(7): the events that can mean a file in the folder changed
_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_CREATE = 0x2, 0x4, 0x8, 0x80, 0x100
_MASK = _IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE
_IN_NONBLOCK, _IN_CLOEXEC = 0o4000, 0o2000000

Stamp = tuple[int, ...]


def stamp_of(paths: Sequence[Path]) -> Stamp:
    """``(mtime_ns, size)`` of each file, ``(-1, -1)`` for one that is not there."""
    out: list[int] = []
    for path in paths:
        try:
            st = path.stat()
            out += [st.st_mtime_ns, st.st_size]
        except OSError:
            out += [-1, -1]
    return tuple(out)


def _inotify(folders: set[Path]) -> int | None:
    """An inotify descriptor watching ``folders``, or None where the platform has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        init, add = libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError):
        return None
    fd = init(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        return None
    for folder in folders:
        if add(fd, os.fsencode(folder), _MASK) < 0:
            os.close(fd)
            log.debug("inotify: cannot watch %s (errno %d); polling instead", folder, ctypes.get_errno())
            return None
    return int(fd)


class FileWatch:
    """Tells when any of ``paths`` changed since the last :meth:`mark` (their folders must exist)."""

    def __init__(self, paths: Sequence[Path], period: float = 0.05) -> None:
        self.paths, self.period = list(paths), period
        self.fd = _inotify({p.parent for p in self.paths})
        self.seen = stamp_of(self.paths)

    @property
    def uses_inotify(self) -> bool:
        return self.fd is not None

    def mark(self) -> None:
        """Take the files as they are now as the state to compare with."""
        self._drain()
        self.seen = stamp_of(self.paths)

    def changed(self) -> bool:
        return stamp_of(self.paths) != self.seen

    def wait(self, timeout: float) -> bool:
        """Until a file changed since the last mark (True) or ``timeout`` seconds passed (False); marks the change."""
        deadline = time.monotonic() + timeout
        while True:
            if self.changed():
                self.mark()
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.fd is None:
                time.sleep(min(self.period, left))
            elif select.select([self.fd], [], [], left)[0]:
                self._drain()

    def _drain(self) -> None:
        if self.fd is None:
            return
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
