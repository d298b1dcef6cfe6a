"""Experiment tracking in MLflow (the optional extra ``weckd[mlflow]``): one MLflow run per completed chain or
baseline, logged from its output folder.

What is logged: the effective chain config and the run's federation settings as parameters; per link
(``step`` = link number) the training site's validation accuracy, the pooled and per-site accuracy of the
sites that evaluated it, the last epoch's loss parts, seconds and bytes relayed; the summary; and as
artifacts ``results.json``, ``config.effective.yaml``, the report (``report.md``, ``report.html`` and its
plots) and ``model/`` (safetensors + model card) where the coordinator may read the delivered model.
Nothing under ``sealed/`` is logged: a model sealed for sites only stays unreadable to the coordinator and so
to its tracking store.

``weckd-server`` runs :func:`main` in a child process after each completed run (``python -m
weckd.server.tracking``), so neither it nor the ServerApp ever imports MLflow; a tracking store that is
down costs a WARNING, never the run (its outputs are on disk; ``weckd track OUT_DIR --uri URI`` logs them
later).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml
from weckd.chain.errors import ConfigError

from .settings import RESULTS_FILE

log = logging.getLogger(__name__)

LOCAL_DB = "mlflow.db"  # the default local store, in the coordinator's output dir
LOCAL_ARTIFACTS = "mlartifacts"
REPORT_FILES = ("report.md", "report.html")
MAX_PARAM = 500  # MLflow's param value limit is larger; long lists are cut with an ellipsis
TRACK_TIMEOUT_S = 300.0
STOP_WAIT_S = 30.0  # a service that is stopped waits this long at most for its pending MLflow logging


def local_uri(output_dir: str | Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / LOCAL_DB}"


def flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    """``{'link': {'epochs': 3}}`` → ``{'link.epochs': '3'}`` (lists as JSON, cut at ``MAX_PARAM``)."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
        out[prefix] = text if len(text) <= MAX_PARAM else text[:MAX_PARAM - 1] + "…"
    return out


def link_metrics(row: dict[str, Any]) -> dict[str, float]:
    """One link's metrics (step = its link number)."""
    out = {"val_accuracy": row["val"]["accuracy"], "train_seconds": row["train_seconds"],
           "round_trip_seconds": row["round_trip_seconds"], "bytes_to_site": row["bytes_to_site"],
           "bytes_from_site": row["bytes_from_site"]}
    if row.get("eval_accuracy") is not None:
        out["eval_accuracy"] = row["eval_accuracy"]
    for site, ev in row.get("evaluations", {}).items():
        out[f"accuracy_site_{site}"] = ev["accuracy"]
    if row.get("epochs"):
        last = row["epochs"][-1]
        out.update({"loss": last["loss"], "ce": last["ce"], "kd": last["kd"]})
    if "do_no_harm" in row:
        out["teacher_kept"] = 1.0 if row["do_no_harm"]["kept"] == "teacher" else 0.0
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}


def log_run(out: Path, uri: str, experiment: str, federation: dict[str, Any] | None = None) -> str:
    """Log the completed run in ``out`` to MLflow; return the MLflow run id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    results = json.loads((out / RESULTS_FILE).read_text(encoding="utf-8"))
    config = yaml.safe_load((out / "config.effective.yaml").read_text(encoding="utf-8")) or {}
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    elif uri.startswith("sqlite:///"):  # a local store: its artifacts beside it
        location = Path(uri[len("sqlite:///"):]).parent / LOCAL_ARTIFACTS
        experiment_id = client.create_experiment(experiment, artifact_location=location.as_uri())
    else:
        experiment_id = client.create_experiment(experiment)
    job = results.get("job", {})
    tags = {"weckd.run_id": str(results.get("run_id", "")), "weckd.kind": str(job.get("kind", "chain")),
            "weckd.job": str(job.get("id", "")), "weckd.version": str(results.get("weckd_version", "")),
            "weckd.mode": str(results.get("mode", ""))}
    run = client.create_run(experiment_id, run_name=str(job.get("name") or results.get("run_id") or out.name),
                            tags=tags)
    rid = run.info.run_id
    params = flatten("", config, {})
    params.update(flatten("federation", federation or {}, {}))
    items = sorted(params.items())
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(rid, params=[Param(k, v) for k, v in items[i:i + 100]])
    metrics = [Metric(name, value, 0, row["link"]) for row in results["links"]
               for name, value in link_metrics(row).items()]
    summary = {k: float(v) for k, v in results.get("summary", {}).items() if isinstance(v, (int, float))}
    metrics += [Metric(f"summary_{k}", v, 0, 0) for k, v in summary.items()]
    for i in range(0, len(metrics), 1000):
        client.log_batch(rid, metrics=metrics[i:i + 1000])
    client.log_batch(rid, tags=[RunTag("weckd.delivered_link", str(results.get("delivered", {}).get("link", "")))])
    for name in (RESULTS_FILE, "config.effective.yaml", *REPORT_FILES):
        if (out / name).is_file():
            client.log_artifact(rid, str(out / name))
    for png in sorted(out.glob("*.png")):
        client.log_artifact(rid, str(png))
    if (out / "model").is_dir():  # delivered to the coordinator; sealed/ is never logged
        client.log_artifacts(rid, str(out / "model"), "model")
    client.set_terminated(rid, "FINISHED")
    return rid


class Tracking:
    """:func:`log_run` in child processes (the coordinator never imports MLflow), started as runs complete and
    reaped later, so a slow tracking store never holds up the next job; a failure is a WARNING."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.pending: list[tuple[subprocess.Popen[bytes], Path, str, Path, float]] = []

    def start(self, out: Path, uri: str, experiment: str, federation: dict[str, Any]) -> None:
        cmd = [sys.executable, "-m", "weckd.server.tracking", str(out), "--uri", uri, "--experiment", experiment,
               "--federation", json.dumps(federation)]
        # a store that is down is given up on within seconds, not MLflow's minutes of retries (unless set)
        env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "60", **os.environ}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"tracking-{out.name}.log"
        with open(log_path, "wb") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self.pending.append((proc, out, uri, log_path, time.monotonic() + TRACK_TIMEOUT_S))

    def reap(self, wait: bool = False, limit: float | None = None) -> None:
        """Log the outcome of every finished child (``wait``: of all of them, each within its timeout, and all
        within ``limit`` seconds if given: a stopping coordinator does not wait for a slow store for long)."""
        left = []
        stop_at = time.monotonic() + limit if limit is not None else None
        for proc, out, uri, log_path, deadline in self.pending:
            if stop_at is not None:
                deadline = min(deadline, stop_at)
            try:
                code = proc.wait(max(0.0, deadline - time.monotonic())) if wait else proc.poll()
            except subprocess.TimeoutExpired:
                code = None
            if code is None and time.monotonic() < deadline:
                left.append((proc, out, uri, log_path, deadline))
                continue
            if code is None:
                proc.kill()
                proc.wait()
                why = "it did not answer in time"
            else:
                lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines() or ["?"]
                if code == 0:
                    log.info("tracking: %s logged to MLflow %s (run %s)", out, uri, lines[-1].strip())
                    continue
                why = lines[-1][:300]
            log.warning("tracking: MLflow (%s) did not take the run: %s; log it later with: weckd track %s --uri %s",
                        uri, why, out, uri)
        self.pending = left


def track_command(argv: Sequence[str]) -> int:
    """Log a completed federated run (its output folder) to MLflow."""
    return main(list(argv), prog="weckd track")


def main(argv: Sequence[str] | None = None, prog: str = "python -m weckd.server.tracking") -> int:
    from weckd.chain.cli import run_command, setup_logging

    parser = argparse.ArgumentParser(prog=prog, description=track_command.__doc__)
    parser.add_argument("out", help="the run's output folder (with results.json)")
    parser.add_argument("--uri", required=True, help="MLflow tracking URI, e.g. http://127.0.0.1:5000 or "
                        "sqlite:///runs/mlflow.db")
    parser.add_argument("--experiment", default="weckd", help="MLflow experiment (default weckd)")
    parser.add_argument("--federation", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup_logging(False)

    def body() -> int:
        out = Path(args.out)
        if not (out / RESULTS_FILE).is_file():
            raise ConfigError(f"{out}: no {RESULTS_FILE}; name the output folder of a completed run")
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ConfigError("MLflow is not installed; install the extra: pip install 'weckd[mlflow]'") from None
        print(log_run(out, args.uri, args.experiment, json.loads(args.federation)))
        return 0

    return run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())
