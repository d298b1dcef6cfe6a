"""``weckd bench perf``: part selection, the trainer part, the memory and relay parts' figures and checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from weckd.chain.cli import main
from weckd.chain.perf import PerfOptions, ThroughputResult
from weckd.server import perf_memory, perf_relay

from .helpers import TINY_CHAIN, write_yaml


def test_unknown_part_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                               ) -> None:
    out = tmp_path / "perf"
    assert main(["bench", "perf", "-o", str(out), "--parts", "trainer,speed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown part(s) speed" in err[0] and "federation" in err[0]
    assert not out.exists()


def test_a_bad_relay_config_exits_2_before_anything_is_measured(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "perf"
    rc = main(["bench", "perf", "-o", str(out), "--parts", "trainer,relay", "--relay-config",
               str(tmp_path / "missing.yaml")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.yaml" in err[0]
    assert not out.exists()


def test_trainer_part_writes_its_table_and_a_checked_ratio(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    out = tmp_path / "perf"
    out.mkdir()
    earlier = {"part": "memory", "what": "ServerApp anon peak", "measured": "0.5%", "target": "≤ 10%", "met": True}
    (out / "checks-memory.json").write_text(json.dumps({"date": "2026-01-02", "checks": [earlier]}))
    rc = main(["bench", "perf", "-o", str(out), "--parts", "trainer", "--arch", "test_resnet", "--size", "32",
               "--images", "48", "--epochs", "1", "--reps", "1", "--device", "cpu"])
    assert rc == 0
    rows = json.loads((out / "trainer.json").read_text())["rows"]
    assert [r["arch"] for r in rows] == ["test_resnet"]
    assert rows[0]["trainer"][0] > 0 and rows[0]["bare"][0] > 0
    summary = (out / "summary.md").read_text()
    assert f"| trainer | test_resnet trainer / bare loop images/s | {rows[0]['ratio']:.3f}× | ≥ 0.95× |" in summary
    assert "Machine:" in summary and "| 32 | 32 |" in (out / "trainer.md").read_text()
    # an earlier part measured into the same folder stays in the summary, with its date
    assert "| memory | ServerApp anon peak | 0.5% | ≤ 10% | yes |" in summary and "memory (2026-01-02)" in summary


def test_trainer_ratio_pairs_each_repetition() -> None:
    result = ThroughputResult("a", 32, 8, 64, 1, 2, trainer=[100.0, 50.0, 90.0], bare=[100.0, 60.0, 80.0])
    assert result.ratio == pytest.approx(1.0)  # median of 1.0, 0.833, 1.125; medians alone would give 1.125


def _run(links: int, superlink: int, server: int = 48_000) -> dict[str, Any]:
    return {"links": links, "seconds": 1.0,
            "peak_anon_kib": {"superlink": superlink, "weckd-server": server},
            "peak_hwm_kib": {"superlink": superlink * 2, "weckd-server": 1}}


def test_memory_checks_use_the_largest_deviation_from_the_first_run() -> None:
    runs = [_run(3, 500_000), _run(10, 480_000), _run(30, 560_000)]
    assert perf_memory._deviation(runs, "superlink", "peak_anon_kib") == pytest.approx(12.0)
    total = (560_000 + 48_000) / (500_000 + 48_000) - 1
    assert perf_memory._deviation(runs, "total", "peak_anon_kib") == pytest.approx(100 * total)
    text = perf_memory.report(runs)
    assert "| 30 | 546.9 (+12.0%) |" in text and "first run (3 links)" in text


def test_memory_part_flags_a_growth_over_ten_percent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = {3: 500_000, 30: 560_000}
    monkeypatch.setattr(perf_memory, "one_run", lambda n, root: _run(n, sizes[n]))
    checks = perf_memory.memory_part(PerfOptions(out=tmp_path, links=(3, 30)))
    by_what = {c.what.split(" peak")[0]: c for c in checks}
    superlink = by_what["SuperLink + ServerApp anon"]
    assert not superlink.met and superlink.measured == "12.0%"
    assert by_what["weckd-server anon"].met
    assert json.loads((tmp_path / "memory.json").read_text())["runs"][1]["links"] == 30


def test_compression_reports_its_ratio_and_break_even() -> None:
    torch.manual_seed(0)
    state = {"w": torch.randn(64, 64), "b": torch.zeros(64), "n": torch.tensor(5)}
    c = perf_relay.compression(state, "test_resnet")
    assert 0.0 < c["ratio"] < 1.0  # the zero bias and the exponent byte plane compress
    assert c["compressed_bytes"] < c["raw_bytes"] and c["break_even_mbit_s"] > 0


def test_relay_part_compares_wire_dtypes_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fed = {wire: [{"link": 1, "bytes_to_site": 0, "bytes_from_site": size},
                  {"link": 2, "bytes_to_site": size, "bytes_from_site": size}]
           for wire, size in (("float32", 1_000_000), ("float16", 504_500))}
    monkeypatch.setattr(perf_relay, "federation_bytes", lambda: fed)
    cfg = write_yaml(tmp_path / "tiny.yaml", TINY_CHAIN)
    checks = perf_relay.relay_part(PerfOptions(out=tmp_path / "perf", seeds=1, relay_configs=(str(cfg),)))
    data = json.loads((tmp_path / "perf" / "relay.json").read_text())
    runs = data["configs"][str(cfg)]
    assert {r["wire"] for r in runs} == {"float32", "float16"}
    r32, r16 = (next(r for r in runs if r["wire"] == w) for w in ("float32", "float16"))
    assert r16["float_bytes"] * 2 == r32["float_bytes"]
    assert 0.5 < r16["payload_bytes"] / r32["state_dict_bytes"] < 0.501  # int64 counters travel as they are
    sealed = next(c for c in checks if c.what.startswith("federation"))
    assert sealed.measured == "0.5045×" and not sealed.met
    assert "Compression of the float16 payload" in (tmp_path / "perf" / "relay.md").read_text()


def test_coordinator_part_counts_everything_but_the_training_executor_while_a_link_trains() -> None:
    from weckd.server.perf_coordinator import Tick, coordinator_peak_mb, quiet_shares

    roles = {1: "executor", 2: "executor", 3: "superlink", 4: "supernode", 5: "serverapp", 6: "weckd-server",
             7: "flwr-cli", 8: "report"}
    idle = {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0, 5: 0.0, 6: 0.0}
    ticks = [Tick(0.0, idle, {3: 200.0, 5: 150.0, 6: 40.0, 7: 60.0, 1: 800.0}, ""),  # the flwr CLI submits
             Tick(1.0, idle, {3: 210.0, 5: 150.0, 6: 40.0}, "A"),  # A starts training
             Tick(11.0, {1: 9.5, 2: 0.1, 3: 0.3, 4: 0.05, 5: 0.05, 6: 0.0}, {3: 230.0, 5: 160.0, 6: 40.0}, "A"),
             Tick(12.0, {1: 9.6, 2: 0.1, 3: 0.3, 4: 0.05, 5: 0.05, 6: 0.0}, {3: 220.0, 5: 180.0, 6: 40.0, 8: 30.0}, "")]
    [window] = quiet_shares(ticks, roles)
    assert window["seconds"] == 10.0 and window["training_pct"] == pytest.approx(95.0)
    assert window["others_pct"] == pytest.approx(5.0)  # 0.5 CPU-s of the others over 10 s
    assert window["by_role"]["superlink"] == pytest.approx(3.0) and window["by_role"]["executor"] == pytest.approx(1.0)
    total, by_role = coordinator_peak_mb(ticks, roles)
    assert total == 470.0  # the peak of the sum: 450 at t=0 (the flwr CLI counts), 470 at t=12 (the report's child)
    assert by_role == {"weckd-server": 40.0, "superlink": 230.0, "superexec": 0.0, "serverapp": 180.0,
                       "flwr-cli": 60.0, "report": 30.0}


def test_a_process_that_lives_only_within_the_window_counts_too() -> None:
    """A ``flwr ls`` weckd-server runs while a link trains: seen only in the middle samples, its CPU counts."""
    from weckd.server.perf_coordinator import Tick, quiet_shares

    roles = {1: "executor", 7: "flwr-cli"}
    ticks = [Tick(0.0, {1: 0.0}, {}, ""), Tick(1.0, {1: 0.0}, {}, "A"),
             Tick(5.0, {1: 4.0, 7: 0.3}, {}, "A"), Tick(6.0, {1: 5.0, 7: 0.6}, {}, "A"),  # born after t=1, gone by t=11
             Tick(11.0, {1: 10.0}, {}, "A"), Tick(12.0, {1: 10.0}, {}, "")]
    [window] = quiet_shares(ticks, roles)
    assert window["by_role"] == {"flwr-cli": pytest.approx(6.0)}  # 0.6 CPU-s over the 10 s window


def test_the_large_part_measures_state_apart_from_the_models_a_site_received(tmp_path: Path) -> None:
    from weckd.server.perf_large import _sizes, checks

    (tmp_path / "state" / "server" / "chain").mkdir(parents=True)
    (tmp_path / "state" / "server" / "chain" / "relay-0.bin").write_bytes(b"x" * 2**20)
    (tmp_path / "state" / "site-A" / "delivered" / "run1").mkdir(parents=True)
    (tmp_path / "state" / "site-A" / "delivered" / "run1" / "model.safetensors").write_bytes(b"x" * 3 * 2**20)
    (tmp_path / "state" / "site-A" / "runs.json").write_bytes(b"x" * 2**20)
    first = _sizes(tmp_path)
    assert first == {"server": 1.0, "site-A": 1.0, "site-A/delivered": 3.0}
    later = {**first, "site-A/delivered": 400.0}  # two more models received: outputs, not state
    ok = checks({"arch": "a", "chains": [{"state_mb": first}, {"state_mb": first}, {"state_mb": later}]})
    assert [c.met for c in ok] == [True, True, True]
    grown = checks({"arch": "a", "chains": [{"state_mb": first}, {"state_mb": first},
                                            {"state_mb": {**first, "server": 336.0}}]})
    assert [c.met for c in grown] == [True, False, True] and grown[1].measured == "+335.0 MB"


def test_federation_part_reports_the_wide_mode_against_the_same_target() -> None:
    from weckd.server.perf_federation import WIDE, Samples, federation_checks, report

    def samples(fixed: float) -> Samples:
        return Samples(fixed=[fixed] * 3, local=[1.0] * 3, trips=[1.0 + fixed] * 3, to_site=[0, 10, 10],
                       from_site=[10] * 3, walls=[60.0])

    modes = {"sealed": samples(1.2), "unsealed": samples(1.4), WIDE: samples(2.0)}
    checks = {c.what: c for c in federation_checks(modes)}
    wide = checks[f"fixed cost per link, {WIDE}"]
    assert wide.measured == "2.00 s" and not wide.met
    assert checks["fixed cost per link, sealed"].met and checks["fixed cost per link, unsealed"].met
    text = report(3, modes)
    assert f"| quantity | sealed | unsealed | {WIDE} |" in text and "evaluate: all" in text


def test_links_are_timed_in_process_from_the_chain_a_federation_was_made_from(tmp_path: Path) -> None:
    from weckd.server.perf_federation import in_process_seconds
    from weckd.server.scaffold import chain_settings

    chain = chain_settings({"link": {"epochs": 1, "arch": "test_resnet"}, "data": {"synthetic": {"samples": 120}}})
    plain = in_process_seconds(tmp_path, chain)
    scored = in_process_seconds(tmp_path, chain, evaluate_all=True)
    assert len(plain) == len(scored) == 3 and all(s > 0 for s in plain + scored)


def test_the_coordinator_watch_tells_a_child_by_its_command_line_after_exec(tmp_path: Path) -> None:
    """A child seen between fork and exec shows its parent's command line (weckd-client): once it has exec'd
    (the site's executor) the watch counts it under its own role, not the supervisor's."""
    import subprocess
    import sys
    import time

    from weckd.server.perf_coordinator import Watch

    code = ("import os, sys, time; time.sleep(0.6); "
            "os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(5)', "
            "'weckd.client.' + 'executor', sys.argv[2]])")
    child = subprocess.Popen([sys.executable, "-c", code, "weckd-client", str(tmp_path)])
    try:
        watch = Watch(tmp_path, [])
        seen = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "executor" not in seen:
            watch._tick()
            seen.append(watch.roles.get(child.pid, ""))
            time.sleep(0.05)
        roles = [r for r in seen if r]  # "": not yet exec'd into the child's own interpreter at the first looks
        assert roles[0] == "site-supervisor" and roles[-1] == "executor"
    finally:
        child.kill()
        child.wait()
