"""The coordinator's chain logic with scripted sites: retries, fail or skip, checkpoint and resume."""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
from weckd.chain.errors import LinkError
from weckd.chain.protocol import MSG_DELIVER, MSG_TRAIN, Reason, error_text
from weckd.server.relay import Relay
from weckd.server.schedule import ChainRun
from weckd.server.state import CheckpointBlobs, load_state, new_state
from weckd.server.transport import MAX_POLL_S, Exchange, SiteFailure, Timing, failure_from_error

from .fake_grid import FakeSites, federation


def _run(tmp_path: Path, sites: FakeSites, order: list[str] | None = None, cycles: int = 1, **settings: Any
         ) -> tuple[ChainRun, list[dict[str, Any]]]:
    fed = federation(tmp_path, order or ["A", "B", "C"], cycles, **settings)
    events: list[dict[str, Any]] = []
    state = load_state(tmp_path / "state", fed) or new_state(fed)
    return ChainRun(sites, fed, {}, events.append, state, tmp_path / "state"), events


def _trained(sites: FakeSites) -> list[tuple[str, int]]:
    return [(site, link) for kind, site, link in sites.calls if kind == MSG_TRAIN]


def _gone(site: str) -> SiteFailure:
    return SiteFailure(site, "unavailable", "node-unavailable", f"train at site {site} failed: Node Unavailable")


def test_every_link_runs_in_order_with_its_predecessor_as_teacher(tmp_path: Path) -> None:
    sites = FakeSites(["A", "B", "C"])
    run, events = _run(tmp_path, sites)
    outcome = run.run()
    assert [r.site for r in outcome.links] == ["A", "B", "C"]
    assert sites.teachers == {0: None, 1: 0, 2: 1}
    assert [e["link"] for e in events if e["event"] == "link-done"] == [1, 2, 3]


def test_a_transient_failure_is_retried_and_the_chain_completes(tmp_path: Path) -> None:
    failures = iter([_gone("B"), _gone("B")])
    sites = FakeSites(["A", "B", "C"], lambda s, k: next(failures, None) if s == "B" else None)
    run, events = _run(tmp_path, sites, retries=2)
    outcome = run.run()
    assert _trained(sites) == [("A", 0), ("B", 1), ("B", 1), ("B", 1), ("C", 2)]
    assert [r.site for r in outcome.links] == ["A", "B", "C"]
    assert [e["attempt"] for e in events if e["event"] == "retry"] == [2, 3]


def test_a_site_failing_every_retry_fails_the_run_naming_it(tmp_path: Path) -> None:
    sites = FakeSites(["A", "B", "C"], lambda s, k: _gone(s) if s == "B" else None)
    run, events = _run(tmp_path, sites, retries=1, on_site_failure="fail")
    with pytest.raises(LinkError, match=r"link 2: site B failed after 2 attempt\(s\).*on_site_failure: fail") as err:
        run.run()
    assert err.value.failure == "site-failed"  # the metrics label, set where the failure is raised
    assert _trained(sites) == [("A", 0), ("B", 1), ("B", 1)]
    assert load_state(tmp_path / "state", run.fed).links[0].site == "A"  # link 1 is kept for a resume


def test_skip_hands_the_last_good_output_to_the_next_site(tmp_path: Path) -> None:
    sites = FakeSites(["A", "B", "C"], lambda s, k: _gone(s) if s == "B" else None)
    run, events = _run(tmp_path, sites, retries=1, on_site_failure="skip")
    outcome = run.run()
    assert [r.site for r in outcome.links] == ["A", "C"]
    assert sites.teachers[1] == 0  # C, now link 2, learns from A's link 1
    assert outcome.skipped == ["B"]
    assert [e for e in events if e["event"] == "site-skipped"][0]["site"] == "B"


def test_skip_at_the_last_link_hands_over_the_last_good_model(tmp_path: Path) -> None:
    sites = FakeSites(["A", "B", "C"], lambda s, k: _gone(s) if s == "C" else None)
    run, events = _run(tmp_path, sites, retries=1, on_site_failure="skip")
    outcome = run.run()
    assert [r.site for r in outcome.links] == ["A", "B"] and outcome.skipped == ["C"]
    assert sites.calls[-1] == (MSG_DELIVER, "B", 1)  # B hands over its link 2; nothing is trained again
    assert _trained(sites) == [("A", 0), ("B", 1), ("C", 2), ("C", 2)]
    assert outcome.final is not None and (outcome.final.link, outcome.final.site) == (1, "B")
    assert outcome.final.blob("weights", "coordinator")  # unsealed: the coordinator can write the model
    assert [e for e in events if e["event"] == "delivered"] == [
        {"event": "delivered", "sites": [], "link": 2, "handed_over": True, "rule": "last"}]
    assert load_state(tmp_path / "state", run.fed).delivered


def test_deliver_best_hands_over_the_link_with_the_best_pooled_validation_accuracy(tmp_path: Path) -> None:
    """Every site scores every link; link 4 (site A, second cycle) scores best over all sites' validation
    splits together, by more than the noise of 30 images, so A hands it over once the chain is done; the
    last link delivers nothing as it trains."""
    scores = {0: 0.6, 1: 0.7, 2: 0.7, 3: 0.9, 4: 0.7, 5: 0.6}
    sites = FakeSites(["A", "B", "C"], eval_accuracy=lambda s, k: scores[k] - (0.1 if s == "C" and k == 3 else 0.0))
    run, events = _run(tmp_path, sites, cycles=2, evaluate="all", deliver="best")
    outcome = run.run()
    assert _trained(sites) == [("A", 0), ("B", 1), ("C", 2), ("A", 3), ("B", 4), ("C", 5)]
    assert sites.calls[-1] == (MSG_DELIVER, "A", 3)  # nothing trained again: A seals its kept link 4
    assert outcome.final is not None and (outcome.final.link, outcome.final.site) == (3, "A")
    delivered = [e for e in events if e["event"] == "delivered"]
    assert delivered == [{"event": "delivered", "sites": [], "link": 4, "handed_over": True, "rule": "best"}]
    assert load_state(tmp_path / "state", run.fed).delivered


def test_deliver_best_breaks_a_tie_towards_the_later_link(tmp_path: Path) -> None:
    sites = FakeSites(["A", "B", "C"], eval_accuracy=lambda s, k: 0.8 if k in (0, 1) else 0.5)
    run, _ = _run(tmp_path, sites, evaluate="all", deliver="best")
    assert (run.run().final.link, sites.calls[-1]) == (1, (MSG_DELIVER, "B", 1))


def test_a_completed_final_link_needs_no_hand_over(tmp_path: Path) -> None:
    sites = FakeSites(["A", "B", "C"])
    run, _ = _run(tmp_path, sites)
    run.run()
    assert MSG_DELIVER not in {kind for kind, _, _ in sites.calls}
    assert load_state(tmp_path / "state", run.fed).delivered


def test_a_hand_over_the_site_refuses_fails_the_run_with_its_reason(tmp_path: Path) -> None:
    refused = failure_from_error("B", "deliver", 2, error_text(Reason.RECIPIENT_NOT_ALLOWED))

    class Refusing(FakeSites):
        def exchange_all(self, kind: str, contents: dict, group: str, timeout: float | None = None):  # type: ignore
            if kind == MSG_DELIVER:
                return Exchange({}, {s: refused for s in contents})
            return super().exchange_all(kind, contents, group, timeout)

    sites = Refusing(["A", "B", "C"], lambda s, k: _gone(s) if s == "C" else None)
    run, _ = _run(tmp_path, sites, retries=0, on_site_failure="skip")
    with pytest.raises(LinkError, match=r"handing over link 2 \(site B\).*recipient-not-allowed") as err:
        run.run()
    assert err.value.failure == "site-refused"


def test_skip_drops_the_site_from_later_cycles_too(tmp_path: Path) -> None:
    sites = FakeSites(["A", "B"], lambda s, k: _gone(s) if s == "B" else None)
    run, _ = _run(tmp_path, sites, order=["A", "B"], cycles=2, retries=0, on_site_failure="skip")
    outcome = run.run()
    assert [r.site for r in outcome.links] == ["A", "A"]  # A B A B without B
    assert _trained(sites) == [("A", 0), ("B", 1), ("A", 1)]
    assert sites.teachers[1] == 0


def test_a_refused_payload_fails_at_once_without_retry_even_with_skip(tmp_path: Path) -> None:
    refused = failure_from_error("B", "train", 2, error_text(Reason.REPLAY))
    sites = FakeSites(["A", "B", "C"], lambda s, k: refused if s == "B" else None)
    run, events = _run(tmp_path, sites, retries=3, on_site_failure="skip")
    with pytest.raises(LinkError, match=r"site B refused the request \(replay\)") as err:
        run.run()
    assert err.value.failure == "site-refused"
    assert _trained(sites) == [("A", 0), ("B", 1)]
    assert [e["reason"] for e in events if e["event"] == "site-failure"] == ["replay"]


def test_a_site_offline_beyond_retry_wait_counts_as_a_failure(tmp_path: Path) -> None:
    sites = FakeSites(["A", "C"])  # B never comes online
    run, events = _run(tmp_path, sites, retries=1, on_site_failure="skip", retry_wait=0.05)
    outcome = run.run()
    assert [r.site for r in outcome.links] == ["A", "C"]
    assert [e["kind"] for e in events if e["event"] == "site-failure"] == ["offline", "offline"]


def test_a_restarted_coordinator_resumes_at_the_next_link(tmp_path: Path) -> None:
    crash = FakeSites(["A", "B", "C"], lambda s, k: _gone(s) if s == "B" else None)
    first, _ = _run(tmp_path, crash, retries=0, on_site_failure="fail")
    with pytest.raises(LinkError):
        first.run()
    sites = FakeSites(["A", "B", "C"])
    second, events = _run(tmp_path, sites)
    outcome = second.run()
    assert second.state.run_id == first.state.run_id
    assert _trained(sites) == [("B", 1), ("C", 2)]  # link 1 is not trained again
    assert sites.teachers[1] == 0  # B gets A's checkpointed output
    assert [r.site for r in outcome.links] == ["A", "B", "C"]
    assert events[0] == {"event": "resumed", "links_done": 1, "links": 3, "run_id": first.state.run_id}


def test_sealed_federation_asks_for_blobs_for_next_evaluators_and_recipients(tmp_path: Path) -> None:
    sealing = {"deliver_to": ["coordinator", "A"], "keys": "k", "peers": {"A": "p", "B": "p", "C": "p"}}
    run, _ = _run(tmp_path, FakeSites(["A", "B", "C"]), sealing=sealing, evaluate="next")
    schedule = run.schedule()
    assert run._seal_for(0, schedule) == ["weights:B"]
    assert run._seal_for(2, schedule) == ["weights:A", "weights:B", "weights:C", "weights:coordinator"]
    run_skip, _ = _run(tmp_path / "skip", FakeSites(["A", "B", "C"]), sealing=sealing, evaluate="none",
                       on_site_failure="skip")
    assert run_skip._seal_for(0, schedule) == ["weights:B", "weights:C"]  # C may have to take over from B


@pytest.mark.parametrize(("code", "reason", "kind", "label"), [
    (5, "Node Unavailable", "unavailable", "node-unavailable"),
    (3, "Message unavailable", "unavailable", "node-unavailable"),
    (2, "weckd-refused:tampered the sealed payload was altered in transit or forged", "security", "tampered"),
    (2, "weckd-refused:malformed-payload the payload is malformed", "security", "malformed-payload"),
    (2, "weckd-refused:arch-not-allowed the architecture is not allowed", "security", "arch-not-allowed"),
    (2, "weckd-refused:internal the request failed at the site", "error", "site-error"),
    (2, "SealError[tampered]: the words of an older site are not a code", "error", "site-error"),
    (2, "weckd-refused:no-such-reason made up", "error", "site-error"),
])
def test_site_errors_are_classified(code: int, reason: str, kind: str, label: str) -> None:
    failure = failure_from_error("B", "train", code, reason)
    assert (failure.kind, failure.reason, failure.site) == (kind, label, "B")
    assert failure.failure == {"unavailable": "site-failed", "security": "site-refused", "error": "site-error"}[kind]
    assert failure.transient == (kind == "unavailable")


def test_a_dp_links_spent_epsilon_reaches_the_results_and_the_progress_event(tmp_path: Path) -> None:
    """What a site reports (``client.app.link_metrics`` of a DP link) is kept per link by the coordinator."""
    from flwr.app import MetricRecord
    from weckd.chain.privacy import PrivacySpent
    from weckd.server.report import _link_json
    from weckd.server.schedule import link_event_extras

    spent = PrivacySpent(epsilon=7.9, delta=1e-5, target_epsilon=8.0, max_grad_norm=1.0, noise_multiplier=0.7,
                         sample_rate=0.1, steps=40)
    metrics = {"val-accuracy": 0.5, "val-n": 4, "val-recall": [0.5, 0.5], "val-confusion": [1, 1, 1, 1],
               "epoch-loss": [1.0], "epoch-ce": [1.0], "epoch-kd": [0.0], "epoch-seconds": [0.1], "seconds": 0.1,
               **{f"privacy-{k}": float(v) for k, v in dict(spent).items()}}
    MetricRecord(metrics)  # what the site sends must fit a Flower MetricRecord
    from weckd.server.state import LinkRecord

    record = LinkRecord(0, "A", "test_resnet+gn", "scratch", metrics, 1.0, 0, 10)
    assert _link_json(record)["privacy"]["epsilon"] == 7.9
    assert _link_json(record)["privacy"]["steps"] == 40
    assert link_event_extras(record)["epsilon"] == 7.9


def test_the_coordinator_polls_fast_at_first_then_backs_off_while_a_site_works() -> None:
    timing = Timing(60.0, 600.0, 0.1)
    assert timing.wait(0.0) == timing.wait(1.9) == 0.1  # queries, evaluations: answered within the first pulls
    assert timing.wait(10.0) == pytest.approx(0.5)  # a reply waits at most ~5% of the time waited
    assert timing.wait(300.0) == MAX_POLL_S == 1.0  # a long link: one pull a second
    assert Timing(60.0, 600.0, 2.0).wait(300.0) == 2.0  # a slower poll_interval set by the operator is kept


def test_discovery_asks_a_site_again_that_proves_unavailable_after_a_coordinator_restart(tmp_path: Path) -> None:
    """A node the SuperLink still listed from before a restart answers "Node Unavailable": discovery waits for
    it to come back online and asks again (within discovery_timeout) instead of failing the run."""
    from weckd.server.schedule import discover

    failed: list[str] = []

    def stale_once(site: str, link: int) -> SiteFailure | None:
        if link == -1 and site == "B" and not failed:
            failed.append(site)
            return _gone(site)
        return None

    sites = FakeSites(["A", "B", "C"], stale_once)
    sites.nodes = {s: 100 + ord(s) for s in "ABC"}
    infos = discover(sites, federation(tmp_path, ["A", "B", "C"], discovery_timeout=30.0))
    assert sorted(infos) == ["A", "B", "C"] and infos["B"]["counts"]["train"] == 8
    assert [site for kind, site, _ in sites.calls if kind == "query"] == ["A", "B", "C", "B"]


def test_discovery_fails_on_a_site_that_stays_unavailable_past_the_discovery_timeout(tmp_path: Path) -> None:
    from weckd.server.schedule import discover

    sites = FakeSites(["A", "B"], lambda site, link: _gone(site) if site == "B" and link == -1 else None)
    sites.nodes = {s: 100 + ord(s) for s in "AB"}
    with pytest.raises(SiteFailure, match="site B"):
        discover(sites, federation(tmp_path, ["A", "B"], discovery_timeout=3.0))


def test_while_a_link_trains_its_teacher_is_held_on_disk_and_a_retry_reads_it_back(tmp_path: Path) -> None:
    held: list[tuple[int, str]] = []

    class Watching(FakeSites):
        def exchange_all(self, kind: str, contents: dict, group: str, timeout: float | None = None):  # type: ignore
            if kind == MSG_TRAIN and run.state.relay is not None:
                held.append((run.state.relay.link, type(run.state.relay.blobs).__name__))
            return super().exchange_all(kind, contents, group, timeout)

    failures = iter([_gone("C")])
    sites = Watching(["A", "B", "C"], lambda s, k: next(failures, None) if s == "C" else None)
    run, _ = _run(tmp_path, sites, retries=1)
    run.run()
    assert held == [(0, "CheckpointBlobs"), (1, "CheckpointBlobs"), (1, "CheckpointBlobs")]
    assert sites.teachers == {0: None, 1: 0, 2: 1}  # the retry of link 3 got link 2's model from the checkpoint


def test_while_a_link_trains_no_relay_holds_a_payload_in_memory(tmp_path: Path) -> None:
    in_memory: list[list[int]] = []

    class Watching(FakeSites):
        def exchange_all(self, kind: str, contents: dict, group: str, timeout: float | None = None):  # type: ignore
            if kind == MSG_TRAIN:  # the teacher is in ``contents`` (its records) and on disk; no Relay in memory
                gc.collect()
                in_memory.append([o.link for o in gc.get_objects()
                                  if type(o) is Relay and not isinstance(o.blobs, CheckpointBlobs)])
            return super().exchange_all(kind, contents, group, timeout)

    sites = Watching(["A", "B", "C"])
    run, _ = _run(tmp_path, sites)
    run.run()
    assert in_memory == [[], [], []]  # each link's output is read back from the checkpoint for a retry
