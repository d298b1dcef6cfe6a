"""A site killed mid-link, the coordinator killed mid-chain, a wrong pinned key: real processes on
loopback (TLS, SuperNode auth, sealed payloads). Each scenario runs one federation; every process is
stopped in a ``finally``.

Loss detection: a SIGKILLed site is noticed by Flower's heartbeat (its message comes back as
``Node Unavailable``) or, where the site came back before that, by the link timeout; the measured
time from the kill to the coordinator's ``site-failure`` event is printed (``pytest -s``).
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from weckd.server.demo import LocalFederation
from weckd.server.scaffold import Scaffold, chain_settings, make_scaffold

pytestmark = pytest.mark.slow

EPOCHS = 2  # enough for a link to be killed mid-way (the tests wait until the site reports it trains)
TIMEOUT = 420.0


def _events(scaffold: Scaffold) -> list[dict[str, Any]]:
    out = []
    for path in sorted((scaffold.root / "state" / "server").glob("progress-*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def _wait_event(fed: LocalFederation, match: Callable[[dict[str, Any]], bool], timeout: float = 240.0
                ) -> dict[str, Any]:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        found = [e for e in _events(fed.scaffold) if match(e)]
        if found:
            return found[-1]
        assert fed.server.poll() is None, f"weckd-server exited ({fed.server.returncode}) before the event"
        time.sleep(0.2)
    raise AssertionError(f"no such event within {timeout:.0f}s: {_events(fed.scaffold)[-3:]}")


def _link_start(link: int) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("event") == "link-start" and e.get("link") == link


def _wait_training(scaffold: Scaffold, site: str, link: int, timeout: float = 120.0) -> None:
    """Until ``site`` reports (its metrics status file) that it trains ``link``: the message has arrived."""
    status = scaffold.root / "state" / f"site-{site}" / "metrics.json"
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if status.is_file():
            s = json.loads(status.read_text())
            if s.get("state") == "training" and s.get("link") == link:
                return
        time.sleep(0.05)
    raise AssertionError(f"site {site} did not start training link {link} within {timeout:.0f}s")


def _kill(fed: LocalFederation, name: str) -> float:
    """SIGKILL a process (its SuperNode/SuperLink and executor die with it); return when."""
    proc = dict(fed.group.procs)[name]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return time.time()


def _trained_links(scaffold: Scaffold) -> list[tuple[str, int]]:
    """(site, link) of every link a site actually trained, from the sites' executor logs."""
    out = []
    for log in sorted((scaffold.root / "state").glob("site-*/logs/executor-*.log")):
        site = log.stem.split("-", 1)[1]
        for line in log.read_text(errors="replace").splitlines():
            if ": training (teacher" in line:
                out.append((site, int(line.split(" link ", 1)[1].split(":", 1)[0])))
    return sorted(out)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Callable[..., LocalFederation]]:
    started: list[LocalFederation] = []

    def start(settings: dict[str, Any], before: Callable[[Scaffold], None] | None = None,
              epochs: int = EPOCHS, order: tuple[str, ...] = ("A", "B", "C")) -> LocalFederation:
        chain = chain_settings({"link": {"epochs": epochs}, "chain": {"order": list(order)}})
        scaffold = make_scaffold(tmp_path, chain, {"retry_wait": 10.0, **settings})
        if before is not None:
            before(scaffold)
        fed = LocalFederation(scaffold, stop_timeout=10.0)
        started.append(fed)
        fed.start_server()
        for site in scaffold.sites:
            fed.start_site(site)
        fed.wait_ready()
        return fed

    try:
        yield start
    finally:
        for fed in started:
            fed.stop()


def _results(fed: LocalFederation) -> dict[str, Any]:
    return json.loads((fed.scaffold.root / "out" / "results.json").read_text())


def test_skip_goes_on_without_a_killed_site_and_hands_over_the_last_good_model(
        federation: Callable[..., LocalFederation]) -> None:
    """Four sites, ``on_site_failure: skip``. B dies in link 2: C trains link 2 from A's model. D dies in
    the last link: C's link 2, as C kept it, becomes the final model, sealed by C for the coordinator and
    site A (nothing trained again), and the run completes."""
    fed = federation({"on_site_failure": "skip", "retries": 1, "retry_wait": 3.0}, epochs=4,
                     order=("A", "B", "C", "D"))  # C must learn from A's model
    _wait_event(fed, _link_start(2))
    _wait_training(fed.scaffold, "B", 2)
    killed = _kill(fed, "weckd-client-B")
    _wait_event(fed, lambda e: e.get("event") == "link-start" and e.get("site") == "D")
    _wait_training(fed.scaffold, "D", 3)
    _kill(fed, "weckd-client-D")
    assert fed.wait_server(TIMEOUT) == 0
    res = _results(fed)
    events = _events(fed.scaffold)
    assert [r["site"] for r in res["links"]] == ["A", "C"] and res["skipped"] == ["B", "D"]
    failure = next(e for e in events if e["event"] == "site-failure" and e["site"] == "B")
    print(f"\nsite B killed; loss detected after {failure['t'] - killed:.1f}s ({failure['reason']})")
    assert failure["kind"] in ("unavailable", "timeout")
    assert res["links"][-1]["eval_accuracy"] > 0.4  # chance is 0.25: C learnt from A's model and its own data
    handed = [e for e in events if e["event"] == "delivered"]
    assert handed == [{"event": "delivered", "sites": ["A"], "link": 2, "handed_over": True, "rule": "best",
                      "t": handed[0]["t"]}]
    card = json.loads((fed.scaffold.root / "out" / "model" / "model_card.json").read_text())
    assert card["provenance"]["links"][-1] == {"link": 2, "site": "C", "arch": "test_resnet", "init": "predecessor"}
    delivered = fed.scaffold.root / "state" / "site-A" / "delivered" / res["run_id"] / "model" / "model_card.json"
    assert json.loads(delivered.read_text())["provenance"]["from_site"] == "C"
    # B and D died in their links; C did not train again for the hand-over
    assert _trained_links(fed.scaffold) == [("A", 1), ("B", 2), ("C", 2), ("D", 3)]


def test_fail_stops_the_run_naming_the_killed_site(federation: Callable[..., LocalFederation]) -> None:
    fed = federation({"on_site_failure": "fail", "retries": 0})
    _wait_event(fed, _link_start(2))
    _wait_training(fed.scaffold, "B", 2)
    _kill(fed, "weckd-client-B")
    assert fed.wait_server(TIMEOUT) == 1
    failed = next(e for e in _events(fed.scaffold) if e["event"] == "failed")
    assert "site B failed after 1 attempt(s)" in failed["reason"] and "on_site_failure: fail" in failed["reason"]
    assert failed["failure"] == "site-failed"  # the metrics label travels typed, next to the words
    assert not (fed.scaffold.root / "out" / "results.json").exists()


def test_a_restarted_site_is_retried_and_a_killed_coordinator_resumes_at_the_next_link(
        federation: Callable[..., LocalFederation]) -> None:
    """B dies in link 2 and comes back: the coordinator retries it and the chain goes on. Then the coordinator
    dies while C trains the last link: restarted, it resumes at that link, and C answers from its store."""
    fed = federation({"on_site_failure": "fail", "retries": 2, "retry_wait": 120.0, "link_timeout": 60.0})
    _wait_event(fed, _link_start(2))
    _wait_training(fed.scaffold, "B", 2)
    killed = _kill(fed, "weckd-client-B")
    time.sleep(2.0)
    fed.start_site("B", name="B-restarted")
    done = _wait_event(fed, lambda e: e.get("event") == "link-done" and e.get("link") == 2)
    _wait_event(fed, _link_start(3))
    _wait_training(fed.scaffold, "C", 3)
    _kill(fed, "weckd-server")
    (fed.scaffold.root / "state" / "server" / "ready").unlink()
    fed.start_server()
    fed.wait_ready()
    assert fed.wait_server(TIMEOUT) == 0
    res = _results(fed)
    events = _events(fed.scaffold)
    assert [r["site"] for r in res["links"]] == ["A", "B", "C"] and res["skipped"] == []
    failure = next(e for e in events if e["event"] == "site-failure")
    print(f"\nsite B killed and restarted; loss detected after {failure['t'] - killed:.1f}s ({failure['reason']})")
    assert any(e["event"] == "retry" and e["site"] == "B" for e in events)
    resumed = next(e for e in events if e["event"] == "resumed")
    assert resumed["links_done"] == 2 and resumed["run_id"] == res["run_id"]
    # B trained link 2 again after its restart (it had died mid-link); C trained link 3 once
    assert _trained_links(fed.scaffold) == [("A", 1), ("B", 2), ("B", 2), ("C", 3)]
    assert res["links"][1]["val"]["accuracy"] == pytest.approx(done["val_accuracy"])
    reused = (fed.scaffold.root / "state" / "site-C" / "logs" / "executor-C.log").read_text()
    assert reused.count("was trained here already") == 1  # C had finished link 3: it answered from its store
    model = fed.scaffold.root / "out" / "model"
    assert (model / "model.safetensors").is_file()
    assert json.loads((model / "model_card.json").read_text())["provenance"]["run_id"] == res["run_id"]


def _impostor_pinned_as_b_at_c(scaffold: Scaffold) -> None:
    """Site C pins another Ed25519 key as B's (a mistake in onboarding, or a swapped file)."""
    from weckd.chain.keys import generate_site_keys

    impostor = generate_site_keys("B", scaffold.root / "impostor")
    pins = scaffold.root / "keys" / "pins-C"
    pins.mkdir()
    for pub in (scaffold.root / "keys" / "public").glob("*.pub"):
        (pins / pub.name).write_bytes(pub.read_bytes())
    (pins / "site-B.ed25519.pub").write_bytes(impostor.ed25519_pub.read_bytes())
    cfg = scaffold.sites["C"]
    cfg.write_text(cfg.read_text().replace("B: keys/public", "B: keys/pins-C"))


def test_a_payload_not_signed_by_the_pinned_key_fails_the_run_with_the_reason(
        federation: Callable[..., LocalFederation]) -> None:
    fed = federation({"retries": 2, "on_site_failure": "skip"}, before=_impostor_pinned_as_b_at_c)
    assert fed.wait_server(TIMEOUT) == 1
    events = _events(fed.scaffold)
    refused = [e for e in events if e["event"] in ("site-failure", "evaluation-missing")]
    assert len(refused) == 1  # never retried, never skipped: the first refusal stops the run
    # C meets B's output first when it evaluates link 2's model (evaluate: all), before training link 3
    assert (refused[0]["site"], refused[0]["link"], refused[0]["reason"]) == ("C", 2, "unexpected-sender")
    failed = next(e for e in events if e["event"] == "failed")
    assert "site C refused the request (unexpected-sender)" in failed["reason"]
    assert failed["failure"] == "site-refused"
    assert "not by site B's pinned key" not in failed["reason"]  # the details stay at the site, in its log
    assert "not by site B's pinned key" in (fed.scaffold.root / "state" / "site-C" / "logs" / "executor-C.log"
                                            ).read_text()
    metrics = json.loads((fed.scaffold.root / "state" / "site-C" / "metrics.json").read_text())
    assert metrics["rejected"] == {"unexpected-sender": 1} and metrics["links_trained"] == 0


def test_a_run_stopped_at_the_superlink_ends_its_serverapp_and_leaves_the_superlink_up(
        federation: Callable[..., LocalFederation]) -> None:
    """The ServerApp runs in the SuperLink's process: when its run is stopped (``flwr stop``, as weckd-server does
    at a deadline), Flower answers its next request with 401 and its heartbeat with a refusal, and would SIGINT
    the process. The ServerApp's thread ends; the SuperLink stays up, and weckd-server reports the stop."""
    import re

    from weckd.chain.flower import SERVERAPP_ENDED
    from weckd.server.superlink import Paths, stop_run

    fed = federation({}, epochs=100)  # a link that trains for minutes
    _wait_event(fed, _link_start(1))
    _wait_training(fed.scaffold, "A", 1)
    state = fed.scaffold.root / "state" / "server"
    logs = "".join(p.read_text() for p in fed.scaffold.root.rglob("weckd-server*.log"))
    run_id = re.search(r"run (\d+) submitted", logs).group(1)  # type: ignore[union-attr]
    stop_run(Paths.under(state), int(run_id))
    stopped = time.monotonic()
    ended = state / SERVERAPP_ENDED
    while not (ended.is_file() and ended.read_text().strip() == run_id) and time.monotonic() - stopped < 60:
        time.sleep(0.1)
    assert ended.read_text().strip() == run_id, "the ServerApp's thread did not end"
    print(f"\nrun stopped; its ServerApp ended {time.monotonic() - stopped:.1f}s later")
    superlink_log = state / "logs" / "superlink.log"
    assert "Shutting down" not in superlink_log.read_text()  # the SuperLink's HTTP server was not stopped
    assert fed.wait_server(60) == 1
    text = "".join(p.read_text() for p in fed.scaffold.root.rglob("weckd-server*.log"))
    assert f"run {run_id} finished:stopped" in text
    assert "superlink exited" not in text
