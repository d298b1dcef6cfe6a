"""``weckd-client --site A -c site-A.yaml --status``: what this site is doing and has done, from its own files.

It reads only the site's state dir: whether its supervisor runs (the ``weckd-client.lock`` it holds), whether
the coordinator admitted it, what the executor is doing now (training link k, epoch e of E, samples/s), the
runs it joined (links trained, evaluations, the delivered model), the ε spent and the payloads it verified
or refused. No network, no Flower. ``--json`` for scripts.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from weckd.chain.files import lock_held

from .metrics import read_status, status_path
from .runstate import FILE as LEDGER_FILE
from .runstate import load_ledger
from .site import SiteConfig

LOCK_FILE = "weckd-client.lock"  # in the site's state dir, held by its running supervisor
RECENT_RUNS = 10


def site_status(cfg: SiteConfig) -> dict[str, Any]:
    state = Path(cfg.state_dir).resolve()
    now = read_status(status_path(cfg.state_dir))
    ledger = load_ledger(state / LEDGER_FILE)
    admitted = state / "admitted"
    runs = []
    for run_id in sorted(ledger.runs, reverse=True)[:RECENT_RUNS]:
        rec = ledger.runs[run_id]
        model = state / "delivered" / run_id / "model"
        runs.append({"run_id": run_id, "current": run_id == ledger.current, "links_trained": [k + 1 for k in rec.links],
                     "evaluations": rec.evaluations, "epsilon": rec.epsilon,
                     "delivered_link": rec.delivered + 1 if rec.delivered >= 0 else None,
                     "delivered_model": str(model) if model.is_dir() else None})
    return {
        "site": cfg.site, "supervisor_running": lock_held(state / LOCK_FILE),
        "admitted_at": admitted.stat().st_mtime if admitted.is_file() else None,
        "now": {k: now.get(k) for k in ("state", "link", "epoch", "epochs", "loss", "samples_per_s", "updated")},
        "links_trained": now.get("links_trained", 0), "evaluations": now.get("evaluations", 0),
        "payloads": {"verified": now.get("verified", 0), "rejected": now.get("rejected", {}),
                     "refused": now.get("refused", {})},
        "epsilon_spent": ledger.epsilon_spent, "runs": runs,
    }


def format_site_status(s: dict[str, Any]) -> str:
    now = s["now"]
    lines = [f"site {s['site']}: supervisor {'running' if s['supervisor_running'] else 'not running'}"
             + (f", admitted by the coordinator {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(s['admitted_at']))}"
                if s["admitted_at"] else ", not admitted yet")]
    if now["state"] == "training":
        lines.append(f"  now: training link {now['link']}, epoch {now['epoch']}/{now['epochs']}"
                     + (f", {now['samples_per_s']:.0f} images/s" if now.get("samples_per_s") else ""))
    else:
        lines.append(f"  now: {now['state']}")
    refused = sum(s["payloads"]["refused"].values()) + sum(s["payloads"]["rejected"].values())
    lines.append(f"  payloads verified {s['payloads']['verified']}, refused or rejected {refused}; "
                 f"epsilon spent {s['epsilon_spent']:.3g}")
    for r in s["runs"]:
        delivered = f", delivered model (link {r['delivered_link']}) in {r['delivered_model']}" if r[
            "delivered_model"] else ""
        lines.append(f"  run {r['run_id']}{' (current)' if r['current'] else ''}: trained link(s) "
                     f"{', '.join(map(str, r['links_trained'])) or '-'}, {r['evaluations']} evaluation(s){delivered}")
    return "\n".join(lines)
