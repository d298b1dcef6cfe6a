"""``weckd status``: the chain's state from the coordinator's progress file, lock and results, as a person and a
script read it."""
from __future__ import annotations

import fcntl
import json
from pathlib import Path

import pytest
from weckd.chain.cli import main
from weckd.server.settings import load_federation
from weckd.server.status import chain_status, format_status

from .fake_grid import federation

T0 = 1_000_000.0
RUN = "20261130T090000Z-aaaaaaaaaaaa"


def _write(state: Path, events: list[dict], name: str = "progress-2.jsonl") -> None:
    state.mkdir(parents=True, exist_ok=True)
    (state / name).write_text("".join(json.dumps(e) + "\n" for e in events))


def _fed(tmp_path: Path):  # noqa: ANN202
    return federation(tmp_path, ["A", "B", "C"], state_dir=str(tmp_path / "state"), output_dir=str(tmp_path / "out"))


RUNNING = [
    {"t": T0, "event": "site-online", "site": "A"}, {"t": T0 + 1, "event": "site-online", "site": "B"},
    {"t": T0 + 2, "event": "discovered", "run_id": RUN, "sites": {}},
    {"t": T0 + 3, "event": "link-start", "link": 1, "links": 3, "site": "A"},
    {"t": T0 + 23, "event": "link-done", "link": 1, "links": 3, "site": "A", "val_accuracy": 0.7, "seconds": 20.0,
     "evaluations": {}},
    {"t": T0 + 24, "event": "link-start", "link": 2, "links": 3, "site": "B"},
]


def test_a_running_chain_shows_its_link_site_and_eta(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    state = Path(fed.settings.state_dir)
    _write(state, [{"t": T0 - 100, "event": "failed", "reason": "an older run"}], "progress-1.jsonl")  # not the latest
    _write(state, RUNNING)
    with (state / "weckd-server.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running weckd-server holds it
        s = chain_status(fed, now=T0 + 34)
    assert (s["state"], s["coordinator_running"], s["run_id"]) == ("running", True, RUN)
    assert s["current"]["link"] == 2 and s["current"]["site"] == "B" and s["sites_online"] == ["A", "B"]
    assert s["eta_seconds"] == pytest.approx(30.0)  # link 2 has 10 s of its expected 20 left, then link 3: 20 s
    text = format_status(s)
    assert "link 2/3 at site B" in text and "ETA 0m30s" in text and "link 1  site A  val acc 0.700" in text


def _running_status(tmp_path: Path, events: list[dict], now: float) -> dict:
    fed = _fed(tmp_path)
    state = Path(fed.settings.state_dir)
    _write(state, events)
    with (state / "weckd-server.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return chain_status(fed, now=now)


def test_the_running_links_epoch_is_estimated_from_earlier_epoch_times(tmp_path: Path) -> None:
    events = [*RUNNING[:3], {**RUNNING[3], "epochs": 4}, {**RUNNING[4], "epoch_seconds": 5.0},
              {**RUNNING[5], "epochs": 4}]
    s = _running_status(tmp_path, events, now=T0 + 24 + 12)  # 12 s into link 2 at 5 s an epoch: its 3rd epoch
    assert s["current"]["epoch"] == {"epoch": 3, "epochs": 4, "estimated": True, "epoch_seconds": 5.0}
    assert "link 2/3 at site B, epoch ~3/4 (estimated" in format_status(s)
    late = _running_status(tmp_path, events, now=T0 + 24 + 500)  # slower than before: never past the last epoch
    assert late["current"]["epoch"]["epoch"] == 4


def test_the_first_links_epoch_is_unknown_until_a_link_has_finished(tmp_path: Path) -> None:
    s = _running_status(tmp_path, [*RUNNING[:3], {**RUNNING[3], "epochs": 4}], now=T0 + 30)
    assert s["current"]["epoch"] == {"epoch": None, "epochs": 4, "estimated": True}
    assert "4 epoch(s) (which one is known once a link has finished)" in format_status(s)


def test_a_chain_whose_coordinator_died_is_stopped_not_running(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    _write(Path(fed.settings.state_dir), RUNNING)
    s = chain_status(fed, now=T0 + 34)
    assert (s["state"], s["current"], s["eta_seconds"]) == ("stopped", None, None)


def test_a_completed_chain_shows_the_delivered_accuracy_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                                ) -> None:
    fed = _fed(tmp_path)
    _write(Path(fed.settings.state_dir), [*RUNNING, {"t": T0 + 60, "event": "completed", "seconds": 60.0}])
    out = Path(fed.settings.output_dir)
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"run_id": RUN, "summary": {"last_eval_accuracy": 0.81,
                                                                             "gain_over_link1": 0.1}}))
    assert main(["status", "-c", str(fed.source), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["state"] == "completed" and s["result"]["delivered_accuracy"] == 0.81
    assert load_federation(fed.source).settings.state_dir == fed.settings.state_dir


def test_a_federation_that_never_ran_is_not_started(tmp_path: Path) -> None:
    s = chain_status(_fed(tmp_path))
    assert (s["state"], s["run_id"], s["links"], s["links_done"]) == ("not started", None, 3, [])
