"""``weckd bench perf`` part ``memory``: coordinator peak memory vs chain length.

Real federations of each requested length (default 3, 10 and 30 links): one site (A) cycled to reach
the chain length, test_resnet, 1 epoch per link on a few hundred synthetic images, evaluation of every
link on (``federation.evaluate: all``). While the run goes, a thread polls every 20 ms every process
under ``weckd-server`` and records, per role (the SuperLink, in whose process each run's ServerApp runs as
a thread, and ``weckd-server`` itself), the peak of ``RssAnon`` (resident anonymous memory: what the
process itself allocated), of ``VmRSS`` and of ``VmHWM`` (the kernel's resident high-water mark,
which also counts file-backed pages such as shared-library code) from ``/proc/<pid>/status``.

The two measures differ at the end of every run: as a torch process exits, the destructors of its
shared libraries page in about 100 MiB of library code and data (file-backed, ``RssFile``) in its
last ~0.2 s, whatever the chain length. ``VmHWM`` keeps that exit spike, so the comparison across
chain lengths uses the peak of ``RssAnon``.
"""
from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from weckd.chain.artifacts import write_json
from weckd.chain.errors import LinkError
from weckd.chain.files import atomic_write_text, private_dir
from weckd.chain.perf import PerfOptions, TargetCheck, machine_line

from .demo import LocalFederation
from .scaffold import chain_settings, make_scaffold

ROLES = {"superlink": "weckd.server.flower_superlink", "weckd-server": "weckd-server"}
TARGET_PCT = 10.0


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(stat.parent.name))
    return kids


def _role(pid: int) -> str | None:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    return next((role for role, needle in ROLES.items() if needle in cmd), None)


def _kib(pid: int, key: str) -> int:
    try:
        line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(key + ":"))
    except (OSError, StopIteration):
        return 0
    return int(line.split()[1])


class Sampler(threading.Thread):
    """Polls the process tree under ``root`` every ``period`` seconds; keeps the peaks per role."""

    def __init__(self, root: int, period: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.root, self.period, self.stop = root, period, threading.Event()
        self.hwm = dict.fromkeys(ROLES, 0)
        self.rss = dict.fromkeys(ROLES, 0)
        self.anon = dict.fromkeys(ROLES, 0)
        self.pids: dict[str, set[int]] = {r: set() for r in ROLES}

    def run(self) -> None:
        while not self.stop.is_set():
            kids, todo = _children(), [self.root]
            while todo:
                pid = todo.pop()
                todo.extend(kids.get(pid, []))
                role = _role(pid)
                if role is not None:
                    self.pids[role].add(pid)
                    self.hwm[role] = max(self.hwm[role], _kib(pid, "VmHWM"))
                    self.rss[role] = max(self.rss[role], _kib(pid, "VmRSS"))
                    self.anon[role] = max(self.anon[role], _kib(pid, "RssAnon"))
            self.stop.wait(self.period)


def one_run(links: int, root: Path) -> dict[str, Any]:
    chain = chain_settings({"chain": {"order": ["A"], "cycles": links},
                            "link": {"epochs": 1}, "data": {"synthetic": {"samples": 240}}})
    scaffold = make_scaffold(root, chain, {"evaluate": "all"})
    fed = LocalFederation(scaffold)
    start = time.monotonic()
    try:
        fed.start_server()
        sampler = Sampler(fed.server.pid)
        sampler.start()
        fed.wait_ready()
        fed.start_site("A")
        rc = fed.wait_server(900.0)
    finally:
        fed.stop()
    sampler.stop.set()
    sampler.join()
    if rc != 0:
        raise LinkError(f"benchmark federation of {links} links failed; logs in {root / 'logs'}")
    return {"links": links, "seconds": time.monotonic() - start, "peak_hwm_kib": sampler.hwm,
            "peak_rss_kib": sampler.rss, "peak_anon_kib": sampler.anon,
            "processes": {r: len(p) for r, p in sampler.pids.items()}}



COLUMNS = (("superlink", "peak_anon_kib", "SuperLink + ServerApp anon"),
           ("superlink", "peak_hwm_kib", "SuperLink + ServerApp VmHWM"),
           ("weckd-server", "peak_anon_kib", "weckd-server anon"), ("total", "peak_anon_kib", "both, anon"))


def _value(run: dict[str, Any], role: str, key: str) -> int:
    if role == "total":
        return sum(run[key][r] for r in ROLES)
    return int(run[key][role])


def _deviation(runs: list[dict[str, Any]], role: str, key: str) -> float:
    """The largest deviation from the first run, in percent."""
    ref = _value(runs[0], role, key)
    return max(abs(_value(r, role, key) / ref - 1) * 100 for r in runs) if ref else 0.0


def report(runs: list[dict[str, Any]]) -> str:
    base = runs[0]
    lines = ["# Coordinator peak memory vs chain length", "",
             f"Measured by `weckd bench perf --parts memory --links {' '.join(str(r['links']) for r in runs)}` "
             f"on {time.strftime('%Y-%m-%d', time.gmtime())}.", "", f"Machine: {machine_line()}.", "",
             "Setup: real federation on loopback (gRPC + TLS + SuperNode auth), one site cycled to reach the chain "
             "length, test_resnet, 1 epoch per link, 240 synthetic images, every link evaluated, payloads sealed, "
             "weights relayed in float16. Every process under `weckd-server` is polled every 20 ms over the whole "
             "run; per role the table gives the peak of `RssAnon` (resident anonymous memory, what the process "
             "allocated itself) and, for the SuperLink (each run's ServerApp runs in its process), the kernel's "
             "high-water mark `VmHWM` (which also counts file-backed pages such as shared-library code).", "",
             "| links | " + " MiB | ".join(label for _, _, label in COLUMNS) + " MiB | run s |",
             "|---|" + "---|" * (len(COLUMNS) + 1)]
    for r in runs:
        cells = []
        for role, key, _ in COLUMNS:
            value, ref = _value(r, role, key), _value(base, role, key)
            cells.append(f"{value / 1024:.1f} ({(value / ref - 1) * 100 if ref else 0.0:+.1f}%)")
        lines.append(f"| {r['links']} | {' | '.join(cells)} | {r['seconds']:.0f} |")
    lines += ["", f"Percentages are relative to the first run ({base['links']} links); the target is within "
              f"±{TARGET_PCT:.0f}%.", ""]
    return "\n".join(lines)


def memory_part(opts: PerfOptions) -> list[TargetCheck]:
    """(d) Coordinator peak memory for each chain length in ``opts.links``: memory.md, memory.json."""
    runs = []
    for n in opts.links:
        with tempfile.TemporaryDirectory(prefix="weckd-mem-") as tmp:
            runs.append(one_run(n, Path(tmp)))
    private_dir(opts.out)
    write_json(opts.out / "memory.json", {"machine": machine_line(), "runs": runs})
    atomic_write_text(opts.out / "memory.md", report(runs))
    return memory_checks(runs)


def memory_checks(runs: list[dict[str, Any]]) -> list[TargetCheck]:
    lengths = [r["links"] for r in runs]
    span = f"{min(lengths)}–{max(lengths)} links"
    return [TargetCheck("memory", f"{label} peak, {span}: largest deviation from {runs[0]['links']} links",
                        f"{_deviation(runs, role, key):.1f}%", f"≤ {TARGET_PCT:.0f}%",
                        _deviation(runs, role, key) <= TARGET_PCT) for role, key, label in COLUMNS]
