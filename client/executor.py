"""One warm ClientApp executor per site, for ``flower-supernode --isolation process``.

Flower's own executor starts a new ``flwr-clientapp`` process for every message, which imports
torch and re-reads the site's data each time (~3 s a link). This process imports torch and the
weckd ClientApp once, asks the SuperNode's ClientAppIo API for a task when the SuperNode signals one
(``weckd.chain.flower.signal_new_tasks``: a file it touches, waited for with ``weckd.chain.watch``; and every
few seconds anyway), and runs each one in-process
with the same helpers as ``flwr/supernode/runtime/run_clientapp.py`` (minus its per-process exit, and
minus installing the run's app bundle: the site checks the bundle and runs its own ClientApp).
The decoded site data stays cached between tasks (see ``weckd.client.app``).

The SuperNode is started with ``--superexec-auth-secret-file``, so its task-handing calls
(AcquireTask, PullPendingTasks, ClaimTask) must carry Flower's SuperExec HMAC headers made with the same
secret; every other call is bound to one task by the task token AcquireTask returned.

``python -m weckd.client.executor --clientappio 127.0.0.1:PORT --superexec-auth-secret-file FILE`` (started
by ``weckd-client``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from weckd.chain.appbundle import check_bundle
from weckd.chain.cli import ERROR_PREFIX
from weckd.chain.errors import WeckdError
from weckd.chain.flower import (
    TASK_SIGNAL_ENV,
    IdlePoll,
    acquire_task_request,
    fast_pull,
    join_array_chunks,
    runtime,
    runtime_client,
    task_heartbeat,
)
from weckd.chain.protocol import Reason, Refused, error_text, reason_of
from weckd.chain.watch import FileWatch

log = logging.getLogger(__name__)

POLL_S = 0.05  # without a task signal: ask every 50 ms while the site works (a task within IDLE_AFTER_S)
IDLE_POLL_S = 0.2  # after that: the SuperNode itself polls the coordinator no faster while idle
IDLE_AFTER_S = 5.0
RETRY_S = 0.5
SAFETY_POLL_S = 10.0  # with the SuperNode's task signal: how often the SuperNode is asked anyway


def run_task(address: str, token: str) -> None:
    """Pull one task's message, check its run's bundle, run weckd's own ClientApp here, push the reply.

    The bundle is checked (``chain.appbundle``) and never installed or imported: the site runs only
    the weckd installed on it. A failure goes back as a reason code and that reason's fixed text
    (``chain.protocol.error_text``); the details stay in this site's log.
    """
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus

    rt = runtime()
    client = runtime_client(address, token)
    heartbeat = task_heartbeat(client)
    message = reply = context = None
    sub_status, details = SubStatus.FAILED, "unknown"
    try:
        message, context, run, fab = rt.pull_task_input(client)
        from weckd.client.app import app, refuse_bundle

        try:
            check_bundle(fab.content, run.fab_id, run.fab_version, "run bundle")
        except Refused as err:
            refuse_bundle(context, message, err)
            raise
        reply = app(message=message, context=context)
        sub_status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # a task failure is reported to the coordinator, the executor lives on
        reason = reason_of(ex)
        details = error_text(reason)
        if reason is Reason.INTERNAL:
            log.exception("task failed: %s: %s", type(ex).__name__, ex)
        else:
            log.warning("request refused (%s): %s", reason.value, ex)
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_reply(rt, client, reply, context)
        finally:
            rt.push_task_output(client=client, context=context, sub_status=sub_status, details=details)
            heartbeat.stop()
            client.close()


def push_reply(rt: Any, client: Any, reply: Any, context: Any) -> None:
    """Hand the reply to the SuperNode. A failed object push is logged, not raised: the SuperNode forwards a
    reply as soon as the coordinator holds every object it lacks, then drops the reply's objects, so an object
    identical to one another site already sent (two sites' equal evaluation metrics) can be refused here
    although the reply arrived. Any other failure propagates (``serve`` logs it and goes on)."""
    try:
        rt.push_message(client, reply, context)
    except rt.push_refused as ex:  # the race above: logged, the task's status is still reported
        log.warning("the SuperNode refused part of the reply (%s: %s); the coordinator has it already or will "
                    "time the task out", type(ex).__name__, ex)


def serve(address: str, secret: bytes, signal_file: Path | None = None) -> None:
    """Run ClientApp tasks forever (until SIGTERM). With ``signal_file`` (the SuperNode touches it when a message
    arrives) the SuperNode is asked for a task when the file changes, and every ``SAFETY_POLL_S`` anyway;
    without it, it is asked every ``POLL_S``/``IDLE_POLL_S``."""
    client = runtime_client(address, None, secret)
    request = acquire_task_request()
    poll = IdlePoll(POLL_S, IDLE_POLL_S, IDLE_AFTER_S)
    watch = FileWatch([signal_file]) if signal_file is not None else None
    while True:
        if watch is not None:
            watch.mark()  # before asking: a message stored after this is noticed below
        try:
            res = client.AcquireTask(request)
        except Exception as ex:  # the SuperNode is starting or restarting: retry
            log.debug("AcquireTask failed (%s); retrying", ex)
            time.sleep(RETRY_S)
            continue
        if res.HasField("task") and res.token:
            try:
                run_task(address, res.token)
            except Exception as ex:  # e.g. the SuperNode restarted mid-task: the site goes on
                log.warning("task ended without its status reaching the SuperNode (%s: %s)", type(ex).__name__, ex)
            poll.worked()
            continue
        if watch is None:
            time.sleep(poll.wait())
        else:
            watch.wait(SAFETY_POLL_S)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weckd.client.executor")
    parser.add_argument("--clientappio", help="the SuperNode's ClientAppIo address")
    parser.add_argument("--superexec-auth-secret-file",
                        help="the secret the SuperNode was started with (--superexec-auth-secret-file)")
    parser.add_argument("--site-config", help="read and cache this site's data before serving")
    parser.add_argument("--check", action="store_true",
                        help="read the site's config and data, print the counts per split as JSON, exit")
    args = parser.parse_args(argv)
    if not args.check and not (args.clientappio and args.superexec_auth_secret_file):
        parser.error("--clientappio and --superexec-auth-secret-file are required unless --check")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "alembic"):  # one line per 50 ms poll otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    t0 = time.perf_counter()
    from weckd.client.app import warm_site_data  # torch and the ClientApp, imported once

    from .metrics import SiteStatus, site_counts, status_path

    if args.site_config:
        try:  # bad data is the site's one-line error (weckd-client shows it), before the SuperNode connects
            site = warm_site_data(args.site_config)
        except WeckdError as err:
            print(f"{ERROR_PREFIX}{err}", file=sys.stderr, flush=True)
            return err.exit_code
        counts = site_counts(site.data.site)
        if args.check:
            print(json.dumps(counts), flush=True)
            return 0
        SiteStatus(status_path(site.cfg.state_dir)).update(counts=counts)  # weckd-client: "executor ready"
    log.info("executor ready (pid %d, warm-up %.1fs)", os.getpid(), time.perf_counter() - t0)
    secret = runtime().load_secret(args.superexec_auth_secret_file)
    assert secret is not None  # the flag is required
    fast_pull()
    join_array_chunks()
    signal_file = os.environ.get(TASK_SIGNAL_ENV)
    serve(args.clientappio, secret, Path(signal_file) if signal_file else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
