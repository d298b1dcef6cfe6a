"""Server and site metrics: progress events and the executor's status file become the right series."""
from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from weckd.chain.errors import PayloadError, WeckdError
from weckd.chain.link import EpochStats
from weckd.chain.procs import free_port
from weckd.client.metrics import SiteMetrics, SiteStatus, site_registry
from weckd.server.metrics import ChainClock, ServerMetrics

LINK_DONE = {"event": "link-done", "link": 1, "links": 2, "site": "A", "val_accuracy": 0.6, "seconds": 12.0,
             "evaluations": {"A": 0.6, "B": 0.5}, "loss": 1.2, "ce": 1.0, "kd": 0.2, "bytes_to_site": 0,
             "bytes_from_site": 4096, "t": 112.0}


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_link_events_set_progress_accuracy_duration_and_bytes() -> None:
    m = ServerMetrics(2, ["A", "B"], 600.0)
    m.observe({"event": "link-start", "link": 1, "links": 2, "site": "A", "t": 100.0})
    assert _value(m.registry, "weckd_chain_current_link") == 1
    assert _value(m.registry, "weckd_chain_current_site", site="A") == 1
    m.observe(LINK_DONE)
    r = m.registry
    assert _value(r, "weckd_chain_links_completed") == 1
    assert _value(r, "weckd_link_accuracy_ratio", link="1", site="B", split="val") == 0.5
    assert _value(r, "weckd_link_duration_seconds", link="1", site="A") == 12.0
    assert _value(r, "weckd_relay_bytes_total", site="A", direction="from_site") == 4096
    assert _value(r, "weckd_link_kd_loss", link="1", site="A") == 0.2
    assert _value(r, "weckd_chain_link_expected_seconds") == 12.0
    assert _value(r, "weckd_chain_current_link") == 0


def test_failed_event_sets_state_and_counts_its_label() -> None:
    m = ServerMetrics(2, ["A"], 600.0)
    m.observe({"event": "failed", "reason": "train: no reply from site(s) A within 600s", "failure": "link-timeout"})
    assert _value(m.registry, "weckd_run_state", weckd_run_state="failed") == 1
    assert _value(m.registry, "weckd_failures_total", reason="link-timeout") == 1


def test_the_label_comes_from_the_event_never_from_its_wording() -> None:
    """The same words with another label count under that label; an unknown or missing label is ``other``."""
    m = ServerMetrics(2, ["A"], 600.0)
    m.observe({"event": "failed", "reason": "site C refused the request (unexpected-sender)", "failure": "deadline"})
    m.observe({"event": "failed", "reason": "site C refused the request (unexpected-sender)"})
    m.observe({"event": "failed", "reason": "x", "failure": "rm -rf"})
    assert _value(m.registry, "weckd_failures_total", reason="deadline") == 1
    assert _value(m.registry, "weckd_failures_total", reason="site-refused") == 0
    assert _value(m.registry, "weckd_failures_total", reason="other") == 2


def test_site_failures_skips_and_resumes_are_counted() -> None:
    m = ServerMetrics(3, ["A", "B", "C"], 600.0)
    assert _value(m.registry, "weckd_site_skipped", site="B") == 0
    m.observe({"event": "resumed", "links_done": 1, "links": 3, "run_id": "r"})
    m.observe({"event": "site-failure", "site": "B", "link": 2, "attempt": 1, "kind": "unavailable",
               "reason": "node-unavailable", "message": "..."})
    m.observe({"event": "retry", "site": "B", "link": 2, "reason": "node-unavailable", "attempt": 2})
    m.observe({"event": "site-failure", "site": "B", "link": 2, "attempt": 2, "kind": "offline",
               "reason": "offline", "message": "..."})
    m.observe({"event": "site-skipped", "site": "B", "link": 2, "reason": "offline"})
    r = m.registry
    assert _value(r, "weckd_chain_resumes_total") == 1 and _value(r, "weckd_chain_links_completed") == 1
    assert _value(r, "weckd_site_failures_total", site="B", reason="node-unavailable") == 1
    assert _value(r, "weckd_site_failures_total", site="B", reason="offline") == 1
    assert _value(r, "weckd_retries_total", reason="node-unavailable") == 1
    assert _value(r, "weckd_site_skipped", site="B") == 1 and _value(r, "weckd_site_skipped", site="C") == 0


def test_each_site_counts_as_connected_when_it_comes_online() -> None:
    m = ServerMetrics(3, ["A", "B", "C"], 600.0)
    m.observe({"event": "site-online", "site": "A"})
    assert _value(m.registry, "weckd_site_connected", site="A") == 1
    assert _value(m.registry, "weckd_site_connected", site="B") == 0
    assert _value(m.registry, "weckd_sites_connected") == 1


def test_eta_is_mean_link_time_times_links_left() -> None:
    clock = ChainClock(start=0.0)
    clock.observe({"event": "link-start", "link": 1, "links": 3, "site": "A", "t": 0.0})
    assert clock.eta(now=5.0) is None
    clock.observe({**LINK_DONE, "links": 3, "seconds": 10.0})
    clock.observe({"event": "link-start", "link": 2, "links": 3, "site": "B", "t": 10.0})
    assert clock.eta(now=14.0) == pytest.approx(16.0)


def test_server_metrics_are_served_over_http_and_port_zero_is_off() -> None:
    m = ServerMetrics(1, ["A"], 60.0)
    port = free_port()
    m.serve("127.0.0.1", port)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        m.close()
    assert "weckd_chain_links 1.0" in body
    off = ServerMetrics(1, ["A"], 60.0)
    off.serve("127.0.0.1", 0)
    assert off._server is None


def test_taken_port_is_a_clear_error() -> None:
    first, second = SiteMetrics(Path("/nonexistent"), {}), SiteMetrics(Path("/nonexistent"), {})
    port = free_port()
    first.serve("127.0.0.1", port)
    try:
        with pytest.raises(WeckdError, match="metrics_port"):
            second.serve("127.0.0.1", port)
    finally:
        first.close()


def test_site_status_file_drives_the_site_collector(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    status = SiteStatus(path)
    status.reset()
    registry = site_registry(path, {"train": 40, "val": 10, "unlabelled": 0})
    with status.activity("training", link=2, epochs=2):
        status.on_epoch(EpochStats(1, 1.5, 1.0, 0.5, 2.0, 250.0))
        assert _value(registry, "weckd_site_state", weckd_site_state="training") == 1
        assert _value(registry, "weckd_site_epoch") == 1
        assert _value(registry, "weckd_site_train_samples_per_second") == 250.0
        status.on_epoch(EpochStats(2, 1.4, 1.0, 0.4, 2.0, 260.0))
        assert _value(registry, "weckd_site_state", weckd_site_state="evaluating") == 1
    assert _value(registry, "weckd_site_state", weckd_site_state="idle") == 1
    assert _value(registry, "weckd_site_links_trained_total") == 1
    assert _value(registry, "weckd_site_kd_loss") == pytest.approx(0.4)
    assert _value(registry, "weckd_site_samples", split="train") == 40


def test_payload_checks_are_counted_verified_or_rejected_by_reason(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    status = SiteStatus(path)
    assert status.checked(lambda: "teacher") == "teacher"
    assert status.checked(lambda: None) is None  # link 1: nothing received, nothing counted

    def bad() -> None:
        raise PayloadError("payload v3, expected v2")

    with pytest.raises(PayloadError):
        status.checked(bad)
    registry = site_registry(path, {})
    assert _value(registry, "weckd_site_payloads_verified_total") == 1
    assert _value(registry, "weckd_site_payloads_rejected_total", reason="malformed") == 1
