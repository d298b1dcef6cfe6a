"""``flower-superlink`` in this process, its SQLite connections' memory bounded
(``weckd.chain.flower.bound_superlink_sqlite``) and its sweep of expired task tokens on run-status checks
throttled (``weckd.chain.flower.throttle_status_cleanup``); its HTTP API's idle loop wakes every 0.5 s, not every
0.1 s (``weckd.chain.flower.slow_http_ticks``).

``python -m weckd.server.flower_superlink <flower-superlink arguments>`` (started by ``weckd-server``,
``weckd.server.superlink.superlink_cmd``).
"""
from __future__ import annotations

import sys

from weckd.chain.cli import ERROR_PREFIX
from weckd.chain.errors import ConfigError
from weckd.chain.flower import bound_superlink_sqlite, slow_http_ticks, throttle_status_cleanup


def main() -> int:
    try:
        bound_superlink_sqlite()
        throttle_status_cleanup()
        slow_http_ticks()
    except ConfigError as err:  # one line, in the coordinator's log
        print(f"{ERROR_PREFIX}{err}", file=sys.stderr, flush=True)
        return 2
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
