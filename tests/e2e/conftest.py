"""Real federations for the end-to-end tests: weckd-server and weckd-client processes on loopback with
TLS and SuperNode auth. Each federation runs once per session and every process is stopped in a
``finally``, whatever the tests do.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from weckd.chain.certs import make_ca, make_site_key
from weckd.chain.procs import flower_env, free_port
from weckd.server.demo import LocalFederation
from weckd.server.scaffold import Scaffold, chain_settings, make_scaffold, write_site_config
from weckd.server.service import submit
from weckd.server.settings import load_federation
from weckd.server.status import service_status

from . import prometheus
from .httpwait import wait_http_ok
from .procwatch import ProcWatch

RUN_TIMEOUT = 300.0
EPOCHS = 4


@dataclass
class FederatedRun:
    scaffold: Scaffold
    server_rc: int
    results: dict[str, Any]
    wire: list[dict[str, Any]]
    refused: dict[str, int | None] = field(default_factory=dict)
    seconds: float = 0.0
    observed: prometheus.Observed | None = None  # what a real Prometheus scraped (monitor=True)
    procs: ProcWatch | None = None  # what the federation's processes held while it ran
    out_dir: Path | None = None  # where this run's outputs are (a service coordinator: one folder per job)
    service: ServiceRun | None = None  # a service coordinator: the jobs and what status and compare said

    @property
    def out(self) -> Path:
        return self.out_dir or self.scaffold.root / "out"


@dataclass
class ServiceRun:
    jobs: list[str]  # job ids in queue order (the first one submitted while no coordinator ran)
    during: dict[str, Any]  # `weckd status --json` while the second job ran
    final: dict[str, Any]  # `weckd status --json` once the coordinator stopped
    sites_alive: dict[str, bool]  # each site's weckd-client still the same process when the last job was done
    compare: str  # `weckd compare` of every job
    plot: Path
    tracked: list[dict[str, Any]]  # the runs a real `mlflow server` holds at the end, oldest first


def _start_mlflow_server(fed: LocalFederation, root: Path, port: int) -> subprocess.Popen:
    """A real ``mlflow server`` on loopback (SQLite store, artifacts proxied to a folder)."""
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'mlflow' / 'mlflow.db'}", "--artifacts-destination",
           str(root / "mlflow" / "artifacts"), "--workers", "1"]
    (root / "mlflow").mkdir()
    # no job runner: MLflow 3's server otherwise starts eight more processes for its GenAI jobs, none used here
    return fed.group.start("mlflow-server", cmd, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


def _tracked(uri: str, experiment: str) -> list[dict[str, Any]]:
    """What the tracking server holds: each run's name, tags, params, metric histories and artifacts."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    out = []
    for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]):
        rid = run.info.run_id
        out.append({"name": run.info.run_name, "status": run.info.status, "tags": dict(run.data.tags),
                    "params": dict(run.data.params),
                    "metrics": {k: [(m.step, m.value) for m in client.get_metric_history(rid, k)]
                                for k in run.data.metrics},
                    "artifacts": sorted(a.path for a in client.list_artifacts(rid)),
                    "model": sorted(a.path for a in client.list_artifacts(rid, "model"))})
    return out


def weckd(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).with_name("weckd")), *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _status(scaffold: Scaffold) -> dict[str, Any]:
    r = weckd("status", "-c", str(scaffold.federation), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _submit(scaffold: Scaffold, name: str, job: dict[str, Any], kind: str = "chain") -> str:
    path = scaffold.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    r = weckd("submit", str(path), "-c", str(scaffold.federation), "--kind", kind, "--json")
    assert r.returncode == 0, r.stderr
    return str(json.loads(r.stdout)["id"])


def _peek(scaffold: Scaffold) -> dict[str, Any]:
    """What ``weckd status --json`` prints, computed here: polling with a new interpreter each time would take
    CPU from the federation under test."""
    return service_status(load_federation(scaffold.federation))


def _wait_running(fed: LocalFederation, scaffold: Scaffold, job: str) -> dict[str, Any]:
    """``weckd status --json`` once the service runs ``job``."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while (_peek(scaffold).get("running") or {}).get("id") != job:
        assert fed.server.poll() is None and time.monotonic() < deadline, f"job {job} never ran"
        time.sleep(0.5)
    return _status(scaffold)


def run_service(root: Path, chain: dict[str, Any], federation: dict[str, Any], server_args: tuple[str, ...],
                later: list[tuple[str, str, dict[str, Any]]]) -> FederatedRun:
    """A service coordinator (``weckd-server --service``) and 3 sites started before it. One
    job (the config's own chain, no overrides) is queued before the coordinator starts; once it runs, the
    ``later`` jobs (name, kind, overrides) are submitted. The run's results are the first job's.
    Every job is tracked in a real ``mlflow server`` on loopback."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    scaffold = make_scaffold(root, chain, {**federation, "mlflow": {"tracking_uri": uri, "experiment": "e2e"}})
    for path in scaffold.sites.values():  # the sites agree to FedAvg baselines (their updates go to the coordinator)
        site = yaml.safe_load(path.read_text())
        site.setdefault("policy", {})["allow_fedavg"] = True
        path.write_text(yaml.safe_dump(site, sort_keys=False))
    fed = LocalFederation(scaffold, stop_timeout=10.0)
    watch = ProcWatch(root)
    start = time.monotonic()
    try:
        watch.start()
        mlflow = _start_mlflow_server(fed, root, port)
        for site in scaffold.sites:
            fed.start_site(site)
        jobs = [_submit(scaffold, "first", {})]  # queued while the sites start, before any coordinator runs
        _wait_sites_waiting(fed)
        fed.start_server("--service", *server_args)
        fed.wait_ready()
        _wait_running(fed, scaffold, jobs[0])
        for name, kind, job in later:  # the same checks as `weckd submit` (above), without starting a process
            path = scaffold.root / f"{name}.yaml"
            path.write_text(yaml.safe_dump(job))
            jobs.append(submit(scaffold.federation, path, kind).id)
        wait_http_ok(f"http://127.0.0.1:{port}/health", mlflow, 120, "mlflow server")
        during = _wait_running(fed, scaffold, jobs[1])  # the second job runs, the third waits, the first is done
        deadline = time.monotonic() + RUN_TIMEOUT * 2
        while len(_peek(scaffold)["recent"]) < len(jobs):  # then it waits, idle, for more
            assert fed.server.poll() is None and time.monotonic() < deadline, "the jobs did not all finish"
            time.sleep(1.0)
        fed.server.send_signal(signal.SIGTERM)  # stopped while idle: exit 0
        rc = fed.wait_server(60.0)
        alive = {name: proc.poll() is None for name, proc in fed.group.procs if name.startswith("weckd-client-")}
        seconds = time.monotonic() - start
        tracked = _tracked(uri, "e2e")
    finally:
        watch.stop()
        fed.stop()
    plot = root / "compare.png"
    compare = weckd("compare", *jobs, "-c", str(scaffold.federation), "--plot", str(plot))
    assert compare.returncode == 0, compare.stderr
    out = scaffold.root / "out" / jobs[0]
    results = json.loads((out / "results.json").read_text()) if rc == 0 else {}
    return FederatedRun(scaffold, rc, results, [], {}, seconds, None, watch, out_dir=out,
                        service=ServiceRun(jobs, during, _status(scaffold), alive, compare.stdout, plot, tracked))


def _read_wire(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _refused_sites(fed: LocalFederation) -> dict[str, str]:
    """Three SuperNodes the coordinator must refuse: wrong CA, unregistered key (weckd-client), and plaintext.
    weckd-client has no plaintext mode, so the plaintext one is a bare ``flower-supernode --insecure``, as an
    attacker would run it. Returns impostor -> process name."""
    s = fed.scaffold
    fleet = yaml.safe_load(s.federation.read_text())["federation"]["fleet_address"]
    make_ca(s.root / "other-ca")
    make_site_key("Z", s.root / "rogue-keys")
    configs = {
        "wrong-ca": write_site_config(s.root, "A", s.chain, fleet, 1, name="A-wrong-ca", ca="other-ca/ca.crt"),
        "unregistered": write_site_config(s.root, "A", s.chain, fleet, 1, name="A-unregistered",
                                          auth_key="rogue-keys/site-Z"),
    }
    for name, cfg in configs.items():  # once the coordinator is gone they give up within 5 s, not 60
        cfg.write_text(cfg.read_text().replace("max_wait: 60.0", "max_wait: 5.0"))
        fed.start_site("A", cfg, name=name)
    plaintext = [str(Path(sys.executable).with_name("flower-supernode")), "--insecure", "--grpc-rere",
                 "--superlink", fleet, "--isolation", "process", "--host", "127.0.0.1", "--port", str(free_port()),
                 "--max-wait-time", "30"]
    fed.group.start("supernode-insecure", plaintext, flower_env(s.root / "state" / "site-A-insecure" / "flwr"))
    return {**{name: f"weckd-client-{name}" for name in configs}, "insecure": "supernode-insecure"}


def _wait_sites_waiting(fed: LocalFederation, timeout: float = 120.0) -> None:
    """Until every site has found its coordinator absent and is waiting for it (its supervisor says so)."""
    start = time.monotonic()
    logs = {site: fed.group.log_dir / f"weckd-client-{site}.log" for site in fed.scaffold.sites}
    while time.monotonic() - start < timeout:
        texts = {site: path.read_text(errors="replace") if path.is_file() else "" for site, path in logs.items()}
        if all("not reachable yet" in text for text in texts.values()):
            return
        exited = [name for name, proc in fed.group.procs if proc.poll() is not None]
        assert not exited, f"{exited} exited while the coordinator was not up yet"
        time.sleep(0.2)
    raise AssertionError(f"sites not waiting for the coordinator within {timeout:.0f}s")


def run_federation(root: Path, chain: dict[str, Any], federation: dict[str, Any] | None = None,
                   refused: bool = False, monitor: bool = False, sealed: bool = True,
                   server_args: tuple[str, ...] = (), sites_first: bool = False) -> FederatedRun:
    """Run a federation (sealed end to end unless ``sealed`` is false); with ``monitor``, a real
    Prometheus scrapes it (see ``prometheus.py``); with ``sites_first``, the sites start before the
    coordinator and wait for it."""
    scaffold = make_scaffold(root, chain, federation, sealed=sealed)
    wire = root / "wire.jsonl"
    fed = LocalFederation(scaffold, stop_timeout=10.0)
    prom = prometheus.Prometheus(scaffold) if monitor else None
    observed = None
    watch = ProcWatch(root)
    start = time.monotonic()
    try:
        watch.start()
        if prom is not None:
            prom.start()
        if sites_first:
            for site in scaffold.sites:
                fed.start_site(site)
            _wait_sites_waiting(fed)
        fed.start_server("--wire-log", str(wire), *server_args)
        if not sites_first:  # at once, as the demo does: sites read their data while the coordinator starts
            for site in scaffold.sites:
                fed.start_site(site)
        fed.wait_ready()
        names = _refused_sites(fed) if refused else {}
        rc = fed.wait_server(RUN_TIMEOUT)
        seconds = time.monotonic() - start
        observed = prom.observe() if prom is not None else None
        codes = {n: fed.exit_code(proc, 60.0) for n, proc in names.items()}
    finally:
        watch.stop()
        fed.stop()
        if prom is not None:
            prom.stop()
    results = json.loads((scaffold.root / "out" / "results.json").read_text()) if rc == 0 else {}
    return FederatedRun(scaffold, rc, results, _read_wire(wire), codes, seconds, observed, watch)


@pytest.fixture(scope="session")
def weights_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FederatedRun]:
    """Weights mode, 3 sites, evaluate all, wire log on, three SuperNodes that must be refused, and a real
    Prometheus scraping the server and the sites (if installed; weckd-server serves its final state 3 s more)."""
    # the shipped recipe (AdamW, one schedule over the chain, do-no-harm, best-link delivery), checked against the
    # in-process chain; lr 0.01: the synthetic images need it to learn in 4 epochs
    chain = chain_settings({"link": {"epochs": EPOCHS, "lr_schedule": "chain", "do_no_harm": True, "optimizer": "adamw",
                                     "lr": 0.01, "weight_decay": 0.05}, "chain": {"deliver": "best"}})
    yield run_federation(tmp_path_factory.mktemp("weights"), chain, {"metrics_linger": 3.0}, refused=True,
                         monitor=prometheus.available())


@pytest.fixture(scope="session")
def logits_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FederatedRun]:
    """Logits mode over a synthetic proxy set with two architectures in the chain, on half the data of
    ``weights_run`` (its delivered test_resnet weights show that payloads do not grow with the data).
    Unsealed, so that the wire tests see the plaintext payload structure sealing hides."""
    chain = chain_settings({
        "chain": {"mode": "logits"},
        "link": {"epochs": 3},
        "links": [{"arch": "test_resnet"}, {"arch": "test_efficientnet"}, {"arch": "test_resnet"}],
        "data": {"proxy": "synthetic", "synthetic": {"samples": 600}},
    })
    yield run_federation(tmp_path_factory.mktemp("logits"), chain, sealed=False)


@pytest.fixture(scope="session")
def hetero_weights_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FederatedRun]:
    """Weights mode across architectures: distillation from a live teacher of another architecture,
    warm start only where the architectures match; evaluation by the next link's site. The YAML says
    3 epochs a link and ``weckd-server --set link.epochs=2`` overrides it. The sites start first and
    wait for their coordinator (any start order), and the coordinator is a service that runs it as a job."""
    chain = chain_settings({
        "link": {"epochs": 3},
        "links": [{"arch": "test_resnet"}, {"arch": "test_efficientnet"}, {"arch": "test_efficientnet"}],
    })
    # the same federation runs as a service: a second chain and two baselines (each site alone, FedAvg of two
    # rounds) are submitted while the first job runs, one architecture and every site evaluating every link
    # (tests/e2e/test_service.py)
    same_arch = {"links": [], "link": {"epochs": 1}, "federation": {"evaluate": "all"}}
    yield run_service(tmp_path_factory.mktemp("weights-hetero"), chain, {"evaluate": "next"},
                      ("--set", "link.epochs=2"), [("second-chain", "chain", same_arch),
                                                   ("sites-alone", "local", same_arch),
                                                   ("fedavg", "fedavg", {**same_arch, "link": {"epochs": 2}})])
