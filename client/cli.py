"""``weckd-client --site A -c site-A.yaml``: serve one hospital site in the federation.

Validates the config first, then starts the site's warm ClientApp executor, which reads the local data
(a clear one-line error before connecting), and only then the SuperNode (gRPC + TLS with the pinned
CA, the site's auth key, ``--isolation process``, Fleet poll capped), and supervises both until
Ctrl-C/SIGTERM or until one of them exits. This supervisor never imports torch: only the executor trains.
There is no plaintext mode: TLS and the auth key are always on.

The SuperNode's local Runtime (ClientAppIo) API listens on 127.0.0.1 only, and its task-handing calls
(AcquireTask, …) require an HMAC made with a secret that only this site's processes can read
(``<state_dir>/flwr-supernode/superexec.secret``, 0600, new at every start): another local user who
reaches the port cannot take the site's tasks. See docs/ports.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import socket
import ssl
import subprocess
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Sequence

from weckd.chain.cli import ERROR_PREFIX, run_command, setup_logging
from weckd.chain.errors import ConfigError, ReportedError, WeckdError
from weckd.chain.files import atomic_write_text, file_sha256, private_dir, process_lock, write_superexec_secret
from weckd.chain.flower import TASK_SIGNAL_ENV, check_flower_version
from weckd.chain.peers import load_party
from weckd.chain.procs import Group, flower_env, raise_on_sigterm, wait_port

from .metrics import SiteMetrics, SiteStatus, read_status, status_path
from .site import SiteConfig, load_site_config
from .status import LOCK_FILE, format_site_status, site_status
from .supernode import HEARTBEAT_ENV

log = logging.getLogger(__name__)

SUPERVISE_POLL_S = 0.5
REJOIN_EVERY_S = 5.0
# first and longest wait between tries while the coordinator is not up: a try is one TLS handshake (or, once
# the coordinator answers, a SuperNode start), so a site that waits for hours still joins within ~4 s
JOIN_BACKOFF_S = (1.0, 4.0)
KEY_GRACE_S = 30.0  # a coordinator that answers but does not admit the site: its key is not registered
ADMITTED_FILE = "admitted"  # written once the coordinator admitted this site's SuperNode


def main(argv: Sequence[str] | None = None) -> int:
    """Serve one site of the WeCKD federation."""
    parser = argparse.ArgumentParser(prog="weckd-client", description=main.__doc__)
    parser.add_argument("--site", required=True, help="this site's name (as registered at the coordinator)")
    parser.add_argument("-c", "--config", required=True, help="site YAML")
    parser.add_argument("--check", action="store_true", help="validate config and data, then exit")
    parser.add_argument("--status", action="store_true",
                        help="show what this site is doing and the runs it joined (reads its state dir), then exit")
    parser.add_argument("--json", action="store_true", help="with --status: one JSON object, for scripts")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return run_command(lambda: _serve(args))


def _serve(args: argparse.Namespace) -> int:
    cfg = load_site_config(args.config, args.site)
    if args.status:
        s = site_status(cfg)
        print(json.dumps(s, indent=1) if args.json else format_site_status(s))
        return 0
    for key, path in (("ca", cfg.ca), ("auth_key", cfg.auth_key)):
        if not Path(path).is_file():
            raise ConfigError(f"{cfg.source}: {key}: {path}: file not found; copy it from the coordinator "
                              "or create it with 'weckd certs'")
    if cfg.sealing is not None:  # a bad key file is a one-line config error before connecting
        load_party(cfg.site, cfg.sealing, cfg.source)
    else:
        log.warning("site %s: no sealing: section; payloads are protected by TLS only and the coordinator can "
                    "read them", cfg.site)
    check_pretrained_files(cfg)
    if args.check:
        counts = check_data(cfg)
        log.info("site %s: config and data OK (%s)", cfg.site, ", ".join(f"{n} {k}" for k, n in counts.items()))
        return 0
    check_flower_version()  # the internals are checked where they are patched: the SuperNode's own process
    state = Path(cfg.state_dir).resolve()
    private_dir(state)
    lock = process_lock(state / LOCK_FILE, "weckd-client")  # one supervisor per state dir; --status reads it
    group = Group(state / "logs", 10.0)
    raise_on_sigterm()
    SiteStatus(status_path(cfg.state_dir)).reset()
    metrics = SiteMetrics(status_path(cfg.state_dir))
    metrics.serve(cfg.metrics_address, cfg.metrics_port if cfg.metrics else 0)
    try:
        node_log = group.log_dir / f"supernode-{cfg.site}.log"
        offset = _log_end(node_log)
        secret = write_superexec_secret(state / "flwr-supernode")
        _start(cfg, group, state, secret)
        return _supervise(group, cfg, metrics, offset, secret)
    finally:
        metrics.close()
        group.stop_all()
        lock.close()
        log.info("site %s stopped", cfg.site)


def check_pretrained_files(cfg: SiteConfig) -> None:
    """Every file under ``pretrained:`` exists and hashes to its name: a wrong copy is one line at start,
    not a refused link later."""
    for sha, path in cfg.pretrained.items():
        actual = file_sha256(Path(path), f"{cfg.source}: pretrained")
        if actual != sha:
            raise ConfigError(f"{cfg.source}: pretrained: {path} has SHA-256 {actual}, not {sha}; copy the file the "
                              "coordinator names, or fix the mapping")


def supernode_cmd(cfg: SiteConfig, secret: Path) -> list[str]:
    """``flower-supernode`` (poll-capped) for this site: TLS with the pinned CA, the auth key, and every
    local listener given explicitly on 127.0.0.1 (Runtime/ClientAppIo API; no health server)."""
    source = str(Path(cfg.source).resolve())
    return [sys.executable, "-m", "weckd.client.supernode", "--grpc-rere", "--superlink", cfg.superlink,
            "--root-certificates", cfg.ca, "--auth-supernode-private-key", cfg.auth_key,
            "--node-config", f"site-id={cfg.site!r} site-config={source!r}",
            "--isolation", "process", "--host", "127.0.0.1", "--port", str(cfg.clientappio_port),
            "--superexec-auth-secret-file", str(secret), "--max-wait-time", str(cfg.max_wait or 86_400)]


def task_signal(state: Path) -> Path:
    """The file the SuperNode touches when a task arrives and the executor watches (chain.flower.signal_new_tasks)."""
    return state / "flwr-supernode" / "task-signal"


def executor_cmd(cfg: SiteConfig, secret: Path) -> list[str]:
    return [sys.executable, "-m", "weckd.client.executor", "--clientappio", f"127.0.0.1:{cfg.clientappio_port}",
            "--superexec-auth-secret-file", str(secret), "--site-config", str(Path(cfg.source).resolve())]


def check_data(cfg: SiteConfig) -> dict[str, int]:
    """Read the site's data in a child process (this process never imports torch); its counts per split,
    or the child's one-line error."""
    cmd = [sys.executable, "-m", "weckd.client.executor", "--check", "--site-config", str(Path(cfg.source).resolve())]
    done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise ReportedError(_reported(done.stderr) or f"site {cfg.site}: the data check failed (exit "
                            f"{done.returncode}): {done.stderr.strip()[-300:]}", done.returncode)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _reported(text: str) -> str:
    """The last ``weckd: error: …`` line of a child's output, without the prefix, or ''."""
    lines = [line for line in text.splitlines() if line.startswith(ERROR_PREFIX)]
    return lines[-1][len(ERROR_PREFIX):] if lines else ""


def _log_end(log_file: Path) -> int:
    """Where a child's next output starts in its log (the log is appended across restarts)."""
    return log_file.stat().st_size if log_file.is_file() else 0


def _reported_since(log_file: Path, offset: int) -> str:
    """The child's one-line error (``_reported``) among what it wrote to its log after ``offset``."""
    with log_file.open("rb") as fh:
        fh.seek(offset)
        return _reported(fh.read().decode("utf-8", errors="replace"))


def _start(cfg: SiteConfig, group: Group, state: Path, secret: Path) -> None:
    """The executor first: it reads the data, so bad data fails before the site connects; then the SuperNode.
    A coordinator that already answers with a certificate the pinned CA did not sign ends the start before
    that: the data and torch need not load for a site that cannot join."""
    Joining(cfg).refuse_wrong_ca()
    log_file = group.log_dir / f"executor-{cfg.site}.log"
    offset = _log_end(log_file)
    executor = group.start(f"executor-{cfg.site}", executor_cmd(cfg, secret),
                           flower_env(state / "flwr-supernode", {TASK_SIGNAL_ENV: str(task_signal(state))}))
    status = status_path(cfg.state_dir)
    while "counts" not in read_status(status):
        if executor.poll() is not None:
            raise ReportedError(_reported_since(log_file, offset) or f"site {cfg.site}: the executor exited with code "
                                f"{executor.returncode} while reading the data; see {log_file}", executor.returncode)
        time.sleep(0.1)
    Joining(cfg).wait_until_up()  # any start order: a site started before its coordinator waits here
    _start_supernode(cfg, group, state, secret)
    log.info("site %s: executor warm, SuperNode connecting to %s (TLS, pinned CA, auth key)", cfg.site,
             cfg.superlink)


def _start_supernode(cfg: SiteConfig, group: Group, state: Path, secret: Path) -> None:
    name = f"supernode-{cfg.site}"
    log_file = group.log_dir / f"{name}.log"
    offset = _log_end(log_file)
    node = group.start(name, supernode_cmd(cfg, secret),
                       flower_env(state / "flwr-supernode", {HEARTBEAT_ENV: str(cfg.heartbeat),
                                                             TASK_SIGNAL_ENV: str(task_signal(state))}))
    try:
        wait_port("127.0.0.1", cfg.clientappio_port, 60.0, node, f"SuperNode of site {cfg.site}")
    except WeckdError:
        reported = _reported_since(log_file, offset) if node.poll() is not None else ""
        if not reported:  # else its one line, e.g. a Flower internal weckd patches has moved
            raise
        raise ReportedError(reported, node.returncode) from None


class Reach(str, Enum):
    """What a TLS probe of the coordinator's Fleet address says (``probe_coordinator``)."""

    UNREACHABLE = "unreachable"  # nothing answers: the coordinator is not up (yet), or restarting
    WRONG_CA = "wrong-ca"  # it answers with a certificate the pinned CA did not sign (or for another name)
    UP = "up"  # it answers with a certificate the pinned CA signed


def probe_coordinator(address: str, ca: str, timeout: float = 3.0) -> Reach:
    """Connect to the coordinator's Fleet API and check its certificate against the pinned CA (TLS handshake,
    ALPN h2 as gRPC speaks it; no request is sent)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        ctx = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"ca: {ca}: not a readable CA certificate ({err})") from None
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            with ctx.wrap_socket(sock, server_hostname=host):
                return Reach.UP
    except ssl.SSLCertVerificationError:
        return Reach.WRONG_CA
    except (OSError, ValueError):  # refused, reset, timed out, unresolvable; a TLS error other than the certificate
        return Reach.UNREACHABLE


class Joining:
    """A site not admitted yet whose SuperNode exited: wait for the coordinator, or give up for a definite reason.

    Sites are services that may start before their coordinator, or while it restarts: while the Fleet
    address does not answer, the SuperNode is started again with backoff for up to ``max_wait`` seconds
    (0: forever). A certificate the pinned CA did not sign is definite at once. A coordinator that answers
    but does not admit the site is given ``KEY_GRACE_S`` (it registers the sites' keys right after its
    SuperLink starts); after that the site's auth key is not registered there, which is definite too.
    """

    def __init__(self, cfg: SiteConfig, up_since: float | None = None) -> None:
        self.cfg = cfg
        self.start = time.monotonic()
        self.refused_since = up_since  # since when the coordinator answers without admitting this site
        self.backoff = JOIN_BACKOFF_S[0]

    def wait_until_up(self) -> None:
        """Before a SuperNode starts: probe the coordinator with backoff until it answers (no SuperNode process
        is started while nothing answers), or raise the definite reason."""
        while True:
            reach = self._probe()
            if reach is Reach.UP:
                return
            time.sleep(self._backoff(reach, "no SuperNode started yet"))

    def refuse_wrong_ca(self) -> None:
        """Raise the definite wrong-ca reason if the coordinator answers with another CA's certificate (one probe;
        a coordinator that does not answer yet is no reason)."""
        self._probe()

    def next_wait(self, code: int) -> float:
        """Seconds to wait before the next SuperNode, or raise the definite reason."""
        return self._backoff(self._probe(), f"SuperNode exited (code {code}) before the coordinator admitted it",
                             code)

    def _probe(self) -> Reach:
        cfg = self.cfg
        reach = probe_coordinator(cfg.superlink, cfg.ca)
        if reach is Reach.WRONG_CA:
            raise WeckdError(f"site {cfg.site}: the coordinator at {cfg.superlink} presents a certificate that the "
                             f"pinned CA ({cfg.ca}) did not sign, or not for that address; copy the federation's "
                             "ca.crt from the coordinator (wrong-ca)")
        return reach

    def _backoff(self, reach: Reach, what: str, code: int = 0) -> float:
        cfg, now = self.cfg, time.monotonic()
        if reach is Reach.UP:
            if self.refused_since is None:
                self.refused_since = now
            if now - self.refused_since > KEY_GRACE_S:
                raise WeckdError(f"site {cfg.site}: the coordinator at {cfg.superlink} answers but does not admit this "
                                 f"site (SuperNode exit {code}) after {KEY_GRACE_S:.0f}s: its auth key "
                                 f"({cfg.auth_key}) is not registered there under the name {cfg.site!r}; send the "
                                 "public key to the coordinator (key-not-registered)")
        else:
            self.refused_since = None
            if cfg.max_wait and now - self.start > cfg.max_wait:
                raise WeckdError(f"site {cfg.site}: the coordinator at {cfg.superlink} did not answer for "
                                 f"{cfg.max_wait:.0f}s (max_wait); is weckd-server running and the address right? "
                                 "(unreachable)")
        wait, self.backoff = self.backoff, min(self.backoff * 2, JOIN_BACKOFF_S[1])
        log.warning("site %s: %s; the coordinator at %s is %s: trying again in %.0fs", cfg.site, what, cfg.superlink,
                    "up" if reach is Reach.UP else "not reachable yet", wait)
        return wait


def _supervise(group: Group, cfg: SiteConfig, metrics: SiteMetrics, offset: int, secret: Path) -> int:
    """Watch the SuperNode and the executor; report when the coordinator admits the site.

    A site not admitted yet waits for its coordinator (:class:`Joining`): any start order works. A site
    the coordinator admitted before (``<state_dir>/admitted``) that loses its SuperNode — the
    coordinator restarted, or this site restarted while the coordinator still holds its previous
    session (Flower refuses a second activation until that session's heartbeat expires) — starts a new
    SuperNode every ``REJOIN_EVERY_S`` for up to ``rejoin_wait`` seconds.
    """
    state = Path(cfg.state_dir).resolve()
    node_log, admitted = group.log_dir / f"supernode-{cfg.site}.log", state / ADMITTED_FILE
    connected, deadline = False, None
    # the coordinator answered before this SuperNode started (``Joining.wait_until_up``): its grace runs from now
    joining = None if admitted.is_file() else Joining(cfg, up_since=time.monotonic())
    while True:
        died = group.exited()
        if died is not None:
            name, code = died
            wait = None
            if name == f"supernode-{cfg.site}" and joining is not None:
                wait = joining.next_wait(code)
            elif name == f"supernode-{cfg.site}" and admitted.is_file():
                deadline = deadline or time.monotonic() + cfg.rejoin_wait
                if time.monotonic() < deadline:
                    log.warning("site %s: SuperNode exited (code %d); this site was admitted before, so the "
                                "coordinator may be restarting or still hold the previous session: rejoining in "
                                "%.0fs (up to rejoin_wait %.0fs)", cfg.site, code, REJOIN_EVERY_S, cfg.rejoin_wait)
                    wait = REJOIN_EVERY_S
            if wait is None:
                raise WeckdError(f"site {cfg.site}: {name} exited with code {code}; see "
                                 f"{group.log_dir / (name + '.log')}")
            metrics.set_connected(False)
            connected = False
            group.procs = [(n, p) for n, p in group.procs if n != name]
            time.sleep(wait)
            offset = node_log.stat().st_size if node_log.is_file() else 0
            _start_supernode(cfg, group, state, secret)
            continue
        if not connected:
            node = admitted_node(node_log, offset)
            if node:
                connected, deadline, joining = True, None, None
                atomic_write_text(admitted, f"{node}\n")
                metrics.set_connected(True)
                log.info("site %s: connected to the coordinator at %s (TLS, auth key accepted; node id %s)",
                         cfg.site, cfg.superlink, node)
        time.sleep(SUPERVISE_POLL_S)


def admitted_node(node_log: Path, offset: int = 0) -> str:
    """The node id the SuperNode logged (after byte ``offset``) once the coordinator admitted it
    ('SuperNode ID: …'), or ''."""
    try:
        with node_log.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        if "SuperNode ID:" in line:
            return line.rsplit("SuperNode ID:", 1)[1].strip()
    return ""


if __name__ == "__main__":
    raise SystemExit(main())
