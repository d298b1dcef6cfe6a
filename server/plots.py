"""The report of a completed federated run (report.md, report.html and its plots), drawn by a short-lived child of
``weckd-server`` once the run's ServerApp has ended: matplotlib and the drawing (~60 MB) never sit in the ServerApp
beside the final model it writes, nor in the coordinator that stays up between chains.

``python -m weckd.server.plots OUT`` draws the report of the results in ``OUT``: ``weckd report OUT`` (the same
command, errors and exit codes), named so that the coordinator's processes are told apart from a user's.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from weckd.chain.errors import WeckdError

from .settings import RESULTS_FILE

log = logging.getLogger(__name__)

DRAW_TIMEOUT_S = 300.0


def report_due(out: Path) -> bool:
    """A report is drawn where every link was evaluated at the sites (``evaluate: all``): its plots are the chain's
    learning curve on their validation splits."""
    try:
        links = json.loads((out / RESULTS_FILE).read_text(encoding="utf-8")).get("links", [])
    except (OSError, ValueError, AttributeError) as err:
        raise WeckdError(f"{out / RESULTS_FILE}: cannot read the run's results ({err})") from None
    return bool(links) and all(isinstance(row, dict) and "test" in row for row in links)


def draw_report(out: Path, timeout: float = DRAW_TIMEOUT_S) -> None:
    """Draw the report of the completed run in ``out`` in a child process (WeckdError naming what failed)."""
    if not report_due(out):
        log.info("no federated evaluation of every link (evaluate is not all): no report plots")
        return
    try:
        done = subprocess.run([sys.executable, "-m", "weckd.server.plots", str(out)], capture_output=True, text=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise WeckdError(f"{out}: drawing the run's report took over {timeout:.0f}s; draw it again with "
                         f"`weckd report {out}`") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no error output"])[-1][:300]
        raise WeckdError(f"{out}: drawing the run's report failed ({last}); draw it again with `weckd report {out}`")
    log.info("report written: %s", out / "report.html")


def main(argv: Sequence[str] | None = None) -> int:
    """``weckd report OUT`` (its one-line errors and exit codes), without the rest of the ``weckd`` CLI."""
    from weckd.chain.report import report_command

    return report_command(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
