"""The paper's protocol as a benchmark: the chain against its baselines, over several seeds.

On one dataset split into K sites, in one process, each seed trains: link 1 (the single
backbone), each site alone, pooled, cyclic weight transfer (warm start, no distillation), the
WeCKD chain from scratch and warm-started, FedAvg with the same total site-epochs, and an ensemble
of the warm chain's links. Every method is scored on the same held-out test split.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ChainConfig, LinkSettings, load_config
from .data import SiteData
from .errors import ConfigError
from .link import evaluate, model_from_state, predict_logits, score, train_link
from .models import pick_device
from .prepare import Prepared, prepare
from .privacy import student_arch
from .runner import ChainRun, link_seed, run_chain

log = logging.getLogger(__name__)

METHODS = (
    "link1",
    "site_alone_mean",
    "pooled",
    "cwt",
    "chain_scratch",
    "chain_warm",
    "fedavg",
    "ensemble",
)
LABELS = {
    "link1": "link 1 (single backbone)",
    "site_alone_mean": "each site alone (mean)",
    "pooled": "pooled (all sites' data)",
    "cwt": "cyclic weight transfer (warm, no KD)",
    "chain_scratch": "WeCKD chain, links from scratch",
    "chain_warm": "WeCKD chain, warm start + KD",
    "fedavg": "FedAvg (same site-epochs)",
    "ensemble": "ensemble of the chain's links",
}


@dataclass(frozen=True)
class SeedScores:
    seed: int
    test_accuracy: dict[str, float]


def with_links(cfg: ChainConfig, **changes: Any) -> ChainConfig:
    """The config with ``changes`` applied to the default and every per-link setting."""
    return dataclasses.replace(
        cfg,
        link=dataclasses.replace(cfg.link, **changes),
        links=tuple(dataclasses.replace(link, **changes) for link in cfg.links),
    )


def run_protocol(cfg: ChainConfig, seeds: list[int], methods: tuple[str, ...] = METHODS) -> list[SeedScores]:
    """Every method for every seed (the seed also draws the site split and the initial weights)."""
    out = []
    for seed in seeds:
        scfg = dataclasses.replace(cfg, seed=seed)
        data = prepare(scfg.data, scfg.chain.order, seed, scfg.chain.mode == "logits")
        scores = _one_seed(scfg, data, methods)
        log.info("seed %d: %s", seed, ", ".join(f"{k}={v:.3f}" for k, v in scores.items()))
        out.append(SeedScores(seed, scores))
    return out


def _one_seed(cfg: ChainConfig, data: Prepared, methods: tuple[str, ...]) -> dict[str, float]:
    scores: dict[str, float] = {}
    warm = run_chain(with_links(cfg, init="predecessor"), data)
    scores["link1"] = warm.links[0].test.accuracy
    scores["chain_warm"] = warm.final.test.accuracy
    sites = [r.test.accuracy for r in warm.baselines if r.kind == "site"]
    if sites:
        scores["site_alone_mean"] = statistics.fmean(sites)
    pooled = [r.test.accuracy for r in warm.baselines if r.kind == "pooled"]
    if pooled:
        scores["pooled"] = pooled[0]
    no_baselines = dataclasses.replace(cfg.baselines, sites=False, pooled=False)
    if "cwt" in methods:
        cwt_cfg = dataclasses.replace(with_links(cfg, init="predecessor", alpha=1.0), baselines=no_baselines)
        scores["cwt"] = run_chain(cwt_cfg, data).final.test.accuracy
    if "chain_scratch" in methods:
        scratch_cfg = dataclasses.replace(with_links(cfg, init="scratch"), baselines=no_baselines)
        scores["chain_scratch"] = run_chain(scratch_cfg, data).final.test.accuracy
    if "fedavg" in methods:
        scores["fedavg"] = fedavg(cfg, data)
    if "ensemble" in methods:
        scores["ensemble"] = ensemble_accuracy(warm, data)
    return {k: v for k, v in scores.items() if k in methods}


def fedavg(cfg: ChainConfig, data: Prepared) -> float:
    """FedAvg with the chain's total site-epochs: ``epochs × cycles`` rounds of one local epoch each."""
    device = pick_device(cfg.runtime.device)
    settings: LinkSettings = dataclasses.replace(cfg.link_settings(0), epochs=1, init="scratch")
    rounds = cfg.link.epochs * cfg.chain.cycles
    torch.manual_seed(link_seed(cfg.seed, 0))
    global_state: dict[str, torch.Tensor] | None = None
    for r in range(rounds):
        states, weights = [], []
        for i, name in enumerate(cfg.chain.order):
            site: SiteData = data.sites[name]
            result = train_link(
                settings,
                site,
                data.spec,
                seed=link_seed(cfg.seed, r * len(cfg.chain.order) + i),
                device=device,
                augment_images=cfg.data.augment,
                label=f"fedavg round {r + 1}/{rounds} site {name}",
                initial_state=global_state,
            )
            states.append(result.state)
            weights.append(len(site.train))
        global_state = average_states(states, weights)
    assert global_state is not None
    model = model_from_state(student_arch(settings), global_state, data.spec, device)
    return evaluate(model, data.test, len(data.spec.classes), device).accuracy


def average_states(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    """Sample-weighted average of floating-point tensors; integer buffers come from the first."""
    total = float(sum(weights))
    out: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = torch.stack([s[key] * (w / total) for s, w in zip(states, weights)]).sum(0)
        else:
            out[key] = first.clone()
    return out


def ensemble_accuracy(run: ChainRun, data: Prepared) -> float:
    """Test accuracy of the mean softmax of every link's model."""
    device = pick_device(run.config.runtime.device)
    probs = None
    for row in run.links:
        model = model_from_state(row.arch, row.result.state, data.spec, device)
        p = predict_logits(model, data.test.images, device).softmax(1)
        probs = p if probs is None else probs + p
    assert probs is not None
    return score(probs.argmax(1), data.test.labels, len(data.spec.classes)).accuracy


def summarise(results: list[SeedScores]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation (over seeds) of each method's test accuracy."""
    out = {}
    for method in METHODS:
        values = [r.test_accuracy[method] for r in results if method in r.test_accuracy]
        if values:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            out[method] = {"mean": statistics.fmean(values), "std": std, "n": len(values)}
    return out


def markdown_table(summary: dict[str, dict[str, float]], title: str) -> str:
    lines = [f"### {title}", "", "| method | test accuracy (mean ± std) | seeds |", "|---|---|---|"]
    for method, s in summary.items():
        lines.append(f"| {LABELS[method]} | {100 * s['mean']:.1f} ± {100 * s['std']:.1f} | {s['n']} |")
    if "chain_warm" in summary and "pooled" in summary:
        gap = 100 * (summary["chain_warm"]["mean"] - summary["pooled"]["mean"])
        gain = 100 * (summary["chain_warm"]["mean"] - summary["link1"]["mean"])
        lines += ["", f"Chain (warm + KD) vs link 1: {gain:+.1f} points; vs pooled: {gap:+.1f} points."]
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict[str, dict[str, float]], path: Path, title: str) -> None:
    """A bar chart of mean test accuracy with ±std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    ax.barh([LABELS[n] for n in names], [summary[n]["mean"] for n in names],
            xerr=[summary[n]["std"] for n in names], color="#4477aa")
    ax.set_xlabel("test accuracy")
    ax.set_xlim(0, 1)
    ax.set_title(title)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)



@dataclass(frozen=True)
class Variant:
    """A named set of config overrides (``key=value``) for the ablation."""

    name: str
    overrides: tuple[str, ...]


def parse_variant(text: str) -> Variant:
    """``NAME:key=value,key=value`` (an empty override list is the config as it is)."""
    name, _, rest = text.partition(":")
    overrides = tuple(item.strip() for item in rest.split(",") if item.strip())
    if not name.strip() or any("=" not in o for o in overrides):
        raise ConfigError(f"--variant {text!r}: expected NAME:key=value,key=value")
    return Variant(name.strip(), overrides)


def run_ablation(path: str, base: tuple[str, ...], seeds: list[int], variants: list[Variant]) -> dict[str, Any]:
    """Last-link test accuracy of every variant per seed, with link 1 and pooled as references."""
    per_seed: list[dict[str, float]] = []
    for seed in seeds:
        cfg = load_config(path, (*base, f"seed={seed}"))
        data = prepare(cfg.data, cfg.chain.order, seed, cfg.chain.mode == "logits")
        ref = run_chain(dataclasses.replace(cfg, baselines=dataclasses.replace(cfg.baselines, sites=False)), data)
        scores = {"link1": ref.links[0].test.accuracy,
                  "pooled": next(r.test.accuracy for r in ref.baselines if r.kind == "pooled")}
        for v in variants:
            vcfg = load_config(path, (*base, f"seed={seed}", *v.overrides))
            vcfg = dataclasses.replace(vcfg, baselines=dataclasses.replace(vcfg.baselines, sites=False, pooled=False))
            scores[v.name] = run_chain(vcfg, data).final.test.accuracy
        log.info("ablation seed %d: %s", seed, ", ".join(f"{k}={v:.3f}" for k, v in scores.items()))
        per_seed.append(scores)
    return {"seeds": seeds, "variants": {v.name: list(v.overrides) for v in variants}, "per_seed": per_seed}


def ablation_table(result: dict[str, Any], title: str) -> str:
    """Mean ± std per variant, its gain over link 1 and its gap to pooled (points)."""

    def stats(key: str) -> tuple[float, float]:
        values = [s[key] for s in result["per_seed"]]
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    link1, pooled = stats("link1")[0], stats("pooled")[0]
    lines = [f"### {title}", "", "| variant | overrides | last-link test acc | vs link 1 | vs pooled |",
             "|---|---|---|---|---|"]
    for key, label in (("link1", "link 1 (reference)"), ("pooled", "pooled (reference)")):
        mean, std = stats(key)
        lines.append(f"| {label} | | {100 * mean:.1f} ± {100 * std:.1f} | | |")
    for name, overrides in result["variants"].items():
        mean, std = stats(name)
        lines.append(f"| {name} | {', '.join(overrides) or '(config as is)'} | {100 * mean:.1f} ± {100 * std:.1f} "
                     f"| {100 * (mean - link1):+.1f} | {100 * (mean - pooled):+.1f} |")
    return "\n".join(lines) + "\n"
