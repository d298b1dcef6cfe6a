"""The whole chain in one process, with its baselines, on one held-out test split.

Link k trains at site ``order[k mod K]`` on that site's labelled data plus distillation from link
k−1. Baselines in the same run: link 1 (the paper's single backbone), each site alone, and one
model trained on all sites' data pooled.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import __version__
from .config import ChainConfig
from .data import SiteData, concat
from .link import Evaluation, LinkResult, Teacher, evaluate, model_from_state, train_link
from .models import pick_device
from .payload import round_state
from .prepare import Prepared, prepare
from .protocol import link_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One trained model of the run: a chain link or a baseline."""

    kind: str  # "link" | "site" | "pooled"
    name: str
    site: str
    arch: str
    init: str
    result: LinkResult
    test: Evaluation


@dataclass
class ChainRun:
    config: ChainConfig
    links: list[Row] = field(default_factory=list)
    baselines: list[Row] = field(default_factory=list)

    @property
    def final(self) -> Row:
        return self.links[-1]


def run_chain(
    cfg: ChainConfig, prepared: Prepared | None = None, on_link: Callable[[Row], None] | None = None
) -> ChainRun:
    """Train every link and the configured baselines; return all of them with test metrics."""
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    device = pick_device(cfg.runtime.device)
    data = prepared or prepare(cfg.data, cfg.chain.order, cfg.seed, cfg.chain.mode == "logits")
    run = ChainRun(cfg)
    teacher: Teacher | None = None
    for k in range(cfg.n_links):
        site = cfg.site_of(k)
        settings = cfg.link_settings(k)
        label = f"link {k + 1}/{cfg.n_links} site {site}"
        result = train_link(
            settings,
            data.sites[site],
            data.spec,
            seed=link_seed(cfg.seed, k),
            device=device,
            teacher=teacher,
            proxy=data.proxy,
            augment_images=cfg.data.augment,
            label=label,
        )
        row = _row("link", f"link {k + 1}", site, result, data, device)
        log.info(
            "%s done: val acc %.3f test acc %.3f (%.1fs)", label, result.val.accuracy, row.test.accuracy, result.seconds
        )
        run.links.append(row)
        if on_link is not None:
            on_link(row)
        teacher = next_teacher(cfg, result)
    run.baselines.extend(_baselines(cfg, data, device, run.links[0]))
    return run


def next_teacher(cfg: ChainConfig, result: LinkResult) -> Teacher:
    """What link k hands to link k+1: logits on the proxy set, or weights rounded through the wire dtype
    exactly as the federation relays them (``chain.wire_dtype``)."""
    if cfg.chain.mode == "logits":
        return Teacher(result.arch, None, result.proxy_logits)
    return Teacher(result.arch, round_state(result.state, cfg.chain.wire_dtype), None)


def _baselines(cfg: ChainConfig, data: Prepared, device: torch.device, link1: Row) -> list[Row]:
    rows: list[Row] = []
    first = cfg.link_settings(0)
    scratch = dataclasses.replace(first, init="scratch")
    seed = link_seed(cfg.seed, 0)
    if cfg.baselines.sites:
        for name in cfg.chain.order:
            if name == link1.site:
                rows.append(dataclasses.replace(link1, kind="site", name=f"site {name} alone"))
                continue
            result = train_link(
                scratch,
                data.sites[name],
                data.spec,
                seed=seed,
                device=device,
                augment_images=cfg.data.augment,
                label=f"baseline site {name} alone",
            )
            rows.append(_row("site", f"site {name} alone", name, result, data, device))
    if cfg.baselines.pooled:
        pooled_settings = dataclasses.replace(cfg.link_settings(cfg.n_links - 1, decay=False), init="scratch")
        sites = list(data.sites.values())
        pooled = SiteData("pooled", concat([s.train for s in sites]), concat([s.val for s in sites]))
        result = train_link(
            pooled_settings,
            pooled,
            data.spec,
            seed=seed,
            device=device,
            augment_images=cfg.data.augment,
            label="baseline pooled",
        )
        rows.append(_row("pooled", "pooled", "all", result, data, device))
    return rows


def _row(kind: str, name: str, site: str, result: LinkResult, data: Prepared, device: torch.device) -> Row:
    model = model_from_state(result.arch, result.state, data.spec, device)
    return Row(
        kind, name, site, result.arch, result.init, result, evaluate(model, data.test, len(data.spec.classes), device)
    )


def eval_dict(ev: Evaluation) -> dict[str, Any]:
    return {"accuracy": ev.accuracy, "recall": ev.recall, "confusion": ev.confusion, "n": ev.n}


def results_json(run: ChainRun) -> dict[str, Any]:
    """Deterministic results (no timings): the same seed on the same machine gives the same bytes."""
    cfg = run.config

    def row_json(r: Row) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": r.kind,
            "name": r.name,
            "site": r.site,
            "arch": r.arch,
            "init": r.init,
            "val": eval_dict(r.result.val),
            "test": eval_dict(r.test),
            "samples": r.result.samples,
            "epochs": [{"epoch": e.epoch, "loss": e.loss, "ce": e.ce, "kd": e.kd} for e in r.result.epochs],
        }
        if r.result.privacy is not None:  # DP-SGD links only: the ε spent at δ and how
            out["privacy"] = dict(r.result.privacy)
        return out

    first, last = run.links[0].test.accuracy, run.final.test.accuracy
    pooled = next((r.test.accuracy for r in run.baselines if r.kind == "pooled"), None)
    summary: dict[str, Any] = {
        "link1_test_accuracy": first,
        "last_test_accuracy": last,
        "gain_over_link1": last - first,
    }
    if pooled is not None:
        summary.update(pooled_test_accuracy=pooled, gap_to_pooled=last - pooled)
    return {
        "weckd_version": __version__,
        "seed": cfg.seed,
        "mode": cfg.chain.mode,
        "classes": list(cfg.data.classes),
        "order": list(cfg.chain.order),
        "cycles": cfg.chain.cycles,
        "links": [row_json(r) for r in run.links],
        "baselines": [row_json(r) for r in run.baselines],
        "summary": summary,
    }


def timings_json(run: ChainRun) -> dict[str, Any]:
    def t(r: Row) -> dict[str, Any]:
        return {
            "name": r.name,
            "seconds": r.result.seconds,
            "images_per_s": r.result.images_per_s,
            "epoch_seconds": [e.seconds for e in r.result.epochs],
        }

    return {"links": [t(r) for r in run.links], "baselines": [t(r) for r in run.baselines]}


def format_table(run: ChainRun) -> str:
    """The run's table: every link, then the baselines, then the gain over link 1."""
    rows = run.links + run.baselines
    private = any(r.result.privacy is not None for r in rows)  # an ε column only where DP-SGD ran
    head = f"{'model':<18} {'site':<6} {'arch':<24} {'init':<12} {'val acc':>8} {'test acc':>9} {'seconds':>8}"
    head += f" {'epsilon':>8}" if private else ""
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (
            f"{r.name:<18} {r.site:<6} {r.arch:<24} {r.init:<12} {r.result.val.accuracy:>8.3f} "
            f"{r.test.accuracy:>9.3f} {r.result.seconds:>8.1f}"
        )
        if private:
            spent = r.result.privacy
            line += f" {spent.epsilon:>8.2f}" if spent is not None else f" {'-':>8}"
        lines.append(line)
    summary = results_json(run)["summary"]
    lines.append(f"last link vs link 1 (single backbone): {100 * summary['gain_over_link1']:+.1f} points test accuracy")
    if "gap_to_pooled" in summary:
        lines.append(f"last link vs pooled: {100 * summary['gap_to_pooled']:+.1f} points test accuracy")
    return "\n".join(lines)


def provenance(run: ChainRun) -> dict[str, Any]:
    cfg = run.config
    return {
        "seed": cfg.seed,
        "mode": cfg.chain.mode,
        "order": list(cfg.chain.order),
        "cycles": cfg.chain.cycles,
        "links": [{"link": i + 1, "site": r.site, "arch": r.arch, "init": r.init} for i, r in enumerate(run.links)],
        "test_accuracy": run.final.test.accuracy,
    }
