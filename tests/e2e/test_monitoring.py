"""A real Prometheus scrapes weckd-server and the three sites during the weights-mode federated run
(``weights_run``); its HTTP API then shows the whole chain: every link completed, an accuracy series
for every link, every site up and each having trained its link."""
from __future__ import annotations

import pytest

from . import prometheus
from .conftest import FederatedRun

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not prometheus.available(),
                                 reason="prometheus not installed (.ci/run installs the Debian package prometheus)")]


def _observed(run: FederatedRun) -> prometheus.Observed:
    assert run.server_rc == 0
    assert run.observed is not None
    return run.observed


def test_prometheus_saw_every_link_complete(weights_run: FederatedRun) -> None:
    seen = _observed(weights_run)
    k = len(weights_run.results["links"])
    assert seen.links == k == 3
    assert seen.completed == k
    assert seen.run_completed == 1
    assert seen.scrapes >= 5  # scraped during the run, not only once


def test_prometheus_has_an_accuracy_series_for_every_link(weights_run: FederatedRun) -> None:
    seen = _observed(weights_run)
    links = weights_run.results["links"]
    assert {link for link, _ in seen.accuracy} == {str(r["link"]) for r in links}
    for r in links:  # the value scraped is the one in results.json
        assert seen.accuracy[(str(r["link"]), r["site"])] == pytest.approx(r["val"]["accuracy"], abs=1e-9)
    assert all(0.0 <= v <= 1.0 for v in seen.accuracy.values())


def test_prometheus_saw_every_site_up_and_training(weights_run: FederatedRun) -> None:
    seen = _observed(weights_run)
    sites = set(weights_run.scaffold.sites)
    assert seen.site_up == {s: 1.0 for s in sites}
    assert seen.links_trained == {s: 1.0 for s in sites}  # one link each in A → B → C
    assert seen.relay_bytes is not None and seen.relay_bytes > 0
