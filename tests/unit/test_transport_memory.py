"""While the coordinator waits for replies, it holds nothing of what it sent: the messages' payloads are the
SuperLink's to hold once pushed (and a teacher the checkpoint's)."""
from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace
from typing import Any

import numpy as np
import weckd.server.transport as transport
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from weckd.server.transport import Timing, Transport
from weckd.server.wire import WireLog


class _Message:
    """Flower's Message needs a run's task identity; the exchange only reads these fields of it."""

    def __init__(self, content: RecordDict, dst: int, kind: str, ttl: float, group_id: str) -> None:
        self.content, self.dst = content, dst
        self.metadata = SimpleNamespace(message_type=kind, reply_to_message_id="")

    def has_error(self) -> bool:
        return False


class _Grid:
    def __init__(self, held: list[weakref.ref[Any]]) -> None:
        self.held, self.alive_at_pull, self.pushed = held, [], 0

    def push_messages(self, msgs: list[_Message]) -> list[str]:
        self.pushed += sum(len(m.content.array_records) for m in msgs)
        return [f"id-{i}" for i in range(len(msgs))]

    def pull_messages(self, ids: list[str]) -> list[SimpleNamespace]:
        gc.collect()
        self.alive_at_pull.append(sum(ref() is not None for ref in self.held))
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i), has_error=lambda: False,
                                content=RecordDict()) for i in ids]


def test_an_exchange_holds_none_of_the_payloads_it_pushed_while_it_waits(monkeypatch: Any) -> None:
    monkeypatch.setattr(transport, "Message", _Message)
    record = ArrayRecord({"blob": Array(np.arange(4096, dtype=np.uint8))})  # one record, as a relay shares it
    contents = {s: RecordDict({"config": ConfigRecord({"link": 1}), "payload": record}) for s in ("A", "B")}
    held = [weakref.ref(record), *(weakref.ref(c) for c in contents.values())]
    del record
    grid = _Grid(held)
    exchange = Transport(grid, {"A": 1, "B": 2}, Timing(60.0, 60.0, 0.01), WireLog("")).exchange_all(  # type: ignore[arg-type]
        "evaluate", contents, "g")
    assert grid.pushed == 2 and grid.alive_at_pull == [0] and contents == {}
    assert {s: r.bytes_out for s, r in exchange.replies.items()} == {"A": 4096, "B": 4096}
