"""What the processes of a live federation hold: sampled from /proc while it runs.

Every process whose command line names the federation's folder is given a role from its command line;
for each one the watcher keeps the peak resident memory (``VmHWM``) and whether torch's library was
ever mapped into it (``/proc/PID/maps``), which catches an import made at run time as well as at start.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

# (command-line marker, role), most specific first
ROLES = (
    ("weckd.client.executor", "executor"),
    ("weckd.client.supernode", "supernode"),
    ("weckd-client", "site-supervisor"),
    ("flwr-serverapp", "serverapp"),
    ("weckd.server.superexec", "superexec"),
    ("weckd.server.flower_superlink", "superlink"),
    ("weckd-server", "weckd-server"),
)
COORDINATOR_ROLES = ("weckd-server", "serverapp", "superexec", "superlink")


@dataclass
class Seen:
    role: str
    peak_rss_mb: float = 0.0
    torch: bool = False


def _role(cmdline: str) -> str | None:
    return next((role for marker, role in ROLES if marker in cmdline), None)


def _peak_rss_mb(pid: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class ProcWatch:
    """Samples the federation's processes every ``every`` seconds between ``start()`` and ``stop()``."""

    def __init__(self, root: Path, every: float = 0.5) -> None:
        self.marker = str(root)
        self.every = every
        self.seen: dict[tuple[int, str], Seen] = {}  # by pid and role: the SuperExec becomes the ServerApp
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    def sample(self) -> None:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if self.marker not in cmdline:
                    continue
                role = _role(cmdline)
                if role is None:
                    continue
                key = (int(proc.name), role)
                known = self.seen.get(key)
                peak = _peak_rss_mb(proc.name)
                torch = (known is not None and known.torch) or "libtorch" in (proc / "maps").read_text(errors="replace")
            except OSError:  # the process exited meanwhile: a sample is kept only with both its readings
                continue
            seen = self.seen.setdefault(key, Seen(role))
            seen.peak_rss_mb, seen.torch = max(seen.peak_rss_mb, peak), torch

    def by_role(self) -> dict[str, list[Seen]]:
        out: dict[str, list[Seen]] = {}
        for seen in self.seen.values():
            out.setdefault(seen.role, []).append(seen)
        return out
