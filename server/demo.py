"""``weckd demo``: a complete federation on this machine, ending with the chain's result table.

In a temp dir: a CA, the server certificate and three site auth keys; ``federation.yaml`` and three
site configs on the built-in synthetic data (the settings of ``configs/chain-synthetic.yaml``, split
into sites A, B, C); then ``weckd-server`` and three ``weckd-client`` processes on loopback (gRPC,
TLS, SuperNode auth). Every process is stopped at the end, whatever happens.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from weckd.chain.cli import run_command, setup_logging
from weckd.chain.errors import LinkError
from weckd.chain.procs import Group, raise_on_sigterm

from .scaffold import Scaffold, chain_settings, make_scaffold
from .settings import RESULTS_FILE

log = logging.getLogger(__name__)


class LocalFederation:
    """``weckd-server`` and ``weckd-client`` processes for a scaffold; stopped together."""

    def __init__(self, scaffold: Scaffold, stop_timeout: float = 15.0) -> None:
        self.scaffold = scaffold
        self.group = Group(scaffold.root / "logs", stop_timeout)
        self.server: Any = None

    def start_server(self, *extra: str, stream: bool = False) -> None:
        cmd = [str(Path(sys.executable).with_name("weckd-server")), "-c", str(self.scaffold.federation), *extra]
        if stream:  # the demo shows the coordinator's progress lines live
            self.server = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
            self.group.procs.append(("weckd-server", self.server))
        else:
            self.server = self.group.start("weckd-server", cmd, dict(os.environ))

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until weckd-server has registered the sites' keys (a site that connects earlier is refused, and
        retries within its key-registration grace)."""
        ready = self.scaffold.root / "state" / "server" / "ready"
        start = time.monotonic()
        while not ready.is_file():
            if self.server.poll() is not None:
                raise LinkError(f"weckd-server exited with code {self.server.returncode} during start-up; "
                                f"logs in {self.group.log_dir}")
            if time.monotonic() - start > timeout:
                raise LinkError(f"weckd-server not ready after {timeout:.0f}s; logs in {self.group.log_dir}")
            time.sleep(0.1)

    def start_site(self, site: str, config: Path | None = None, *extra: str, name: str | None = None) -> None:
        cfg = config or self.scaffold.sites[site]
        cmd = [str(Path(sys.executable).with_name("weckd-client")), "--site", site, "-c", str(cfg), *extra]
        self.group.start(f"weckd-client-{name or site}", cmd, dict(os.environ))

    def wait_server(self, timeout: float) -> int:
        """Exit code of weckd-server; raises LinkError after ``timeout``."""
        start = time.monotonic()
        while self.server.poll() is None:
            if time.monotonic() - start > timeout:
                raise LinkError(f"weckd-server still running after {timeout:.0f}s; logs in {self.group.log_dir}")
            time.sleep(0.2)
        return int(self.server.returncode)

    def exit_code(self, name: str, timeout: float) -> int | None:
        """Exit code of process ``name`` once it exits, None if it still runs after ``timeout``."""
        proc = dict(self.group.procs)[name]
        try:
            return int(proc.wait(timeout))
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """Stop the coordinator and the sites together (SIGTERM to all, then wait)."""
        self.group.stop_all()

    def results(self) -> dict[str, Any]:
        return json.loads((self.scaffold.root / "out" / RESULTS_FILE).read_text(encoding="utf-8"))


def format_table(res: dict[str, Any]) -> str:
    head = (f"{'link':<6} {'site':<6} {'arch':<22} {'init':<12} {'val acc':>8} {'eval acc':>9} {'seconds':>8} "
            f"{'relay KB':>9}")
    lines = [head, "-" * len(head)]
    for r in res["links"]:
        ev = r["eval_accuracy"]
        relay = (r["bytes_to_site"] + r["bytes_from_site"]) / 1024
        lines.append(f"{r['link']:<6} {r['site']:<6} {r['arch']:<22} {r['init']:<12} {r['val']['accuracy']:>8.3f} "
                     f"{(f'{ev:.3f}' if ev is not None else '-'):>9} {r['round_trip_seconds']:>8.1f} {relay:>9.1f}")
    gain = res["summary"].get("gain_over_link1")
    if gain is not None:
        lines.append(f"last link vs link 1 (single backbone), accuracy on all sites' validation data: "
                     f"{100 * gain:+.1f} points")
    return "\n".join(lines)


def demo_command(argv: Sequence[str]) -> int:
    """Run a complete federation on this machine (server + 3 sites, TLS, synthetic data)."""
    parser = argparse.ArgumentParser(prog="weckd demo", description=demo_command.__doc__)
    parser.add_argument("--epochs", type=int, default=8, help="epochs per link (default 8)")
    parser.add_argument("--keep", metavar="DIR", help="build the federation in DIR and keep it")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_command(lambda: _demo(args))


def _demo(args: argparse.Namespace) -> int:
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="weckd-demo-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        scaffold = make_scaffold(root, chain_settings({"link": {"epochs": args.epochs}}))
        log.info("demo federation in %s: CA, server certificate, site keys A, B, C", root)
        fed = LocalFederation(scaffold)
        raise_on_sigterm()
        try:
            fed.start_server(stream=True)
            for site in scaffold.sites:  # at once: each reads its data while the coordinator starts, then joins
                fed.start_site(site)
            fed.wait_ready()
            code = fed.wait_server(args.timeout)
        finally:
            fed.stop()
        if code != 0:
            raise LinkError(f"the federation failed (weckd-server exit {code}); logs in {root / 'logs'} "
                            "(rerun with --keep DIR to look at them)")
        print(format_table(fed.results()))
    print(f"demo finished in {time.monotonic() - start:.0f}s; every process stopped")
    return 0
