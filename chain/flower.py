"""The one adapter over Flower 1.39 that both roles share; nothing else in weckd touches Flower's internals.

*Records*: payload bytes in and out of Flower records (``payload_record``, ``read_payloads``) and
``config_dict``; ``weckd.chain.payload`` itself stays Flower-free. A payload the coordinator received is held
as a view into the array it came in and sent on as that same array (``read_payloads(view=True)``).

*Tighter polling*, without editing Flower. Stock Flower 1.39 costs ~6 s per chain link on loopback: the
SuperNode sleeps a hard-coded 3 s between Fleet polls, an object pull that races the upload backs off
1 s, and every message starts a new ``flwr-clientapp`` process that imports torch. weckd removes all
three, each only in the process that needs it:

* :func:`set_node_heartbeat` (the site's SuperNode process) sets its heartbeat period (``heartbeat`` in
  the site config) so that a site that dies is noticed in seconds, not Flower's minute;
* :func:`cap_supernode_sleep` (the site's SuperNode process) replaces the ``time`` name seen by
  ``flwr.supernode.start_client_internal`` with a shim whose ``sleep`` is capped;
* :func:`signal_new_tasks` (the site's SuperNode process) touches a file when a message arrives, which the
  site's executor watches instead of polling the SuperNode's HTTP API (an idle site stays quiet);
* :func:`fast_pull` (the SuperNode, the site's executor and the ServerApp: the processes that pull
  message objects) lowers the keyword defaults of the object-pull backoff in
  ``flwr.supercore.inflatable.inflatable_utils``, and :func:`join_array_chunks` (the site's executor and the
  ServerApp) has a received array's chunks joined in one copy rather than grown in a buffer and copied again;
* :class:`ServerAppHost` (the SuperLink, ``weckd.server.flower_superlink``) runs each run's ServerApp in a thread
  of the SuperLink process (no SuperExec, no ``flwr-serverapp`` process: ~130 MB less at the coordinator), asking
  the SuperLink for a run once weckd-server touched a file after submitting it, not every second;
* :func:`bound_superlink_sqlite` (the SuperLink, ``weckd.server.flower_superlink``) bounds the memory its SQLite
  connections keep, which Flower sets to hold ~300 MB of relayed payloads, and :func:`throttle_status_cleanup`
  sweeps expired task tokens at most once a second from run-status checks (Flower: on every object pulled);
* :func:`slow_http_ticks` (the SuperLink and the SuperNode) has the uvicorn loop behind their HTTP APIs wake every
  0.5 s rather than every 0.1 s while nothing asks it anything;
* :func:`process_settings` (every Flower process weckd starts, through ``chain.procs.flower_env``) sets the
  size of the chunks Flower cuts an array into, so the SuperLink and the ServerApp hold 1 MiB per object in
  flight rather than 5 MiB (each holds up to ~16 in flight while a payload is relayed);
* :func:`superlink_files` (the ServerApp) names the SuperLink's database files, so the ServerApp pulls
  replies when the SuperLink has written something rather than on a timer;
* :func:`register_node` (the coordinator's one-off ``flwr`` process) registers a site's key through the
  Control API and returns Flower's own error code, so an already-registered key is told apart by its code;
* ``weckd.client.executor`` keeps one warm ClientApp executor per site (``--isolation process``),
  built on the SuperNode's Runtime API through :func:`runtime_client`, :func:`acquire_task_request`,
  :func:`task_heartbeat` and :data:`RUNTIME` (Flower's own ``run_clientapp`` helpers).

These touch Flower internals, so flwr is pinned to 1.39.* and :func:`check_internals` (called by
both CLIs and by a unit test) fails loudly when any of them moves.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import sys
import threading
import time as _time
from pathlib import Path
from queue import Queue
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .errors import ConfigError, PayloadError
from .protocol import KEY_PLAIN, KEY_SEALED, PAYLOAD_ENTRY
from .watch import FileWatch

if TYPE_CHECKING:
    from flwr.app import ArrayRecord


log = logging.getLogger(__name__)

SUPPORTED = "1.39."
PULL_KWARGS = ("initial_backoff", "backoff_cap", "max_tries_per_object")
CHUNK_ENV = "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE"  # read once, when flwr.common.constant is imported
ARRAY_CHUNK_BYTES = 1 << 20  # Flower's default is 5 MiB


def process_settings() -> dict[str, str]:
    """Environment settings for every Flower process weckd starts (SuperLink with its ServerApp, SuperNode,
    the site's executor and the one-off ``flwr`` CLI): arrays cross a hop in chunks of
    :data:`ARRAY_CHUNK_BYTES`. A relayed payload is cut into these chunks, and the SuperLink holds every
    request body of the object pushes and pulls in flight twice (the body and its decoded message), so the
    chunk size scales its peak memory while payloads move: a 3-link resnet18 chain peaked at 340-430 MB with
    5 MiB chunks and 230 MB with 1 MiB ones (the ServerApp ~320 and ~280 MB). Chunks are content-addressed
    objects whatever their size, so a site and a coordinator that cut differently still read each other."""
    return {CHUNK_ENV: str(ARRAY_CHUNK_BYTES)}


class IdlePoll:
    """How long to wait before the next poll: ``fast`` while there was work within the last ``idle_after``
    seconds, then ``slow`` (``slowest`` after ``slowest_after``). A federation site idles for whole links while
    others train; polling it at ``slow`` then keeps the processes that wait quiet, and its first message after a
    long idle costs at most ``slow`` seconds more.

    With ``quick_after`` (longer than ``idle_after``), the fast pace lasts that long after a message that came
    soon (within ``quick_after``) after the one before it: messages that come in quick succession (short links,
    evaluations) are picked up at once, while a site whose messages come a long link apart slows down
    ``idle_after`` seconds after each. The first (the run's discovery query) holds it ``idle_after``: every site
    but the first link's then waits that link out at the slow pace (a fast ``quick_after`` after discovery cost
    ~1.5 % of a core in the first link of a 3-site federation), and a site whose next message comes within
    ``idle_after`` still finds it at once.

    While a message is being handled, the SuperNode waits for its reply in steps of ``brisk`` seconds for the
    first ``brisk_for`` seconds after it arrived (an evaluation's reply is ready in well under a second), then
    of ``fast`` (a link that trains for minutes)."""

    def __init__(self, fast: float, slow: float, idle_after: float, slowest: float = 0.0,
                 slowest_after: float = float("inf"), quick_after: float = 0.0, brisk: float = 0.0,
                 brisk_for: float = 0.0) -> None:
        self.fast, self.slow, self.idle_after = fast, max(fast, slow), idle_after
        self.slowest, self.slowest_after = max(self.slow, slowest), slowest_after
        self.quick_after = max(idle_after, quick_after)
        self.hold = self.quick_after  # how long the fast pace lasts after work
        self.brisk, self.brisk_for = min(fast, brisk) if brisk > 0 else fast, brisk_for
        self.last_work = _time.monotonic()
        self.last_message: float | None = None

    def worked(self) -> None:
        self.last_work = _time.monotonic()

    def message(self) -> None:
        """A message arrived: work, and the pace after it set by how soon it followed the one before."""
        now = _time.monotonic()
        soon = self.last_message is not None and now - self.last_message < self.quick_after
        self.hold = self.quick_after if soon else self.idle_after
        self.last_message = self.last_work = now

    def reply_wait(self) -> float:
        """The step while a message is being handled."""
        recent = self.last_message is not None and _time.monotonic() - self.last_message < self.brisk_for
        return self.brisk if recent else self.fast

    def wait(self) -> float:
        idle = _time.monotonic() - self.last_work
        return self.fast if idle < self.hold else self.slow if idle < self.slowest_after else self.slowest


class _ModuleShim:
    """A module as one module of Flower's (or uvicorn's) sees it: the names a subclass defines are its own, every
    other name is the module ``_module``'s."""

    _module = "time"

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module(self._module), name)


class _CappedTime(_ModuleShim):
    """The ``time`` module with ``sleep`` capped at the idle poll: Flower's SuperNode sleeps 3 s after a Fleet
    poll that found nothing and 0.5 s while it waits for a reply (which counts as work)."""

    def __init__(self, poll: IdlePoll) -> None:
        self._poll = poll

    def sleep(self, seconds: float) -> None:
        if seconds < 3:  # not the empty-poll sleep: a message is being handled
            self._poll.worked()
            _time.sleep(min(seconds, self._poll.reply_wait()))
        else:
            _time.sleep(self._poll.wait())


def check_flower_version() -> str:
    """The installed flwr version, read from its metadata (Flower is not imported); fail unless it is 1.39.*."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("flwr")
    except PackageNotFoundError:
        found = "none"
    if not found.startswith(SUPPORTED):
        raise ConfigError(f"flwr {found} installed; weckd needs flwr {SUPPORTED}* (pip install 'flwr>=1.39,<1.40')")
    return found


def check_internals() -> None:
    """Fail with a clear reason when the Flower internals weckd patches are not where 1.39 had them."""
    import flwr.supernode.start_client_internal as sci
    from flwr.supercore.inflatable import inflatable_utils as utils

    version = check_flower_version()
    _check_chunk_setting()
    _uvicorn_server()
    from flwr.app.message.array import Array

    _array_inflate(Array)
    _sqlite_mixin()
    _sql_linkstate()
    _serverapp_runtime()
    if "time.sleep(3)" not in inspect.getsource(sci) or getattr(sci, "time", None) is None:
        raise ConfigError("flwr.supernode.start_client_internal no longer polls with time.sleep(3); "
                          "update weckd.chain.flower for this Flower release")
    if "run_id = _pull_and_store_message(" not in inspect.getsource(sci.start_client_internal) or \
            not callable(getattr(sci, "_pull_and_store_message", None)):
        raise ConfigError("flwr.supernode.start_client_internal no longer stores messages through "
                          "_pull_and_store_message; update weckd.chain.flower (signal_new_tasks)")
    for fn in (utils.pull_objects, utils.pull_and_inflate_object_from_tree):
        missing = [k for k in PULL_KWARGS if k not in (fn.__kwdefaults__ or {})]
        if missing:
            raise ConfigError(f"flwr {fn.__qualname__} lost keyword(s) {missing}; update weckd.chain.flower")
    import flwr.client.grpc_rere_client.connection as conn
    from flwr.supercore import heartbeat as hb

    for module in (conn, hb):
        if "HEARTBEAT_DEFAULT_INTERVAL" not in inspect.getsource(module) or \
                not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            raise ConfigError(f"{module.__name__} no longer reads HEARTBEAT_DEFAULT_INTERVAL; "
                              "update weckd.chain.flower")
    from flwr.supercore.retry import make_simple_http_retry_invoker

    if not callable(getattr(make_simple_http_retry_invoker(), "wait_gen_factory", None)):
        raise ConfigError("flwr's HTTP retry invoker has no wait_gen_factory any more; update weckd.chain.flower")
    try:
        runtime()
        codes = control_api().codes
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"flwr {version}: a Runtime or Control API helper weckd uses moved ({err}); "
                          "update weckd.chain.flower") from None
    if getattr(codes, "PUBLIC_KEY_ALREADY_IN_USE", None) != KEY_ALREADY_REGISTERED:
        raise ConfigError(f"flwr {version}: the Control API's already-registered key code is no longer "
                          f"{KEY_ALREADY_REGISTERED}; update weckd.chain.flower")


def _check_chunk_setting() -> None:
    from flwr.app.message import array
    from flwr.common import constant

    if f'os.getenv("{CHUNK_ENV}"' not in inspect.getsource(constant) or \
            "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE" not in inspect.getsource(array.Array.slice_array):
        raise ConfigError(f"flwr no longer cuts arrays by {CHUNK_ENV}; update weckd.chain.flower (process_settings)")


def cap_supernode_sleep(cap: float = 0.2, idle: float = 1.0, idle_after: float = 3.0, quick_after: float = 10.0,
                        long_idle: float = 3.0, long_idle_after: float = 60.0, brisk: float = 0.05,
                        brisk_for: float = 2.0) -> IdlePoll:
    """Poll the Fleet API every ``cap`` seconds (Flower: 3 s) while the site had work within ``idle_after``
    seconds (``quick_after`` after a message that followed the one before it soon, see :class:`IdlePoll`),
    every ``idle`` seconds after that and every ``long_idle`` seconds once nothing came for ``long_idle_after``
    seconds; waits for a reply are capped at ``cap`` too (at ``brisk`` for ``brisk_for`` seconds after the message
    came). A site waits idle for whole links while the others train (and a service federation between jobs): each
    poll is a signed TLS request that the SuperLink answers from its database. ``idle_after`` covers the gap
    between a site's evaluation reply and its train message when it trains next (the other sites' evaluations,
    seconds); after that a site whose messages come a long link apart is idle for a whole link, and each fast
    poll would be a request for nothing. Returns the pace, for :func:`signal_new_tasks` to tell it of each
    message."""
    import flwr.supernode.start_client_internal as sci

    poll = IdlePoll(cap, idle, idle_after, long_idle, long_idle_after, quick_after=quick_after, brisk=brisk,
                    brisk_for=brisk_for)
    sci.time = _CappedTime(poll)  # type: ignore[assignment]
    return poll


RUN_SIGNAL_ENV = "WECKD_RUN_SIGNAL"  # weckd-server touches this file after it submits a run; the SuperLink watches it


SQLITE_BOUNDS = {"cache_size": "-2000", "mmap_size": "0"}  # 2 MB of page cache per connection, no mmap


def bound_superlink_sqlite() -> None:
    """The SuperLink process (``weckd.server.flower_superlink``): Flower 1.39 gives each of its SQLite connections
    a 64 MB page cache and 256 MB of memory-mapped I/O (``flwr.supercore.constant.SQLITE_PRAGMAS``), and every
    message object relayed passes through them, so the SuperLink kept what it relayed resident: a 3-link resnet18
    chain took it from 150 MB to 470 MB. With :data:`SQLITE_BOUNDS` a connection caches 2 MB and reads through
    the OS's page cache, which holds the database file anyway: the SuperLink opens ~10 connections (one per
    thread that touches its state), and at 8 MB each they kept ~30 MB more resident (peak 248 → 219 MB)."""
    mixin = _sqlite_mixin()
    mixin.SQLITE_PRAGMAS = tuple({**dict(mixin.SQLITE_PRAGMAS), **SQLITE_BOUNDS}.items())


HTTP_TICK_S = 0.5  # how often the uvicorn loop behind a Flower HTTP API wakes to see whether it should stop


class _TickAsyncio(_ModuleShim):
    """The ``asyncio`` module as ``uvicorn.server`` sees it, with the sleep of its server's idle loop (``loop``, the
    code of ``Server.main_loop``: 0.1 s) made ``tick``; every other sleep there (those of its shutdown) is kept."""

    _module = "asyncio"

    def __init__(self, tick: float, loop: Any) -> None:
        self.tick, self.loop = tick, loop

    def sleep(self, seconds: float, result: Any = None) -> Any:
        import asyncio

        return asyncio.sleep(self.tick if sys._getframe(1).f_code is self.loop else seconds, result)


def slow_http_ticks(tick: float = HTTP_TICK_S) -> None:
    """The SuperLink and the site's SuperNode, whose Control/Runtime APIs run uvicorn: its server loop wakes every
    0.1 s only to see whether it should stop and to refresh its ``Date`` header, ~0.15 % of a core per process,
    through every link (four such processes wait while a 3-site federation on one host trains). With this it wakes
    every ``tick`` seconds; requests are served as they come either way, and a stop is seen up to ``tick`` later."""
    us = _uvicorn_server()
    us.asyncio = _TickAsyncio(tick, us.Server.main_loop.__code__)


def _uvicorn_server() -> Any:
    import uvicorn.server as us

    if "await asyncio.sleep(0.1)" not in inspect.getsource(us.Server.main_loop) or \
            getattr(us, "asyncio", None) is None:
        raise ConfigError("uvicorn's server loop no longer ticks with asyncio.sleep(0.1); "
                          "update weckd.chain.flower (slow_http_ticks)")
    return us


STATUS_CLEANUP_S = 1.0  # a run's status check sweeps expired task tokens at most this often


def throttle_status_cleanup(interval: float = STATUS_CLEANUP_S) -> None:
    """The SuperLink process: Flower 1.39's ``SqlLinkState.get_run_status`` first sweeps expired task tokens (two
    UPDATE statements in a write transaction), and every object a site pulls or pushes asks for its run's status:
    ~11 % of the SuperLink's CPU while six sites fetch and score a model. From a status check the sweep then runs
    at most once per ``interval`` (a task whose heartbeat lapsed is marked failed that much later, against
    heartbeat timeouts of tens of seconds); every other caller (task activation, heartbeats, claims) sweeps as in
    Flower."""
    import threading

    state_cls = _sql_linkstate()
    sweep, status = state_cls._cleanup_expired_task_tokens, state_cls.get_run_status
    local, lock, last = threading.local(), threading.Lock(), [float("-inf")]

    def throttled_sweep(self: Any) -> None:
        if getattr(local, "status_check", False):
            with lock:
                now = _time.monotonic()
                if now - last[0] < interval:
                    return
                last[0] = now
        sweep(self)

    def get_run_status(self: Any, run_ids: Any) -> Any:
        local.status_check = True
        try:
            return status(self, run_ids)
        finally:
            local.status_check = False

    state_cls._cleanup_expired_task_tokens = throttled_sweep
    state_cls.get_run_status = get_run_status


def _sql_linkstate() -> Any:
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState

    status = getattr(SqlLinkState, "get_run_status", None)
    if status is None or not callable(getattr(SqlLinkState, "_cleanup_expired_task_tokens", None)) or \
            "self._cleanup_expired_task_tokens()" not in inspect.getsource(status):
        raise ConfigError("flwr's SqlLinkState.get_run_status no longer sweeps expired task tokens first; "
                          "update weckd.chain.flower (throttle_status_cleanup)")
    return SqlLinkState


def _sqlite_mixin() -> Any:
    import flwr.supercore.sql_mixin as mixin

    pragmas = dict(getattr(mixin, "SQLITE_PRAGMAS", ()))
    setter = getattr(mixin, "_set_sqlite_pragmas", None)
    if not all(k in pragmas for k in SQLITE_BOUNDS) or setter is None or \
            "SQLITE_PRAGMAS" not in inspect.getsource(setter):
        raise ConfigError("flwr.supercore.sql_mixin no longer sets cache_size and mmap_size from SQLITE_PRAGMAS; "
                          "update weckd.chain.flower (bound_superlink_sqlite)")
    return mixin


def superlink_files(database: Path) -> list[Path]:
    """The files Flower 1.39's SuperLink commits every message, object and heartbeat to: its SQLite database
    and write-ahead log. The ServerApp runs in the SuperLink's process (:class:`ServerAppHost`) and
    pulls replies when they changed (``weckd.server.transport.ChangeWait``)."""
    return [database, database.with_name(database.name + "-wal")]


SERVERAPP_ENDED = "serverapp-ended"  # beside the run signal: the id of the last run whose ServerApp has ended


class _StopTask(_ModuleShim):
    """The ``signal`` module as ``flwr.supercore.heartbeat`` sees it: a task's heartbeat that the SuperLink refuses
    (its run was stopped) raises SIGINT at its process, which in the SuperLink process would stop the SuperLink;
    here it calls ``stop`` instead."""

    _module = "signal"

    def __init__(self, stop: Callable[[], None]) -> None:
        self._stop = stop

    def raise_signal(self, signum: int) -> None:
        self._stop()


class RunStopped(BaseException):
    """The SuperLink refused a hosted ServerApp's task token (its run was stopped): raised in the thread that
    asked, where Flower would have sent SIGINT to the process (and so stopped the SuperLink). A BaseException, so
    that no ``except Exception`` on the way (Flower's, weckd's) takes it for a failure to retry or report."""


class _RaiseInstead(_ModuleShim):
    """The ``os`` module as ``flwr.supercore.retry.http_retry`` sees it: its retry invoker, refused with HTTP 401
    (a task token the SuperLink no longer knows), kills its own process with SIGINT; here it calls ``stop`` and
    raises :class:`RunStopped` in the thread that made the request."""

    _module = "os"

    def __init__(self, stop: Callable[[], None]) -> None:
        self._stop = stop

    def kill(self, pid: int, signum: int) -> None:
        import os
        import signal

        if pid != os.getpid() or signum != signal.SIGINT:
            os.kill(pid, signum)
            return
        self._stop()
        raise RunStopped("the SuperLink no longer accepts the ServerApp's task token (its run was stopped)")


class ServerAppHost:
    """Each run's ServerApp, in a thread of the SuperLink process (``weckd.server.flower_superlink``).

    Flower's SuperLink in ``--isolation process`` hands a run to whoever acquires it on its Runtime API with the
    SuperExec secret; Flower's SuperExec then starts ``flwr-serverapp`` as a process that imports all of Flower
    again (~130 MB). Here the SuperLink's own process acquires it and runs Flower's ServerApp runtime
    (``flwr.superlink.runtime.run_serverapp``) in a thread, over the same TLS Runtime API, with three names that
    runtime sees replaced: its signal handlers (only a main thread may set them; its exit handlers are kept and
    run by :meth:`_exit`), ``flwr_exit`` (which would end the process: here it pushes the task's output and
    returns) and ``HttpGrid`` (kept, so that a stopped run's grid is closed: the ServerApp's next request then
    fails, and its thread ends). Where Flower answers a stopped run with SIGINT at its own process (a refused
    heartbeat, a request refused with HTTP 401), the SuperLink would stop: here the grid is closed instead, and a
    refused request raises :class:`RunStopped` in its thread.

    A run is asked for once ``run_signal`` was touched (weckd-server touches it after each submission) and at
    least every ``longest`` seconds; after each, the run's id is written to :data:`SERVERAPP_ENDED` beside it
    (weckd-server's sign that the ServerApp has pushed its output)."""

    def __init__(self, runtime_address: str, ca_file: str, secret: bytes, run_signal: Path,
                 longest: float = 30.0) -> None:
        self.address, self.ca_file, self.secret = runtime_address, ca_file, secret
        self.run_signal, self.longest = run_signal, longest
        self.ended = run_signal.with_name(SERVERAPP_ENDED)
        self._handlers: list[Callable[[], None]] = []
        self._grid: Any = None
        self.exit_code: int | None = None
        self.closed = threading.Event()  # set: :meth:`serve` returns at its next wake

    def start(self) -> threading.Thread:
        self._install()
        thread = threading.Thread(target=self.serve, name="weckd-serverapp", daemon=True)
        thread.start()
        return thread

    def serve(self) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        watch = FileWatch([self.run_signal])
        while True:
            watch.wait(self.longest)
            if self.closed.is_set():
                return
            client = None
            try:  # a client per wake: an open keep-alive connection would hold up the SuperLink's HTTP server's stop
                client = runtime_client(self.address, None, self.secret, Path(self.ca_file).read_bytes())
                while True:  # every run submitted since the last one
                    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP]))
                    if not (res.HasField("task") and res.token):
                        break
                    self.run_task(res.token)
            except (Exception, RunStopped):  # noqa: BLE001 (the host outlives a failed request: the next wake retries)
                log.exception("ServerApp host: acquiring a run from the SuperLink failed")
            finally:
                if client is not None:
                    client.close()

    def run_task(self, token: str) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        rsa = importlib.import_module("flwr.superlink.runtime.run_serverapp")
        self._handlers, self._grid, self.exit_code = [], None, None
        setattr(TaskIdentity, "_run_id", None)  # noqa: B010 (this task's id, read back below, not the last task's)
        try:
            rsa.run_serverapp(runtime_api_address=self.address, log_queue=Queue(), token=token, insecure=False,
                              certificates=Path(self.ca_file).read_bytes(), parent_pid=None,
                              runtime_dependency_install=False)
        except RunStopped as stopped:
            self._exit(130, f"{stopped}; the ServerApp stops")  # its exit handlers: heartbeat stopped, grid closed
        finally:
            self._grid = None
            run_id = TaskIdentity._run_id
            log.info("ServerApp host: the ServerApp of run %s ended (exit code %s)", run_id, self.exit_code)
            if run_id is not None:
                from .files import atomic_write_text

                atomic_write_text(self.ended, f"{run_id}\n")

    def _install(self) -> None:
        rsa, hb, retry = _serverapp_runtime()
        grid_cls = rsa.HttpGrid

        def grid(*args: Any, **kwargs: Any) -> Any:
            self._grid = grid_cls(*args, **kwargs)
            return self._grid

        rsa.register_signal_handlers = self._keep_handlers
        rsa.flwr_exit = self._exit
        rsa.HttpGrid = grid
        hb.signal = _StopTask(self._stop)  # type: ignore[assignment]
        retry.os = _RaiseInstead(self._stop)  # type: ignore[assignment]

    def _keep_handlers(self, *_: Any, exit_handlers: list[Callable[[], None]] | None = None, **__: Any) -> None:
        self._handlers = list(exit_handlers or [])

    def _exit(self, code: int, message: str | None = None, *_: Any, **__: Any) -> None:
        if message:
            log.log(logging.INFO if 0 <= code < 100 else logging.ERROR, "ServerApp: %s", message)
        handlers, self._handlers = self._handlers, []
        for handler in handlers:  # pushes the task's output, closes its grid
            try:
                handler()
            except (Exception, RunStopped) as err:  # noqa: BLE001 (a stopped run's closed grid refuses the push)
                log.warning("ServerApp host: exit handler failed: %s", err)
        self.exit_code = int(code)

    def _stop(self) -> None:
        grid = self._grid
        log.warning("ServerApp host: the SuperLink refused the running task (its run was stopped); closing its grid")
        if grid is not None:
            grid.close()


def _serverapp_runtime() -> tuple[Any, Any, Any]:
    from flwr.supercore import heartbeat as hb
    from flwr.supercore.retry import http_retry as retry

    # the module, not the function of the same name its package exports
    rsa = importlib.import_module("flwr.superlink.runtime.run_serverapp")

    src = inspect.getsource(rsa.run_serverapp)
    names = ("register_signal_handlers(", "flwr_exit(", "HttpGrid(", "exit_handlers=[on_exit]")
    if not all(n in src for n in names) or not all(hasattr(rsa, n.rstrip("(")) for n in names[:3]):
        raise ConfigError("flwr.superlink.runtime.run_serverapp no longer sets up its grid, exit handlers and exit "
                          "as 1.39 did; update weckd.chain.flower (ServerAppHost)")
    if "signal.raise_signal(signal.SIGINT)" not in inspect.getsource(hb.make_task_heartbeat_fn_http) or \
            getattr(hb, "signal", None) is None:
        raise ConfigError("flwr.supercore.heartbeat no longer stops a refused task with SIGINT; "
                          "update weckd.chain.flower (ServerAppHost)")
    if "os.kill(os.getpid(), signal.SIGINT)" not in inspect.getsource(retry) or getattr(retry, "os", None) is None:
        raise ConfigError("flwr.supercore.retry.http_retry no longer stops a refused task with SIGINT; "
                          "update weckd.chain.flower (ServerAppHost)")
    return rsa, hb, retry


TASK_SIGNAL_ENV = "WECKD_TASK_SIGNAL"  # weckd-client gives the SuperNode and the executor the same path


def signal_new_tasks(path: Path, on_message: Callable[[], None] | None = None) -> None:
    """Touch ``path`` each time the SuperNode has stored a message from the coordinator (a task for the site's
    executor), and call ``on_message`` (the poll pace, :meth:`IdlePoll.message`). The executor waits for the
    file (``weckd.chain.watch``) instead of polling the SuperNode's HTTP API five times a second: an idle site
    then costs almost no CPU, and a task starts sooner."""
    import flwr.supernode.start_client_internal as sci

    pull = sci._pull_and_store_message

    def pull_and_signal(*args: Any, **kwargs: Any) -> Any:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            path.touch()  # creates it, or sets its mtime to now
            if on_message is not None:
                on_message()
        return run_id

    sci._pull_and_store_message = pull_and_signal  # type: ignore[attr-defined]


def set_node_heartbeat(interval: float) -> None:
    """The SuperNode's heartbeat period in seconds (Flower's default is 30; the SuperLink takes a node for gone
    after two missed periods, so a site that dies is noticed after about twice this). Flower hard-codes the
    period in the node connection (what it announces) and in the heartbeat sender (how often it beats)."""
    import flwr.client.grpc_rere_client.connection as conn
    from flwr.supercore import heartbeat as hb

    conn.HEARTBEAT_DEFAULT_INTERVAL = hb.HEARTBEAT_DEFAULT_INTERVAL = interval  # type: ignore[attr-defined,assignment]


def fast_pull(initial_backoff: float = 0.05, backoff_cap: float = 0.5, max_tries: int = 20_000) -> None:
    """Retry object pulls after 50 ms instead of 1 s (the object is usually a moment behind)."""
    from flwr.supercore.inflatable import inflatable_utils as utils

    for fn in (utils.pull_objects, utils.pull_and_inflate_object_from_tree):
        missing = [k for k in PULL_KWARGS if k not in (fn.__kwdefaults__ or {})]
        if missing:  # the coordinator's processes patch only this: they check it here, not in check_internals
            raise ConfigError(f"flwr {fn.__qualname__} lost keyword(s) {missing}; update weckd.chain.flower")
        fn.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), "initial_backoff": initial_backoff,
                             "backoff_cap": backoff_cap, "max_tries_per_object": max_tries}


class _ChunkTap:
    """One received ArrayChunk as Flower's ``Array.inflate`` reads it: the chunk's bytes are noted (in the order
    read) and none handed over, so the array is joined from them once instead of grown in a bytearray."""

    __slots__ = ("_chunk", "_read")

    def __init__(self, chunk: Any, read: list[Any]) -> None:
        self._chunk, self._read = chunk, read

    @property
    def data(self) -> bytes:
        self._read.append(self._chunk.data)
        return b""


def join_array_chunks() -> None:
    """The weckd processes that receive payloads as arrays (the ServerApp and a site's executor): Flower 1.39
    assembles a received Array by growing a bytearray from its chunks, then copying it into bytes
    (``flwr.app.message.array.Array.inflate``), so three copies of the payload are held at once; here Flower's
    own ``inflate`` checks the array and its chunks, and the bytes are joined from the chunks in one copy."""
    from flwr.app.message.array import Array

    flower_inflate = _array_inflate(Array)

    def inflate(cls: type, object_content: bytes, children: dict[str, Any] | None = None) -> Any:
        read: list[Any] = []
        array = flower_inflate.__func__(cls, object_content,  # type: ignore[attr-defined]
                                        {cid: _ChunkTap(ch, read) for cid, ch in (children or {}).items()})
        array.data = b"".join(read)
        return array

    inflate.__wrapped__ = flower_inflate  # type: ignore[attr-defined]
    Array.inflate = classmethod(inflate)  # type: ignore[assignment,method-assign]


def _array_inflate(array_cls: Any) -> Any:
    """Flower's ``Array.inflate`` (the original where :func:`join_array_chunks` wrapped it), checked to read each
    chunk's ``data`` once, in order, into one buffer."""
    held = inspect.getattr_static(array_cls, "inflate")
    flower_inflate = getattr(getattr(held, "__func__", None), "__wrapped__", None) or array_cls.inflate
    source = inspect.getsource(flower_inflate)
    if "buff += cast(ArrayChunk, children[ch_id]).data" not in source or "array.data = bytes(buff)" not in source:
        raise ConfigError("flwr.app.message.array.Array.inflate no longer joins chunks into one buffer; "
                          "update weckd.chain.flower (join_array_chunks)")
    return flower_inflate


# The SuperNode's Runtime API calls that hand out tasks; signed with the shared secret (as Flower's SuperExec does).
SUPEREXEC_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask", "/flwr.proto.Runtime/PullPendingTasks",
                               "/flwr.proto.Runtime/ClaimTask"})


def runtime() -> SimpleNamespace:
    """Flower's own ClientApp-side Runtime helpers (``flwr.supernode.runtime.run_clientapp``) and the SuperExec
    secret loader, imported on first use (only the site's executor needs them)."""
    from flwr.supercore.auth import load_superexec_auth_secret
    from flwr.supercore.inflatable.inflatable_utils import ObjectPushError
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    return SimpleNamespace(pull_task_input=pull_task_input, push_message=push_message,
                           push_task_output=push_task_output, load_secret=load_superexec_auth_secret,
                           push_refused=ObjectPushError)


# Flower's Control API error code for a SuperNode key that is already registered
# (``flwr.supercore.error.base.ApiErrorCode.PUBLIC_KEY_ALREADY_IN_USE``; checked by check_internals)
KEY_ALREADY_REGISTERED = 23


def control_api() -> SimpleNamespace:
    """Flower's Control API client pieces the ``flwr supernode register`` command uses, imported on first use
    (only the coordinator's one-off ``flwr`` process needs them)."""
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import RegisterNodeRequest  # pylint: disable=E0611
    from flwr.supercore.error.base import ApiErrorCode, FlowerError

    return SimpleNamespace(connection=read_superlink_connection, client=init_http_client_from_connection,
                           public_key=try_load_public_key, request=RegisterNodeRequest, error=FlowerError,
                           codes=ApiErrorCode)


def register_node(connection: str, public_key: str, name: str) -> dict[str, Any]:
    """Register a SuperNode key under ``name`` through the Control API, as ``flwr supernode register`` does, but
    with the answer typed: ``{"success": True, "node-id": …}``, or ``{"success": False, "error-code": N,
    "error-message": …}`` with Flower's own error code (:data:`KEY_ALREADY_REGISTERED`: the key is known)."""
    import httpx

    api = control_api()
    try:
        key = api.public_key(Path(public_key).expanduser())
    except SystemExit:  # Flower's loader exits on a key that is not a NIST EC public key
        return {"success": False, "error-code": None, "error-message": f"{public_key}: not an EC P-384 public key"}
    client = api.client(api.connection(connection))
    try:
        reply = client.RegisterNode(request=api.request(public_key=key, name=name))
    except httpx.HTTPStatusError as err:
        flower = api.error.from_json(err.response.text)
        return {"success": False, "error-code": flower.code if flower is not None else None,
                "error-message": (flower.message if flower is not None else err.response.text)[:300]}
    except httpx.HTTPError as err:
        return {"success": False, "error-code": None, "error-message": f"{type(err).__name__}: {err}"[:300]}
    finally:
        client.close()
    return {"success": True, "node-id": int(reply.node_id)} if reply.node_id else \
        {"success": False, "error-code": None, "error-message": "the SuperLink registered no node"}


def runtime_client(address: str, token: str | None, secret: bytes | None = None,
                   root_certificates: bytes | None = None) -> Any:
    """A client of a Runtime API: the SuperNode's on loopback without TLS (the site's executor, signed with
    ``secret``, or one task's, authenticated by its ``token``), or the SuperLink's with TLS
    (``root_certificates``: :class:`ServerAppHost`)."""
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp" if token else "SuperExec")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    if secret:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=SUPEREXEC_METHODS))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=root_certificates is None, root_certificates=root_certificates,
        interceptors=interceptors, retry_invoker=loopback_retries(make_simple_http_retry_invoker()),
    )


LOOPBACK_RETRY_S = 0.25


def loopback_retries(invoker: Any) -> Any:
    """Flower's retry invoker, retrying every ~0.25 s instead of backing off to ~10 s: the SuperNode's
    ClientAppIo is on loopback, and it comes up (or back) whenever weckd-client starts its SuperNode; the
    executor, started first, must not sleep through that."""
    invoker.wait_gen_factory = lambda: iter(lambda: LOOPBACK_RETRY_S, None)
    return invoker


def acquire_task_request() -> Any:
    """An AcquireTask request for ClientApp tasks."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType

    return AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])


def task_heartbeat(client: Any) -> Any:
    """A started heartbeat for the task ``client`` is bound to (call ``.stop()`` when the task ends)."""
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http

    sender = HeartbeatSender(make_task_heartbeat_fn_http(client))
    sender.start()
    return sender


def payload_record(blobs: Mapping[str, bytes | memoryview]) -> ArrayRecord:
    """Payload bytes (plain ``chain.payload`` bytes or sealed blobs) as one ArrayRecord: a uint8 array per
    name, so each payload crosses a hop as one object whatever its tensor count."""
    from flwr.app import ArrayRecord

    return ArrayRecord({name: _byte_array(data) for name, data in blobs.items()})


def _byte_array(data: bytes | memoryview) -> Any:
    """A 1-d uint8 Array of ``data``, whose serialisation is the ``.npy`` header plus the bytes. Where ``data`` is
    the view :func:`read_payloads` took of a received array (``view=True``), that array's own serialisation travels
    on as it is: a coordinator relaying a payload holds it once, not once received and once again to send."""
    import io

    import numpy as np
    from flwr.app import Array

    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False, "shape": (len(data),)})
    header = head.getvalue()
    held = data.obj if isinstance(data, memoryview) else None
    if isinstance(held, bytes) and len(held) == len(header) + len(data) and held.startswith(header) and \
            _address(data) == _address(held) + len(header):
        npy = held
    else:
        npy = header + bytes(data)
    return Array(dtype="uint8", shape=(len(data),), stype="numpy.ndarray", data=npy)


def _address(data: bytes | memoryview) -> int:
    import numpy as np

    return int(np.frombuffer(data, dtype=np.uint8).ctypes.data)


def payload_records(sealed: bool, blobs: Mapping[str, bytes | memoryview]) -> dict[str, ArrayRecord]:
    """The record a message's payloads travel in: ``KEY_SEALED`` or ``KEY_PLAIN``."""
    return {payload_key(sealed): payload_record(blobs)}


def payload_key(sealed: bool) -> str:
    """The record key payloads travel under: ``KEY_SEALED`` in a sealed federation, else ``KEY_PLAIN``."""
    return KEY_SEALED if sealed else KEY_PLAIN


def request_payload(sealed: bool, data: bytes | memoryview) -> dict[str, ArrayRecord]:
    """The records that hand one payload to a site (a request holds exactly one, named PAYLOAD_ENTRY)."""
    return payload_records(sealed, {PAYLOAD_ENTRY: data})


def read_payloads(content: Any, where: str, *, view: bool = False
                  ) -> tuple[bool, dict[str, bytes | memoryview]] | None:
    """(sealed?, payload bytes by name) of a message, or None when it carries none. Both records at once
    is a malformed message. With ``view`` each payload is a read-only view into its array's serialisation
    (no copy; :func:`payload_record` sends such a view on as that array), else a copy of its bytes."""
    held = [key for key in (KEY_SEALED, KEY_PLAIN) if key in content.array_records]
    if not held:
        return None
    if len(held) > 1:
        raise PayloadError(f"{where}: message holds both sealed and plain payloads; upgrade weckd on both sides")
    record = content.array_records[held[0]]
    out: dict[str, bytes | memoryview] = {}
    for name, arr in record.items():
        if arr.dtype != "uint8" or len(arr.shape) != 1:
            raise PayloadError(f"{where}: payload {name[:40]!r} is not a byte array; upgrade weckd on both sides")
        data = _array_view(arr, name, where)
        out[name] = data if view else bytes(data)
    return held[0] == KEY_SEALED, out


def _array_view(arr: Any, name: str, where: str) -> memoryview:
    """The bytes of a 1-d uint8 Array, a view into its ``.npy`` serialisation (``arr.numpy().tobytes()`` copies
    twice: a coordinator relays each payload of hundreds of MB)."""
    import io

    import numpy as np

    bad = f"{where}: payload {name[:40]!r} is not a byte array; upgrade weckd on both sides"
    head = io.BytesIO(arr.data if isinstance(arr.data, bytes) else b"")
    try:
        version = np.lib.format.read_magic(head)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, fortran, dtype = reader(head)
    except (ValueError, KeyError) as err:
        raise PayloadError(bad) from err
    start = head.tell()
    if arr.stype != "numpy.ndarray" or dtype != np.uint8 or len(shape) != 1 or fortran or \
            len(arr.data) - start != shape[0]:
        raise PayloadError(bad)
    return memoryview(arr.data)[start:]


def config_dict(content: Any, key: str, where: str) -> Mapping[str, Any]:
    """A ConfigRecord that must be present (a missing one means mismatched weckd versions)."""
    if key not in content.config_records:
        raise PayloadError(f"{where}: message lacks {key!r}; upgrade weckd on both sides")
    return dict(content.config_records[key])
