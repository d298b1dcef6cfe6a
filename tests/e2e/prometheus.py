"""A real Prometheus server that scrapes a test federation (weckd-server and every site) every second.

Started before the federation and queried through its HTTP API once ``weckd-server`` has exited (it
serves its final state ``federation.metrics_linger`` seconds longer) while the sites still run; the
answers are kept in :class:`Observed` so the tests can assert on them after every process stopped.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import yaml
from weckd.chain.procs import free_port
from weckd.server.scaffold import Scaffold

from .httpwait import wait_http_ok

SCRAPE_S = 1.0
WINDOW = "15m"


def available() -> bool:
    return shutil.which("prometheus") is not None


@dataclass
class Observed:
    """What Prometheus answered after the run (instant vectors as {labels: value})."""

    completed: float | None = None
    links: float | None = None
    run_completed: float | None = None
    accuracy: dict[tuple[str, str], float] = field(default_factory=dict)
    site_up: dict[str, float] = field(default_factory=dict)
    links_trained: dict[str, float] = field(default_factory=dict)
    relay_bytes: float | None = None
    scrapes: int = 0


class Prometheus:
    """``prometheus`` scraping the scaffold's server and sites; always stopped by :meth:`stop`."""

    def __init__(self, scaffold: Scaffold) -> None:
        self.root = scaffold.root / "prometheus"
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        server = yaml.safe_load(scaffold.federation.read_text())["federation"]
        sites = {s: yaml.safe_load(p.read_text()) for s, p in scaffold.sites.items()}
        config = {
            "global": {"scrape_interval": f"{SCRAPE_S:.0f}s", "scrape_timeout": f"{SCRAPE_S:.0f}s"},
            "scrape_configs": [
                {"job_name": "weckd-server",
                 "static_configs": [{"targets": [f"127.0.0.1:{server['metrics_port']}"]}]},
                {"job_name": "weckd-site",
                 "static_configs": [{"targets": [f"127.0.0.1:{c['metrics_port']}"], "labels": {"site": s}}
                                    for s, c in sites.items()]},
            ],
        }
        self.config = self.root / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        log = (self.root / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={self.config}", f"--storage.tsdb.path={self.root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_http_ok(f"{self.url}/-/ready", self.proc, timeout, "prometheus")
        except RuntimeError as err:
            raise RuntimeError(f"{err}; see {self.root / 'prometheus.log'}") from None

    def query(self, expr: str) -> list[dict[str, Any]]:
        q = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=10) as res:
            body = json.loads(res.read())
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def scalar(self, expr: str) -> float | None:
        res = self.query(expr)
        return float(res[0]["value"][1]) if res else None

    def by(self, expr: str, *labels: str) -> dict[Any, float]:
        out: dict[Any, float] = {}
        for r in self.query(expr):
            key = tuple(r["metric"].get(lbl, "") for lbl in labels)
            out[key[0] if len(key) == 1 else key] = float(r["value"][1])
        return out

    def observe(self) -> Observed:
        """Query the run's outcome (call after weckd-server exited, while the sites still run)."""
        time.sleep(2 * SCRAPE_S)  # one more scrape of the sites
        last = f"[{WINDOW}]"
        return Observed(
            completed=self.scalar(f"last_over_time(weckd_chain_links_completed{last})"),
            links=self.scalar(f"last_over_time(weckd_chain_links{last})"),
            run_completed=self.scalar(f'last_over_time(weckd_run_state{{weckd_run_state="completed"}}{last})'),
            accuracy=self.by(f'last_over_time(weckd_link_accuracy_ratio{{split="val"}}{last})', "link", "site"),
            site_up=self.by('max_over_time(up{job="weckd-site"}' + last + ")", "site"),
            links_trained=self.by(f"last_over_time(weckd_site_links_trained_total{last})", "site"),
            relay_bytes=self.scalar(f"sum(last_over_time(weckd_relay_bytes_total{last}))"),
            scrapes=int(self.scalar(f'count_over_time(up{{job="weckd-server"}}{last})') or 0),
        )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
