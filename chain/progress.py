"""Progress for long work: a bar when stderr is a terminal, one log line per epoch otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


class Progress:
    """Steps of one training job; draws a bar on a terminal and stays silent elsewhere."""

    def __init__(self, total: int, label: str, enabled: bool | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.done = 0
        self.start = time.monotonic()
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.postfix = ""

    @property
    def on_terminal(self) -> bool:
        return self.enabled

    def update(self, steps: int = 1, postfix: str | None = None) -> None:
        self.done += steps
        if postfix is not None:
            self.postfix = postfix
        if self.enabled:
            self._draw()

    def close(self) -> None:
        if self.enabled:
            self._draw()
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _draw(self) -> None:
        frac = min(self.done / self.total, 1.0)
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        elapsed = time.monotonic() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        sys.stderr.write(f"\r{self.label} [{bar}] {frac:4.0%} {elapsed:5.1f}s eta {eta:5.1f}s {self.postfix}\033[K")
        sys.stderr.flush()
