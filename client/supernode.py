"""``flower-supernode`` in this process, with the Fleet poll capped and its Runtime API's idle loop slowed (see
``weckd.chain.flower``).

``python -m weckd.client.supernode <flower-supernode arguments>`` (started by ``weckd-client``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from weckd.chain.cli import ERROR_PREFIX
from weckd.chain.errors import ConfigError
from weckd.chain.flower import (
    TASK_SIGNAL_ENV,
    cap_supernode_sleep,
    check_internals,
    fast_pull,
    set_node_heartbeat,
    signal_new_tasks,
    slow_http_ticks,
)

POLL_ENV = "WECKD_FLEET_POLL_S"
HEARTBEAT_ENV = "WECKD_HEARTBEAT_S"  # the site config's heartbeat (weckd-client sets it)


def main() -> int:
    try:
        check_internals()
    except ConfigError as err:  # one line, which weckd-client shows
        print(f"{ERROR_PREFIX}{err}", file=sys.stderr, flush=True)
        return 2
    poll = cap_supernode_sleep(float(os.environ.get(POLL_ENV, "0.2")))
    fast_pull()
    slow_http_ticks()
    if os.environ.get(TASK_SIGNAL_ENV):
        signal_new_tasks(Path(os.environ[TASK_SIGNAL_ENV]), poll.message)
    if os.environ.get(HEARTBEAT_ENV):
        set_node_heartbeat(float(os.environ[HEARTBEAT_ENV]))
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
