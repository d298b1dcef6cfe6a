"""The protocol benchmark's pieces: FedAvg averaging, per-method runs and the summary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from weckd.chain.bench import (
    METHODS,
    ablation_jobs,
    ablation_result,
    ablation_table,
    average_states,
    compute,
    markdown_table,
    paired,
    parse_variant,
    run_ablation,
    run_job,
    run_jobs,
    run_protocol,
    summarise,
    with_links,
)
from weckd.chain.config import load_config
from weckd.chain.errors import ConfigError

from .helpers import TINY_CHAIN, deep_merge, write_yaml


def test_average_states_weights_floats_by_samples_and_keeps_integer_buffers() -> None:
    a = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 0.0]), "n": torch.tensor(9)}
    avg = average_states([a, b], [1, 3])
    assert torch.allclose(avg["w"], torch.tensor([3.0, 1.0]))
    assert int(avg["n"]) == 3


def test_with_links_changes_default_and_every_override(tmp_path: Path) -> None:
    cfg = load_config(write_yaml(tmp_path / "c.yaml", deep_merge(TINY_CHAIN, {"links": [{"epochs": 2}]})))
    changed = with_links(cfg, alpha=1.0)
    assert changed.link.alpha == 1.0 and changed.links[0].alpha == 1.0 and changed.links[0].epochs == 2


def test_protocol_scores_every_method_for_every_seed(tmp_path: Path) -> None:
    cfg = load_config(write_yaml(tmp_path / "c.yaml", TINY_CHAIN))
    results = run_protocol(cfg, [0, 1])
    assert [r.seed for r in results] == [0, 1]
    for r in results:
        assert set(r.test_accuracy) == set(METHODS)
        assert all(0.0 <= v <= 1.0 for v in r.test_accuracy.values())
    summary = summarise(results)
    assert summary["pooled"]["n"] == 2
    assert summary["link1"]["mean"] == pytest.approx(sum(r.test_accuracy["link1"] for r in results) / 2)
    diffs = paired(results)
    chain_minus_cwt = [r.test_accuracy["chain_warm"] - r.test_accuracy["cwt"] for r in results]
    assert diffs["cwt"]["mean"] == pytest.approx(sum(chain_minus_cwt) / 2)
    assert diffs["cwt"]["below"] == sum(d < 0 for d in chain_minus_cwt)
    cost = {m: compute(cfg, m) for m in summary}
    assert cost["chain_warm"] == cost["cwt"] == 2 * 1 and cost["pooled"] == 2 and cost["link1"] == 1
    table = markdown_table(summary, "tiny", cost, diffs)
    assert "WeCKD chain, warm start + KD" in table and "pooled, AdamW" in table and "seeds below" in table


def test_compute_counts_site_epochs_at_equal_budget(tmp_path: Path) -> None:
    cfg = load_config(write_yaml(tmp_path / "c.yaml", deep_merge(TINY_CHAIN, {
        "chain": {"order": ["A", "B", "C", "D"], "cycles": 5}, "link": {"epochs": 3}})))
    assert compute(cfg, "chain_warm") == 60 == compute(cfg, "pooled") == compute(cfg, "fedavg")
    assert compute(cfg, "link1") == compute(cfg, "site_alone_mean") == 15  # a site's share of the chain


def test_variant_parses_name_and_overrides() -> None:
    v = parse_variant("alpha 0.8:link.alpha=0.8, chain.lr_decay=0.5")
    assert v.name == "alpha 0.8" and v.overrides == ("link.alpha=0.8", "chain.lr_decay=0.5")
    assert parse_variant("as is:").overrides == ()


def test_malformed_variant_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="expected NAME:key=value"):
        parse_variant("alpha:link.alpha")


def test_ablation_scores_chain_and_pooled_variants_with_paired_differences(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", deep_merge(TINY_CHAIN, {"baselines": {"sites": False, "pooled": False}}))
    variants = [parse_variant("cwt:link.alpha=1.0"), parse_variant("chain-schedule:link.lr_schedule=chain"),
                parse_variant("pooled-adamw:pooled,link.optimizer=adamw,link.lr=0.001")]
    result = run_ablation(str(path), (), [0, 1], variants)
    assert [sorted(s) for s in result["per_seed"]] == [sorted(["link1", "pooled", "cwt", "chain-schedule",
                                                               "pooled-adamw"])] * 2
    assert all(0.0 <= v <= 1.0 for s in result["per_seed"] for v in s.values())
    table = ablation_table(result, "tiny", reference="cwt")
    d = [s["chain-schedule"] - s["cwt"] for s in result["per_seed"]]
    row = next(line for line in table.splitlines() if line.startswith("| chain-schedule"))
    assert f"{100 * sum(d) / 2:+.1f} ± " in row and f"({sum(x < 0 for x in d)} below)" in row


def test_ablation_in_worker_processes_scores_what_one_process_scores(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", deep_merge(TINY_CHAIN, {"baselines": {"sites": False, "pooled": False}}))
    variants = [parse_variant("cwt:link.alpha=1.0"), parse_variant("pooled-adamw:pooled,link.optimizer=adamw")]
    assert [(j.seed, j.name) for j in ablation_jobs([0, 1], variants)] == [
        (s, n) for s in (0, 1) for n in ("link1", "pooled", "cwt", "pooled-adamw")]
    jobs = ablation_jobs([0], variants)[1:]  # pooled, a chain variant and a pooled one (link1 has its own tests)
    heard: list[tuple[int, str, float]] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # what each of the 2 workers gets
    try:
        alone = [run_job(str(path), (), job) for job in jobs]
    finally:
        torch.set_num_threads(threads)
    pooled = run_jobs([(str(path), (), job) for job in jobs], workers=2,
                      done=lambda _p, _b, job, score, seconds: heard.append((job.seed, job.name, score)))
    assert pooled == alone
    assert sorted(heard) == sorted((j.seed, j.name, s) for j, s in zip(jobs, alone))
    result = ablation_result([0], variants, jobs, pooled)
    assert result["per_seed"] == [{j.name: s for j, s in zip(jobs, pooled)}]
