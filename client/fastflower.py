"""Tighter polling inside Flower 1.39, without editing Flower.

Stock Flower 1.39 costs ~6 s per chain link on loopback: the SuperNode sleeps a hard-coded 3 s
between Fleet polls, an object pull that races the upload backs off 1 s, and every message starts a
new ``flwr-clientapp`` process that imports torch. weckd removes all three:

* :func:`cap_supernode_sleep` replaces the ``time`` name seen by
  ``flwr.supernode.start_client_internal`` with a shim whose ``sleep`` is capped;
* :func:`fast_pull` lowers the keyword defaults of the object-pull backoff in
  ``flwr.supercore.inflatable.inflatable_utils`` (every caller in the process shares them);
* ``weckd.client.executor`` keeps one warm ClientApp executor per site (``--isolation process``).

These touch Flower internals, so flwr is pinned to 1.39.* and :func:`check_internals` (called by
both CLIs and by a unit test) fails loudly when the internals move.
"""
from __future__ import annotations

import inspect
import logging
import time as _time
from typing import Any

from weckd.chain.errors import ConfigError

log = logging.getLogger(__name__)

SUPPORTED = "1.39."
PULL_KWARGS = ("initial_backoff", "backoff_cap", "max_tries_per_object")


class _CappedTime:
    """The ``time`` module with ``sleep`` capped at ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        self._cap = cap

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(seconds, self._cap))


def check_internals() -> None:
    """Fail with a clear reason when the Flower internals weckd patches are not where 1.39 had them."""
    import flwr
    import flwr.supernode.start_client_internal as sci
    from flwr.supercore.inflatable import inflatable_utils as utils

    version = getattr(flwr, "__version__", "?")
    if not version.startswith(SUPPORTED):
        raise ConfigError(f"flwr {version} installed; weckd needs flwr {SUPPORTED}* (pip install 'flwr>=1.39,<1.40')")
    if "time.sleep(3)" not in inspect.getsource(sci) or getattr(sci, "time", None) is None:
        raise ConfigError("flwr.supernode.start_client_internal no longer polls with time.sleep(3); "
                          "update weckd.client.fastflower for this Flower release")
    for fn in (utils.pull_objects, utils.pull_and_inflate_object_from_tree):
        missing = [k for k in PULL_KWARGS if k not in (fn.__kwdefaults__ or {})]
        if missing:
            raise ConfigError(f"flwr {fn.__qualname__} lost keyword(s) {missing}; update weckd.client.fastflower")


def cap_supernode_sleep(cap: float = 0.2) -> None:
    """Cap every sleep of the SuperNode main loop (Fleet poll 3 s, reply wait 0.5 s) at ``cap``."""
    import flwr.supernode.start_client_internal as sci

    sci.time = _CappedTime(cap)  # type: ignore[assignment]


def fast_pull(initial_backoff: float = 0.05, backoff_cap: float = 0.5, max_tries: int = 20_000) -> None:
    """Retry object pulls after 50 ms instead of 1 s (the object is usually a moment behind)."""
    from flwr.supercore.inflatable import inflatable_utils as utils

    for fn in (utils.pull_objects, utils.pull_and_inflate_object_from_tree):
        fn.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), "initial_backoff": initial_backoff,
                             "backoff_cap": backoff_cap, "max_tries_per_object": max_tries}
