"""One warm ClientApp executor per site, for ``flower-supernode --isolation process``.

Flower's own executor starts a new ``flwr-clientapp`` process for every message, which imports
torch and re-reads the site's data each time (~3 s a link). This process imports torch and the
weckd ClientApp once, polls the SuperNode's ClientAppIo API for tasks and runs each one in-process
with the same helpers as ``flwr/supernode/runtime/run_clientapp.py`` (minus its per-process exit).
The decoded site data stays cached between tasks (see ``weckd.client.app``).

``python -m weckd.client.executor --clientappio 127.0.0.1:PORT`` (started by ``weckd-client``).
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
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output
from weckd.chain.errors import SecurityError

from .fastflower import fast_pull

log = logging.getLogger(__name__)

POLL_S = 0.05
RETRY_S = 0.5


def _client(address: str, token: str | None) -> RuntimeHttpClient:
    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp" if token else "SuperExec")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,  # loopback ClientAppIo only
        interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker(),
    )


def run_task(address: str, token: str) -> None:
    """Pull one task's message, run the ClientApp in this process, push its reply and status."""
    client = _client(address, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = reply = context = None
    sub_status, details = SubStatus.FAILED, "unknown"
    try:
        message, context, run, fab = pull_task_input(client)
        install_from_fab(fab.content, skip_prompt=True)
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        app: ClientApp = load(run.fab_id, run.fab_version, fab.hash_str)
        reply = app(message=message, context=context)
        sub_status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # a task failure is reported to the coordinator, the executor lives on
        code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) \
            else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        reason = getattr(ex, "reason", "") if isinstance(ex, SecurityError) else ""
        details = f"SealError[{reason}]: {ex}" if reason else f"{type(ex).__name__}: {ex}"
        log.exception("task failed: %s", details)
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
            heartbeat.stop()
            client.close()


def serve(address: str) -> None:
    """Poll for ClientApp tasks forever (until SIGTERM)."""
    client = _client(address, None)
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
    parser.add_argument("--site-config", help="read and cache this site's data before serving")
    args = parser.parse_args(argv)
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
    serve(args.clientappio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
