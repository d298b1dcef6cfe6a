"""`weckd report` and the report `weckd chain` writes: files, plot sizes, tables, bad run dirs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from weckd.chain.bench import plot_summary
from weckd.chain.cli import main
from weckd.chain.report import PNG_SIZES, accuracy_range

from .helpers import TINY_CHAIN, write_yaml

REPORT_FILES = {"report.md", "report.html", *PNG_SIZES}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny chain run (2 links, site and pooled baselines) shared by this module's tests."""
    root = tmp_path_factory.mktemp("report")
    cfg = write_yaml(root / "c.yaml", TINY_CHAIN)
    assert main(["chain", "-c", str(cfg), "-o", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture
def fresh_run(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the run dir without its report files."""
    copy = Path(shutil.copytree(run_dir, tmp_path / "run"))
    for name in REPORT_FILES:
        (copy / name).unlink()
    return copy


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("weckd: error: ") and "Traceback" not in err
    return lines[0]


def test_chain_writes_the_report_into_its_run_dir(run_dir: Path) -> None:
    assert REPORT_FILES <= {p.name for p in run_dir.iterdir()}
    assert not any(p.name.endswith(".tmp") for p in run_dir.iterdir())


def test_report_command_writes_every_file(fresh_run: Path, capsys) -> None:
    assert main(["report", str(fresh_run)]) == 0
    assert REPORT_FILES <= {p.name for p in fresh_run.iterdir()}
    assert len(capsys.readouterr().out.splitlines()) == len(REPORT_FILES)


@pytest.mark.parametrize("name", sorted(PNG_SIZES))
def test_each_plot_has_its_fixed_size_and_is_not_blank(run_dir: Path, name: str) -> None:
    with Image.open(run_dir / name) as image:
        assert image.format == "PNG"
        assert image.size == PNG_SIZES[name]
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.std() > 10.0


def test_markdown_has_one_table_row_per_link_and_the_summary(run_dir: Path) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    text = (run_dir / "report.md").read_text()
    links = text.split("## Links")[1].split("## Baselines")[0]
    rows = [line for line in links.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(results["links"]) == 2
    assert [row.split(" | ")[1] for row in rows] == ["A", "B"]
    assert rows[-1].split(" | ")[5] == f"{results['links'][-1]['test']['accuracy']:.3f}"
    gain = 100 * results["summary"]["gain_over_link1"]
    assert f"Last link vs link 1 (single backbone): {gain:+.1f} points" in text
    assert "Last link vs pooled:" in text and "| pooled | all |" in text


def test_markdown_and_html_reference_the_plots_by_relative_path(run_dir: Path) -> None:
    markdown = (run_dir / "report.md").read_text()
    page = (run_dir / "report.html").read_text()
    for name in PNG_SIZES:
        assert f"]({name})" in markdown
        assert f'src="{name}"' in page
    assert str(run_dir) not in page and "staging" not in page


def test_seconds_column_is_left_out_without_timings(fresh_run: Path) -> None:
    (fresh_run / "timings.json").unlink()
    assert main(["report", str(fresh_run)]) == 0
    assert "seconds" not in (fresh_run / "report.md").read_text()


def test_missing_run_dir_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    code = main(["report", str(tmp_path / "absent")])
    assert code == 2
    assert "run dir not found" in _one_error_line(capsys.readouterr().err)


def test_run_dir_without_results_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    code = main(["report", str(tmp_path)])
    assert code == 2
    assert "results.json not found" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"links": [], "baselines": [], "classes": [], "summary": {}}'])
def test_malformed_results_exit_2_with_one_line_and_no_report(content: str, tmp_path: Path, capsys) -> None:
    (tmp_path / "results.json").write_text(content)
    code = main(["report", str(tmp_path)])
    assert code == 2
    assert "results" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "report.md").exists()


@pytest.mark.parametrize(("values", "chance", "expected"), [
    ([0.7, 0.9], 0.25, (0.2, 0.95)),  # four classes: chance 25% stays on the axis
    ([0.8, 0.85], 0.5, (0.45, 0.9)),
    ([0.98], 0.9, (0.8, 1.0)),  # at least 0.2 wide, never past 1
    ([0.02, 0.1], 0.5, (0.0, 0.55)),  # never below 0
])
def test_accuracy_axis_zooms_to_the_values_and_the_chance_level(values: list[float], chance: float,
                                                                 expected: tuple[float, float]) -> None:
    lo, hi = accuracy_range(values, chance)
    assert (lo, hi) == pytest.approx(expected)
    assert lo <= min([*values, chance]) and hi >= max([*values, chance]) and hi - lo >= 0.2 - 1e-9


def test_protocol_plot_marks_chance_and_zooms_to_the_accuracies(tmp_path: Path) -> None:
    summary = {"link1": {"mean": 0.72, "std": 0.04}, "chain_warm": {"mean": 0.84, "std": 0.02},
               "pooled": {"mean": 0.83, "std": 0.01}}
    plot_summary(summary, tmp_path / "plot.png", "two classes", n_classes=2)
    image = np.asarray(Image.open(tmp_path / "plot.png").convert("RGB")).astype(int)
    red = (image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] < 60)  # the chance line
    columns = np.flatnonzero(red.sum(0) > 50)
    assert columns.size and columns.max() - columns.min() < 6  # one vertical line
    # zoomed: bars start at the axis' left end (0.45, clipped), so chance (0.5) sits at 0.05/0.39 of the way to
    # the longest bar's end (0.84); on a 0–1 axis it would sit at 0.5/0.84 of it
    blue = np.flatnonzero(((np.abs(image - np.array([0x44, 0x77, 0xAA])) < 8).all(-1)).sum(0) > 20)
    left, bar_end = blue.min(), blue.max()
    assert 0.05 < (columns.mean() - left) / (bar_end - left) < 0.25
