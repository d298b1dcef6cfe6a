"""The site's warm executor: one task's failed hand-over never stops the site (its executor serves on)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import weckd.client.app as site_app
from flwr.common.constant import SubStatus
from flwr.supercore.inflatable.inflatable_utils import ObjectPushError
from weckd.client import executor


class _Stop(Exception):
    pass


def _task_runtime(monkeypatch: pytest.MonkeyPatch, push_error: Exception | None) -> list[tuple[str, object]]:
    calls: list[tuple[str, object]] = []
    message, context, reply = object(), object(), object()  # opaque here: the ClientApp is stubbed
    run = SimpleNamespace(fab_id="weckd/weckd", fab_version="1")

    def push_message(client: object, got: object, ctx: object) -> None:
        calls.append(("push_message", got is reply and ctx is context))
        if push_error is not None:
            raise push_error

    rt = SimpleNamespace(
        pull_task_input=lambda client: (message, context, run, SimpleNamespace(content=b"")),
        push_message=push_message,
        push_task_output=lambda client, context, sub_status, details: calls.append(("output", sub_status)),
        push_refused=ObjectPushError)
    monkeypatch.setattr(executor, "runtime", lambda: rt)
    monkeypatch.setattr(executor, "runtime_client", lambda address, token, *a: SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(executor, "task_heartbeat", lambda client: SimpleNamespace(stop=lambda: None))
    monkeypatch.setattr(executor, "check_bundle", lambda *a: None)
    monkeypatch.setattr(site_app, "app", lambda message, context: reply)
    return calls


def test_a_refused_object_push_is_logged_and_the_task_still_reports(monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    # the SuperNode forwarded the reply (the coordinator held an identical object) and dropped its objects
    # before this executor pushed that one: Flower raises ObjectPushError here
    calls = _task_runtime(monkeypatch, ObjectPushError("ab" * 32, 1, "session"))
    executor.run_task("127.0.0.1:1", "token")
    assert calls == [("push_message", True), ("output", SubStatus.COMPLETED)]
    assert "the SuperNode refused part of the reply (ObjectPushError" in caplog.text


def test_a_reply_handed_over_reports_completed(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    calls = _task_runtime(monkeypatch, None)
    executor.run_task("127.0.0.1:1", "token")
    assert calls == [("push_message", True), ("output", SubStatus.COMPLETED)]
    assert "refused" not in caplog.text


def test_serve_goes_on_after_a_task_that_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []
    ran: list[str] = []

    def acquire(request: object) -> SimpleNamespace:
        asked.append(1)
        if len(asked) > 2:
            raise _Stop
        return SimpleNamespace(HasField=lambda name: True, token=f"t{len(asked)}")

    def run_task(address: str, token: str) -> None:
        ran.append(token)
        raise ConnectionError("the SuperNode restarted")

    monkeypatch.setattr(executor, "runtime_client", lambda *a: SimpleNamespace(AcquireTask=acquire))
    monkeypatch.setattr(executor, "acquire_task_request", lambda: object())
    monkeypatch.setattr(executor, "run_task", run_task)
    monkeypatch.setattr(executor.time, "sleep", lambda s: (_ for _ in ()).throw(_Stop()))
    with pytest.raises(_Stop):
        executor.serve("127.0.0.1:1", b"secret")
    assert ran == ["t1", "t2"]  # the first task's failure did not end the loop


def test_another_push_failure_still_reports_then_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _task_runtime(monkeypatch, ConnectionError("the SuperNode went away"))
    with pytest.raises(ConnectionError):  # serve() logs it and goes on (test_serve_goes_on_after_a_task_that_raised)
        executor.run_task("127.0.0.1:1", "token")
    assert calls == [("push_message", True), ("output", SubStatus.COMPLETED)]
