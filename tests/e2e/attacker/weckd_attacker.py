"""A ServerApp under an attacker's control: it runs on the coordinator host (importable there through
PYTHONPATH, not shipped in the run's bundle) and sends crafted requests to real weckd sites.

Run config ``federation-config``: a JSON plan written by the test::

    {"federation": ".../federation.yaml", "keys": ".../keys", "scratch": "...", "escape_abs": "...",
     "out": ".../replies.json", "scenarios": ["join", ...],
     "sites": {"B": {"state_dir": "...", "metrics_port": 1234}, ...}}

Scenario i (1-based, in plan order) runs as weckd run id ``r<i:04d>-<name>``. Each request goes out
alone, with a bounded wait; the reply (error code and text, or the content's record keys) is written
to ``out`` after every request (``done`` once the scenarios are over), with what the site showed
before and after it (training/evaluation counters from its /metrics, its last-link store, its model
files): the test's observation, not part of the attack.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any

from crafted import SCENARIOS, Forge, Step
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from weckd.chain.protocol import KEY_CONFIG
from weckd.server.transport import wait_for_sites

log = logging.getLogger("weckd_attacker")

app = ServerApp()

POLL_S = 0.1
COUNTERS = ("weckd_site_links_trained_total", "weckd_site_evaluations_total")


@app.main()
def main(grid: Grid, context: Context) -> None:
    plan = json.loads(Path(str(context.run_config["federation-config"])).read_text(encoding="utf-8"))
    out = Path(plan["out"])
    results: dict[str, Any] = {"steps": [], "error": None, "done": False}
    try:
        forge = Forge(plan["federation"], Path(plan["keys"]), Path(plan["scratch"]), plan["escape_abs"])
        nodes = wait_for_sites(grid, list(plan["sites"]), 120.0, 0.2)
        results["nodes"] = nodes
        _write(out, results)
        for i, name in enumerate(plan["scenarios"], start=1):
            for j, step in enumerate(SCENARIOS[name](forge, f"r{i:04d}-{name}")):
                site = plan["sites"][step.site]
                before = observe(site)
                record = exchange(grid, nodes[step.site], step) if step.site in nodes else {"offline": True}
                results["steps"].append({"scenario": name, "index": j, "site": step.site, "kind": step.kind,
                                         "run_id": step.run_id, "before": before, "after": observe(site),
                                         "sent": _jsonable(dict(step.content.config_records.get(KEY_CONFIG, {}))),
                                         **record})
                _write(out, results)
    except Exception:
        results["error"] = traceback.format_exc()
        raise
    finally:
        results["done"] = True
        _write(out, results)


def exchange(grid: Grid, node: int, step: Step) -> dict[str, Any]:
    """Push one message; its reply (error or content keys) within ``step.timeout`` seconds."""
    msg = Message(step.content, node, step.kind, ttl=step.timeout + 60.0, group_id=step.run_id[:64])
    start = time.monotonic()
    ids = list(grid.push_messages([msg]))
    while time.monotonic() - start < step.timeout:
        for rep in grid.pull_messages(ids):
            seconds = round(time.monotonic() - start, 2)
            if rep.has_error():
                return {"seconds": seconds, "error": {"code": int(rep.error.code), "reason": str(rep.error.reason)}}
            c = rep.content
            return {"seconds": seconds, "error": None,
                    "content": {"config": {k: sorted(v) for k, v in c.config_records.items()},
                                "metrics": {k: sorted(v) for k, v in c.metric_records.items()},
                                "arrays": {k: sorted(v) for k, v in c.array_records.items()}}}
        time.sleep(POLL_S)
    return {"seconds": step.timeout, "error": None, "timeout": True}


def observe(site: dict[str, Any]) -> dict[str, Any]:
    """What the site has done so far: work counters, its last-link store, its model files."""
    state = Path(site["state_dir"])
    meta = state / "last-link" / "meta.json"
    models = []
    for folder, _, files in os.walk(state):
        models += [os.path.relpath(os.path.join(folder, f), state) for f in files if f.endswith(".safetensors")]
    return {"counters": scrape(int(site["metrics_port"])),
            "last_link": hashlib.sha256(meta.read_bytes()).hexdigest() if meta.is_file() else "",
            "models": sorted(models)}


def scrape(port: int) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError as err:
        return {"error": str(err)}  # type: ignore[dict-item]
    out = {}
    for name in COUNTERS:
        m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
        if m:
            out[name] = float(m.group(1))
    return out


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in values.items()}


def _write(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)
