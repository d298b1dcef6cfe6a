"""``weckd-server -c federation.yaml``: run the chain as the federation's coordinator.

Starts the SuperLink, registers the sites' auth keys, submits the WeCKD run, follows it (one
progress line per event), and exits 0 when the run completed, 1 with the reason otherwise, 2 on a
config error (before anything starts), 130 on Ctrl-C/SIGTERM (after stopping every child).

``--hold`` (a coordinator under a supervisor that restarts whatever exits, e.g. a Kubernetes StatefulSet):
once the chain is complete, in this run or in the checkpoint found at start, the SuperLink stops and
``/metrics`` keeps serving the final state until SIGTERM or Ctrl-C, then the exit code is 0. A failed run
still exits 1.

``--service`` (a coordinator that stays up): the SuperLink starts once, the sites are admitted once, and the
jobs queued with ``weckd submit`` (chains and baselines, see ``weckd.server.service``) run one after another,
each with its own run id, checkpoint, results and model; ``weckd status`` shows the queue. It runs until
SIGTERM or Ctrl-C (exit 0 when that comes while no job runs, 130 when it cuts a job short: that job resumes
at the next start).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from weckd.chain.cli import run_command, setup_logging
from weckd.chain.errors import ConfigError, LinkError, WeckdError
from weckd.chain.files import atomic_write_text, private_dir
from weckd.chain.flower import check_flower_version
from weckd.chain.peers import COORDINATOR, load_party
from weckd.chain.procs import Group, raise_on_sigterm
from weckd.chain.protocol import Event, Failure
from weckd.chain.watch import FileWatch

from .metrics import ServerMetrics, format_seconds
from .plots import draw_report
from .service import KIND_TEXT, Job, Queue, check_job, record_results
from .settings import RESULTS_FILE, Federation, check_files, coordinator_sealing, load_federation, write_effective
from .state import ChainState, StateError, discard_state, load_state
from .status import read_events
from .superlink import (
    SUPERLINK_DB,
    Paths,
    hold_lock,
    register_and_submit,
    register_sites,
    run_status,
    start_superlink,
    stop_run,
    submit,
    write_app_dir,
    write_cli_config,
)
from .tracking import STOP_WAIT_S, Tracking, local_uri

log = logging.getLogger(__name__)

FOLLOW_WAIT_S = 1.0  # at most between looks at the processes and the status line; progress shows when written
FOLLOW_POLL_S = 0.25  # once the ServerApp reported its end, until Flower says the run finished
STATUS_EVERY_S = 600.0  # `flwr ls` costs ~1 s of CPU: the ServerApp reports its own end, and its process is watched
GONE_STATUS_S = 5.0  # once the ServerApp's process is gone without a word: how often Flower is asked for the run
GONE_GRACE_S = 60.0  # and how long, before the run counts as failed
EXIT_WAIT_S = 15.0  # once the ServerApp reported its end: how long Flower is not asked while it pushes its output
HOLD_SLEEP_S = 3600.0  # a signal ends the sleep at once
READY_FILE = "ready"
SERVICE_POLL_S = 1.0  # an idle service looks at its queue once a second


def main(argv: Sequence[str] | None = None) -> int:
    """Run the WeCKD chain as the federation's coordinator."""
    parser = argparse.ArgumentParser(prog="weckd-server", description=main.__doc__)
    parser.add_argument("-c", "--config", required=True, help="federation YAML")
    parser.add_argument("-o", "--out", help="output folder (default: federation.output_dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set link.epochs=3 (repeatable)")
    parser.add_argument("--fresh", action="store_true",
                        help="start the chain over: move the checkpoint in the state dir aside instead of resuming")
    parser.add_argument("--hold", action="store_true",
                        help="once the chain is complete (this run or its checkpoint), keep serving /metrics until "
                             "SIGTERM, then exit 0 (for supervisors that restart what exits)")
    parser.add_argument("--service", action="store_true",
                        help="stay up and run the jobs submitted with 'weckd submit' one after another (the chain "
                             "settings in the config are each job's defaults)")
    parser.add_argument("--wire-log", default="", help=argparse.SUPPRESS)  # tests: record every message
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return run_command(lambda: _serve(args))


def _serve(args: argparse.Namespace) -> int:
    fed = load_federation(args.config, tuple(args.set))
    check_files(fed)
    _check_sealing(fed)
    check_flower_version()  # the ServerApp checks the internals it patches (chain.flower.fast_pull)
    out = Path(args.out or fed.settings.output_dir).resolve()
    paths = Paths.under(Path(fed.settings.state_dir).resolve())
    private_dir(paths.state)
    lock = hold_lock(paths.state)  # one coordinator per state dir; released by the OS if we die
    if args.service and (args.fresh or args.hold):
        lock.close()
        flag = "--fresh" if args.fresh else "--hold"
        raise ConfigError(f"--service runs submitted jobs, each with its own checkpoint; {flag} applies to the "
                          "one-shot coordinator only")
    complete = None if args.service else _checkpoint(fed, paths.state, args.fresh, args.hold)
    (paths.state / READY_FILE).unlink(missing_ok=True)
    raise_on_sigterm()
    metrics = ServerMetrics(fed.chain.n_links, list(fed.chain.chain.order), fed.settings.link_timeout)
    s = fed.settings
    metrics.serve(s.metrics_address, s.metrics_port if s.metrics else 0)
    held = False
    try:
        if args.service:
            return _service(fed, paths, out, args.wire_log, metrics)
        if complete is None:
            code = _federate(fed, paths, out, args.wire_log, metrics)  # a failed run raises: never held
            why = "the chain completed"
        else:
            metrics.complete(len(complete.links))
            code, why = 0, f"the chain checkpointed in {s.state_dir} is complete ({len(complete.links)} links)"
        if code or not args.hold:
            return code
        held = True
        return _hold(why)
    finally:
        metrics.close(0.0 if held else s.metrics_linger)
        lock.close()


def _federate(fed: Federation, paths: Paths, out: Path, wire_log: str, metrics: ServerMetrics) -> int:
    """Start the SuperLink, run the chain, stop the SuperLink: 0 when the run completed (it raises otherwise)."""
    group = Group(paths.logs, fed.settings.shutdown_timeout)
    try:
        start_superlink(fed, group, paths)
        write_cli_config(fed, paths)
        write_app_dir(paths)
        return _run(fed, paths, group, out, wire_log, metrics, paths.state)
    finally:
        group.stop_all()
        log.info("SuperLink stopped")


def _service(fed: Federation, paths: Paths, out_root: Path, wire_log: str, metrics: ServerMetrics) -> int:
    """``--service``: the SuperLink stays up and the sites stay admitted; the queued jobs run one after
    another until SIGTERM or Ctrl-C: exit 0 when it came while no job ran, 130 when it cut a job short (that
    job resumes from its checkpoint at the next start)."""
    group = Group(paths.logs, fed.settings.shutdown_timeout)
    queue = Queue(paths.state)
    tracking = Tracking(paths.logs)
    try:
        start_superlink(fed, group, paths)
        write_cli_config(fed, paths)
        write_app_dir(paths)
        register_sites(fed, paths)
        atomic_write_text(paths.state / READY_FILE, f"{time.time()}\n")
        log.info("service up: sites %s admitted; submit jobs with: weckd submit JOB.yaml -c %s",
                 ", ".join(fed.sites), fed.source)
        while True:
            try:  # idle: a stop now cuts nothing short
                died = group.exited()
                if died is not None:
                    raise WeckdError(f"{died[0]} exited with code {died[1]}; see {paths.logs / (died[0] + '.log')}")
                tracking.reap()
                job = queue.take()
                if job is None:
                    time.sleep(SERVICE_POLL_S)
                    continue
            except KeyboardInterrupt:
                log.info("stopped while idle (no job running)")
                return 0
            _run_job(fed, queue, job, paths, group, out_root, wire_log, metrics, tracking)
    finally:
        group.stop_all()
        log.info("SuperLink stopped")
        tracking.reap(wait=True, limit=STOP_WAIT_S)


def _run_job(fed: Federation, queue: Queue, job: Job, paths: Paths, group: Group, out_root: Path, wire_log: str,
             metrics: ServerMetrics, tracking: Tracking) -> None:
    """Run one job to its end; a job's own failure is recorded and the service goes on."""
    job_dir = queue.job_dir(job.id)
    out = out_root / job.id
    job.attempts += 1
    queue.save(job)
    log.info("job %s (%s, %s): %s", job.id, job.name, KIND_TEXT[job.kind],
             "starting" if job.attempts == 1 else f"resuming (start {job.attempts})")
    try:
        jfed = check_job(fed, job)
        _check_sealing(jfed)
        state = load_state(job_dir, jfed)
        metrics.new_chain(jfed.chain.n_links, list(jfed.chain.chain.order), jfed.settings.link_timeout)
        if state is None or not state.completed:
            _run(jfed, paths, group, out, wire_log, metrics, job_dir, register=False)
        job.summary = record_results(out, job)
        job.status, job.output = "completed", str(out)
        track(jfed, out, out_root, tracking)  # in the background: the next job need not wait for MLflow
        discard_state(job_dir)  # its outputs are in the output folder: the relay blobs go
        log.info("job %s completed: delivered accuracy %s; outputs in %s", job.id,
                 _fmt(job.summary.get("delivered_accuracy")), out)
    except (ConfigError, LinkError, StateError, OSError, ValueError) as err:
        job.status, job.reason = "failed", str(err)
        log.error("job %s failed: %s", job.id, err)
    finally:
        if job.status != "running":
            job.finished = time.time()
        queue.save(job)


def track(fed: Federation, out: Path, root: Path, tracking: Tracking) -> None:
    """Log a completed run to MLflow when ``federation.mlflow`` is set (a local store under ``root`` by default)."""
    m = fed.settings.mlflow
    if m is None:
        return
    s = fed.settings
    federation = {"evaluate": s.evaluate, "on_site_failure": s.on_site_failure,
                  "sealed_for": list(s.sealing.deliver_to) if s.sealing else None}
    tracking.start(out, m.tracking_uri or local_uri(root), m.experiment, federation)


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "-"


def _hold(why: str) -> int:
    """``--hold``: stay up (``/metrics`` keeps serving the final state) until SIGTERM or Ctrl-C, then 0.

    Under ``raise_on_sigterm`` both arrive as KeyboardInterrupt; here they end a completed chain's
    wait, not a run, so the exit code is 0, not 130.
    """
    try:
        log.info("%s; holding (--hold): serving the final metrics until SIGTERM", why)
        while True:
            time.sleep(HOLD_SLEEP_S)
    except KeyboardInterrupt:
        log.info("stopped while holding a completed chain")
        return 0


def _check_sealing(fed: Federation) -> None:
    """Load the coordinator's sealing keys now (a bad key is a config error before anything starts)."""
    if fed.settings.sealing is None:
        log.warning("federation.sealing is not set: payloads are protected by TLS only, so the coordinator can read "
                    "every relayed model; see docs/threat-model.md")
        return
    own = coordinator_sealing(fed)
    if own is not None:
        load_party(COORDINATOR, own, fed.source)
    log.info("payloads sealed end to end; final model for: %s", ", ".join(fed.settings.sealing.deliver_to))


def _checkpoint(fed: Federation, state_dir: Path, fresh: bool, hold: bool) -> ChainState | None:
    """Resume from the chain checkpoint, or (``--fresh``) move it aside; a torn one stops us here.

    A complete checkpoint is refused, unless ``hold``: then it is returned (nothing is left to run).
    """
    if fresh:
        moved = discard_state(state_dir)
        if moved is not None:
            log.info("--fresh: previous chain checkpoint moved to %s", moved)
        return None
    state = load_state(state_dir, fed)
    if state is None:
        return None
    if state.completed:
        if hold:
            return state
        raise ConfigError(f"{fed.settings.state_dir}: the chain checkpointed there is complete ({len(state.links)} "
                          "links); pass --fresh to start a new chain")
    log.info("resuming chain %s at link %d (%d link(s) done, checkpoint of %s)", state.run_id, len(state.links) + 1,
             len(state.links), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.updated)))
    return None


def _run(fed: Federation, paths: Paths, group: Group, out: Path, wire_log: str, metrics: ServerMetrics,
         state_dir: Path, register: bool = True) -> int:
    """Submit the chain as one Flower run (its checkpoint and progress in ``state_dir``) and follow it: 0 when it
    completed (it raises otherwise). ``register``: register the sites' keys in the same ``flwr`` process."""
    progress = state_dir / f"progress-{int(time.time() * 1000)}.jsonl"
    private_dir(out)
    (out / RESULTS_FILE).unlink(missing_ok=True)
    effective, digest = write_effective(fed, state_dir)
    log.info("effective config (after --set) in %s, sha256 %s", effective, digest[:16])
    run_config = {"federation-config": str(effective), "config-dir": fed.base_dir, "output-dir": str(out),
                  "state-dir": str(state_dir), "progress-file": str(progress), "wire-log": wire_log,
                  "superlink-database": str(paths.state / SUPERLINK_DB)}
    run_id = register_and_submit(fed, paths, run_config) if register else submit(paths, run_config)
    if register:
        atomic_write_text(paths.state / READY_FILE, f"{time.time()}\n")  # the sites' keys are registered
    log.info("run %d submitted; waiting for sites %s", run_id, ", ".join(fed.chain.chain.order))
    metrics.set_run(run_id, fed.chain.chain.mode)
    try:
        status, details = _follow(fed, paths, group, run_id, progress, metrics)
    except BaseException:
        stop_run(paths, run_id)
        raise
    if status == "finished:completed" and (out / RESULTS_FILE).is_file():
        log.info("run %d completed; outputs in %s", run_id, out)
        draw_report(out)  # its ServerApp has ended: the drawing is not held beside the final model
        if register:  # the one-shot coordinator (a service tracks a job once its results carry the job)
            tracking = Tracking(paths.logs)
            track(fed, out, out, tracking)
            tracking.reap(wait=True)
        return 0
    reason = _failure_reason(progress) or details or status
    if not _failure_reason(progress):  # the ServerApp never said why: it died, or the run outlived its deadline
        metrics.fail(Failure.DEADLINE.value if status == "timed out" else Failure.OTHER.value)
    raise LinkError(f"run {run_id} {status}: {reason}; logs in {paths.logs}")


def _follow(fed: Federation, paths: Paths, group: Group, run_id: int, progress: Path, metrics: ServerMetrics
            ) -> tuple[str, str]:
    """Show the run's progress lines until it finishes (bounded by a deadline).

    Progress comes from the ServerApp's progress file. ``flwr ls`` (a CLI process that would compete with
    training for CPU) is asked once the app reports an end and the SuperLink's ServerApp host has written that
    the run's ServerApp ended (at most ``EXIT_WAIT_S`` later: Flower counts the run finished once the ServerApp
    has pushed its output, and the ~100 MB ``flwr`` process is then not held beside the ending ServerApp), or
    once the ServerApp ended without reporting an end, and otherwise only every ``STATUS_EVERY_S``.
    """
    s = fed.settings
    deadline = time.monotonic() + s.discovery_timeout + s.link_timeout * (fed.chain.n_links + 2)
    seen, next_status, gone_since, ended_at = 0, time.monotonic() + STATUS_EVERY_S, None, None
    status, details = "pending", ""
    watch = FileWatch([progress, paths.ended])
    try:
        while time.monotonic() < deadline:
            seen = _show_progress(progress, seen, metrics)
            _status_line(metrics)
            died = group.exited()
            if died is not None:
                raise WeckdError(f"{died[0]} exited with code {died[1]}; see {paths.logs / (died[0] + '.log')}")
            alive = not paths.serverapp_ended(run_id)  # read before the events
            events = read_events(progress)
            ended = any(e.get("event") in (Event.COMPLETED, Event.FAILED) for e in events)
            now = time.monotonic()
            if not ended and gone_since is None and not alive:
                gone_since, next_status = now, now
            if ended and ended_at is None:
                ended_at = now
            exiting = ended_at is not None and now - ended_at < EXIT_WAIT_S and alive
            if (ended and not exiting) or now >= next_status:
                status, details = run_status(paths, run_id)
                next_status = now + (GONE_STATUS_S if gone_since is not None else STATUS_EVERY_S)
                if status.startswith("finished"):
                    _show_progress(progress, seen, metrics)
                    return status, details
                if gone_since is not None and now - gone_since > GONE_GRACE_S:
                    return "finished:failed", "the ServerApp exited without reporting the end of the run"
            watch.wait(FOLLOW_POLL_S if ended else FOLLOW_WAIT_S)
    finally:
        watch.close()
    stop_run(paths, run_id)
    return "timed out", "run did not finish before the deadline (discovery_timeout + link_timeout × (links + 2))"


def _status_line(metrics: ServerMetrics) -> None:
    """On a terminal, one live line: link k/K, site, elapsed, ETA (log lines otherwise)."""
    c = metrics.clock
    if not sys.stderr.isatty() or not c.links:
        return
    link = f"link {c.done + 1}/{c.links}" if c.link_start is not None else f"{c.done}/{c.links} links done"
    site = f" site {c.site}" if c.link_start is not None else ""
    sys.stderr.write(f"\r{link}{site}  elapsed {format_seconds(c.elapsed())}  eta {format_seconds(c.eta())}\033[K")
    sys.stderr.flush()


def _show_progress(progress: Path, seen: int, metrics: ServerMetrics) -> int:
    events = read_events(progress)
    if events[seen:] and sys.stderr.isatty():
        sys.stderr.write("\r\033[K")  # clear the live status line before the event lines
    for e in events[seen:]:
        metrics.observe(e)
        kind = e.get("event")
        c = metrics.clock
        when = f"elapsed {format_seconds(c.elapsed())}, eta {format_seconds(c.eta())}"
        if kind == Event.LINK_START:
            log.info("link %d/%d: training at site %s (%s)", e["link"], e["links"], e["site"], when)
        elif kind == Event.LINK_DONE:
            evals = " ".join(f"{s}={a:.3f}" for s, a in e.get("evaluations", {}).items())
            log.info("link %d/%d site %s done: val acc %.3f, %.1fs%s (%s)", e["link"], e["links"], e["site"],
                     e["val_accuracy"], e["seconds"], f", evaluated {evals}" if evals else "", when)
        elif kind == Event.SITES_ONLINE:
            log.info("all sites online: %s", ", ".join(e["sites"]))
        elif kind == Event.FAILED:
            log.error("run failed: %s", e.get("reason"))
    return len(events)


def _failure_reason(progress: Path) -> str:
    failed = [e for e in read_events(progress) if e.get("event") == Event.FAILED]
    return str(failed[-1].get("reason", "")) if failed else ""


if __name__ == "__main__":
    raise SystemExit(main())
