"""The Flower adapter's quiet waiting: a SuperNode that signals new tasks to its executor, and polls that slow
down the longer a site idles."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import flwr.supernode.start_client_internal as sci
import pytest
from weckd.chain import flower
from weckd.chain.flower import IdlePoll, signal_new_tasks


def task_signal_mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


def test_the_supernode_touches_the_signal_only_when_it_stored_a_message(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([None, 7, None])
    monkeypatch.setattr(sci, "_pull_and_store_message", lambda **kwargs: next(answers))
    signal = tmp_path / "task-signal"
    signal_new_tasks(signal)
    assert sci._pull_and_store_message(state=None) is None and task_signal_mtime(signal) is None
    assert sci._pull_and_store_message(state=None) == 7  # the run id goes through unchanged
    first = task_signal_mtime(signal)
    assert first is not None
    assert sci._pull_and_store_message(state=None) is None and task_signal_mtime(signal) == first


def test_polls_slow_down_in_steps_the_longer_a_site_idles(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(flower._time, "monotonic", lambda: now[0])
    poll = IdlePoll(0.2, 1.0, 10.0, 3.0, 60.0)
    waits = []
    for idle in (0.0, 9.9, 10.0, 59.9, 60.0, 3600.0):
        now[0] = 1000.0 + idle
        waits.append(poll.wait())
    assert waits == [0.2, 0.2, 1.0, 1.0, 3.0, 3.0]
    poll.worked()
    assert poll.wait() == 0.2


def test_the_fast_pace_lasts_longer_after_messages_that_come_in_quick_succession(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Short links and evaluations: messages seconds apart keep the site fast for ``quick_after``; the first, and a
    message that came a long link after the one before, slow the site down ``idle_after`` after them."""
    now = [1000.0]
    monkeypatch.setattr(flower._time, "monotonic", lambda: now[0])
    poll = IdlePoll(0.2, 1.0, 3.0, 3.0, 60.0, quick_after=10.0)
    told: list[int] = []
    signal_calls = iter([5, 6, 7])
    monkeypatch.setattr(sci, "_pull_and_store_message", lambda **kwargs: next(signal_calls))
    signal_new_tasks(tmp_path / "task-signal", lambda: (told.append(1), poll.message()))

    def pace_after(seconds: float) -> float:
        start = now[0]
        now[0] = start + seconds
        pace = poll.wait()
        now[0] = start
        return pace

    sci._pull_and_store_message(state=None)  # the first message (discovery)
    assert told == [1] and pace_after(2.0) == 0.2 and pace_after(3.5) == 1.0  # fast for idle_after
    now[0] += 4.0
    sci._pull_and_store_message(state=None)  # 4 s later: in quick succession
    assert pace_after(9.0) == 0.2 and pace_after(10.5) == 1.0
    now[0] += 40.0
    sci._pull_and_store_message(state=None)  # a long link later: slow after idle_after
    assert pace_after(2.0) == 0.2 and pace_after(3.5) == 1.0


def test_a_reply_is_waited_for_briskly_only_just_after_its_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """An evaluation's reply is ready within a second: the SuperNode looks for it every 20 ms at first, every
    200 ms once the site has been training a while."""
    now = [1000.0]
    monkeypatch.setattr(flower._time, "monotonic", lambda: now[0])
    poll = IdlePoll(0.2, 1.0, 3.0, quick_after=10.0, brisk=0.02, brisk_for=2.0)
    assert poll.reply_wait() == 0.2  # no message yet
    poll.message()
    now[0] += 1.5
    assert poll.reply_wait() == 0.02
    now[0] += 1.0
    assert poll.reply_wait() == 0.2


def _control_api(monkeypatch: pytest.MonkeyPatch, reply: object) -> list[tuple[bytes, str]]:
    """Flower's real Control API pieces, with a client whose RegisterNode answers ``reply`` (or raises it)."""
    import types

    real, calls = flower.control_api(), []

    class Client:
        def RegisterNode(self, request: object) -> object:  # noqa: N802 - Flower's method name
            calls.append((request.public_key, request.name))  # type: ignore[attr-defined]
            if isinstance(reply, Exception):
                raise reply
            return reply

        def close(self) -> None:
            calls.append((b"", "closed"))

    fake = types.SimpleNamespace(**{**vars(real), "connection": lambda name: name, "client": lambda conn: Client(),
                                    "public_key": lambda path: b"key:" + path.name.encode()})
    monkeypatch.setattr(flower, "control_api", lambda: fake)
    return calls


def _http_error(status: int, body: dict) -> Exception:
    import json

    import httpx

    request = httpx.Request("POST", "http://127.0.0.1/RegisterNode")
    return httpx.HTTPStatusError("refused", request=request,
                                 response=httpx.Response(status, text=json.dumps(body), request=request))


def test_registration_answers_carry_flowers_error_code_not_its_words(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from weckd.server.superlink import check_registered

    calls = _control_api(monkeypatch, types.SimpleNamespace(node_id=42))
    assert flower.register_node("local", "keys/site-A.pub", "A") == {"success": True, "node-id": 42}
    assert calls == [(b"key:site-A.pub", "A"), (b"", "closed")]
    _control_api(monkeypatch, _http_error(409, {"code": flower.KEY_ALREADY_REGISTERED, "detail": "Key in use"}))
    known = flower.register_node("local", "keys/site-B.pub", "B")
    assert known == {"success": False, "error-code": flower.KEY_ALREADY_REGISTERED, "error-message": "Key in use"}
    # another code is a failure whatever its words say
    _control_api(monkeypatch, _http_error(400, {"code": 7, "detail": "already registered (code: 23)"}))
    other = flower.register_node("local", "keys/site-C.pub", "C")
    assert other["error-code"] == 7
    fed = types.SimpleNamespace(sites={s: types.SimpleNamespace(auth_key=f"keys/site-{s}.pub") for s in "ABC"})
    check_registered(fed, [{"success": True, "node-id": 42}, known, known])  # type: ignore[arg-type]
    with pytest.raises(Exception, match=r"registering site C \(keys/site-C.pub\) failed: already registered"):
        check_registered(fed, [{"success": True, "node-id": 42}, known, other])  # type: ignore[arg-type]


def test_a_moved_flower_internal_is_the_supernodes_one_line_shown_by_weckd_client(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The supervisor imports no Flower internals: the SuperNode process checks them where it patches them,
    and its one line is what weckd-client reports."""
    import sys

    from weckd.chain.errors import ConfigError, ReportedError
    from weckd.chain.procs import Group
    from weckd.client import cli, supernode
    from weckd.client.site import SiteConfig

    def moved() -> None:
        raise ConfigError("flwr.supernode.start_client_internal no longer polls with time.sleep(3)")

    monkeypatch.setattr(supernode, "check_internals", moved)
    assert supernode.main() == 2
    line = capsys.readouterr().err.strip()
    assert line == "weckd: error: flwr.supernode.start_client_internal no longer polls with time.sleep(3)"
    child = f"import sys; print('some Flower banner'); print({line!r}, file=sys.stderr); sys.exit(2)"
    monkeypatch.setattr(cli, "supernode_cmd", lambda cfg, secret: [sys.executable, "-c", child])
    group = Group(tmp_path / "logs", 5.0)
    try:
        with pytest.raises(ReportedError, match=r"^flwr.supernode.start_client_internal no longer polls") as err:
            cli._start_supernode(SiteConfig(site="A", clientappio_port=1), group, tmp_path, tmp_path / "secret")
    finally:
        group.stop_all()
    assert err.value.exit_code == 2


def _hosted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[flower.ServerAppHost, Any, Any]:
    """A ServerApp host with its names installed in Flower's runtime (all restored after the test)."""
    import importlib

    from flwr.supercore import heartbeat as hb

    rsa = importlib.import_module("flwr.superlink.runtime.run_serverapp")
    for name in ("register_signal_handlers", "flwr_exit", "HttpGrid"):
        monkeypatch.setattr(rsa, name, getattr(rsa, name))
    monkeypatch.setattr(hb, "signal", hb.signal)
    host = flower.ServerAppHost("127.0.0.1:9093", str(tmp_path / "ca.crt"), b"secret", tmp_path / "run-signal",
                                longest=0.4)
    return host, rsa, hb


def test_the_hosted_serverapp_keeps_flowers_exit_handlers_and_its_exit_leaves_the_process(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Flower's runtime sets signal handlers (only a main thread may) and ends with flwr_exit (which ends the
    process): in the SuperLink's thread its exit handlers (the push of its output) run and the thread goes on."""
    import signal
    import threading

    host, rsa, _ = _hosted(monkeypatch, tmp_path)
    host._install()
    before = signal.getsignal(signal.SIGINT)
    pushed: list[str] = []
    errors: list[BaseException] = []

    def task() -> None:
        try:
            rsa.register_signal_handlers(event_type=None, exit_message="stopped",
                                         exit_handlers=[lambda: pushed.append("output")])
            rsa.flwr_exit(code=0, event_type=None, event_details={})
            rsa.flwr_exit(code=0)  # the handlers ran once
        except BaseException as err:  # noqa: BLE001 (the assertion below names it)
            errors.append(err)

    thread = threading.Thread(target=task)
    thread.start()
    thread.join(5)
    assert errors == [] and pushed == ["output"] and host.exit_code == 0
    assert signal.getsignal(signal.SIGINT) is before


def test_a_refused_heartbeat_closes_the_hosted_tasks_grid_not_the_superlink(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    """Flower's heartbeat raises SIGINT at the process when the SuperLink refuses it (the run was stopped)."""
    import signal
    from types import SimpleNamespace

    host, rsa, hb = _hosted(monkeypatch, tmp_path)
    closed: list[str] = []

    class Grid:
        def __init__(self, **_: Any) -> None:
            pass

        def close(self) -> None:
            closed.append("grid")

    monkeypatch.setattr(rsa, "HttpGrid", Grid)
    host._install()
    grid = rsa.HttpGrid(runtime_api_address="127.0.0.1:9093", insecure=False, token="t")
    interrupted: list[int] = []
    monkeypatch.setattr(signal, "raise_signal", interrupted.append)  # the real one would end this test process
    beat = hb.make_task_heartbeat_fn_http(SimpleNamespace(SendTaskHeartbeat=lambda req: SimpleNamespace(success=False)))
    assert beat() is True
    assert closed == ["grid"] and interrupted == [] and isinstance(grid, Grid)


def test_a_request_refused_with_401_raises_in_the_hosted_task_instead_of_interrupting_the_superlink(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Flower's own HTTP retry invoker, given a 401 (a stopped run's token), kills its own process with SIGINT."""
    import os
    import signal

    import httpx
    from flwr.supercore.retry import http_retry, make_simple_http_retry_invoker

    host, _, _ = _hosted(monkeypatch, tmp_path)
    monkeypatch.setattr(http_retry, "os", http_retry.os)
    host._install()
    closed: list[str] = []
    host._grid = type("Grid", (), {"close": lambda self: closed.append("grid")})()
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))  # the real one would end pytest
    request = httpx.Request("POST", "https://127.0.0.1:9093/v1/runtime/pull-messages")

    def refused() -> None:
        raise httpx.HTTPStatusError("401", request=request, response=httpx.Response(401, request=request))

    with pytest.raises(flower.RunStopped, match="its run was stopped"):
        make_simple_http_retry_invoker().invoke(refused)
    assert closed == ["grid"] and killed == []
    http_retry.os.kill(4242, signal.SIGTERM)  # any other kill is the real one
    assert killed == [(4242, signal.SIGTERM)]


def test_the_host_asks_for_a_run_once_signalled_and_writes_each_runs_end(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    import threading
    import time
    from types import SimpleNamespace

    from flwr.supercore.task_identity import TaskIdentity

    host, rsa, _ = _hosted(monkeypatch, tmp_path)
    asked: list[float] = []
    runs = iter([SimpleNamespace(HasField=lambda f: True, token="t0k3n")])
    idle = SimpleNamespace(HasField=lambda f: False, token="")
    client = SimpleNamespace(AcquireTask=lambda req: (asked.append(time.monotonic()), next(runs, idle))[1],
                             close=lambda: None)
    monkeypatch.setattr(flower, "runtime_client", lambda *a, **k: client)
    (tmp_path / "ca.crt").write_bytes(b"CA")
    tokens: list[str] = []

    def run_serverapp(**kwargs: Any) -> None:
        tokens.append(kwargs["token"])
        assert kwargs["certificates"] == b"CA" and kwargs["parent_pid"] is None and not kwargs["insecure"]
        TaskIdentity.run_id = 77

    monkeypatch.setattr(rsa, "run_serverapp", run_serverapp)
    monkeypatch.setattr(TaskIdentity, "_run_id", TaskIdentity._run_id)
    serving = threading.Thread(target=host.serve, daemon=True)
    serving.start()
    time.sleep(0.2)
    assert asked == []  # nothing asked before the signal (or ``longest``)
    t0 = time.monotonic()
    host.run_signal.touch()
    deadline = time.monotonic() + 5
    while not host.ended.is_file() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert tokens == ["t0k3n"] and host.ended.read_text() == "77\n"
    assert asked and asked[0] - t0 < 0.3  # woken by the touch, not by ``longest``
    time.sleep(0.1)
    assert len(asked) == 2  # once more after the run, then it waits
    host.closed.set()
    serving.join(1.0)
    assert not serving.is_alive()


def test_a_moved_serverapp_runtime_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(flower.inspect, "getsource", lambda obj: "def run_serverapp(): run()")
    with pytest.raises(flower.ConfigError, match=r"update weckd.chain.flower \(ServerAppHost\)"):
        flower.ServerAppHost("127.0.0.1:1", "ca.crt", b"s", tmp_path / "run-signal")._install()


def test_the_superlinks_sqlite_connections_cache_2_mb_and_map_nothing(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    """Flower's own connect hook, as the SuperLink runs it, sets the bounded pragmas on a real connection."""
    import sqlite3

    import flwr.supercore.sql_mixin as mixin

    monkeypatch.setattr(mixin, "SQLITE_PRAGMAS", mixin.SQLITE_PRAGMAS)  # restored after the test
    conn = sqlite3.connect(tmp_path / "state.db")
    mixin._set_sqlite_pragmas(conn, None)
    assert conn.execute("PRAGMA cache_size").fetchone()[0] == -64000  # Flower's: 64 MB a connection
    flower.bound_superlink_sqlite()
    conn = sqlite3.connect(tmp_path / "state.db")
    mixin._set_sqlite_pragmas(conn, None)
    assert conn.execute("PRAGMA cache_size").fetchone()[0] == -2000
    assert conn.execute("PRAGMA mmap_size").fetchone()[0] == 0
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000  # the others as Flower sets them


def test_moved_sqlite_pragmas_are_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.supercore.sql_mixin as mixin

    monkeypatch.setattr(mixin, "SQLITE_PRAGMAS", (("journal_mode", "WAL"),))
    with pytest.raises(flower.ConfigError, match=r"no longer sets cache_size and mmap_size from SQLITE_PRAGMAS"):
        flower.bound_superlink_sqlite()
    with pytest.raises(flower.ConfigError, match=r"bound_superlink_sqlite"):
        flower.check_internals()


def test_run_status_checks_sweep_expired_tokens_at_most_once_an_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each object a site pulls asks for its run's status; Flower sweeps expired task tokens on every one."""
    import time

    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState

    sweeps: list[str] = []
    monkeypatch.setattr(SqlLinkState, "_cleanup_expired_task_tokens", lambda self: sweeps.append("swept"))
    monkeypatch.setattr(SqlLinkState, "get_run_status", SqlLinkState.get_run_status)  # both restored after
    flower.throttle_status_cleanup(interval=0.3)
    state = SqlLinkState.__new__(SqlLinkState)  # no run asked for: Flower's method returns {} after its sweep
    for _ in range(5):
        assert SqlLinkState.get_run_status(state, set()) == {}
    assert len(sweeps) == 1
    SqlLinkState._cleanup_expired_task_tokens(state)  # another caller (a heartbeat, a claim): always sweeps
    assert len(sweeps) == 2
    time.sleep(0.35)
    SqlLinkState.get_run_status(state, set())
    assert len(sweeps) == 3


def test_a_moved_run_status_sweep_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState

    monkeypatch.setattr(SqlLinkState, "get_run_status", lambda self, run_ids: {})
    with pytest.raises(flower.ConfigError, match=r"no longer sweeps expired task tokens first"):
        flower.throttle_status_cleanup()
    with pytest.raises(flower.ConfigError, match=r"throttle_status_cleanup"):
        flower.check_internals()


def test_payload_bytes_come_out_of_their_array_intact() -> None:
    from flwr.app import RecordDict

    blob = bytes(range(256)) * 1000
    content = RecordDict(flower.payload_records(True, {"payload": blob}))
    assert flower.read_payloads(content, "site A") == (True, {"payload": blob})


@pytest.mark.parametrize("data", [b"not an npy file at all", b"", "truncated"])
def test_a_payload_array_whose_bytes_are_not_what_it_says_is_refused(data: object) -> None:
    """What a hostile peer could put in a message's array: its bytes are the sender's to choose."""
    import io

    import numpy as np
    from flwr.app import Array, ArrayRecord, RecordDict

    if data == "truncated":  # a valid header for 1000 bytes, followed by 10
        buf = io.BytesIO()
        np.save(buf, np.zeros(1000, dtype=np.uint8))
        data = buf.getvalue()[:-990]
    arr = Array(dtype="uint8", shape=(1000,), stype="numpy.ndarray", data=data)
    content = RecordDict({flower.KEY_SEALED: ArrayRecord({"payload": arr})})
    with pytest.raises(flower.PayloadError, match=r"^site A: payload 'payload' is not a byte array"):
        flower.read_payloads(content, "site A")


def test_every_flower_process_weckd_starts_cuts_arrays_into_1_mib_chunks(tmp_path: Path) -> None:
    """The environment of every Flower process weckd starts, read by Flower itself in a fresh interpreter:
    a 3.5 MiB payload crosses a hop as 4 objects, where Flower's default cuts one 5 MiB object."""
    import subprocess
    import sys

    from weckd.chain.procs import flower_env

    code = ("import numpy as np; from flwr.app import Array; "
            "print(len(Array(np.zeros(7 << 19, dtype=np.uint8)).slice_array()))")
    env = flower_env(tmp_path / "home")
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.split() == ["4"]
    env.pop(flower.CHUNK_ENV)
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.split() == ["1"]


def test_a_moved_chunk_setting_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.app.message.array import Array

    monkeypatch.setattr(Array, "slice_array", lambda self: [])
    with pytest.raises(flower.ConfigError, match=r"no longer cuts arrays by FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE"):
        flower.check_internals()


def test_only_the_http_apis_idle_loop_wakes_every_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    import uvicorn.server as us

    monkeypatch.setattr(us, "asyncio", us.asyncio)  # restored after the test
    slept: list[float] = []

    async def record(seconds: float, result: object = None) -> object:
        slept.append(seconds)
        return result

    flower.slow_http_ticks(0.5)
    monkeypatch.setattr(asyncio, "sleep", record)
    server = us.Server(us.Config(app=None))
    ticks = iter([False, False, True])

    async def on_tick(counter: int) -> bool:
        return next(ticks)

    monkeypatch.setattr(server, "on_tick", on_tick)
    asyncio.run(server.main_loop())
    assert slept == [0.5, 0.5]
    assert asyncio.run(us.asyncio.sleep(0.1, "kept")) == "kept" and slept[-1] == 0.1  # a shutdown's sleep


def test_a_moved_uvicorn_tick_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn.server as us

    monkeypatch.setattr(us.Server, "main_loop", lambda self: None)
    with pytest.raises(flower.ConfigError, match=r"uvicorn's server loop no longer ticks with asyncio.sleep\(0.1\)"):
        flower.check_internals()
