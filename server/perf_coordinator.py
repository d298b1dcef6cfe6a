"""``weckd bench perf`` part ``coordinator``: what the coordinator and a waiting federation cost.

One federation on loopback (weckd-server + 3 weckd-client processes, gRPC + TLS + SuperNode auth,
payloads sealed, ``evaluate: all``), ``resnet18`` at 64 px on real images when ``--real-data`` names a
MedMNIST ``.npz`` (its training split cut across the sites), on synthetic 64-px images otherwise; one
torch thread per site. While it runs, a thread reads ``/proc`` every 0.1 s. Measured, against the
targets of the lean coordinator:

* **time to the first link**: the sites start first and wait for their coordinator; from
  ``weckd-server``'s start to link 1's ``link-start`` event (target ≤ 20 s);
* **coordinator memory**: the peak of the summed resident memory (``VmRSS``) of ``weckd-server``,
  the SuperLink (``weckd.server.flower_superlink``, in which each run's ServerApp runs as a thread), the ``flwr``
  CLI processes and the report's drawing, and any SuperExec or ``flwr-serverapp`` process (none should start)
  (target ≤ 400 MB);
* **quiet while a link trains**: from the moment the training site reports ``training`` until it
  stops, the CPU time of every federation process except the training executor, as % of one core
  (target ≤ 5 %);
* **federated / in-process**: each link's ``train`` round trip against the same link trained in this
  process (same data split, seed and threads) right after the federation stopped (target ≤ 1.1×).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weckd.chain.artifacts import write_json
from weckd.chain.errors import ConfigError, LinkError
from weckd.chain.files import atomic_write_text, private_dir
from weckd.chain.perf import PerfOptions, TargetCheck, machine_line

from .demo import LocalFederation
from .perf_federation import in_process_seconds
from .scaffold import SITE_HEARTBEAT, chain_settings, make_scaffold
from .status import read_events

ARCH = "resnet18"
SIZE = 64
EPOCHS = 24  # links of ~25-35 s on a 2-core CPU: the fixed cost of a link is a small part of it, as in use
THREADS = 1
# (command-line marker, role), most specific first
ROLES = (("weckd.client.executor", "executor"), ("weckd.client.supernode", "supernode"),
         ("weckd-client", "site-supervisor"), ("flwr-serverapp", "serverapp"), ("weckd.server.superexec", "superexec"),
         ("weckd.server.flower_superlink", "superlink"), ("weckd-server", "weckd-server"),
         ("weckd.server.flwr_batch", "flwr-cli"), ("bin/flwr ", "flwr-cli"), ("weckd.server.plots", "report"))
UNROOTED = ("serverapp", "superexec", "flwr-cli")  # their command lines need not name the federation's folder
# roles whose processes start others: a child seen between its fork and its exec shows its parent's command line
# (and a SuperExec would become its ServerApp), so these are looked at again until the command line settles
REREAD = ("superexec", "site-supervisor", "weckd-server")
# every process weckd-server starts: the flwr CLI that registers keys and submits the run, and the report's
# drawing after it, count with the long-lived ones
COORDINATOR = ("weckd-server", "superlink", "superexec", "serverapp", "flwr-cli", "report")
TARGETS = {"first_link_s": 20.0, "coordinator_mb": 400.0, "quiet_pct": 5.0, "ratio": 1.1}
_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class Tick:
    t: float
    cpu: dict[int, float]  # pid → CPU seconds so far
    rss_mb: dict[int, float]  # pid → resident MB now
    training: str  # the site that reports training now ("" when none)


@dataclass(eq=False)  # a Thread must stay hashable
class Watch(threading.Thread):
    """Samples the federation's processes (those whose command line names ``root``, the ServerApp, and the
    ``flwr`` CLI processes weckd-server runs) and the sites' status files."""

    root: Path
    sites: list[str]
    period: float = 0.1
    ticks: list[Tick] = field(default_factory=list)
    roles: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(daemon=True)
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.ticks.append(self._tick())
            self.halt.wait(self.period)

    def _tick(self) -> Tick:
        cpu, rss = {}, {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            pid = int(proc.name)
            try:
                if pid not in self.roles or self.roles[pid] in REREAD:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    role = next((r for marker, r in ROLES if marker in cmd), None)
                    if role is None or (str(self.root) not in cmd and role not in UNROOTED):
                        continue
                    self.roles[pid] = role
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                cpu[pid] = (int(fields[11]) + int(fields[12])) / _HZ
                rss[pid] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20
            except (OSError, ValueError, IndexError):
                continue
        return Tick(time.monotonic(), cpu, rss, self._training())

    def _training(self) -> str:
        for site in self.sites:
            try:
                status = json.loads((self.root / "state" / f"site-{site}" / "metrics.json").read_text())
            except (OSError, ValueError):
                continue
            if status.get("state") == "training":
                return site
        return ""


def _windows(ticks: list[Tick]) -> list[tuple[int, int]]:
    """(first, last) tick index of each stretch in which one site reports training."""
    out, start = [], None
    for i in range(1, len(ticks)):
        prev, tick = ticks[i - 1], ticks[i]
        if tick.training and not prev.training:
            start = i
        if start is not None and prev.training and not tick.training:
            out.append((start, i - 1))
            start = None
    return [(a, b) for a, b in out if ticks[b].t - ticks[a].t >= 2.0]


def quiet_shares(ticks: list[Tick], roles: dict[int, str]) -> list[dict[str, Any]]:
    """Per training window: CPU % of one core of every process but the training executor, by role. A process
    that starts within the window (a ``flwr`` CLI call) counts from its start, one that ends in it up to its
    last sample."""
    out = []
    for i, j in _windows(ticks):
        span = ticks[j].t - ticks[i].t
        first, last = dict(ticks[i].cpu), {}
        for tick in ticks[i:j + 1]:
            for pid, cpu in tick.cpu.items():
                first.setdefault(pid, 0.0)
                last[pid] = cpu
        used = {pid: (last[pid] - first[pid]) / span * 100 for pid in last}
        executors = [pid for pid in used if roles.get(pid) == "executor"]
        busiest = max(executors, key=lambda pid: used[pid]) if executors else None
        by_role: dict[str, float] = {}
        for pid, pct in used.items():
            if pid != busiest:
                by_role[roles[pid]] = by_role.get(roles[pid], 0.0) + pct
        out.append({"seconds": span, "training_pct": used.get(busiest, 0.0) if busiest else 0.0,
                    "others_pct": sum(by_role.values()), "by_role": by_role})
    return out


def coordinator_peak_mb(ticks: list[Tick], roles: dict[int, str]) -> tuple[float, dict[str, float]]:
    """The peak of the summed RSS of the coordinator's processes, and each role's own peak."""
    total, by_role = 0.0, {r: 0.0 for r in COORDINATOR}
    for tick in ticks:
        now = {r: 0.0 for r in COORDINATOR}
        for pid, mb in tick.rss_mb.items():
            if roles.get(pid) in now:
                now[roles[pid]] += mb
        total = max(total, sum(now.values()))
        by_role = {r: max(by_role[r], now[r]) for r in COORDINATOR}
    return total, by_role


def _chain(real_data: str) -> tuple[dict[str, Any], str]:
    link = {"arch": ARCH, "epochs": EPOCHS, "batch_size": 32, "lr": 0.01}
    if real_data:
        path = Path(real_data).resolve()
        if not path.is_file():
            raise ConfigError(f"--real-data: {path}: file not found (a MedMNIST .npz such as breastmnist.npz)")
        chain = chain_settings({"link": link, "data": {"dataset": str(path), "classes": ["class_0", "class_1"],
                                                        "image_size": SIZE, "channels": 1}})
        chain["data"].pop("synthetic", None)
        return chain, f"{path.name} (training split cut across 3 sites)"
    data = {"image_size": SIZE, "channels": 3, "synthetic": {"samples": 600, "noise": 1.8, "seed": 1234}}
    return chain_settings({"link": link, "data": data}), "synthetic images (600, 3 channels)"


def one_run(root: Path, chain: dict[str, Any]) -> dict[str, Any]:
    scaffold = make_scaffold(root, chain, {"evaluate": "all"}, threads=THREADS, heartbeat=SITE_HEARTBEAT)
    fed = LocalFederation(scaffold)
    watch = Watch(root, list(scaffold.sites))
    watch.start()
    try:
        for site in scaffold.sites:
            fed.start_site(site)
        _wait_sites_waiting(fed)
        started = time.time()
        fed.start_server()
        rc = fed.wait_server(1800.0)
    finally:
        fed.stop()
        watch.halt.set()
        watch.join()
    if rc != 0:
        raise LinkError(f"benchmark federation failed (exit {rc}); logs in {root / 'logs'} and {root / 'state'}")
    events = [e for p in sorted((root / "state" / "server").glob("progress-*.jsonl")) for e in read_events(p)]
    first = next(e["t"] for e in events if e.get("event") == "link-start")
    res = fed.results()
    local = in_process_seconds(root, chain)
    total, by_role = coordinator_peak_mb(watch.ticks, watch.roles)
    return {"first_link_s": first - started, "coordinator_mb": total, "coordinator_by_role_mb": by_role,
            "quiet": quiet_shares(watch.ticks, watch.roles),
            "links": [{"link": r["link"], "site": r["site"], "federated_s": r["round_trip_seconds"], "local_s": s,
                       "val_accuracy": r["val"]["accuracy"]} for r, s in zip(res["links"], local, strict=True)]}


def _wait_sites_waiting(fed: LocalFederation, timeout: float = 300.0) -> None:
    """Until every site has read its data and found its coordinator absent (its supervisor says so)."""
    start = time.monotonic()
    logs = [fed.group.log_dir / f"weckd-client-{site}.log" for site in fed.scaffold.sites]
    while time.monotonic() - start < timeout:
        if all(p.is_file() and "not reachable yet" in p.read_text(errors="replace") for p in logs):
            return
        if fed.group.exited() is not None:
            raise LinkError(f"{fed.group.exited()} exited while waiting for the coordinator; see {fed.group.log_dir}")
        time.sleep(0.2)
    raise LinkError(f"the sites did not get ready within {timeout:.0f}s; see {fed.group.log_dir}")


def _each(runs: list[dict[str, Any]], key: str, fmt: str) -> str:
    return ", ".join(format(r[key], fmt) for r in runs)


def report(runs: list[dict[str, Any]], data: str) -> str:
    q = [w for r in runs for w in r["quiet"]]
    links = [x for r in runs for x in r["links"]]
    roles = sorted({k for w in q for k in w["by_role"]})
    fed, loc = sum(x["federated_s"] for x in links), sum(x["local_s"] for x in links)
    lines = ["# The coordinator and a waiting federation: start-up, memory, idle CPU, wall time", "",
             f"Measured by `weckd bench perf --parts coordinator --reps {len(runs)}` on "
             f"{time.strftime('%Y-%m-%d', time.gmtime())}.", "", f"Machine: {machine_line()}.", "",
             f"Setup: weckd-server + 3 weckd-client processes on loopback (gRPC + TLS + SuperNode auth), sealed, "
             f"evaluate: all; {ARCH} at {SIZE} px, {EPOCHS} epochs a link, {THREADS} torch thread per site; the sites' "
             f"SuperNode heartbeat {SITE_HEARTBEAT:.0f} s (the site config's default); data: "
             f"{data}. The sites start first and wait; then weckd-server starts. `/proc` sampled every 0.1 s.", "",
             "| quantity | per run | target |", "|---|---|---|",
             f"| weckd-server start → link 1 training (s) | {_each(runs, 'first_link_s', '.1f')} | "
             f"≤ {TARGETS['first_link_s']:.0f} |",
             f"| coordinator peak RSS, all its processes together (MB) | {_each(runs, 'coordinator_mb', '.0f')} | "
             f"≤ {TARGETS['coordinator_mb']:.0f} |", "",
             "Each coordinator process's own peak RSS (MB), first run: "
             + ", ".join(f"{k} {v:.0f}" for k, v in runs[0]["coordinator_by_role_mb"].items()) + ".", "",
             "## While a link trains: CPU of everything else, % of one core", "",
             "| window | seconds | training executor | " + " | ".join(roles) + " | **all others** |",
             "|---|---|---|" + "---|" * len(roles) + "---|"]
    for i, w in enumerate(q):
        lines.append(f"| {i + 1} | {w['seconds']:.1f} | {w['training_pct']:.0f} | "
                     + " | ".join(f"{w['by_role'].get(r, 0.0):.1f}" for r in roles) + f" | **{w['others_pct']:.1f}** |")
    lines += ["", f"Median over the windows: **{statistics.median(w['others_pct'] for w in q):.1f} %** of a core "
              f"(target ≤ {TARGETS['quiet_pct']:.0f} %).", "",
              "## Federated / in-process wall time of the same links", "",
              "| run | link | site | federated train round trip (s) | same link in one process (s) | ratio |",
              "|---|---|---|---|---|---|"]
    for i, r in enumerate(runs):
        for x in r["links"]:
            lines.append(f"| {i + 1} | {x['link']} | {x['site']} | {x['federated_s']:.1f} | {x['local_s']:.1f} | "
                         f"{x['federated_s'] / x['local_s']:.2f}× |")
    lines += ["", f"All links: {fed:.1f} s federated against {loc:.1f} s in one process: **{fed / loc:.2f}×** "
              f"(target ≤ {TARGETS['ratio']}×).", ""]
    return "\n".join(lines)


def coordinator_part(opts: PerfOptions) -> list[TargetCheck]:
    """Start-up to link 1, coordinator memory, idle CPU while a link trains, federated/in-process time."""
    chain, data = _chain(opts.real_data)
    runs = []
    for _ in range(opts.reps):
        with tempfile.TemporaryDirectory(prefix="weckd-bench-") as tmp:
            runs.append(one_run(Path(tmp), chain))
            print(f"coordinator part: run {len(runs)}/{opts.reps} done", file=sys.stderr)
    private_dir(opts.out)
    write_json(opts.out / "coordinator.json", {"machine": machine_line(), "data": data, "runs": runs})
    atomic_write_text(opts.out / "coordinator.md", report(runs, data))
    quiet = statistics.median(w["others_pct"] for r in runs for w in r["quiet"])
    links = [x for r in runs for x in r["links"]]
    ratio = sum(x["federated_s"] for x in links) / sum(x["local_s"] for x in links)
    first = statistics.median(r["first_link_s"] for r in runs)
    memory = max(r["coordinator_mb"] for r in runs)
    return [
        TargetCheck("coordinator", "weckd-server start → link 1 training, sites up (median)", f"{first:.1f} s",
                    f"≤ {TARGETS['first_link_s']:.0f} s", first <= TARGETS["first_link_s"]),
        TargetCheck("coordinator", "coordinator RSS, all its processes (peak)", f"{memory:.0f} MB",
                    f"≤ {TARGETS['coordinator_mb']:.0f} MB", memory <= TARGETS["coordinator_mb"]),
        TargetCheck("coordinator", "CPU of all but the training executor while a link trains (median)",
                    f"{quiet:.1f} % of a core", f"≤ {TARGETS['quiet_pct']:.0f} %", quiet <= TARGETS["quiet_pct"]),
        TargetCheck("coordinator", f"federated / in-process wall time, {ARCH} {SIZE} px links", f"{ratio:.2f}×",
                    f"≤ {TARGETS['ratio']}×", ratio <= TARGETS["ratio"]),
    ]
