"""The weckd ServerApp: discover the sites, run the chain, write the results (thin: logic in schedule.py).

Run-config keys (set by ``weckd-server``): ``federation-config`` (the effective config weckd-server
wrote into its state dir after ``--set``, read here with the same validation), ``config-dir`` (the
folder relative paths resolve against: the original file's), ``output-dir``, ``state-dir`` (the
chain checkpoint: a run continues from it), ``progress-file`` (one JSON line per event, which
``weckd-server`` follows), ``wire-log`` (empty: off) and ``superlink-database`` (the SuperLink's SQLite file on
this host: replies are pulled when it changes; empty: on a timer). Flower discards the ServerApp's context when
the run ends, so everything is written to files here.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from weckd.chain.audit import AUDIT_FILE, AuditLog
from weckd.chain.errors import LinkError
from weckd.chain.files import append_text
from weckd.chain.flower import fast_pull, join_array_chunks, superlink_files
from weckd.chain.protocol import Event, Failure
from weckd.chain.watch import FileWatch

from .fedavg import FedAvgRun
from .report import write_outputs
from .schedule import ChainRun, discover
from .settings import Federation, load_federation
from .state import ChainState, load_state, new_state, save_state
from .transport import ChangeWait, Timing, Transport, wait_for_sites
from .wire import WireLog

log = logging.getLogger(__name__)

app = ServerApp()


class ProgressFile:
    """Appends one JSON line per chain event (read by ``weckd-server`` to show progress)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path) if path else None

    def __call__(self, event: dict[str, Any]) -> None:
        log.info("progress: %s", event)
        if self.path is not None:
            append_text(self.path, json.dumps({"t": time.time(), **event}) + "\n")


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    fast_pull()
    join_array_chunks()  # a reply's payload is assembled in one copy, not three
    gc.freeze()  # the modules' objects, loaded once, out of every collection (its GC cost while it waits)
    start = time.monotonic()
    fed = load_federation(str(rc["federation-config"]), base_dir=str(rc["config-dir"]) or None)
    progress = ProgressFile(str(rc["progress-file"]))
    progress({"event": Event.STARTED, "pid": os.getpid()})
    state_dir = Path(str(rc["state-dir"]))
    s = fed.settings
    try:
        state = load_state(state_dir, fed) or new_state(fed)
        wanted = [site for site in dict.fromkeys(fed.chain.chain.order) if site not in state.skipped]
        nodes = wait_for_sites(grid, wanted, s.discovery_timeout, s.poll_interval,
                               lambda site: progress({"event": Event.SITE_ONLINE, "site": site}))
        _offline_at_discovery(fed, state, [site for site in wanted if site not in nodes], progress)
        database = str(rc.get("superlink-database", ""))
        transport = Transport(grid, nodes, Timing(s.message_ttl, s.link_timeout, s.poll_interval),
                              WireLog(str(rc["wire-log"])),
                              ChangeWait(FileWatch(superlink_files(Path(database)))) if database else None)
        progress({"event": Event.SITES_ONLINE, "sites": sorted(nodes)})
        infos = discover(transport, fed)
        progress({"event": Event.DISCOVERED, "run_id": state.run_id,
                  "sites": {k: v["counts"] for k, v in infos.items()}})
        audit = AuditLog(state_dir / AUDIT_FILE)
        _audit_discovery(audit, state.run_id, infos)
        runner = FedAvgRun if s.algorithm == "fedavg" else ChainRun
        outcome = runner(transport, fed, infos, progress, state, state_dir, audit).run()
        write_outputs(Path(str(rc["output-dir"])), fed, outcome, time.monotonic() - start, state.run_id)
        state.completed = True
        save_state(state_dir, state)
    except Exception as err:
        progress({"event": Event.FAILED, "reason": str(err), "failure": getattr(err, "failure", Failure.OTHER.value)})
        raise
    progress({"event": Event.COMPLETED, "seconds": time.monotonic() - start})


def _audit_discovery(audit: AuditLog, run_id: str, infos: dict[str, dict[str, Any]]) -> None:
    """One audit line per site discovered: its version, sealing fingerprint and image counts."""
    for site, info in infos.items():
        counts = {k: v for k, v in info["counts"].items() if isinstance(v, (int, float))}
        audit.append("discover", run=run_id, decision="accepted", site=site, version=str(info.get("weckd-version")),
                     sealing=str(info.get("sealing", "")), counts=counts)


def _offline_at_discovery(fed: Federation, state: ChainState, missing: list[str], progress: ProgressFile) -> None:
    """Sites still offline after ``discovery_timeout``: fail the run naming them, or skip them."""
    if not missing:
        return
    s = fed.settings
    message = (f"discovery: site(s) {', '.join(missing)} not online after {s.discovery_timeout:.0f}s; start "
               "weckd-client there, check its fleet address, CA and auth key, or raise federation.discovery_timeout")
    if s.on_site_failure == "fail":
        raise LinkError(message, Failure.DISCOVERY_TIMEOUT)
    for site in missing:
        progress({"event": Event.SITE_FAILURE, "site": site, "link": len(state.links) + 1, "attempt": 1,
                  "kind": "offline", "reason": "offline", "message": message})
        progress({"event": Event.SITE_SKIPPED, "site": site, "link": len(state.links) + 1, "reason": "offline"})
        state.skipped.append(site)
    log.warning("%s; skipping them (on_site_failure: skip)", message)
