"""The weckd ServerApp: discover the sites, run the chain, write the results (thin: logic in schedule.py).

Run-config keys (set by ``weckd-server``): ``federation-config`` (the coordinator's YAML, read here
again with the same validation), ``output-dir``, ``progress-file`` (one JSON line per event, which
``weckd-server`` follows) and ``wire-log`` (empty: off). Flower discards the ServerApp's context
when the run ends, so everything is written to files here.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from weckd.client.fastflower import fast_pull

from .report import write_outputs
from .schedule import discover, run_links
from .settings import load_federation
from .transport import Timing, Transport, wait_for_sites
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
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"t": time.time(), **event}) + "\n")


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    fast_pull()
    start = time.monotonic()
    fed = load_federation(str(rc["federation-config"]))
    progress = ProgressFile(str(rc["progress-file"]))
    s = fed.settings
    try:
        nodes = wait_for_sites(grid, list(fed.chain.chain.order), s.discovery_timeout, s.poll_interval)
        transport = Transport(grid, nodes, Timing(s.message_ttl, s.link_timeout, s.poll_interval),
                              WireLog(str(rc["wire-log"])))
        progress({"event": "sites-online", "sites": sorted(nodes)})
        infos = discover(transport, fed)
        progress({"event": "discovered", "sites": {k: v["counts"] for k, v in infos.items()}})
        outcome = run_links(transport, fed, infos, progress)
        write_outputs(Path(str(rc["output-dir"])), fed, outcome, time.monotonic() - start)
    except Exception as err:
        progress({"event": "failed", "reason": str(err)})
        raise
    progress({"event": "completed", "seconds": time.monotonic() - start})
