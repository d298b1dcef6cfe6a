"""``flower-superlink`` in this process, its SQLite connections' memory bounded
(``weckd.chain.flower.bound_superlink_sqlite``) and its sweep of expired task tokens on run-status checks
throttled (``weckd.chain.flower.throttle_status_cleanup``); its HTTP API's idle loop wakes every 0.5 s, not every
0.1 s (``weckd.chain.flower.slow_http_ticks``). Each run weckd-server submits runs as a ServerApp in a thread of
this process (``weckd.chain.flower.ServerAppHost``), once weckd-server touched ``WECKD_RUN_SIGNAL``.

``python -m weckd.server.flower_superlink <flower-superlink arguments>`` (started by ``weckd-server``,
``weckd.server.superlink.superlink_cmd``, which passes ``--port``, ``--ssl-ca-certfile`` and
``--superexec-auth-secret-file``: the Runtime API the ServerApp talks to, its CA, and the secret that signs
the request for a run).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from weckd.chain.cli import ERROR_PREFIX
from weckd.chain.errors import ConfigError
from weckd.chain.flower import (
    RUN_SIGNAL_ENV,
    ServerAppHost,
    bound_superlink_sqlite,
    runtime,
    slow_http_ticks,
    throttle_status_cleanup,
)

HOST_FLAGS = ("--port", "--ssl-ca-certfile", "--superexec-auth-secret-file")


def main() -> int:
    argv = sys.argv[1:]
    try:
        bound_superlink_sqlite()
        throttle_status_cleanup()
        slow_http_ticks()
        host = _host(argv)
    except ConfigError as err:  # one line, in the coordinator's log
        print(f"{ERROR_PREFIX}{err}", file=sys.stderr, flush=True)
        return 2
    from flwr.superlink.cli import flower_superlink

    host.start()
    sys.argv[0] = "flower-superlink"
    flower_superlink()
    return 0


def _host(argv: list[str]) -> ServerAppHost:
    """The ServerApp host for this SuperLink: its Runtime API on 127.0.0.1, the federation CA and the shared secret."""
    values = {}
    for flag in HOST_FLAGS:
        if flag not in argv[:-1]:
            raise ConfigError(f"weckd.server.flower_superlink: {flag} not given; weckd-server passes it")
        values[flag] = argv[argv.index(flag) + 1]
    if not os.environ.get(RUN_SIGNAL_ENV):
        raise ConfigError(f"{RUN_SIGNAL_ENV} not set: weckd-server names the run signal file")
    try:
        secret = runtime().load_secret(values["--superexec-auth-secret-file"])
    except ValueError as err:
        raise ConfigError(f"weckd.server.flower_superlink: {err}") from None
    if not secret:
        raise ConfigError(f"{values['--superexec-auth-secret-file']}: empty SuperExec secret")
    return ServerAppHost(f"127.0.0.1:{values['--port']}", values["--ssl-ca-certfile"], secret,
                         Path(os.environ[RUN_SIGNAL_ENV]))


if __name__ == "__main__":
    raise SystemExit(main())
