"""The coordinator's Prometheus metrics, driven by the ServerApp's progress events.

``weckd-server`` follows the ServerApp's progress file (one JSON line per chain event) and feeds every
event to :meth:`ServerMetrics.observe`; ``/metrics`` is served from a dedicated ``CollectorRegistry``
(never the global default one) on ``federation.metrics_address:metrics_port`` (default
``127.0.0.1:9464``; ``metrics: false`` or port 0 switches it off). Names follow Prometheus conventions:
``weckd_`` prefix, base units, ``_total`` counters, ``_seconds``/``_bytes`` units, and only
low-cardinality labels (site, link, direction, reason, split); ``weckd_run_state`` is an enum (its
label is its own name) and ``weckd_run_info`` carries the run id, mode and weckd version.

:class:`ChainClock` turns the same events into elapsed time and an ETA (mean link duration × links
left), for the ``weckd_chain_eta_seconds`` gauge and the progress lines ``weckd-server`` prints.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info
from weckd.chain import __version__
from weckd.chain.procs import serve_registry
from weckd.chain.protocol import Event, Failure

log = logging.getLogger(__name__)

RUN_STATES = ("starting", "discovering", "training", "completed", "failed")
FAILURE_REASONS = tuple(f.value for f in Failure)
DIRECTIONS = ("to_site", "from_site")
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


@dataclass
class ChainClock:
    """Elapsed time and ETA of a chain from its events (link durations so far → the links left)."""

    start: float = field(default_factory=time.time)
    links: int = 0
    done: int = 0
    site: str = ""
    link_start: float | None = None
    durations: list[float] = field(default_factory=list)

    def observe(self, event: dict[str, Any]) -> None:
        kind, t = event.get("event"), float(event.get("t", time.time()))
        if kind == Event.LINK_START:
            self.links, self.link_start, self.site = int(event["links"]), t, str(event["site"])
        elif kind == Event.LINK_DONE:
            self.links, self.done = int(event["links"]), int(event["link"])
            self.durations.append(float(event["seconds"]))
            self.link_start = None

    def elapsed(self, now: float | None = None) -> float:
        return (now or time.time()) - self.start

    def expected_link_seconds(self) -> float | None:
        return sum(self.durations) / len(self.durations) if self.durations else None

    def eta(self, now: float | None = None) -> float | None:
        """Seconds until the last link is done, None until one link has finished."""
        mean = self.expected_link_seconds()
        if mean is None or not self.links:
            return None
        left = (self.links - self.done) * mean
        if self.link_start is not None:
            left -= min((now or time.time()) - self.link_start, mean)
        return max(left, 0.0)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class ServerMetrics:
    """Every coordinator metric, in its own registry; :meth:`observe` applies one progress event."""

    def __init__(self, links: int, sites: list[str], expected_link_seconds: float,
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.clock = ChainClock()
        self._default_expected = expected_link_seconds
        self._sites = list(sites)
        self._connected: set[str] = set()
        self._server: Any = None
        r = self.registry
        self.info = Info("weckd_run", "The run: Flower run id, chain mode, weckd version", registry=r)
        self.state = Enum("weckd_run_state", "Run state", states=list(RUN_STATES), registry=r)
        self.run_start = Gauge("weckd_run_start_timestamp_seconds", "When weckd-server started the run", registry=r)
        self.links_total = Gauge("weckd_chain_links", "Links in the chain (K)", registry=r)
        self.links_done = Gauge("weckd_chain_links_completed", "Links completed so far", registry=r)
        self.current_link = Gauge("weckd_chain_current_link", "Link being trained (1-based; 0: none)", registry=r)
        self.current_site = Gauge("weckd_chain_current_site", "1 for the site training the current link",
                                  ["site"], registry=r)
        self.link_started = Gauge("weckd_chain_current_link_start_timestamp_seconds",
                                  "When the current link was sent to its site (0: no link running)", registry=r)
        self.expected = Gauge("weckd_chain_link_expected_seconds",
                              "Expected link duration: mean of the finished links, link_timeout before", registry=r)
        self.eta = Gauge("weckd_chain_eta_seconds", "Estimated seconds until the last link is done", registry=r)
        self.duration = Gauge("weckd_link_duration_seconds", "Round trip of a link: send, train, reply",
                              ["link", "site"], registry=r)
        self.duration_hist = Histogram("weckd_link_round_trip_seconds", "Distribution of link round trips",
                                       buckets=DURATION_BUCKETS, registry=r)
        self.accuracy = Gauge("weckd_link_accuracy_ratio", "Accuracy of a link's model on a site's split",
                              ["link", "site", "split"], registry=r)
        self.loss = Gauge("weckd_link_loss", "Training loss of a link's last epoch", ["link", "site"], registry=r)
        self.ce = Gauge("weckd_link_ce_loss", "Cross-entropy part of a link's last-epoch loss", ["link", "site"],
                        registry=r)
        self.kd = Gauge("weckd_link_kd_loss", "Distillation part of a link's last-epoch loss", ["link", "site"],
                        registry=r)
        self.relay = Counter("weckd_relay_bytes_total", "Payload bytes relayed by the coordinator",
                             ["site", "direction"], registry=r)
        self.connected = Gauge("weckd_site_connected", "1 while the site's SuperNode is online", ["site"], registry=r)
        self.sites_connected = Gauge("weckd_sites_connected", "Sites online", registry=r)
        self.samples = Gauge("weckd_site_reported_samples", "Samples a site reported at discovery (counts only)",
                             ["site", "split"], registry=r)
        self.failures = Counter("weckd_failures_total", "Run failures by reason", ["reason"], registry=r)
        self.retries = Counter("weckd_retries_total", "Retried messages by reason", ["reason"], registry=r)
        self.site_failures = Counter("weckd_site_failures_total", "A site failed a link or an evaluation, by reason",
                                     ["site", "reason"], registry=r)
        self.skipped = Gauge("weckd_site_skipped", "1 once a site is skipped for the rest of the chain", ["site"],
                             registry=r)
        self.resumes = Counter("weckd_chain_resumes_total", "Runs that continued a checkpointed chain", registry=r)
        self.epsilon = Gauge("weckd_link_privacy_epsilon", "DP-SGD privacy budget spent by a link (epsilon)",
                             ["link", "site"], registry=r)
        self.delivered = Gauge("weckd_chain_delivered_link", "The link delivered as the chain's model (1-based; 0: "
                               "none yet), by the rule that chose it (chain.deliver)", ["rule"], registry=r)
        self._initial(links)

    def _initial(self, links: int) -> None:
        self.state.state("starting")
        self.run_start.set(self.clock.start)
        self.links_total.set(links)
        self.expected.set(self._default_expected)
        for site in self._sites:
            self.current_site.labels(site).set(0)
            self.connected.labels(site).set(0)
            self.skipped.labels(site).set(0)
            for d in DIRECTIONS:
                self.relay.labels(site, d)
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)

    def new_chain(self, links: int, sites: list[str], expected_link_seconds: float) -> None:
        """A service coordinator starts its next job: the per-chain gauges start over (counters keep counting:
        Prometheus counters only go up)."""
        self.clock = ChainClock()
        self._default_expected = expected_link_seconds
        for gauge in (self.current_site, self.duration, self.accuracy, self.loss, self.ce, self.kd, self.epsilon,
                      self.delivered, self.connected, self.skipped):
            gauge.clear()
        self._sites = list(sites)
        self._connected = set()
        self.sites_connected.set(0)
        self.links_done.set(0)
        self._idle()
        self._initial(links)

    def set_run(self, run_id: int, mode: str) -> None:
        self.info.info({"run_id": str(run_id), "mode": mode, "version": __version__})

    def observe(self, event: dict[str, Any]) -> None:
        """Apply one ServerApp progress event (unknown events are ignored: newer ServerApps add some)."""
        self.clock.observe(event)
        kind = event.get("event")
        if kind == Event.SITE_ONLINE:
            self._online([str(event["site"])])
        elif kind == Event.SITES_ONLINE:
            self._online(list(event["sites"]))
        elif kind == Event.DISCOVERED:
            self.state.state("discovering")
            for site, counts in event.get("sites", {}).items():
                for split, n in counts.items():
                    self.samples.labels(site, split).set(n)
        elif kind == Event.LINK_START:
            self._link_start(event)
        elif kind == Event.LINK_DONE:
            self._link_done(event)
        elif kind == Event.DELIVERED and "link" in event:
            self.delivered.labels(str(event.get("rule", "last"))).set(int(event["link"]))
        elif kind == Event.RETRY:
            self.retries.labels(str(event.get("reason", "other"))).inc()
        elif kind in ("site-failure", "evaluation-missing"):
            self.site_failures.labels(str(event["site"]), str(event.get("reason", "other"))).inc()
        elif kind == Event.SITE_SKIPPED:
            self.skipped.labels(str(event["site"])).set(1)
        elif kind == Event.RESUMED:
            self.resumes.inc()
            self.links_done.set(int(event["links_done"]))
        elif kind == Event.COMPLETED:
            self.state.state("completed")
            self._idle()
        elif kind == Event.FAILED:
            self.fail(str(event.get("failure", Failure.OTHER.value)))
        eta = self.clock.eta()
        if eta is not None:
            self.eta.set(eta)

    def complete(self, links: int) -> None:
        """The state of a chain found complete in its checkpoint (``weckd-server --hold`` after a restart)."""
        self.state.state("completed")
        self.links_total.set(links)
        self.links_done.set(links)

    def fail(self, failure: str) -> None:
        """The run failed; ``failure`` is its label (``chain.protocol.Failure``; unknown ones count as other)."""
        self.state.state("failed")
        self.failures.labels(failure if failure in FAILURE_REASONS else Failure.OTHER.value).inc()
        self._idle()

    def _online(self, sites: list[str]) -> None:
        self.state.state("discovering")
        self._connected.update(sites)
        for site in sites:
            self.connected.labels(site).set(1)
        self.sites_connected.set(len(self._connected))

    def _link_start(self, e: dict[str, Any]) -> None:
        self.state.state("training")
        self.links_total.set(e["links"])
        self.current_link.set(e["link"])
        for site in self._sites:
            self.current_site.labels(site).set(1 if site == e["site"] else 0)
        self.link_started.set(float(e.get("t", time.time())))

    def _link_done(self, e: dict[str, Any]) -> None:
        link, site = str(e["link"]), str(e["site"])
        self.links_done.set(e["link"])
        self.duration.labels(link, site).set(e["seconds"])
        self.duration_hist.observe(e["seconds"])
        self.accuracy.labels(link, site, "val").set(e["val_accuracy"])
        for other, acc in e.get("evaluations", {}).items():
            self.accuracy.labels(link, other, "val").set(acc)
        for gauge, key in ((self.loss, "loss"), (self.ce, "ce"), (self.kd, "kd"), (self.epsilon, "epsilon")):
            if key in e:
                gauge.labels(link, site).set(e[key])
        self.relay.labels(site, "to_site").inc(e.get("bytes_to_site", 0))
        self.relay.labels(site, "from_site").inc(e.get("bytes_from_site", 0))
        self.expected.set(self.clock.expected_link_seconds() or self._default_expected)
        self._idle()

    def _idle(self) -> None:
        self.current_link.set(0)
        self.link_started.set(0)
        for site in self._sites:
            self.current_site.labels(site).set(0)

    def serve(self, address: str, port: int) -> None:
        """Serve ``/metrics`` on ``address:port`` in a daemon thread (port 0: off)."""
        self._server = serve_registry(self.registry, address, port, "federation.metrics_port")

    def close(self, linger: float = 0.0) -> None:
        """Keep serving ``linger`` seconds (a last scrape sees the final state), then stop."""
        if self._server is None:
            return
        if linger > 0:
            log.info("metrics: serving the final state %.0fs more (federation.metrics_linger)", linger)
            time.sleep(linger)
        self._server.shutdown()
        self._server.server_close()
        self._server = None
