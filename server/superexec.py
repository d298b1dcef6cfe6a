"""``flower-superexec`` in this process, its task poll waiting for weckd-server's run signal (see
``weckd.chain.flower.superexec_waits_for``), and the process then becoming the ServerApp of the run it acquired
(``weckd.chain.flower.superexec_becomes_task``).

``python -m weckd.server.superexec <flower-superexec arguments>`` (started by ``weckd-server`` for each run it
submits to its SuperLink in ``--isolation process``, with ``WECKD_RUN_SIGNAL`` naming the file it touches after
the submission).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from weckd.chain.cli import ERROR_PREFIX
from weckd.chain.errors import ConfigError
from weckd.chain.flower import RUN_SIGNAL_ENV, superexec_becomes_task, superexec_waits_for


def main() -> int:
    try:
        if not os.environ.get(RUN_SIGNAL_ENV):
            raise ConfigError(f"{RUN_SIGNAL_ENV} not set: weckd-server names the run signal file")
        superexec_waits_for(Path(os.environ[RUN_SIGNAL_ENV]))
        superexec_becomes_task(_parent_pid(sys.argv[1:]))
    except ConfigError as err:  # one line, in the coordinator's log
        print(f"{ERROR_PREFIX}{err}", file=sys.stderr, flush=True)
        return 2
    from flwr.supercore.cli.flower_superexec import flower_superexec

    sys.argv[0] = "flower-superexec"
    flower_superexec()
    return 0


def _parent_pid(argv: list[str]) -> int | None:
    """``--parent-pid`` among Flower's arguments (the SuperLink's pid), which the ServerApp watches after it."""
    if "--parent-pid" in argv[:-1]:
        return int(argv[argv.index("--parent-pid") + 1])
    return None


if __name__ == "__main__":
    raise SystemExit(main())
