"""A site's Prometheus metrics: the executor writes a status file, the supervisor serves ``/metrics``.

Training runs in the site's warm executor process (``weckd.client.executor``), not in the
``weckd-client`` supervisor. We chose a status file over a second HTTP server in the executor:

* the executor (through the ClientApp, :class:`SiteStatus`) rewrites ``<state_dir>/metrics.json``
  atomically (``weckd.chain.files.atomic_write``) when its state changes and after every epoch;
* the supervisor serves ``/metrics`` on ``metrics_address:metrics_port`` (default ``127.0.0.1:9465``;
  ``metrics: false`` or port 0 switches it off) from a dedicated ``CollectorRegistry`` whose custom
  collector (:class:`SiteCollector`) reads that file at every scrape.

So the endpoint belongs to the long-lived process that owns the site's port and lifecycle, stays up
while the executor imports torch or restarts, and the executor stays free of HTTP threads; a scrape
never sees a half-written file. Only counts and aggregates are exported, never anything
patient-level. Metric names: ``weckd_site_`` prefix, base units, ``_total`` counters; labels only
``split`` and ``reason`` (the site itself is the scrape target's ``site`` label, set in Prometheus).
``weckd_site_state`` is an enum (idle / training / evaluating) whose label is its own name.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from weckd.chain.errors import PayloadError, SecurityError
from weckd.chain.files import atomic_write_text, private_dir
from weckd.chain.procs import serve_registry

if TYPE_CHECKING:
    from weckd.chain.data import SiteData
    from weckd.chain.link import EpochStats

log = logging.getLogger(__name__)

STATUS_FILE = "metrics.json"
STATES = ("idle", "training", "evaluating")
REJECT_REASONS = {PayloadError: "malformed", SecurityError: "verification"}
SPLITS = ("train", "val", "unlabelled")

T = TypeVar("T")


def site_counts(site: SiteData) -> dict[str, int]:
    """The site's dataset sizes by split (counts only)."""
    return {"train": len(site.train), "val": len(site.val),
            "unlabelled": len(site.unlabelled) if site.unlabelled is not None else 0}


def status_path(state_dir: str | Path) -> Path:
    """Where a site's executor writes its status (under the site's ``state_dir``)."""
    return Path(state_dir).resolve() / STATUS_FILE


def _fresh() -> dict[str, Any]:
    return {"state": "idle", "link": 0, "epoch": 0, "epochs": 0, "loss": None, "ce": None, "kd": None,
            "samples_per_s": 0.0, "epoch_seconds": 0.0, "links_trained": 0, "evaluations": 0,
            "verified": 0, "rejected": {}, "refused": {}, "updated": time.time()}


def read_status(path: Path) -> dict[str, Any]:
    """The last status the executor wrote (a fresh idle status if none yet or unreadable)."""
    try:
        return {**_fresh(), **json.loads(path.read_text(encoding="utf-8"))}
    except FileNotFoundError:
        return _fresh()
    except (OSError, ValueError) as err:  # never expected: writes are atomic
        log.warning("metrics: cannot read %s (%s); reporting idle", path, err)
        return _fresh()


class SiteStatus:
    """The executor's side: state, epoch, loss parts, throughput and payload checks → the status file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = read_status(path)

    def reset(self) -> None:
        """Start from idle with zeroed counters (the supervisor calls this at start-up)."""
        self.data = _fresh()
        self._write()

    def _write(self) -> None:
        self.data["updated"] = time.time()
        private_dir(self.path.parent)
        atomic_write_text(self.path, json.dumps(self.data))

    def update(self, **changes: Any) -> None:
        self.data.update(changes)
        self._write()

    @contextlib.contextmanager
    def activity(self, state: str, link: int, epochs: int = 0) -> Iterator[None]:
        """``state`` (training / evaluating) for the duration of the block, idle afterwards."""
        assert state in STATES
        self.update(state=state, link=link, epoch=0, epochs=epochs)
        try:
            yield
        except BaseException:
            self.update(state="idle")
            raise
        key = "links_trained" if state == "training" else "evaluations"
        self.update(state="idle", **{key: self.data[key] + 1})

    def on_epoch(self, stats: EpochStats) -> None:
        """``train_link``'s epoch hook; after the last epoch the link's model is being evaluated."""
        last = self.data.get("epochs") and stats.epoch >= self.data["epochs"]
        self.update(epoch=stats.epoch, loss=stats.loss, ce=stats.ce, kd=stats.kd,
                    samples_per_s=stats.images_per_s, epoch_seconds=stats.seconds,
                    **({"state": "evaluating"} if last else {}))

    def payload_verified(self) -> None:
        self.update(verified=self.data["verified"] + 1)

    def payload_rejected(self, reason: str) -> None:
        rejected = dict(self.data["rejected"])
        rejected[reason] = rejected.get(reason, 0) + 1
        self.update(rejected=rejected)

    def request_refused(self, reason: str) -> None:
        """A request refused before any work (policy, run state, sender, bundle, payload), by reason."""
        refused = dict(self.data["refused"])
        refused[reason] = refused.get(reason, 0) + 1
        self.update(refused=refused)

    def checked(self, decode: Callable[[], T | None]) -> T | None:
        """Run a payload decode/verify step; count it verified, or rejected with the reason and re-raise."""
        try:
            out = decode()
        except (PayloadError, SecurityError) as err:
            base = next((label for cls, label in REJECT_REASONS.items() if isinstance(err, cls)), "other")
            self.payload_rejected(str(getattr(err, "reason", "") or base))
            raise
        if out is not None:
            self.payload_verified()
        return out


class SiteCollector(Collector):
    """The supervisor's side: turns the status file (with the data counts the executor wrote there) into
    metrics per scrape; ``counts`` stand in until the executor has written its own."""

    def __init__(self, path: Path, counts: dict[str, int] | None = None) -> None:
        self.path = path
        self.counts = counts or {}
        self.connected = 0  # set by the supervisor once the coordinator admitted the SuperNode

    def collect(self) -> Iterable[Metric]:
        s = read_status(self.path)
        yield GaugeMetricFamily("weckd_site_connected", "1 once the coordinator admitted this site's SuperNode "
                                "(TLS, pinned CA, auth key) and while it runs", value=self.connected)
        state = GaugeMetricFamily("weckd_site_state", "What the site is doing", labels=["weckd_site_state"])
        for name in STATES:
            state.add_metric([name], 1.0 if s["state"] == name else 0.0)
        yield state
        yield GaugeMetricFamily("weckd_site_link", "Chain link of the current or last task (1-based)", value=s["link"])
        yield GaugeMetricFamily("weckd_site_epoch", "Current training epoch (1-based; 0: none yet)", value=s["epoch"])
        yield GaugeMetricFamily("weckd_site_epochs", "Epochs of the current link", value=s["epochs"])
        yield GaugeMetricFamily("weckd_site_train_samples_per_second", "Training throughput of the last epoch",
                                value=s["samples_per_s"])
        yield GaugeMetricFamily("weckd_site_epoch_duration_seconds", "Duration of the last epoch",
                                value=s["epoch_seconds"])
        for key, name, what in (("loss", "weckd_site_loss", "Training loss"),
                                ("ce", "weckd_site_ce_loss", "Cross-entropy part of the loss"),
                                ("kd", "weckd_site_kd_loss", "Distillation part of the loss")):
            g = GaugeMetricFamily(name, f"{what} of the last epoch")
            if s[key] is not None:
                g.add_metric([], float(s[key]))
            yield g
        samples = GaugeMetricFamily("weckd_site_samples", "Local dataset size (counts only)", labels=["split"])
        counts = s.get("counts") or self.counts
        for split in SPLITS:
            samples.add_metric([split], float(counts.get(split, 0)))
        yield samples
        yield CounterMetricFamily("weckd_site_links_trained", "Chain links trained here", value=s["links_trained"])
        yield CounterMetricFamily("weckd_site_evaluations", "Models evaluated here", value=s["evaluations"])
        yield CounterMetricFamily("weckd_site_payloads_verified", "Received payloads that passed the checks",
                                  value=s["verified"])
        rejected = CounterMetricFamily("weckd_site_payloads_rejected", "Received payloads refused, by reason",
                                       labels=["reason"])
        for reason in sorted({*REJECT_REASONS.values(), "other", *s["rejected"]}):
            rejected.add_metric([reason], float(s["rejected"].get(reason, 0)))
        yield rejected
        refused = CounterMetricFamily("weckd_site_requests_refused", "Requests this site refused before any work, "
                                      "by reason (weckd.chain.protocol.Reason)", labels=["reason"])
        for reason, n in sorted(s["refused"].items()):
            refused.add_metric([str(reason)], float(n))
        yield refused
        yield GaugeMetricFamily("weckd_site_status_timestamp_seconds", "When the executor last updated its status",
                                value=s["updated"])


def site_registry(path: Path, counts: dict[str, int] | None = None, collector: SiteCollector | None = None
                  ) -> CollectorRegistry:
    """A dedicated registry holding the site's collector (never the global default registry)."""
    registry = CollectorRegistry()
    registry.register(collector or SiteCollector(path, counts))
    return registry


class SiteMetrics:
    """``/metrics`` of one site, served by the ``weckd-client`` supervisor."""

    def __init__(self, path: Path, counts: dict[str, int] | None = None) -> None:
        self.collector = SiteCollector(path, counts)
        self.registry = site_registry(path, counts, self.collector)
        self._server: Any = None

    def set_connected(self, connected: bool) -> None:
        self.collector.connected = int(connected)

    def serve(self, address: str, port: int) -> None:
        self._server = serve_registry(self.registry, address, port, "metrics_port in the site config")

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
