"""The report as a hospital opens it: ``report.html`` rendered by headless Chromium (the Debian package
``chromium``, which ``.ci/run`` installs) to a PNG, with its three plots loaded, against the same page
whose plot files are missing."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from weckd.chain.cli import main
from weckd.chain.report import PNG_SIZES

from ..unit.helpers import TINY_CHAIN, write_yaml

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# matplotlib's first two line colours (val and test per link; the loss curves) and the dark end of the
# confusion matrix's "Blues"
LINES = (np.array([0x1F, 0x77, 0xB4]), np.array([0xFF, 0x7F, 0x0E]))
MATRIX = np.array([0x08, 0x30, 0x6B])


def _screenshot(page: Path, out: Path) -> np.ndarray:
    width = max(w for w, _ in PNG_SIZES.values()) + 100
    run = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         f"--user-data-dir={out.parent / 'chromium-profile'}", f"--screenshot={out}",
         f"--window-size={width},2600", page.as_uri()],
        capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert run.returncode == 0 and out.is_file(), run.stderr[-2000:]
    return np.asarray(Image.open(out).convert("RGB")).astype(int)


def _pixels(image: np.ndarray, colour: np.ndarray) -> int:
    return int((np.abs(image - colour) <= 12).all(-1).sum())


def test_the_report_renders_in_chromium_with_its_plots(tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian package chromium; .ci/run installs it)")
    cfg = write_yaml(tmp_path / "c.yaml", TINY_CHAIN)
    run = tmp_path / "run"
    assert main(["chain", "-c", str(cfg), "-o", str(run)]) == 0
    shown = _screenshot(run / "report.html", tmp_path / "report.png")
    broken = tmp_path / "broken"  # the page alone: its <img> files missing
    broken.mkdir()
    shutil.copy(run / "report.html", broken / "report.html")
    missing = _screenshot(broken / "report.html", tmp_path / "broken.png")
    for colour in (*LINES, MATRIX):
        assert _pixels(shown, colour) > 300, f"colour {colour} of the plots not on the rendered page"
        assert _pixels(missing, colour) < 20  # the check tells a page without its plots apart
    # the page is not blank around the plots: the tables render as text (dark pixels) above them
    assert (shown[: shown.shape[0] // 4].sum(-1) < 200).sum() > 500
