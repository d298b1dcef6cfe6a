"""One warm ClientApp executor per site, for ``flower-supernode --isolation process``.

Flower's own executor starts a new ``flwr-clientapp`` process for every message, which imports
torch and re-reads the site's data each time (~3 s a link). This process imports torch and the
weckd ClientApp once, polls the SuperNode's ClientAppIo API for tasks and runs each one in-process
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
import logging
import os
import signal
import time
from typing import Any, Sequence

from flwr.app import Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.auth import load_superexec_auth_secret
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output
from weckd.chain.appbundle import check_bundle
from weckd.chain.protocol import Reason, Refused, error_text, reason_of

from .fastflower import fast_pull

log = logging.getLogger(__name__)

POLL_S = 0.05
RETRY_S = 0.5
# The SuperNode's Runtime API calls that hand out tasks; signed with the shared secret (as Flower's SuperExec does).
SUPEREXEC_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask", "/flwr.proto.Runtime/PullPendingTasks",
                               "/flwr.proto.Runtime/ClaimTask"})


def _client(address: str, token: str | None, secret: bytes | None = None) -> RuntimeHttpClient:
    """A client of the SuperNode's loopback Runtime API: the executor's own (signed with ``secret``), or one
    task's (authenticated by its ``token``)."""
    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp" if token else "SuperExec")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    if secret:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=SUPEREXEC_METHODS))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,  # loopback ClientAppIo only
        interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker(),
    )


def run_task(address: str, token: str) -> None:
    """Pull one task's message, check its run's bundle, run weckd's own ClientApp here, push the reply.

    The bundle is checked (``chain.appbundle``) and never installed or imported: the site runs only
    the weckd installed on it. A failure goes back as a reason code and that reason's fixed text
    (``chain.protocol.error_text``); the details stay in this site's log.
    """
    client = _client(address, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = reply = context = None
    sub_status, details = SubStatus.FAILED, "unknown"
    try:
        message, context, run, fab = pull_task_input(client)
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
                push_message(client, reply, context)
        finally:
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
            heartbeat.stop()
            client.close()


def serve(address: str, secret: bytes) -> None:
    """Poll for ClientApp tasks forever (until SIGTERM)."""
    client = _client(address, None, secret)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    while True:
        try:
            res = client.AcquireTask(request)
        except Exception as ex:  # the SuperNode is starting or restarting: retry
            log.debug("AcquireTask failed (%s); retrying", ex)
            time.sleep(RETRY_S)
            continue
        if res.HasField("task") and res.token:
            run_task(address, res.token)
            continue
        time.sleep(POLL_S)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weckd.client.executor")
    parser.add_argument("--clientappio", required=True, help="the SuperNode's ClientAppIo address")
    parser.add_argument("--superexec-auth-secret-file", required=True,
                        help="the secret the SuperNode was started with (--superexec-auth-secret-file)")
    parser.add_argument("--site-config", help="read and cache this site's data before serving")
    args = parser.parse_args(argv)
    secret = load_superexec_auth_secret(args.superexec_auth_secret_file)
    assert secret is not None  # the flag is required
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "alembic"):  # one line per 50 ms poll otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    fast_pull()
    t0 = time.perf_counter()
    from weckd.client.app import warm_site_data  # torch and the ClientApp, imported once

    if args.site_config:
        warm_site_data(args.site_config)

    log.info("executor ready (pid %d, warm-up %.1fs)", os.getpid(), time.perf_counter() - t0)
    serve(args.clientappio, secret)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
