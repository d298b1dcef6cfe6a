"""``weckd status -c federation.yaml``: where the coordinator's chain stands.

It reads only what the coordinator keeps in its state and output folders (the latest run's progress file,
the ``weckd-server`` lock, ``results.json``): no network port, no Control API, no Flower. ``--json`` for
scripts.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import time
from pathlib import Path
from typing import Any, Sequence

from weckd.chain.cli import run_command, setup_logging
from weckd.chain.protocol import Event

from .metrics import ChainClock, format_seconds
from .settings import RESULTS_FILE, Federation, load_federation
from .superlink import LOCK_FILE


def _running(state: Path) -> bool:
    """Whether a weckd-server holds this state dir's lock (tried without waiting, then released)."""
    path = state / LOCK_FILE
    if not path.is_file():
        return False
    with path.open("r") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def _events(state: Path) -> list[dict[str, Any]]:
    """The latest run's progress events (``progress-<ms>.jsonl``)."""
    files = sorted(state.glob("progress-*.jsonl"), key=lambda p: p.name)
    return read_events(files[-1]) if files else []


def read_events(progress: Path) -> list[dict[str, Any]]:
    """The events of one progress file (the ServerApp appends one JSON object a line); a torn last line, read
    while it is being written, is skipped."""
    if not progress.is_file():
        return []
    out = []
    for line in progress.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            out.append(event)
    return out


def chain_status(fed: Federation, now: float | None = None) -> dict[str, Any]:
    """The chain's state, current link, sites online, links done, ETA and (once complete) the delivered result."""
    state = Path(fed.settings.state_dir)
    events, now = _events(state), now or time.time()
    running = _running(state)
    kinds = [e.get("event") for e in events]
    status = ("completed" if Event.COMPLETED in kinds else "failed" if Event.FAILED in kinds
              else "running" if running else "stopped" if events else "not started")
    clock = ChainClock(start=float(events[0].get("t", now)) if events else now)
    online: list[str] = []
    done: list[dict[str, Any]] = []
    current = None
    for e in events:
        clock.observe(e)
        kind = e.get("event")
        if kind == Event.SITE_ONLINE and e.get("site") not in online:
            online.append(str(e.get("site")))
        elif kind == Event.LINK_START:
            current = {"link": e.get("link"), "links": e.get("links"), "site": e.get("site"), "since": e.get("t")}
        elif kind == Event.LINK_DONE:
            done.append({k: e.get(k) for k in ("link", "site", "val_accuracy", "seconds", "evaluations")})
            current = None
    out: dict[str, Any] = {
        "state": status, "coordinator_running": running,
        "run_id": next((e["run_id"] for e in events if "run_id" in e), None),
        "links": clock.links or len(fed.chain.chain.order) * fed.chain.chain.cycles, "links_done": done,
        "current": current if status == "running" else None, "sites_online": online,
        "skipped": [e.get("site") for e in events if e.get("event") == Event.SITE_SKIPPED],
        "elapsed_seconds": (now - clock.start) if events else None,
        "eta_seconds": clock.eta(now) if status == "running" else None,
        "failure": next((e.get("reason") for e in events if e.get("event") == Event.FAILED), None),
    }
    results = Path(fed.settings.output_dir) / RESULTS_FILE
    if status == "completed" and results.is_file():
        data = json.loads(results.read_text(encoding="utf-8"))
        summary = data.get("summary", {})
        out["result"] = {"run_id": data.get("run_id"), "delivered_accuracy": summary.get("last_eval_accuracy"),
                         "gain_over_link1": summary.get("gain_over_link1"), "results": str(results)}
    return out


def format_status(s: dict[str, Any]) -> str:
    lines = [f"chain {s['run_id'] or '-'}: {s['state']} ({len(s['links_done'])}/{s['links']} links done)"
             + (", coordinator running" if s["coordinator_running"] else "")]
    cur = s["current"]
    if cur:
        lines.append(f"  now: link {cur['link']}/{cur['links']} at site {cur['site']}; ETA "
                     f"{format_seconds(s['eta_seconds'])}")
    lines.append(f"  sites online: {', '.join(s['sites_online']) or '-'}"
                 + (f"; skipped: {', '.join(map(str, s['skipped']))}" if s["skipped"] else ""))
    for row in s["links_done"]:
        lines.append(f"  link {row['link']}  site {row['site']}  val acc {row['val_accuracy']:.3f}  "
                     f"{format_seconds(row['seconds'])}")
    if s["failure"]:
        lines.append(f"  failed: {s['failure']}")
    if "result" in s and s["result"]["delivered_accuracy"] is not None:
        lines.append(f"  delivered model: accuracy {s['result']['delivered_accuracy']:.3f} on the sites' validation "
                     f"data ({s['result']['results']})")
    return "\n".join(lines)


def status_command(argv: Sequence[str]) -> int:
    """Show where the coordinator's chain stands (reads its state dir; no network)."""
    parser = argparse.ArgumentParser(prog="weckd status", description=status_command.__doc__)
    parser.add_argument("-c", "--config", required=True, help="the coordinator's federation YAML")
    parser.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    args = parser.parse_args(argv)
    setup_logging(False)

    def body() -> int:
        s = chain_status(load_federation(args.config))
        print(json.dumps(s, indent=1) if args.json else format_status(s))
        return 0

    return run_command(body)
