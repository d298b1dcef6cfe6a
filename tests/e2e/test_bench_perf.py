"""``weckd bench perf`` runs its federation parts on real federations (weckd-server + weckd-client
processes on loopback) and writes their figures and checks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.bench]  # four federations, ~4 min: -m bench


def test_federation_and_memory_parts_measure_real_federations(tmp_path: Path) -> None:
    out = tmp_path / "perf"
    run = subprocess.run([str(Path(sys.executable).with_name("weckd")), "bench", "perf", "-o", str(out),
                          "--parts", "federation,memory", "--reps", "1", "--links", "1", "2"],
                         capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]

    fed = json.loads((out / "federation.json").read_text())["modes"]
    for mode in ("sealed", "unsealed"):
        assert len(fed[mode]["trips"]) == 3  # one run of three links per mode
        assert all(trip > local > 0 for trip, local in zip(fed[mode]["trips"], fed[mode]["local"]))
        assert fed[mode]["to_site"][0] == 0 and min(fed[mode]["to_site"][1:]) > 100_000  # teachers from link 2
    runs = json.loads((out / "memory.json").read_text())["runs"]
    assert [r["links"] for r in runs] == [1, 2]
    # the ServerApp holds Flower and the relayed bytes, never torch: tens of MiB of its own, under its peak RSS
    assert all(10 * 1024 < r["peak_anon_kib"]["serverapp"] < r["peak_hwm_kib"]["serverapp"] for r in runs)
    summary = (out / "summary.md").read_text()
    assert "| federation | fixed cost per link, sealed |" in summary
    assert "| memory | ServerApp anon peak, 1–2 links: largest deviation from 1 links |" in summary
