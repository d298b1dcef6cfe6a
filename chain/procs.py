"""Child processes and local listeners for ``weckd-server`` and ``weckd-client`` (both roles import this
Flower-free module): start in their own process group, wait for
ports, stop the whole group (SIGTERM, then SIGKILL after a timeout: ``flower-supernode`` sometimes
hangs in interpreter shutdown, and ``flwr-clientapp``/``flwr-serverapp`` children can outlive a run).
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Sequence

from weckd.chain.errors import ConfigError, WeckdError
from weckd.chain.files import open_append, private_dir
from weckd.chain.flower import process_settings

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def flower_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a Flower component: its own FLWR_HOME, telemetry and update checks off, and nothing
    else of Flower's from the parent environment.

    Flower 1.39 reads settings from ``FLWR_*`` variables that change what it opens or where it sends data
    (``FLWR_INTERNAL_GRPC_CONTROL_API=1`` starts a second, unauthenticated Control API on
    ``--control-api-address``, default 0.0.0.0:9093; ``FLWR_OIDC_ENABLED``, ``FLWR_MODEL_API_ENDPOINT``,
    ``FLWR_SUPERGRID_*``, ``FLWR_DATABASE`` …), so an inherited one is dropped: only the variables set here
    (``chain.flower.process_settings`` and ``extra``) reach Flower. Loopback is added to
    ``NO_PROXY``/``no_proxy``: the local Runtime and Control APIs are reached over 127.0.0.1 and must never go
    through an HTTP proxy from the environment.
    This interpreter's scripts directory comes first on ``PATH``.
    """
    private_dir(home)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FLWR_")}
    env.update({"FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                **process_settings()})
    # Flower starts its own helpers by name (flower-superexec, flwr-serverapp): they must come from this
    # installation even where its bin/ is not on PATH (a systemd unit, a full path to weckd-server).
    scripts = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([scripts, *(d for d in env.get("PATH", "").split(os.pathsep) if d and d != scripts)])
    for name in ("NO_PROXY", "no_proxy"):
        hosts = [h.strip() for h in env.get(name, "").split(",") if h.strip()]
        env[name] = ",".join([*hosts, *(h for h in LOOPBACK_HOSTS if h not in hosts)])
    env.update(extra or {})
    return env


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PICKED = 10000  # ports picked outside the ephemeral range are taken from here up to its start


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on loopback, all held at once while they are picked, so none repeats (two
    ``free_port()`` calls in a row may return the same port). Where the kernel's ephemeral range can be read they
    come from below it: a port from that range may be taken by any outgoing connection on the host (a SuperNode's,
    an object pull's) between being picked and being bound by the process it was picked for."""
    socks: list[socket.socket] = []
    try:
        for port in _candidates():
            if len(socks) == n:
                break
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use, or a closed connection's TIME_WAIT
                sock.close()
                continue
            socks.append(sock)
        while len(socks) < n:  # no readable range, or nothing free below it: the kernel picks
            socks.append(socket.socket())
            socks[-1].bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _candidates(tries: int = 400) -> list[int]:
    """Random ports below the ephemeral range (none where it cannot be read or leaves no room)."""
    import random

    try:
        low = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    if low <= LOWEST_PICKED:
        return []
    return random.SystemRandom().sample(range(LOWEST_PICKED, low), min(tries, low - LOWEST_PICKED))


def free_port() -> int:
    return free_ports(1)[0]


def check_distinct_ports(ports: dict[str, int], where: str) -> None:
    """One line naming the two settings when two of ``ports`` (setting -> port; 0: off) are the same port."""
    seen: dict[int, str] = {}
    for key, port in ports.items():
        if port and port in seen:
            raise ConfigError(f"{where}: {key}: port {port} is also {seen[port]}; give each its own port")
        seen.setdefault(port, key)


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    """Wait until ``host:port`` accepts connections; fail early if ``proc`` exits."""
    start = time.monotonic()
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    while time.monotonic() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise WeckdError(f"{what or 'process'} exited with code {proc.returncode} before listening on "
                             f"{host}:{port}; see its log")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise WeckdError(f"{what or 'process'}: nothing listening on {host}:{port} after {timeout:.0f}s; "
                     "is the port taken? see its log")


@dataclass
class Group:
    """Processes started together and stopped together, newest first."""

    log_dir: Path
    stop_timeout: float = 10.0
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, cmd: Sequence[str], env: dict[str, str]) -> subprocess.Popen:
        private_dir(self.log_dir)
        out = open_append(self.log_dir / f"{name}.log")
        try:
            proc = subprocess.Popen(list(cmd), env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            out.close()
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(cmd))
        self.procs.append((name, proc))
        return proc

    def exited(self) -> tuple[str, int] | None:
        """(name, exit code) of the first process that has exited, if any."""
        for name, proc in self.procs:
            if proc.poll() is not None:
                return name, int(proc.returncode)
        return None

    def stop_all(self) -> None:
        """Stop every process: SIGTERM to all of them at once (newest first), then wait for them together
        for at most ``stop_timeout``, then SIGKILL what is left; a second Ctrl-C/SIGTERM does not cut the
        cleanup short."""
        interrupted = False
        procs = list(reversed(self.procs))
        while True:
            try:
                stop_together(procs, self.stop_timeout)
                break
            except KeyboardInterrupt:
                interrupted = True
        self.procs.clear()
        if interrupted:
            raise KeyboardInterrupt


def stop_together(procs: Sequence[tuple[str, subprocess.Popen]], timeout: float) -> None:
    """SIGTERM every process group, wait until all have exited or ``timeout`` has passed, SIGKILL the rest
    (and leftover children in each group); always reap."""
    for _, proc in procs:
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for name, proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", name, timeout)
    for _, proc in procs:
        _signal_group(proc.pid, signal.SIGKILL)  # leftover children in the group
        proc.wait()


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None  # loaded here, not in the forked child
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL it when its parent dies, so a SIGKILLed weckd-server or
    weckd-client never leaves a SuperLink or SuperNode holding its ports."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def kill_leftovers(markers: Sequence[str], programs: Sequence[str] = ("flower", "flwr")) -> int:
    """SIGKILL this user's processes left by a previous, killed instance: those whose command line names
    one of ``programs`` and contains one of ``markers`` (e.g. our state dir or our loopback API address:
    Flower's own helper processes live in sessions of their own and can outlive it).
    Returns how many were killed."""
    killed = 0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int(proc.name) == os.getpid() or proc.stat().st_uid != os.getuid():
                continue
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if any(p in cmdline for p in programs) and any(m in cmdline for m in markers):
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
        except (OSError, ValueError):
            continue
    if killed:
        log.warning("killed %d leftover Flower process(es) of a previous, interrupted instance", killed)
    return killed


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def raise_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt so the CLI's cleanup path runs for both."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def serve_registry(registry: CollectorRegistry, address: str, port: int, setting: str) -> Any:
    """Serve ``/metrics`` for ``registry`` in a daemon thread; port 0 turns it off (returns None).

    ``setting`` names the config key to change when the port is taken.
    """
    from prometheus_client import start_http_server

    if not port:
        log.warning("metrics: off (%s is 0 or metrics is false)", setting)
        return None
    try:
        server, _ = start_http_server(port, address, registry=registry)
    except OSError as err:
        raise WeckdError(f"metrics: cannot listen on {address}:{port} ({err}); set {setting} to a free port, "
                         "or metrics: false") from err
    log.info("metrics on http://%s:%d/metrics", address, port)
    return server
