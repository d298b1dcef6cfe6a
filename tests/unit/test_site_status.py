"""``weckd-client --status``: a site's own view of what it is doing and the runs it joined, from its state dir; and
one supervisor per state dir."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from weckd.chain.errors import WeckdError
from weckd.chain.files import lock_held, process_lock
from weckd.client.cli import main
from weckd.client.metrics import SiteStatus, status_path
from weckd.client.site import load_site_config
from weckd.server.scaffold import chain_settings, write_site_config

RUN1, RUN2 = "20261130T090000Z-aaaaaaaaaaaa", "20261130T100000Z-bbbbbbbbbbbb"


@pytest.fixture
def site_cfg(tmp_path: Path) -> Path:
    return write_site_config(tmp_path, "A", chain_settings(), "127.0.0.1:1", 1)


def test_status_shows_the_link_training_now_and_the_runs_joined(site_cfg: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_site_config(site_cfg, "A")
    state = Path(cfg.state_dir)
    state.mkdir(parents=True)
    (state / "runs.json").write_text(json.dumps({"current": RUN2, "epsilon_spent": 1.5, "runs": {
        RUN1: {"routed": ["A", "B"], "last_link": 1, "links": [0], "evaluations": 2, "epsilon": 1.5, "delivered": 0},
        RUN2: {"routed": ["A"], "last_link": 0, "links": [], "evaluations": 0, "epsilon": 0.0, "delivered": -1}}}))
    (state / "delivered" / RUN1 / "model").mkdir(parents=True)
    SiteStatus(status_path(cfg.state_dir)).update(state="training", link=1, epoch=3, epochs=8, samples_per_s=85.0)
    assert main(["--site", "A", "-c", str(site_cfg), "--status", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["site"] == "A" and not s["supervisor_running"] and s["admitted_at"] is None
    assert (s["now"]["state"], s["now"]["link"], s["now"]["epoch"], s["now"]["epochs"]) == ("training", 1, 3, 8)
    assert [r["run_id"] for r in s["runs"]] == [RUN2, RUN1] and s["runs"][0]["current"]
    assert s["runs"][1]["links_trained"] == [1] and s["runs"][1]["delivered_link"] == 1
    assert s["runs"][1]["delivered_model"].endswith(f"delivered/{RUN1}/model") and s["epsilon_spent"] == 1.5
    assert main(["--site", "A", "-c", str(site_cfg), "--status"]) == 0
    text = capsys.readouterr().out
    assert "training link 1, epoch 3/8, 85 images/s" in text and f"run {RUN1}: trained link(s) 1" in text


def test_a_fresh_site_has_an_idle_status(site_cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--site", "A", "-c", str(site_cfg), "--status"]) == 0
    assert "supervisor not running, not admitted yet\n  now: idle" in capsys.readouterr().out


def test_one_supervisor_per_state_dir(tmp_path: Path) -> None:
    lock = process_lock(tmp_path / "weckd-client.lock", "weckd-client")
    try:
        assert lock_held(tmp_path / "weckd-client.lock")
        with pytest.raises(WeckdError, match=r"another weckd-client \(pid \d+\) runs on this state dir"):
            process_lock(tmp_path / "weckd-client.lock", "weckd-client")
    finally:
        lock.close()
    assert not lock_held(tmp_path / "weckd-client.lock")
