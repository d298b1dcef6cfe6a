"""The report of a federated run is drawn by a child of weckd-server after the run's ServerApp has ended."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from weckd.chain.errors import WeckdError
from weckd.server import plots


def results(out: Path, links: object) -> Path:
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps({"links": links}))
    return out


def test_a_report_is_due_only_where_every_link_was_evaluated(tmp_path: Path) -> None:
    assert plots.report_due(results(tmp_path / "all", [{"link": 1, "test": {}}, {"link": 2, "test": {}}]))
    assert not plots.report_due(results(tmp_path / "next", [{"link": 1, "test": {}}, {"link": 2}]))
    assert not plots.report_due(results(tmp_path / "none", []))


def test_a_run_without_a_report_due_starts_no_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plots.subprocess, "run", lambda *a, **k: pytest.fail("no child for a run without a report"))
    plots.draw_report(results(tmp_path, [{"link": 1}]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_report_that_cannot_be_drawn_is_one_line_naming_the_folder_and_the_fix(tmp_path: Path) -> None:
    out = results(tmp_path, [{"link": 1, "test": {}}])  # due, but not the results of a run
    with pytest.raises(WeckdError) as err:
        plots.draw_report(out)
    text = str(err.value)
    assert text.startswith(f"{out}: drawing the run's report failed (") and f"weckd report {out}" in text
    assert "\n" not in text and not (out / "report.html").exists()


def test_unreadable_results_are_named(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(WeckdError, match=r"results.json: cannot read the run's results"):
        plots.report_due(tmp_path)


def test_the_child_takes_exactly_one_folder(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        plots.main([])
    assert done.value.code == 2 and "usage: weckd report" in capsys.readouterr().err
