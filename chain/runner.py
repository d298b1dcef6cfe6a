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
from .delivery import best_link, deliver_rule, delivery_json, pooled_accuracy
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

    # chain.deliver: best: every link's relayed model on the validation splits of all sites together, and
    # the chosen link as delivered (its weights through the wire dtype, as the federation hands it over)
    pooled_val: list[float] = field(default_factory=list)
    pooled_n: int = 0  # validation images of all sites together
    best: Row | None = None

    @property
    def final(self) -> Row:
        """The chain's model: the last link, or with ``chain.deliver: best`` the best one (:func:`best_link`)."""
        return self.best if self.best is not None else self.links[-1]

    @property
    def last(self) -> Row:
        return self.links[-1]

    @property
    def delivered(self) -> int:
        """The index of the link delivered as the chain's model."""
        return best_link(self.pooled_val, self.pooled_n) if self.best is not None else len(self.links) - 1


def run_chain(
    cfg: ChainConfig, prepared: Prepared | None = None, on_link: Callable[[Row], None] | None = None
) -> ChainRun:
    """Train every link and the configured baselines; return all of them with test metrics."""
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    device = pick_device(cfg.runtime.device)
    data = prepared or prepare(cfg.data, cfg.chain.order, cfg.seed, cfg.chain.mode == "logits")
    run = ChainRun(cfg)
    best = deliver_rule(cfg.chain.deliver, cfg.chain.mode) == "best"
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
            position=(k, cfg.n_links),
        )
        row = _row("link", f"link {k + 1}", site, result, data, device)
        log.info(
            "%s done: val acc %.3f test acc %.3f (%.1fs)", label, result.val.accuracy, row.test.accuracy, result.seconds
        )
        run.links.append(row)
        if on_link is not None:
            on_link(row)
        teacher = next_teacher(cfg, result)
        if best:
            run.pooled_val.append(_pooled_val(teacher, data, device))
    if best:
        run.pooled_n = sum(len(s.val) for s in data.sites.values())
        k = best_link(run.pooled_val, run.pooled_n)
        chosen = run.links[k]
        relayed = next_teacher(cfg, chosen.result).state
        assert relayed is not None  # chain.deliver: best needs weights mode (checked by the config loader)
        run.best = _row("link", chosen.name, chosen.site, dataclasses.replace(chosen.result, state=relayed), data,
                        device)
        log.info("delivered: link %d (pooled validation accuracy %.3f; the last link's %.3f)", k + 1,
                 run.pooled_val[k], run.pooled_val[-1])
    run.baselines.extend(_baselines(cfg, data, device, run.links[0]))
    return run


def next_teacher(cfg: ChainConfig, result: LinkResult) -> Teacher:
    """What link k hands to link k+1: logits on the proxy set, or weights rounded through the wire dtype
    exactly as the federation relays them (``chain.wire_dtype``)."""
    if cfg.chain.mode == "logits":
        return Teacher(result.arch, None, result.proxy_logits)
    return Teacher(result.arch, round_state(result.state, cfg.chain.wire_dtype), None)


def _baselines(cfg: ChainConfig, data: Prepared, device: torch.device, link1: Row) -> list[Row]:
    """Each site alone and pooled, at the chain's compute: a site alone trains ``epochs × cycles`` (the
    site-epochs the chain spends there), pooled ``epochs × cycles`` over all sites' data together."""
    rows: list[Row] = []
    first = cfg.link_settings(0)
    scratch = dataclasses.replace(first, init="scratch", epochs=first.epochs * cfg.chain.cycles)
    seed = link_seed(cfg.seed, 0)
    if cfg.baselines.sites:
        # link 1 is the first site alone when it trained the site's whole budget and cosine schedule (one
        # cycle, lr_schedule: link); otherwise the site is trained alone anew
        reuse = first.lr_schedule == "link" and cfg.chain.cycles == 1
        for name in cfg.chain.order:
            if name == link1.site and reuse:
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
    rows.extend(pooled_rows(cfg, data, device))
    return rows


def pooled_rows(cfg: ChainConfig, data: Prepared, device: torch.device) -> list[Row]:
    """The pooled baseline (when ``baselines.pooled``): one model on all sites' data, ``epochs × cycles``."""
    rows: list[Row] = []
    seed = link_seed(cfg.seed, 0)
    if cfg.baselines.pooled:
        last = cfg.link_settings(cfg.n_links - 1, decay=False)
        pooled_settings = dataclasses.replace(last, init="scratch", epochs=last.epochs * cfg.chain.cycles)
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


def _pooled_val(relayed: Teacher, data: Prepared, device: torch.device) -> float:
    """The relayed model (as every site evaluates it in the federation) on all sites' validation splits."""
    assert relayed.state is not None
    model = model_from_state(relayed.arch, relayed.state, data.spec, device)
    n_classes = len(data.spec.classes)
    evaluations = [evaluate(model, s.val, n_classes, device) for s in data.sites.values()]
    return pooled_accuracy((e.accuracy, e.n) for e in evaluations)


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
        if r.result.teacher_val is not None:  # do_no_harm: the teacher on this site, and what was handed on
            out["do_no_harm"] = {"teacher_val_accuracy": r.result.teacher_val.accuracy, "kept": r.result.kept}
        return out

    alone = next((r for r in run.baselines if r.kind == "site" and r.site == cfg.chain.order[0]), None)
    # the single backbone: link 1's site alone where that baseline ran (with one schedule over the chain,
    # link 1 itself trains only the first slice of it)
    first = (alone or run.links[0]).test.accuracy
    delivered = run.final.test.accuracy
    pooled = next((r.test.accuracy for r in run.baselines if r.kind == "pooled"), None)
    summary: dict[str, Any] = {
        "link1_test_accuracy": first,
        "link1_is": "site alone" if alone is not None else "link 1",
        "last_test_accuracy": run.last.test.accuracy,
        "delivered_link": run.delivered + 1,
        "delivered_test_accuracy": delivered,
        "gain_over_link1": delivered - first,
    }
    if pooled is not None:
        summary.update(pooled_test_accuracy=pooled, gap_to_pooled=delivered - pooled)
    extra: dict[str, Any] = {}
    if run.best is not None:
        extra["delivered"] = delivery_json("best", run.delivered, run.pooled_val)
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
        **extra,
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
    k = run.delivered
    if run.best is not None:
        lines.append(f"delivered: link {k + 1} of {len(run.links)} (best on all sites' validation splits, "
                     f"{run.pooled_val[k]:.3f}; ties go to the later link), test acc {run.best.test.accuracy:.3f}")
    lines.append(f"delivered model vs link 1 (single backbone): {100 * summary['gain_over_link1']:+.1f} points "
                 "test accuracy")
    if "gap_to_pooled" in summary:
        lines.append(f"delivered model vs pooled: {100 * summary['gap_to_pooled']:+.1f} points test accuracy")
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
        "delivered_link": run.delivered + 1,
    }
