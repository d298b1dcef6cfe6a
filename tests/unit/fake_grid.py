"""A stand-in for Flower's Grid and the sites behind it: the coordinator's chain logic (retries, skips,
checkpoints, sealing requests) tested in-process, with scripted site behaviour per link."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from weckd.chain import __version__
from weckd.chain.flower import payload_records, read_payloads
from weckd.chain.payload import encode_state, payload_bytes, read_index
from weckd.chain.protocol import (
    KEY_CONFIG,
    KEY_INFO,
    KEY_METRICS,
    MSG_DELIVER,
    MSG_QUERY,
    MSG_TRAIN,
    EvalMetrics,
    LinkInfo,
    LinkMetrics,
    SiteCounts,
    SiteInfo,
)
from weckd.server.settings import Federation, load_federation
from weckd.server.transport import Exchange, Reply, SiteFailure, Timing, Transport
from weckd.server.wire import WireLog

from .helpers import write_yaml

Behaviour = Callable[[str, int], SiteFailure | None]  # (site, link) → a failure to report, or None to answer


def federation(tmp_path: Path, order: list[str], cycles: int = 1, deliver: str = "last",
               link: dict[str, Any] | None = None, **settings: Any) -> Federation:
    tmp_path.mkdir(parents=True, exist_ok=True)
    fed = {"sites": {s: {"auth_key": f"keys/site-{s}.pub"} for s in dict.fromkeys(order)},
           "poll_interval": 0.01, "retry_wait": 0.0, **settings}
    cfg = {"seed": 1, "chain": {"order": order, "cycles": cycles, "deliver": deliver},
           "link": link or {"arch": "test_resnet"},
           "data": {"classes": ["a", "b"], "image_size": 32}, "federation": fed}
    return load_federation(write_yaml(tmp_path / "federation.yaml", cfg))


@dataclass
class FakeGrid:
    online: set[str]

    def get_nodes(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name=s, node_id=100 + ord(s[0])) for s in sorted(self.online)]


@dataclass
class FakeSites(Transport):
    """Answers train and evaluate messages like weckd sites would (unsealed), unless ``behaviour`` fails them."""

    behaviour: Behaviour = lambda site, link: None
    calls: list[tuple[str, str, int]] = field(default_factory=list)
    teachers: dict[int, int | None] = field(default_factory=dict)  # link → link of the teacher it was sent

    def __init__(self, sites: list[str], behaviour: Behaviour | None = None,
                 eval_accuracy: Callable[[str, int], float] | None = None) -> None:
        super().__init__(FakeGrid(set(sites)), {}, Timing(60.0, 60.0, 0.01), WireLog(""))
        self.behaviour = behaviour or (lambda site, link: None)
        self.eval_accuracy = eval_accuracy or (lambda site, link: 0.5)  # (evaluating site, link) → accuracy
        self.calls, self.teachers = [], {}

    def exchange_all(self, kind: str, contents: dict[str, RecordDict], group: str, timeout: float | None = None
                     ) -> Exchange:
        replies, failures = {}, {}
        for site, content in contents.items():
            link = int(content.config_records[KEY_CONFIG].get("link", -1))  # -1: a query
            self.calls.append((kind, site, link))
            failure = self.behaviour(site, link) if kind in (MSG_TRAIN, MSG_QUERY) else None
            if failure is not None:
                failures[site] = failure
                continue
            if kind == MSG_TRAIN:
                teacher = read_payloads(content, "test")
                self.teachers[link] = None if teacher is None else int(read_index(teacher[1]["payload"]).header["link"])
            content = _answer(kind, site, link, self.eval_accuracy(site, link))
            replies[site] = Reply(site, SimpleNamespace(content=content), 0.1, 10, 20)
        return Exchange(replies, failures)


def _answer(kind: str, site: str, link: int, accuracy: float = 0.5) -> RecordDict:
    if kind == MSG_QUERY:
        info = SiteInfo(site, __version__, ("a", "b"), 32, 1, "", "")
        return RecordDict({KEY_INFO: ConfigRecord(info.to_record()),
                           KEY_METRICS: MetricRecord(SiteCounts(8, 2, 0, 0).to_record())})
    if kind not in (MSG_TRAIN, MSG_DELIVER):  # a hand-over answers with the link's weights, as its train reply did
        return RecordDict({KEY_METRICS: MetricRecord(EvalMetrics(accuracy, 10, (0.6, 0.4), (3, 2, 3, 2)).to_record())})
    weights = payload_bytes(encode_state({"w": torch.full((2,), float(link))}, "test_resnet", link))
    metrics = LinkMetrics(0.5 + link / 10, 10, (0.5, 0.5), (3, 2, 3, 2), (1.0,), (0.7,), (0.3,), (0.1,), 0.1, 100.0,
                          {"train": 8})
    return RecordDict({**payload_records(False, {"weights": weights}), KEY_METRICS: MetricRecord(metrics.to_record()),
                       KEY_INFO: ConfigRecord(LinkInfo(site, "test_resnet", "scratch").to_record())})
