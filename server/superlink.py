"""The coordinator's Flower pieces: the SuperLink process, the ``flwr`` CLI connection, site
registration, the config-only app bundle, and submitting and following a run.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import tomli_w
from weckd.chain.appbundle import app_pyproject
from weckd.chain.errors import WeckdError
from weckd.chain.files import atomic_write_text, private_dir, process_lock, write_superexec_secret
from weckd.chain.flower import KEY_ALREADY_REGISTERED, RUN_SIGNAL_ENV, SERVERAPP_ENDED
from weckd.chain.procs import Group, flower_env, kill_leftovers, wait_port

from .settings import Federation

log = logging.getLogger(__name__)

CONNECTION = "weckd"
CLI_TIMEOUT = 120.0
SUPERLINK_DB = "superlink.db"  # the SuperLink's SQLite state, in the coordinator's state dir
# glibc's allocator for the coordinator's SuperLink process (the ServerApp runs in it): payload
# chunks pass through many threads, and per-thread arenas would each keep the freed megabytes resident
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "1048576"}
RUN_SIGNAL = "run-signal"  # touched after each submission; the SuperLink's ServerApp host waits for it


@dataclass(frozen=True)
class Paths:
    state: Path
    cli_home: Path
    app_dir: Path
    logs: Path

    @classmethod
    def under(cls, state: Path) -> "Paths":
        return cls(state, state / "flwr-cli", state / "app", state / "logs")

    @property
    def secret(self) -> Path:
        """The SuperExec HMAC secret that signs the SuperLink's ServerApp host's requests for a run (new at every
        start)."""
        return self.state / "flwr-superlink" / "superexec.secret"

    @property
    def run_signal(self) -> Path:
        return self.state / RUN_SIGNAL

    @property
    def ended(self) -> Path:
        """Where the SuperLink's ServerApp host writes the id of each run whose ServerApp has ended (beside
        :attr:`run_signal`, as ``ServerAppHost.ended``)."""
        return self.state / SERVERAPP_ENDED

    def serverapp_ended(self, run_id: int) -> bool:
        """Whether the ServerApp of run ``run_id`` has ended (it pushed its output to the SuperLink)."""
        try:
            return self.ended.read_text().strip() == str(run_id)
        except OSError:
            return False


def superlink_cmd(fed: Federation, paths: Paths) -> list[str]:
    """``flower-superlink`` (``weckd.server.flower_superlink``: its SQLite memory bounded): Fleet API (gRPC + TLS +
    SuperNode auth) on the configured address; every other listener given explicitly on 127.0.0.1 (docs/ports.md).

    ``--host/--port`` is the Control + Runtime (ServerAppIo) HTTP API. ``--control-api-address`` is the
    deprecated gRPC Control API, started only when ``FLWR_INTERNAL_GRPC_CONTROL_API=1`` (which
    :func:`flower_env` never passes on) and otherwise bound to 0.0.0.0:9093: it is pinned to loopback on the
    same port, so even then it could not listen beyond loopback (Flower logs a deprecation WARNING for it).
    No ``--health-server-address``: no health server. ``--isolation process``: no SuperExec; each run's ServerApp
    runs in a thread of the SuperLink process (``weckd.chain.flower.ServerAppHost``), which signs its requests for
    a run with the secret in ``paths.secret`` and asks for one when ``paths.run_signal`` is touched.
    """
    s = fed.settings
    return [sys.executable, "-m", "weckd.server.flower_superlink",
            "--ssl-ca-certfile", s.ca, "--ssl-certfile", s.cert, "--ssl-keyfile", s.key,
            "--enable-supernode-auth", "--fleet-api-address", s.fleet_address,
            "--host", "127.0.0.1", "--port", str(s.control_port),
            "--control-api-address", f"127.0.0.1:{s.control_port}",
            "--database", str(paths.state / SUPERLINK_DB), "--disable-runtime-dependency-installation",
            "--isolation", "process", "--superexec-auth-secret-file", str(paths.secret)]


def start_superlink(fed: Federation, group: Group, paths: Paths, start_timeout: float = 60.0) -> None:
    """Fleet API (gRPC + TLS + SuperNode auth) on the configured address; Control/Runtime on 127.0.0.1."""
    s = fed.settings
    cmd = superlink_cmd(fed, paths)
    kill_leftovers([str(paths.state / SUPERLINK_DB), f"127.0.0.1:{s.control_port} "])  # of a killed weckd-server
    write_superexec_secret(paths.secret.parent)
    proc = group.start("superlink", cmd, flower_env(paths.state / "flwr-superlink",
                                                    {RUN_SIGNAL_ENV: str(paths.run_signal), **MALLOC_ENV}))
    host, _, port = s.fleet_address.rpartition(":")
    wait_port(host, int(port), start_timeout, proc, "flower-superlink (fleet API)")
    wait_port("127.0.0.1", s.control_port, start_timeout, proc, "flower-superlink (control API)")
    log.info("SuperLink up: fleet %s (TLS, SuperNode auth), control 127.0.0.1:%d", s.fleet_address, s.control_port)


LOCK_FILE = "weckd-server.lock"  # in the state dir; ``weckd status`` tells a running coordinator by it


def hold_lock(state: Path) -> IO[str]:
    """Hold ``state/weckd-server.lock`` for the life of the process: one coordinator per state dir."""
    return process_lock(state / LOCK_FILE, "weckd-server")


def write_cli_config(fed: Federation, paths: Paths) -> None:
    private_dir(paths.cli_home)
    atomic_write_text(paths.cli_home / "config.toml", tomli_w.dumps({"superlink": {
        "default": CONNECTION,
        CONNECTION: {"address": f"127.0.0.1:{fed.settings.control_port}", "root-certificates": fed.settings.ca},
    }}))


def flwr(paths: Paths, args: list[str], check: bool = True) -> dict[str, Any]:
    """Run one ``flwr`` CLI command with JSON output (bounded by a timeout)."""
    exe = str(Path(sys.executable).with_name("flwr"))
    try:
        r = subprocess.run([exe, *args, "--format", "json"], env=flower_env(paths.cli_home), capture_output=True,
                           text=True, timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        raise WeckdError(f"flwr {args[0]} did not answer within {CLI_TIMEOUT:.0f}s; is the SuperLink up?") from err
    try:
        out = json.loads(r.stdout)
    except json.JSONDecodeError:
        out = {"success": False, "error-message": (r.stdout + r.stderr).strip()[-500:]}
    if check and not out.get("success", False):
        raise WeckdError(f"flwr {' '.join(args[:2])} failed: {out.get('error-message', out)}")
    return out


def flwr_batch(paths: Paths, commands: list[list[str]]) -> list[dict[str, Any]]:
    """Several ``flwr`` CLI commands in one process (``weckd.server.flwr_batch``): one import of Flower's CLI
    instead of one per command. Returns each command's JSON answer, in order."""
    try:
        r = subprocess.run([sys.executable, "-m", "weckd.server.flwr_batch"], input=json.dumps(commands),
                           env=flower_env(paths.cli_home), capture_output=True, text=True,
                           timeout=CLI_TIMEOUT * len(commands))
    except subprocess.TimeoutExpired as err:
        raise WeckdError(f"flwr {commands[0][0]} … did not answer within {CLI_TIMEOUT * len(commands):.0f}s; is the "
                         "SuperLink up?") from err
    try:
        out = json.loads(r.stdout)
    except json.JSONDecodeError:
        out = None
    if r.returncode != 0 or not isinstance(out, list) or len(out) != len(commands):
        tail = (r.stdout + r.stderr).strip()[-300:]
        raise WeckdError(f"flwr {commands[0][0]} … failed (exit {r.returncode}): {tail}")
    return [o if isinstance(o, dict) else {"success": False, "error-message": str(o)[:300]} for o in out]


def register_commands(fed: Federation) -> list[list[str]]:
    return [["supernode", "register", site.auth_key, CONNECTION, "--name", name] for name, site in fed.sites.items()]


def run_command(paths: Paths, run_config: dict[str, str]) -> list[str]:
    rc = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    return ["run", str(paths.app_dir), CONNECTION, "--run-config", rc]


def register_sites(fed: Federation, paths: Paths) -> None:
    """Register every site's auth public key under the site's name (already registered: kept)."""
    check_registered(fed, flwr_batch(paths, register_commands(fed)))


def register_and_submit(fed: Federation, paths: Paths, run_config: dict[str, str]) -> int:
    """Register the sites' keys and submit the run in one ``flwr`` process; return the run's id."""
    *registered, run = flwr_batch(paths, [*register_commands(fed), run_command(paths, run_config)])
    check_registered(fed, registered)
    if not run.get("success", False):
        raise WeckdError(f"flwr run failed: {run.get('error-message', run)}")
    paths.run_signal.touch()
    return int(run["run-id"])


def check_registered(fed: Federation, answers: list[dict[str, Any]]) -> None:
    """Each site's ``supernode register`` answer: registered now, or already (kept); anything else stops."""
    outs = dict(zip(fed.sites, answers, strict=True))
    for name, site in fed.sites.items():
        out = outs[name]
        if out.get("success"):
            log.info("site %s registered (node id %s)", name, out.get("node-id"))
            continue
        message = str(out.get("error-message", out))
        if out.get("error-code") == KEY_ALREADY_REGISTERED:
            log.info("site %s already registered", name)
            continue
        raise WeckdError(f"registering site {name} ({site.auth_key}) failed: {message}")


def write_app_dir(paths: Paths) -> None:
    """A config-only app bundle whose components point at the installed weckd (``chain.appbundle``)."""
    private_dir(paths.app_dir)
    atomic_write_text(paths.app_dir / "pyproject.toml", app_pyproject())


def submit(paths: Paths, run_config: dict[str, str]) -> int:
    """Submit the run (and wake the SuperLink's ServerApp host); return its id."""
    run_id = int(flwr(paths, run_command(paths, run_config))["run-id"])
    paths.run_signal.touch()
    return run_id


def run_status(paths: Paths, run_id: int) -> tuple[str, str]:
    """(status, details) of a run, e.g. ('finished:completed', '')."""
    out = flwr(paths, ["ls", CONNECTION, "--run-id", str(run_id)], check=False)
    runs = out.get("runs") or []
    if not runs:
        return "unknown", str(out.get("error-message", ""))
    return str(runs[0].get("status", "unknown")), str(runs[0].get("status-details", runs[0].get("details", "")))


def stop_run(paths: Paths, run_id: int) -> None:
    flwr(paths, ["stop", str(run_id), CONNECTION], check=False)
