"""The protocol's typed replies: every reply type round-trips through Flower's records, and a reply with a
missing, extra or mistyped field is one clear line naming the site and the field (``site-error``)."""
from __future__ import annotations

from typing import Any, Callable

import pytest
from flwr.app import ConfigRecord, MetricRecord
from weckd.chain.protocol import (
    EvalMetrics,
    Failure,
    LinkInfo,
    LinkMetrics,
    ReplyError,
    SiteCounts,
    SiteInfo,
)

INFO = SiteInfo("A", "0.1.0", ("benign", "malignant"), 64, 3, "", "5e7a592b02d92a7e")
COUNTS = SiteCounts(120, 30, 40, 0)
LINK_INFO = LinkInfo("A", "resnet18", "predecessor")
METRICS = LinkMetrics(0.8125, 32, (0.75, 0.875), (12, 4, 2, 14), (1.2, 0.9), (0.8, 0.6), (0.4, 0.3), (2.5, 2.4),
                      5.1, 47.2, {"train": 120, "unlabelled": 40}, {"epsilon": 7.9, "delta": 1e-5})
EVAL = EvalMetrics(0.75, 40, (0.7, 0.8), (14, 6, 4, 16))
KEPT = LinkMetrics(**{**METRICS.__dict__, "privacy": None, "teacher_val_accuracy": 0.84375, "teacher_kept": True})
REPLIES: list[tuple[Any, Callable[[Any], Any]]] = [(INFO, ConfigRecord), (COUNTS, MetricRecord),
                                                    (LINK_INFO, ConfigRecord), (METRICS, MetricRecord),
                                                    (EVAL, MetricRecord), (KEPT, MetricRecord)]


@pytest.mark.parametrize("reply, record", REPLIES, ids=lambda v: type(v).__name__ if not callable(v) else "")
def test_every_reply_round_trips_through_its_flower_record(reply: Any, record: Callable[[Any], Any]) -> None:
    values = dict(record(reply.to_record()))  # what Flower carries: it raises on anything a record cannot hold
    assert type(reply).from_record(values, "site A") == reply


def test_a_link_without_dp_has_no_privacy_fields() -> None:
    plain = LinkMetrics(**{**METRICS.__dict__, "privacy": None})
    assert not any(k.startswith("privacy-") for k in plain.to_record())
    assert LinkMetrics.from_record(plain.to_record(), "site A").privacy is None


def test_do_no_harm_fields_come_together_and_kept_is_zero_or_one() -> None:
    values = KEPT.to_record()
    assert values["teacher-kept"] == 1 and LinkMetrics.from_record(values, "site A").teacher_kept is True
    with pytest.raises(ReplyError, match="reply has 'teacher-val-accuracy' without 'teacher-kept'"):
        LinkMetrics.from_record({k: v for k, v in values.items() if k != "teacher-kept"}, "site A")
    with pytest.raises(ReplyError, match="'teacher-kept' must be 0 or 1, got 7"):
        LinkMetrics.from_record({**values, "teacher-kept": 7}, "site A")


def test_a_whole_number_where_a_float_is_expected_is_read_as_a_float() -> None:
    values = {**EVAL.to_record(), "accuracy": 1}
    assert EvalMetrics.from_record(values, "site A").accuracy == 1.0


@pytest.mark.parametrize("reply", [r for r, _ in REPLIES], ids=lambda v: type(v).__name__)
def test_a_missing_field_names_the_site_and_the_field(reply: Any) -> None:
    values = reply.to_record()
    key = next(iter(values))
    del values[key]
    with pytest.raises(ReplyError) as err:
        type(reply).from_record(values, "link 2: site B")
    assert str(err.value).startswith("link 2: site B: reply has no") and repr(key) in str(err.value)
    assert err.value.failure == Failure.SITE_ERROR and "\n" not in str(err.value)


@pytest.mark.parametrize("reply, key, value", [
    (INFO, "image-size", "64"), (INFO, "classes", ["a", 1]), (INFO, "site-id", 3), (COUNTS, "train", 1.5),
    (LINK_INFO, "arch", ["resnet18"]), (METRICS, "val-accuracy", "0.9"), (METRICS, "val-confusion", [1.5, 2.0]),
    (METRICS, "epoch-loss", 1.0), (METRICS, "samples-train", 3.0), (EVAL, "n", True), (EVAL, "recall", ["x"]),
])  # fmt: skip
def test_a_mistyped_field_is_refused(reply: Any, key: str, value: Any) -> None:
    with pytest.raises(ReplyError, match=f"site B: reply field '{key[:8]}"):
        type(reply).from_record({**reply.to_record(), key: value}, "site B")


@pytest.mark.parametrize("reply", [r for r, _ in REPLIES], ids=lambda v: type(v).__name__)
def test_an_unexpected_field_is_refused(reply: Any) -> None:
    with pytest.raises(ReplyError, match="unexpected fields"):
        type(reply).from_record({**reply.to_record(), "per-image-loss": [0.1] * 3}, "site B")
