"""``weckd status -c federation.yaml``: where the coordinator's chain stands.

It reads only what the coordinator keeps in its state and output folders (the latest run's progress file,
the ``weckd-server`` lock, ``results.json``): no network port, no Control API, no Flower. ``--json`` for
scripts.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

from weckd.chain.cli import run_command, setup_logging
from weckd.chain.files import lock_held
from weckd.chain.protocol import Event

from .metrics import ChainClock, format_seconds
from .service import Queue
from .settings import RESULTS_FILE, Federation, load_federation
from .superlink import LOCK_FILE


def _running(state: Path) -> bool:
    """Whether a weckd-server holds this state dir's lock."""
    return lock_held(state / LOCK_FILE)


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
    return chain_status_at(state, Path(fed.settings.output_dir), len(fed.chain.chain.order) * fed.chain.chain.cycles,
                           _running(state), now)


def chain_status_at(state: Path, output: Path, default_links: int, running: bool, now: float | None = None
                    ) -> dict[str, Any]:
    """:func:`chain_status` of the chain whose progress files are in ``state`` and outputs in ``output``."""
    events, now = _events(state), now or time.time()
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
            current = {"link": e.get("link"), "links": e.get("links"), "site": e.get("site"), "since": e.get("t"),
                       "epochs": e.get("epochs")}
        elif kind == Event.LINK_DONE:
            done.append({k: e.get(k) for k in ("link", "site", "val_accuracy", "seconds", "evaluations",
                                               "epoch_seconds")})
            current = None
    if current is not None and status == "running":
        current["epoch"] = epoch_estimate(current, done, now)
    out: dict[str, Any] = {
        "state": status, "coordinator_running": running,
        "run_id": next((e["run_id"] for e in events if "run_id" in e), None),
        "links": clock.links or default_links, "links_done": done,
        "current": current if status == "running" else None, "sites_online": online,
        "skipped": [e.get("site") for e in events if e.get("event") == Event.SITE_SKIPPED],
        "elapsed_seconds": (now - clock.start) if events else None,
        "eta_seconds": clock.eta(now) if status == "running" else None,
        "failure": next((e.get("reason") for e in events if e.get("event") == Event.FAILED), None),
    }
    results = output / RESULTS_FILE
    if status == "completed" and results.is_file():
        data = json.loads(results.read_text(encoding="utf-8"))
        summary = data.get("summary", {})
        out["result"] = {"run_id": data.get("run_id"), "delivered_accuracy": summary.get("last_eval_accuracy"),
                         "gain_over_link1": summary.get("gain_over_link1"), "results": str(results)}
    return out


def epoch_estimate(current: dict[str, Any], done: list[dict[str, Any]], now: float) -> dict[str, Any] | None:
    """Which epoch the training site is most likely in: the time since the link was sent over the mean epoch
    time of that site's earlier links (else of any earlier link). The coordinator hears from a site only when
    its link is done, so this is an estimate; the site's own ``weckd-client --status`` shows the epoch."""
    epochs, since = current.get("epochs"), current.get("since")
    if not isinstance(epochs, int) or not isinstance(since, (int, float)):
        return None
    times = [float(d["epoch_seconds"]) for d in done if isinstance(d.get("epoch_seconds"), (int, float))
             and d["epoch_seconds"] > 0]
    own = [float(d["epoch_seconds"]) for d in done if d.get("site") == current.get("site")
           and isinstance(d.get("epoch_seconds"), (int, float)) and d["epoch_seconds"] > 0]
    basis = own or times
    if not basis:
        return {"epoch": None, "epochs": epochs, "estimated": True}
    per_epoch = sum(basis) / len(basis)
    return {"epoch": max(1, min(epochs, int((now - float(since)) // per_epoch) + 1)), "epochs": epochs,
            "estimated": True, "epoch_seconds": per_epoch}


def _epoch_text(cur: dict[str, Any]) -> str:
    ep = cur.get("epoch")
    if not ep:
        return ""
    if ep["epoch"] is None:
        return f", {ep['epochs']} epoch(s) (which one is known once a link has finished)"
    return f", epoch ~{ep['epoch']}/{ep['epochs']} (estimated from earlier epoch times)"


def format_status(s: dict[str, Any]) -> str:
    lines = [f"chain {s['run_id'] or '-'}: {s['state']} ({len(s['links_done'])}/{s['links']} links done)"
             + (", coordinator running" if s["coordinator_running"] else "")]
    cur = s["current"]
    if cur:
        lines.append(f"  now: link {cur['link']}/{cur['links']} at site {cur['site']}{_epoch_text(cur)}; ETA "
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


RECENT_JOBS = 10  # finished jobs a service status lists, newest first


def is_service(fed: Federation) -> bool:
    """Whether this coordinator runs submitted jobs (a queue or job records in its state dir)."""
    q = Queue(fed.settings.state_dir)
    return q.queue.is_dir() or q.jobs.is_dir()


def service_status(fed: Federation, now: float | None = None) -> dict[str, Any]:
    """A service coordinator: its queue, the running job (with its chain's status) and the latest finished jobs."""
    state = Path(fed.settings.state_dir)
    q, running = Queue(state), _running(state)
    records = q.records()
    current = next((j for j in records if j.status == "running"), None)
    out: dict[str, Any] = {"mode": "service", "coordinator_running": running,
                           "queue": [j.brief() for j in q.queued()], "running": None,
                           "recent": [j.brief() for j in records if j.status != "running"][::-1][:RECENT_JOBS]}
    if current is not None:
        chain = chain_status_at(q.job_dir(current.id), Path(fed.settings.output_dir) / current.id, 0, running, now)
        out["running"] = {**current.brief(), "chain": chain}
    return out


def format_service_status(s: dict[str, Any]) -> str:
    lines = [f"coordinator service: {'running' if s['coordinator_running'] else 'not running'}; "
             f"{len(s['queue'])} job(s) queued"]
    cur = s["running"]
    if cur is not None:
        lines.append(f"running: job {cur['id']} ({cur['name']}, {cur['kind']})"
                     + ("" if s["coordinator_running"] else " (resumes when the coordinator starts again)"))
        lines += ["  " + line for line in format_status(cur["chain"]).splitlines()]
    for j in s["queue"]:
        lines.append(f"queued: job {j['id']} ({j['name']}, {j['kind']}), submitted "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(j['submitted']))}")
    for j in s["recent"]:
        acc = j.get("summary", {}).get("delivered_accuracy")
        what = f"delivered accuracy {acc:.3f}" if isinstance(acc, float) else (j.get("reason") or "")[:160]
        lines.append(f"{j['status']}: job {j['id']} ({j['name']}, {j['kind']}) {what}".rstrip())
    return "\n".join(lines)


def status_command(argv: Sequence[str]) -> int:
    """Show where the coordinator's chain stands (reads its state dir; no network)."""
    parser = argparse.ArgumentParser(prog="weckd status", description=status_command.__doc__)
    parser.add_argument("-c", "--config", required=True, help="the coordinator's federation YAML")
    parser.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    args = parser.parse_args(argv)
    setup_logging(False)

    def body() -> int:
        fed = load_federation(args.config)
        if is_service(fed):
            s = service_status(fed)
            print(json.dumps(s, indent=1) if args.json else format_service_status(s))
            return 0
        s = chain_status(fed)
        print(json.dumps(s, indent=1) if args.json else format_status(s))
        return 0

    return run_command(body)
