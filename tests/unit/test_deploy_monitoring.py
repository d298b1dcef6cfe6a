"""The shipped monitoring files: promtool accepts them, every metric they name is exported by the code,
the dashboard has what Grafana requires, and the exported metrics follow Prometheus' naming conventions."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from weckd.client.metrics import SiteStatus, site_registry
from weckd.server.metrics import ServerMetrics

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "weckd.json"
PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
METRIC = re.compile(r"\bweckd_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created", "_info")
ALLOWED_LABELS = {"site", "link", "direction", "reason", "split"}
INFO_LABELS = {"run_id", "mode", "version"}

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed (.ci/run installs the Debian package prometheus)")


def _server_registry() -> CollectorRegistry:
    m = ServerMetrics(3, ["A", "B"], 600.0)
    m.set_run(1, "weights")
    m.observe({"event": "discovered", "sites": {"A": {"train": 10, "val": 3}}})
    m.observe({"event": "link-start", "link": 1, "links": 3, "site": "A", "t": 1.0})
    m.observe({"event": "link-done", "link": 1, "links": 3, "site": "A", "val_accuracy": 0.5, "seconds": 2.0,
               "evaluations": {"B": 0.4}, "loss": 1.0, "ce": 0.8, "kd": 0.2, "bytes_to_site": 0,
               "bytes_from_site": 10})
    m.observe({"event": "retry", "reason": "link-timeout"})
    return m.registry


def _site_registry(tmp_path: Path) -> CollectorRegistry:
    path = tmp_path / "metrics.json"
    SiteStatus(path).reset()
    return site_registry(path, {"train": 10, "val": 3, "unlabelled": 0})


def _families(tmp_path: Path) -> list[Metric]:
    return [*_server_registry().collect(), *_site_registry(tmp_path).collect()]


def _exported(tmp_path: Path) -> set[str]:
    names = set()
    for fam in _families(tmp_path):
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
    return names


def _base(name: str, exported: set[str]) -> bool:
    if name in exported:
        return True
    return any(name.endswith(suf) and name[: -len(suf)] in exported for suf in SUFFIXES)


def _rule_exprs() -> list[str]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule["expr"] for g in groups for rule in g["rules"]]


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


@needs_promtool
def test_promtool_accepts_the_scrape_config() -> None:
    res = subprocess.run(["promtool", "check", "config", str(PROMETHEUS / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@needs_promtool
def test_promtool_accepts_the_alert_rules() -> None:
    res = subprocess.run(["promtool", "check", "rules", str(PROMETHEUS / "alerts.yml")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_scrape_config_covers_server_and_sites_with_site_labels() -> None:
    cfg = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["weckd-server"]["static_configs"][0]["targets"][0].endswith(":9464")
    sites = jobs["weckd-site"]["static_configs"]
    assert all(s["targets"][0].endswith(":9465") and s["labels"]["site"] for s in sites)
    assert cfg["rule_files"] == ["alerts.yml"]


def test_every_metric_in_the_alert_rules_is_exported(tmp_path: Path) -> None:
    exported = _exported(tmp_path)
    used = {n for e in _rule_exprs() for n in METRIC.findall(e)}
    assert used, "the rules name no weckd metric"
    assert {n for n in used if not _base(n, exported)} == set()


def test_every_metric_in_the_dashboard_is_exported(tmp_path: Path) -> None:
    exported = _exported(tmp_path)
    used = {n for e in _dashboard_exprs() for n in METRIC.findall(e)}
    assert {"weckd_chain_links_completed", "weckd_link_accuracy_ratio", "weckd_link_duration_seconds",
            "weckd_relay_bytes_total", "weckd_failures_total"} <= used
    assert {n for n in used if not _base(n, exported)} == set()


def test_a_misspelt_metric_would_be_caught(tmp_path: Path) -> None:
    exported = _exported(tmp_path)
    assert not _base("weckd_chain_link_completed", exported)
    assert _base("weckd_link_round_trip_seconds_bucket", exported)


def test_dashboard_has_the_fields_grafana_requires() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["type"] and p["title"] and p["targets"]
        assert set(p["gridPos"]) == {"x", "y", "w", "h"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        assert all(t["refId"] and t["expr"] for t in p["targets"])


def test_grafana_provisioning_points_at_the_dashboard_datasource() -> None:
    ds = yaml.safe_load((PROVISIONING / "datasources" / "weckd.yml").read_text())["datasources"][0]
    prov = yaml.safe_load((PROVISIONING / "dashboards" / "weckd.yml").read_text())["providers"][0]
    dash = json.loads(DASHBOARD.read_text())
    assert ds["type"] == "prometheus" and prov["type"] == "file" and prov["options"]["path"]
    assert {p["datasource"]["uid"] for p in dash["panels"]} == {ds["uid"]}


def test_metric_names_follow_prometheus_conventions(tmp_path: Path) -> None:
    for fam in _families(tmp_path):
        assert fam.name.startswith("weckd_"), fam.name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", fam.name), fam.name
        assert not re.search(r"_(ms|milliseconds|minutes|hours|kb|mb|bytes_count|percent)(_|$)", fam.name), fam.name
        if fam.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples), fam.name
        elif fam.type == "gauge":
            assert not fam.name.endswith("_total"), fam.name
        if "seconds" in fam.name:
            assert fam.name.endswith(("_seconds", "_per_second")), fam.name
        if "bytes" in fam.name:
            assert fam.name.endswith("_bytes"), fam.name


def test_labels_are_low_cardinality(tmp_path: Path) -> None:
    for fam in _families(tmp_path):
        for s in fam.samples:
            labels = set(s.labels) - {"le"}
            if s.name.endswith("_info"):
                assert labels == INFO_LABELS, fam.name
            elif fam.name.endswith("_state"):  # an enum: one series per state, labelled by its own name
                assert labels == {fam.name}, fam.name
            else:
                assert labels <= ALLOWED_LABELS, (fam.name, labels)
