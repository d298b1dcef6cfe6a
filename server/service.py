"""A coordinator that stays up: chains and baselines submitted as jobs to a running federation.

``weckd-server -c federation.yaml --service`` starts the SuperLink, registers the sites once and then runs
the jobs found in its queue one after another, each as its own Flower run with its own chain run id,
checkpoint folder (``<state_dir>/jobs/<job id>/``), results and model (``<output_dir>/<job id>/``).
``weckd submit JOB.yaml -c federation.yaml`` validates a job in full against the coordinator's config and
queues it. The queue is a folder in the coordinator's private state dir (0700): submission is a local file
operation by the coordinator's own user, and no network port faces anyone for it.

A job is a YAML mapping of chain settings (``seed``, ``chain``, ``link``, ``links``, ``data``, ``model``…)
laid over the chain settings of ``federation.yaml`` (mappings merge key by key, lists are replaced), plus
a few per-run federation keys (``JOB_FEDERATION_KEYS``). Its kind says what runs across the sites:

* ``chain``: the WeCKD chain as configured;
* ``cwt``: cyclic weight transfer, the chain's baseline without distillation (every link starts from its
  predecessor's weights and trains on its labels alone: ``alpha 1``);
* ``local``: each site alone, what every hospital gets without the federation (every link starts from
  scratch, no distillation, no do-no-harm hand-over, a whole learning-rate schedule per link);
* ``fedavg``: FedAvg (``weckd.server.fedavg``): rounds of one local epoch at every site from the
  coordinator's average, as many as give each site the chain's site-epochs. It runs only at sites whose
  policy allows it (``policy.allow_fedavg``): the coordinator reads every update.

Every kind runs through the same ServerApp, the same sites, their policies and the same sealing, and is
scored on the same validation splits (``evaluate``), so ``weckd compare`` can set them side by side.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import secrets
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from weckd.chain.cli import run_command, setup_logging
from weckd.chain.config import NOT_AT_COORDINATOR, merge_mappings, read_yaml, refuse_keys
from weckd.chain.errors import ConfigError, WeckdError
from weckd.chain.files import atomic_write_text, private_dir, refuse_symlink
from weckd.chain.schema import Origin

from .settings import RESULTS_FILE, Federation, check_files, federation_from_mapping, load_federation

log = logging.getLogger(__name__)

QUEUE_DIR = "queue"  # in the state dir: <job id>.json, one per queued job
JOBS_DIR = "jobs"  # in the state dir: <job id>/job.json (its record) and the job's chain checkpoint
JOB_FILE = "job.json"
MAX_JOB_FILE_BYTES = 1 << 20
# per-link settings each kind lays over the job's own (all links alike)
KINDS: dict[str, dict[str, Any]] = {
    "chain": {},
    "cwt": {"alpha": 1.0, "init": "predecessor"},
    "local": {"alpha": 1.0, "init": "scratch", "do_no_harm": False, "lr_schedule": "link"},
    "fedavg": {"alpha": 1.0, "do_no_harm": False},  # rounds of one epoch from the average (weckd.server.fedavg)
}
ALGORITHM = {"fedavg": "fedavg"}  # federation.algorithm of each kind (the rest: chain)
KIND_TEXT = {"chain": "WeCKD chain", "cwt": "cyclic weight transfer (no distillation)",
             "local": "each site alone", "fedavg": "FedAvg (the chain's site-epochs)"}
# federation keys a job may set for its own run; the rest (addresses, TLS, keys, folders, sealing, metrics)
# belong to the running coordinator
JOB_FEDERATION_KEYS = ("evaluate", "on_site_failure", "link_timeout", "discovery_timeout", "retries",
                       "retry_wait", "message_ttl", "mlflow")
JOB_ID = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9]{3}-[0-9a-f]{4}")
JOB_NAME = re.compile(r"[\w][\w .-]{0,63}")
STATES = ("queued", "running", "completed", "failed", "cancelled")


@dataclass
class Job:
    """One submitted job and what became of it (``jobs/<id>/job.json``)."""

    id: str
    kind: str
    name: str
    submitted: float
    source: str
    job: dict[str, Any] = field(default_factory=dict)  # the submitted mapping, as read
    status: str = "queued"
    started: float | None = None
    finished: float | None = None
    attempts: int = 0  # times the coordinator started (or resumed) it
    chain_run: str = ""  # the chain's run id (results.json)
    flower_run: int | None = None
    output: str = ""
    reason: str = ""
    summary: dict[str, Any] = field(default_factory=dict)

    def brief(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "job"}


def new_job_id(now: float | None = None) -> str:
    """A time-ordered job id (``20261130-231500-123-a1b2``): the queue runs in this order."""
    now = time.time() if now is None else now
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-{int(now % 1 * 1000):03d}-{secrets.token_hex(2)}"


def job_mapping(service: dict[str, Any], job: dict[str, Any], kind: str, where: str) -> dict[str, Any]:
    """The whole federation mapping a job runs with: ``job`` over the coordinator's (effective) mapping,
    then the kind's link settings over every link; ``federation.sites`` narrowed to the job's chain."""
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    fed_part = job.get("federation", {})
    if not isinstance(fed_part, dict):
        raise ConfigError(f"{where}: federation: expected a mapping")
    foreign = [k for k in fed_part if k not in JOB_FEDERATION_KEYS]
    if foreign:
        raise ConfigError(f"{where}: federation.{foreign[0]}: belongs to the coordinator's own federation.yaml, not "
                          f"to a job; a job may set federation.{{{', '.join(JOB_FEDERATION_KEYS)}}}")
    merged = merge_mappings(service, job)
    changes = KINDS[kind]
    if changes:
        link = merged.get("link") or {}
        if not isinstance(link, dict):
            raise ConfigError(f"{where}: link: expected a mapping")
        merged["link"] = {**link, **changes}
        links = merged.get("links")
        if isinstance(links, list):
            merged["links"] = [{**item, **changes} if isinstance(item, dict) else item for item in links]
    if not isinstance(merged.get("federation"), dict):
        raise ConfigError(f"{where}: federation: expected a mapping")
    merged["federation"]["algorithm"] = ALGORITHM.get(kind, "chain")
    chain = merged.get("chain") if isinstance(merged.get("chain"), dict) else {}
    order = chain.get("order") if isinstance(chain, dict) else None
    sites = merged.get("federation", {}).get("sites")
    if isinstance(order, list) and isinstance(sites, dict):
        missing = [str(s) for s in order if s not in sites]
        if missing:
            raise ConfigError(f"{where}: chain.order: site(s) {', '.join(missing)} are not sites of this coordinator "
                              f"({', '.join(map(str, sites))})")
        merged["federation"]["sites"] = {k: v for k, v in sites.items() if k in order}
    return merged


def job_federation(service: Federation, job: Job) -> Federation:
    """The job's validated config (relative paths resolve where the coordinator's config's do)."""
    where = f"{job.source} (job {job.id})"
    raw = job_mapping(service.effective, job.job, job.kind, where)
    return federation_from_mapping(raw, Origin(where, Path(service.base_dir)))


def read_job_file(path: str | Path) -> dict[str, Any]:
    """A job file's mapping; keys that would do nothing in a federated job are refused here."""
    raw, origin = read_yaml(path)
    refuse_keys(raw, NOT_AT_COORDINATOR, origin, "in a federated job")
    return raw


class Queue:
    """The coordinator's queue and job records, in its state dir."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state = Path(state_dir)
        self.queue = self.state / QUEUE_DIR
        self.jobs = self.state / JOBS_DIR

    def job_dir(self, job_id: str) -> Path:
        return self.jobs / job_id

    def put(self, job: Job) -> Path:
        private_dir(self.state)
        private_dir(self.queue)
        path = self.queue / f"{job.id}.json"
        atomic_write_text(path, json.dumps(asdict(job), indent=1), replace=False)
        return path

    def queued(self) -> list[Job]:
        """Queued jobs, oldest first (a file that cannot be read is skipped with a warning)."""
        out = []
        for path in sorted(self.queue.glob("*.json")) if self.queue.is_dir() else []:
            job = _read_job(path)
            if job is not None:
                out.append(job)
        return out

    def records(self) -> list[Job]:
        """Every job taken from the queue, oldest first."""
        out = []
        for path in sorted(self.jobs.glob(f"*/{JOB_FILE}")) if self.jobs.is_dir() else []:
            job = _read_job(path)
            if job is not None:
                out.append(job)
        return out

    def save(self, job: Job) -> None:
        atomic_write_text(self.job_dir(job.id) / JOB_FILE, json.dumps(asdict(job), indent=1))

    def take(self) -> Job | None:
        """The next job to run: one left running by a coordinator that stopped (it resumes from its
        checkpoint), else the oldest queued one, moved into its own folder and marked running."""
        for job in self.records():
            if job.status == "running":
                return job
        for job in self.queued():
            private_dir(self.jobs)
            private_dir(self.job_dir(job.id))
            job.status, job.started = "running", time.time()
            self.save(job)
            (self.queue / f"{job.id}.json").unlink(missing_ok=True)
            return job
        return None

    def cancel(self, job_id: str) -> Job:
        path = self.queue / f"{job_id}.json"
        job = _read_job(path) if path.is_file() else None
        if job is None:
            known = {j.id: j.status for j in self.records()}
            if job_id in known:
                raise ConfigError(f"job {job_id} is {known[job_id]}, not queued: only a queued job can be cancelled")
            raise ConfigError(f"job {job_id}: no such job in {self.queue}")
        path.unlink()
        private_dir(self.jobs)
        private_dir(self.job_dir(job.id))
        job.status, job.finished = "cancelled", time.time()
        self.save(job)
        return job


def _read_job(path: Path) -> Job | None:
    try:
        refuse_symlink(path)
        with path.open("rb") as fh:
            data = json.loads(fh.read(MAX_JOB_FILE_BYTES))
        names = {f.name for f in fields(Job)}
        job = Job(**{k: v for k, v in data.items() if k in names})
        if job.status not in STATES or job.kind not in KINDS:
            raise ValueError(f"status {job.status!r}, kind {job.kind!r}")
        expected = path.stem if path.parent.name == QUEUE_DIR else path.parent.name
        if not isinstance(job.id, str) or job.id != expected or not JOB_ID.fullmatch(job.id):
            raise ValueError(f"job id {str(job.id)[:80]!r} is not its file's name {expected!r}")
        if not isinstance(job.job, dict):
            raise ValueError("job: not a mapping")
        return job
    except (OSError, ValueError, TypeError, WeckdError) as err:
        log.warning("%s: not a job record (%s); ignored", path, str(err)[:200])
        return None


def submit(config: str | Path, job_file: str | Path, kind: str = "chain", name: str = "") -> Job:
    """Validate ``job_file`` in full against the coordinator's ``config`` and queue it; return the job."""
    fed = load_federation(config)
    name = name or Path(job_file).stem
    if not JOB_NAME.fullmatch(name):
        raise ConfigError(f"--name {name[:80]!r}: use 1-64 letters, digits, spaces and . _ - (it names the job in "
                          "logs, weckd status, weckd compare and MLflow)")
    job = Job(id=new_job_id(), kind=kind, name=name, submitted=time.time(),
              source=str(Path(job_file).resolve()), job=read_job_file(job_file))
    jfed = check_job(fed, job)
    _check_archs(jfed, job)
    job.submitted = time.time()  # queued now, once valid
    Queue(fed.settings.state_dir).put(job)
    return job


def _check_archs(fed: Federation, job: Job) -> None:
    """Every link's architecture is one the sites can build (timm's registry; this loads torch, so it runs in
    ``weckd submit``, never in the coordinator's own processes)."""
    from weckd.chain.models import check_arch

    for k in range(fed.chain.n_links):
        where = f"{job.source}: " + (f"links[{k}].arch" if k < len(fed.chain.links) else "link.arch")
        check_arch(fed.chain.link_settings(k).arch, where)


def check_job(fed: Federation, job: Job) -> Federation:
    """Everything the coordinator checks before a job may run: the merged config and the files it names."""
    jfed = job_federation(fed, job)
    check_files(jfed)
    return jfed


def record_results(out: Path, job: Job) -> dict[str, Any]:
    """Tag the job's ``results.json`` with the job (id, kind, name) and return its summary."""
    path = out / RESULTS_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    data["job"] = {"id": job.id, "kind": job.kind, "name": job.name}
    atomic_write_text(path, json.dumps(data, indent=1))
    job.chain_run = str(data.get("run_id", ""))
    summary = data.get("summary", {})
    return {"delivered_accuracy": summary.get("delivered_eval_accuracy", summary.get("last_eval_accuracy")),
            "link1_accuracy": summary.get("link1_eval_accuracy"), "seconds": summary.get("seconds")}


def submit_command(argv: Sequence[str]) -> int:
    """Queue a chain or a baseline on a running (or later started) weckd-server --service."""
    parser = argparse.ArgumentParser(prog="weckd submit", description=submit_command.__doc__)
    parser.add_argument("job", nargs="?", help="job YAML: chain settings laid over the coordinator's config")
    parser.add_argument("-c", "--config", required=True, help="the coordinator's federation YAML")
    parser.add_argument("--kind", choices=tuple(KINDS), default="chain",
                        help="chain (WeCKD), cwt (cyclic weight transfer, no distillation), local (each site "
                             "alone) or fedavg (FedAvg, the chain's site-epochs); default chain")
    parser.add_argument("--name", default="", help="a name for the job (default: the file's stem)")
    parser.add_argument("--cancel", metavar="JOB_ID", help="take a queued job out of the queue instead")
    parser.add_argument("--json", action="store_true", help="print the job record as JSON")
    args = parser.parse_args(argv)
    setup_logging(False)

    def body() -> int:
        if args.cancel:
            job = Queue(load_federation(args.config).settings.state_dir).cancel(args.cancel)
            print(json.dumps(job.brief()) if args.json else f"job {job.id} cancelled")
            return 0
        if not args.job:
            raise ConfigError("weckd submit: name a job YAML (or --cancel JOB_ID)")
        job = submit(args.config, args.job, args.kind, args.name)
        fed = load_federation(args.config)
        ahead = [j.id for j in Queue(fed.settings.state_dir).queued() if j.id < job.id]
        if args.json:
            print(json.dumps({**job.brief(), "ahead": len(ahead)}))
        else:
            print(f"queued job {job.id} ({job.name}: {KIND_TEXT[job.kind]}), {len(ahead)} job(s) ahead of it; "
                  f"follow it with: weckd status -c {args.config}")
        return 0

    return run_command(body)
