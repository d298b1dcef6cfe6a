"""Experiment tracking: a completed federated run, logged to a real (local) MLflow store, reads back with its
parameters, per-link metrics (step = link) and artifacts, and nothing sealed; a store that is down costs a
warning, not the run."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from weckd.chain.cli import main
from weckd.chain.errors import ConfigError
from weckd.chain.procs import free_port
from weckd.server.scaffold import chain_settings, make_scaffold
from weckd.server.settings import load_federation
from weckd.server.tracking import Tracking, link_metrics, log_run

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install 'weckd[mlflow]')")


def _output(out: Path, kind: str = "chain") -> Path:
    out.mkdir(parents=True)
    links = [{"link": k + 1, "site": s, "val": {"accuracy": 0.5 + 0.1 * k, "n": 10}, "train_seconds": 2.0,
              "round_trip_seconds": 3.0, "bytes_to_site": 100, "bytes_from_site": 200, "eval_accuracy": 0.55 + 0.1 * k,
              "evaluations": {t: {"accuracy": 0.4 + 0.1 * k + 0.01 * i, "n": 10} for i, t in enumerate("ABC")},
              "epochs": [{"epoch": 1, "loss": 1.2, "ce": 1.0, "kd": 0.2 * (k > 0), "seconds": 1.0}]}
             for k, s in enumerate("ABC")]
    (out / "results.json").write_text(json.dumps({
        "run_id": "20261130T090000Z-aaaaaaaaaaaa", "mode": "weights", "weckd_version": "0", "links": links,
        "delivered": {"link": 3}, "summary": {"delivered_eval_accuracy": 0.75, "seconds": 12.5},
        "job": {"id": "20261130-090000-000-abcd", "kind": kind, "name": "trial"}}))
    (out / "config.effective.yaml").write_text(yaml.safe_dump(chain_settings({"link": {"epochs": 3}})))
    (out / "report.md").write_text("# report\n")
    (out / "accuracy.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (out / "model").mkdir()
    (out / "model" / "model.safetensors").write_bytes(b"weights")
    (out / "model" / "model-card.json").write_text("{}")
    (out / "sealed").mkdir()
    (out / "sealed" / "final-model.sealed").write_bytes(b"sealed for site A only")
    return out


def test_a_run_reads_back_from_the_store(tmp_path: Path) -> None:
    out = _output(tmp_path / "out" / "job")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rid = log_run(out, uri, "weckd-test", {"evaluate": "all", "sealed_for": ["coordinator", "A"]})
    client = mlflow.MlflowClient(uri)
    run = client.get_run(rid)
    assert run.info.status == "FINISHED" and run.info.run_name == "trial"
    assert run.data.tags["weckd.kind"] == "chain" and run.data.tags["weckd.run_id"].startswith("20261130T")
    assert run.data.params["link.epochs"] == "3" and run.data.params["federation.evaluate"] == "all"
    assert json.loads(run.data.params["federation.sealed_for"]) == ["coordinator", "A"]
    history = client.get_metric_history(rid, "val_accuracy")
    assert [(m.step, round(m.value, 3)) for m in history] == [(1, 0.5), (2, 0.6), (3, 0.7)]
    assert [round(m.value, 3) for m in client.get_metric_history(rid, "accuracy_site_B")] == [0.41, 0.51, 0.61]
    assert run.data.metrics["summary_delivered_eval_accuracy"] == 0.75
    top = {a.path for a in client.list_artifacts(rid)}
    assert {"results.json", "config.effective.yaml", "report.md", "accuracy.png", "model"} <= top
    assert "sealed" not in top  # a model sealed for sites only is not the coordinator's to log
    assert {a.path for a in client.list_artifacts(rid, "model")} == {"model/model.safetensors", "model/model-card.json"}
    again = log_run(_output(tmp_path / "out" / "job2", "local"), uri, "weckd-test")  # the same experiment, 2 runs
    assert client.get_run(again).info.experiment_id == run.info.experiment_id


def test_link_metrics_skip_what_a_link_did_not_report() -> None:
    row = {"link": 1, "val": {"accuracy": 0.5, "n": 4}, "train_seconds": 1, "round_trip_seconds": 2,
           "bytes_to_site": 0, "bytes_from_site": 0, "eval_accuracy": None, "evaluations": {}, "epochs": []}
    assert set(link_metrics(row)) == {"val_accuracy", "train_seconds", "round_trip_seconds", "bytes_to_site",
                                      "bytes_from_site"}


def test_a_store_that_is_down_costs_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = _output(tmp_path / "out")
    with caplog.at_level(logging.WARNING):
        tracking = Tracking(tmp_path / "logs")  # as weckd-server runs it
        tracking.start(out, f"http://127.0.0.1:{free_port()}", "weckd", {})
        tracking.reap(wait=True)
    assert "did not take the run" in caplog.text and f"weckd track {out}" in caplog.text


def test_the_config_names_a_store(tmp_path: Path) -> None:
    scaffold = make_scaffold(tmp_path / "fed", chain_settings())
    raw = yaml.safe_load(scaffold.federation.read_text())
    raw["federation"]["mlflow"] = {"experiment": "consortium"}
    scaffold.federation.write_text(yaml.safe_dump(raw))
    fed = load_federation(scaffold.federation)
    assert fed.settings.mlflow is not None and fed.settings.mlflow.tracking_uri == ""
    raw["federation"]["mlflow"] = {"tracking_uri": "localhost 5000"}
    scaffold.federation.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="federation.mlflow.tracking_uri: 'localhost 5000' is not a URI"):
        load_federation(scaffold.federation)


def test_weckd_track_names_a_folder_without_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["track", str(tmp_path), "--uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    assert "no results.json; name the output folder of a completed run" in capsys.readouterr().err


def test_a_stopping_coordinator_waits_for_slow_logging_only_so_long(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    import subprocess
    import time

    tracking = Tracking(tmp_path)
    slow = subprocess.Popen(["sleep", "60"])  # a child stuck on a tracking store that does not answer
    (tmp_path / "tracking-run.log").write_text("")
    tracking.pending.append((slow, tmp_path / "run", "http://mlflow.example:5000", tmp_path / "tracking-run.log",
                             time.monotonic() + 300))
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        tracking.reap(wait=True, limit=0.5)
    assert time.monotonic() - start < 5 and slow.poll() is not None and tracking.pending == []
    assert "did not answer in time" in caplog.text and "weckd track" in caplog.text
