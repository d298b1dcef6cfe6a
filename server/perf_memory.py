#!/usr/bin/env python
"""Coordinator peak memory vs chain length: real federations of 3, 10 and 30 links.

One site (A) cycled to reach the chain length, test_resnet, 1 epoch per link on a few hundred
synthetic images, evaluation of every link on (``federation.evaluate: all``). While the run goes, a
thread polls every 0.2 s every process under ``weckd-server`` and records, per role (the SuperLink,
the ServerApp process ``flwr-serverapp`` it starts, and ``weckd-server`` itself), the peak of
``VmHWM`` (the kernel's own resident high-water mark) and of ``VmRSS`` from ``/proc/<pid>/status``.

    python benchmarks/coordinator_memory.py --links 3 10 30
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from weckd.server.demo import LocalFederation
from weckd.server.scaffold import chain_settings, make_scaffold

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federation_overhead import machine  # noqa: E402

ROLES = {"serverapp": "flwr-serverapp", "superlink": "flower-superlink", "weckd-server": "weckd-server"}
OUT = Path("docs/benchmarks/coordinator-memory")


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

    def __init__(self, root: int, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.period, self.stop = root, period, threading.Event()
        self.hwm = dict.fromkeys(ROLES, 0)
        self.rss = dict.fromkeys(ROLES, 0)
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
        raise SystemExit(f"federated run of {links} links failed; logs in {root / 'logs'}")
    return {"links": links, "seconds": time.monotonic() - start, "peak_hwm_kib": sampler.hwm,
            "peak_rss_kib": sampler.rss, "processes": {r: len(p) for r, p in sampler.pids.items()}}


def report(runs: list[dict[str, Any]], label: str, notes: str = "") -> str:
    base = runs[0]
    lines = ["# Coordinator peak memory vs chain length", "",
             f"Measured by `python benchmarks/coordinator_memory.py` (chains of "
             f"{', '.join(str(r['links']) for r in runs)} links) on {time.strftime('%Y-%m-%d', time.gmtime())}"
             f"{label}.", "", f"Machine: {machine()}.", "",
             "Setup: real federation on loopback (gRPC + TLS + SuperNode auth), one site cycled to reach the chain "
             "length, test_resnet, 1 epoch per link, 240 synthetic images, every link evaluated. Peak resident "
             "memory per process: the maximum of `VmHWM` (kernel high-water mark) in `/proc/<pid>/status`, polled "
             "every 0.2 s over the whole run for every process under `weckd-server`.", "",
             "| links | ServerApp (flwr-serverapp) MiB | SuperLink MiB | weckd-server MiB | run s |",
             "|---|---|---|---|---|"]
    for r in runs:
        h = r["peak_hwm_kib"]
        cells = []
        for role in ("serverapp", "superlink", "weckd-server"):
            rel = (h[role] / base["peak_hwm_kib"][role] - 1) * 100 if base["peak_hwm_kib"][role] else 0.0
            cells.append(f"{h[role] / 1024:.1f} ({rel:+.1f}%)")
        lines.append(f"| {r['links']} | {' | '.join(cells)} | {r['seconds']:.0f} |")
    lines += ["", f"Percentages are relative to the {base['links']}-link run; the target is within ±10%.", ""]
    if notes:
        lines += [notes.strip(), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", type=int, nargs="*", default=[3, 10, 30])
    parser.add_argument("--label", default="", help="appended to the date line (e.g. ', before the fix')")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--add", type=Path, nargs="*", default=[],
                        help="append the runs of these earlier JSON outputs (e.g. a longer chain run separately)")
    parser.add_argument("--notes", type=Path, help="a Markdown file appended to the report (the analysis)")
    args = parser.parse_args()
    runs = [r for extra in args.add for r in json.loads(extra.read_text())["runs"]]
    for n in args.links:
        with tempfile.TemporaryDirectory(prefix="weckd-mem-") as tmp:
            runs.append(one_run(n, Path(tmp)))
        print(json.dumps(runs[-1]), file=sys.stderr)
    runs.sort(key=lambda r: r["links"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "runs": runs}, indent=1) + "\n")
    text = report(runs, args.label, args.notes.read_text(encoding="utf-8") if args.notes else "")
    args.out.with_suffix(".md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
