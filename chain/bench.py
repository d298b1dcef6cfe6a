"""The paper's protocol as a benchmark: the chain against its baselines, over several seeds.

On one dataset split into K sites, in one process, each seed trains: link 1 (the single
backbone), each site alone, pooled, cyclic weight transfer (warm start, no distillation), the
WeCKD chain from scratch and warm-started, FedAvg with the same total site-epochs, and an ensemble
of the warm chain's links. Every method is scored on the same held-out test split.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
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
from .rounds import fedavg_rounds
from .runner import ChainRun, link_seed, pooled_rows, run_chain

log = logging.getLogger(__name__)

METHODS = (
    "link1",
    "site_alone_mean",
    "pooled",
    "pooled_adamw",
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
    "pooled_adamw": "pooled, AdamW lr 1e-3 + cosine (reference)",
    "cwt": "cyclic weight transfer (warm, no KD)",
    "chain_scratch": "WeCKD chain, links from scratch",
    "chain_warm": "WeCKD chain, warm start + KD (delivered model)",
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


# the plain pooled reference the shipped recipe's pooled baseline is held against (issue: no winning by a
# weak baseline): AdamW, lr 1e-3, weight decay 0.05, a cosine schedule, the same epochs
ADAMW_REFERENCE = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "lr_schedule": "link"}


def compute(cfg: ChainConfig, method: str) -> int:
    """The site-epochs a method trains (one epoch over one site's training images is one site-epoch)."""
    sites, epochs = len(cfg.chain.order), sum(cfg.link_settings(k).epochs for k in range(cfg.n_links))
    cycles = cfg.chain.cycles
    first = cfg.link_settings(0).epochs * cycles
    last = cfg.link_settings(cfg.n_links - 1).epochs * cycles
    return {"link1": first, "site_alone_mean": first, "pooled": last * sites, "pooled_adamw": last * sites,
            "fedavg": fedavg_rounds(cfg.link.epochs, cycles) * sites}.get(method, epochs)


def _one_seed(cfg: ChainConfig, data: Prepared, methods: tuple[str, ...]) -> dict[str, float]:
    scores: dict[str, float] = {}
    warm = run_chain(with_links(cfg, init="predecessor"), data)
    scores["chain_warm"] = warm.final.test.accuracy
    sites = {r.site: r.test.accuracy for r in warm.baselines if r.kind == "site"}
    if sites:
        scores["site_alone_mean"] = statistics.fmean(sites.values())
    scores["link1"] = sites[cfg.chain.order[0]] if sites else single_backbone(cfg, data)
    pooled = [r.test.accuracy for r in warm.baselines if r.kind == "pooled"]
    if pooled:
        scores["pooled"] = pooled[0]
    no_baselines = dataclasses.replace(cfg.baselines, sites=False, pooled=False)
    if "pooled_adamw" in methods:
        ref = dataclasses.replace(with_links(cfg, **ADAMW_REFERENCE),
                                  baselines=dataclasses.replace(cfg.baselines, sites=False, pooled=True))
        scores["pooled_adamw"] = _pooled_only(ref, data)
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


def single_backbone(cfg: ChainConfig, data: Prepared) -> float:
    """Test accuracy of link 1's site trained alone (its whole schedule, no teacher): the paper's baseline."""
    device = pick_device(cfg.runtime.device)
    name = cfg.chain.order[0]
    settings = cfg.link_settings(0)
    settings = dataclasses.replace(settings, init="scratch", epochs=settings.epochs * cfg.chain.cycles)
    result = train_link(settings, data.sites[name], data.spec,
                        seed=link_seed(cfg.seed, 0), device=device, augment_images=cfg.data.augment,
                        label=f"baseline site {name} alone")
    model = model_from_state(result.arch, result.state, data.spec, device)
    return evaluate(model, data.test, len(data.spec.classes), device).accuracy


def _pooled_only(cfg: ChainConfig, data: Prepared) -> float:
    """The pooled baseline of ``cfg`` alone (no chain)."""
    device = pick_device(cfg.runtime.device)
    rows = pooled_rows(cfg, data, device)
    return rows[0].test.accuracy


def fedavg(cfg: ChainConfig, data: Prepared) -> float:
    """FedAvg with the chain's total site-epochs: ``epochs × cycles`` rounds of one local epoch each."""
    device = pick_device(cfg.runtime.device)
    settings: LinkSettings = dataclasses.replace(cfg.link_settings(0), epochs=1, init="scratch")
    rounds = fedavg_rounds(cfg.link.epochs, cfg.chain.cycles)
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


PAIRED = ("link1", "cwt", "pooled", "pooled_adamw")


def paired(results: list[SeedScores], method: str = "chain_warm") -> dict[str, dict[str, float]]:
    """Per-seed differences ``method − other`` for the references: mean, std, and the seeds where it is below."""
    out = {}
    for other in PAIRED:
        diffs = [r.test_accuracy[method] - r.test_accuracy[other] for r in results
                 if method in r.test_accuracy and other in r.test_accuracy]
        if diffs:
            out[other] = {"mean": statistics.fmean(diffs), "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                          "below": sum(d < 0 for d in diffs), "n": len(diffs)}
    return out


def markdown_table(summary: dict[str, dict[str, float]], title: str, compute: dict[str, int] | None = None,
                   diffs: dict[str, dict[str, float]] | None = None) -> str:
    """The protocol table: accuracy (mean ± std) and compute (site-epochs) per method, then the paired
    per-seed differences of the chain against link 1, CWT and pooled."""
    compute = compute or {}
    lines = [f"### {title}", "", "| method | test accuracy (mean ± std) | site-epochs | seeds |", "|---|---|---|---|"]
    for method, s in summary.items():
        lines.append(f"| {LABELS[method]} | {100 * s['mean']:.1f} ± {100 * s['std']:.1f} | "
                     f"{compute.get(method, '')} | {s['n']} |")
    if diffs:
        lines += ["", "Paired per-seed differences, chain (delivered model) − reference, in points:", "",
                  "| reference | mean ± std | seeds below |", "|---|---|---|"]
        for other, d in diffs.items():
            lines.append(f"| {LABELS[other]} | {100 * d['mean']:+.1f} ± {100 * d['std']:.1f} | "
                         f"{d['below']} of {d['n']} |")
    elif "chain_warm" in summary and "pooled" in summary and "link1" in summary:
        gap = 100 * (summary["chain_warm"]["mean"] - summary["pooled"]["mean"])
        gain = 100 * (summary["chain_warm"]["mean"] - summary["link1"]["mean"])
        lines += ["", f"Chain (warm + KD) vs link 1: {gain:+.1f} points; vs pooled: {gap:+.1f} points."]
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict[str, dict[str, float]], path: Path, title: str, n_classes: int) -> None:
    """A bar chart of mean test accuracy with ±std error bars, zoomed to the accuracies, chance marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import accuracy_range

    names = list(summary)
    chance = 1.0 / n_classes
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    ax.barh([LABELS[n] for n in names], [summary[n]["mean"] for n in names],
            xerr=[summary[n]["std"] for n in names], color="#4477aa")
    ax.axvline(chance, color="red", linestyle=":", linewidth=1.5, label=f"chance ({chance:.0%})")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("test accuracy")
    ends = [summary[n]["mean"] + s * summary[n]["std"] for n in names for s in (-1, 1)]
    ax.set_xlim(*accuracy_range(ends, chance))
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
    """``NAME:key=value,key=value`` (an empty override list is the config as it is); the bare word
    ``pooled`` among the overrides makes it a pooled-only variant (one model on all sites' data)."""
    name, _, rest = text.partition(":")
    overrides = tuple(item.strip() for item in rest.split(",") if item.strip())
    if not name.strip() or any("=" not in o and o != POOLED for o in overrides):
        raise ConfigError(f"--variant {text!r}: expected NAME:key=value,key=value (or the word pooled)")
    return Variant(name.strip(), overrides)


POOLED = "pooled"


@dataclass(frozen=True)
class AblationJob:
    """One model of an ablation: a seed and a variant (or a reference: ``link1``, ``pooled``)."""

    seed: int
    name: str
    overrides: tuple[str, ...] = ()


REFERENCES = ("link1", "pooled")


def ablation_jobs(seeds: list[int], variants: list[Variant]) -> list[AblationJob]:
    """Every model an ablation trains, seed by seed, the references first."""
    return [job for seed in seeds for job in (
        *(AblationJob(seed, ref) for ref in REFERENCES),
        *(AblationJob(seed, v.name, v.overrides) for v in variants),
    )]


def run_job(path: str, base: tuple[str, ...], job: AblationJob) -> float:
    """Test accuracy of one ablation model: link 1 (the first site alone, its whole budget), pooled (the
    config's own recipe), a pooled-only variant or a chain variant (its delivered model)."""
    overrides = tuple(o for o in job.overrides if o != POOLED)
    cfg = load_config(path, (*base, f"seed={job.seed}", *overrides))
    data = prepare(cfg.data, cfg.chain.order, job.seed, cfg.chain.mode == "logits")
    if job.name == "link1" and not job.overrides:
        return single_backbone(cfg, data)
    if (job.name == "pooled" and not job.overrides) or POOLED in job.overrides:
        cfg = dataclasses.replace(cfg, baselines=dataclasses.replace(cfg.baselines, sites=False, pooled=True))
        return _pooled_only(cfg, data)
    cfg = dataclasses.replace(cfg, baselines=dataclasses.replace(cfg.baselines, sites=False, pooled=False))
    return run_chain(cfg, data).final.test.accuracy


def _job_worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def run_jobs(jobs: list[tuple[str, tuple[str, ...], AblationJob]], workers: int = 1,
             done: Callable[[str, tuple[str, ...], AblationJob, float, float], None] | None = None) -> list[float]:
    """Accuracies of ``(config path, overrides, job)`` triples, in their order. ``workers`` > 1 runs them in as
    many processes at once (a GPU trains several small models side by side); ``done`` hears of each as it
    ends, with its accuracy and seconds."""
    def finish(i: int, acc: float, seconds: float) -> float:
        if done is not None:
            done(*jobs[i], acc, seconds)
        return acc

    if workers <= 1:
        return [finish(i, *_timed_job(*triple)) for i, triple in enumerate(jobs)]
    threads = max(1, (os.cpu_count() or 1) // workers)
    accs: dict[int, float] = {}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_job_worker_init, initargs=(threads,)) as pool:
        started = {pool.submit(_timed_job, *triple): i for i, triple in enumerate(jobs)}
        for fut in as_completed(started):
            i = started[fut]
            acc, seconds = fut.result()
            accs[i] = finish(i, acc, seconds)
    return [accs[i] for i in range(len(jobs))]


def _timed_job(path: str, base: tuple[str, ...], job: AblationJob) -> tuple[float, float]:
    start = time.monotonic()
    return run_job(path, base, job), time.monotonic() - start


def run_ablation(path: str, base: tuple[str, ...], seeds: list[int], variants: list[Variant],
                 workers: int = 1) -> dict[str, Any]:
    """Test accuracy of every variant's delivered model per seed, with link 1 (the first site alone, its
    whole budget) and pooled (the config's own recipe) as references."""
    jobs = ablation_jobs(seeds, variants)
    accs = run_jobs([(path, base, job) for job in jobs], workers,
                      lambda _p, _b, job, acc, seconds: log.info("ablation seed %d %s: %.3f (%.0f s)",
                                                                    job.seed, job.name, acc, seconds))
    return ablation_result(seeds, variants, jobs, accs)


def ablation_result(seeds: list[int], variants: list[Variant], jobs: list[AblationJob],
                    accs: list[float]) -> dict[str, Any]:
    """The ablation's results.json body from its jobs' accuracies."""
    per_seed: dict[int, dict[str, float]] = {seed: {} for seed in seeds}
    for job, acc in zip(jobs, accs):
        per_seed[job.seed][job.name] = acc
    return {"seeds": seeds, "variants": {v.name: list(v.overrides) for v in variants},
            "per_seed": [per_seed[seed] for seed in seeds]}


def ablation_table(result: dict[str, Any], title: str, reference: str = "") -> str:
    """Mean ± std per variant, and per-seed paired differences (mean ± std, points) against link 1,
    pooled and, when named, a reference variant."""
    rows = result["per_seed"]

    def stats(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.fmean(values):.1f} ± {100 * std:.1f}"

    def diff(name: str, other: str) -> str:
        d = [s[name] - s[other] for s in rows]
        std = statistics.stdev(d) if len(d) > 1 else 0.0
        return f"{100 * statistics.fmean(d):+.1f} ± {100 * std:.1f} ({sum(x < 0 for x in d)} below)"

    refs = ["link1", "pooled"] + ([reference] if reference else [])
    head = "| variant | overrides | test acc | " + " | ".join(f"− {r} (paired)" for r in refs) + " |"
    lines = [f"### {title}", "", head, "|" + "---|" * (3 + len(refs))]
    for key, label in (("link1", "link 1 (first site alone)"), ("pooled", "pooled (reference)")):
        lines.append(f"| {label} | | {stats([s[key] for s in rows])} |" + " |" * len(refs))
    for name, overrides in result["variants"].items():
        cells = [diff(name, r) if r != name else "" for r in refs]
        lines.append(f"| {name} | {', '.join(overrides) or '(config as is)'} | {stats([s[name] for s in rows])} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
