"""Train and evaluate one link of the chain.

A link is a student trained on one site's labelled data with cross-entropy plus distillation from
its predecessor: a live teacher model (weights mode) or the predecessor's logits on a shared proxy
set of unlabelled images (logits mode). Where the architectures match and ``init: predecessor``,
the student starts from the predecessor's weights.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from .config import LinkSettings
from .data import ImageSet, ImageSpec, SiteData, augment, to_input
from .errors import LinkError
from .losses import kd_loss, kd_term
from .models import create_model, load_state, state_of
from .progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Teacher:
    """What the predecessor hands on: its weights (weights mode) or its logits on the proxy set."""

    arch: str
    state: dict[str, torch.Tensor] | None = None
    proxy_logits: torch.Tensor | None = None


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    loss: float
    ce: float
    kd: float
    seconds: float
    images_per_s: float


@dataclass(frozen=True)
class Evaluation:
    """Accuracy, per-class recall and the confusion matrix (rows: true class, columns: predicted)."""

    accuracy: float
    recall: list[float]
    confusion: list[list[int]]
    n: int


@dataclass(frozen=True)
class LinkResult:
    arch: str
    state: dict[str, torch.Tensor]
    val: Evaluation
    epochs: list[EpochStats]
    samples: dict[str, int]
    init: str
    seconds: float
    images_per_s: float
    proxy_logits: torch.Tensor | None = field(default=None, repr=False)


EpochHook = Callable[[EpochStats], None]


def train_link(
    settings: LinkSettings,
    site: SiteData,
    spec: ImageSpec,
    *,
    seed: int,
    device: torch.device,
    teacher: Teacher | None = None,
    proxy: ImageSet | None = None,
    augment_images: bool = True,
    label: str = "link",
    on_epoch: EpochHook | None = None,
) -> LinkResult:
    """Train one student on ``site`` (plus distillation from ``teacher``) and evaluate it."""
    torch.manual_seed(seed)
    student = create_model(settings.arch, len(spec.classes), spec.channels, settings.weights)
    init = _warm_start(student, settings, teacher, label)
    student.to(device)
    teacher_model = _teacher_model(teacher, spec, device, settings, label)
    distil_proxy = teacher is not None and teacher.proxy_logits is not None
    if distil_proxy and proxy is None:
        raise LinkError(f"{label}: logits mode needs the proxy set at this site")
    optimizer = _optimizer(settings, student)
    steps_per_epoch = _n_batches(len(site.train), settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    gen = torch.Generator().manual_seed(seed)
    extra = site.unlabelled if teacher_model is not None else None
    extra_iter = _cycle(len(extra), settings.batch_size, gen) if extra is not None and len(extra) else None
    proxy_iter = _cycle(len(proxy), settings.batch_size, gen) if distil_proxy and proxy is not None else None
    bar = Progress(total_steps, label)
    history: list[EpochStats] = []
    start = time.perf_counter()
    seen = 0
    for epoch in range(1, settings.epochs + 1):
        t0 = time.perf_counter()
        sums = np.zeros(3)
        student.train()
        for idx in _batches(len(site.train), settings.batch_size, gen):
            x = to_input(site.train.images[idx], device)
            if augment_images:
                x = augment(x, gen)
            y = site.train.labels[idx].to(device)
            logits = student(x)
            with torch.no_grad():
                t_logits = teacher_model(x) if teacher_model is not None else None
            parts = kd_loss(logits, y, t_logits, settings.alpha, settings.temperature, settings.distill)
            total, kd = parts.total, parts.kd
            if extra_iter is not None and extra is not None and teacher_model is not None:
                ux = to_input(extra.images[next(extra_iter)], device)
                with torch.no_grad():
                    u_t = teacher_model(ux)
                u_kd = kd_term(student(ux), u_t, settings.temperature, settings.distill)
                total = total + (1.0 - settings.alpha) * u_kd
                kd = (kd + u_kd) / 2
            if proxy_iter is not None and proxy is not None and teacher is not None:
                pidx = next(proxy_iter)
                p_t = teacher.proxy_logits[pidx].to(device)  # type: ignore[index]
                p_kd = kd_term(student(to_input(proxy.images[pidx], device)), p_t, settings.temperature, settings.distill)
                total = settings.alpha * parts.ce + (1.0 - settings.alpha) * p_kd
                kd = p_kd
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            schedule.step()
            if not torch.isfinite(total):
                raise LinkError(f"{label}: loss became {total.item()} at epoch {epoch}; lower link.lr")
            sums += (total.item() * len(idx), parts.ce.item() * len(idx), kd.item() * len(idx))
            seen += len(idx)
            bar.update(1, f"ep {epoch}/{settings.epochs} loss {total.item():.3f}")
        stats = _epoch_stats(epoch, sums, len(site.train), time.perf_counter() - t0)
        history.append(stats)
        if not bar.on_terminal:
            log.info("%s epoch %d/%d loss=%.4f ce=%.4f kd=%.4f %.0f img/s", label, epoch,
                     settings.epochs, stats.loss, stats.ce, stats.kd, stats.images_per_s)
        if on_epoch is not None:
            on_epoch(stats)
    bar.close()
    seconds = time.perf_counter() - start
    val = evaluate(student, site.val, len(spec.classes), device)
    own_proxy = predict_logits(student, proxy.images, device) if proxy is not None else None
    samples = {"train": len(site.train), "val": len(site.val), "unlabelled": len(extra) if extra is not None else 0}
    return LinkResult(settings.arch, state_of(student), val, history, samples, init, seconds,
                      seen / seconds if seconds > 0 else 0.0, own_proxy)


def _warm_start(student: torch.nn.Module, settings: LinkSettings, teacher: Teacher | None, label: str) -> str:
    if settings.init != "predecessor" or teacher is None:
        return "scratch"
    if teacher.state is None:
        log.warning("%s: init=predecessor but only logits travel in logits mode: starting from scratch", label)
        return "scratch"
    if teacher.arch != settings.arch:
        log.warning("%s: init=predecessor but architectures differ (%s → %s): starting from scratch",
                    label, teacher.arch, settings.arch)
        return "scratch"
    load_state(student, teacher.state, label)
    return "predecessor"


def _teacher_model(
    teacher: Teacher | None, spec: ImageSpec, device: torch.device, settings: LinkSettings, label: str
) -> torch.nn.Module | None:
    if teacher is None or teacher.state is None:
        return None
    if settings.alpha >= 1.0:
        log.warning("%s: alpha=1: the teacher is unused (no distillation)", label)
        return None
    model = create_model(teacher.arch, len(spec.classes), spec.channels)
    load_state(model, teacher.state, f"{label} teacher")
    return model.to(device).eval()


def _optimizer(settings: LinkSettings, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay, nesterov=settings.momentum > 0)
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def _n_batches(n: int, batch: int) -> int:
    full, rest = divmod(n, batch)
    return full + (1 if rest > 1 or (rest == 1 and full == 0) else 0)


def _batches(n: int, batch: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled batches; a trailing batch of one image is dropped (batch norm needs two)."""
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch):
        idx = perm[i : i + batch]
        if len(idx) == 1 and n > 1:
            return
        yield idx


def _cycle(n: int, batch: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    while True:
        yield from _batches(n, min(batch, n), gen)


def _epoch_stats(epoch: int, sums: np.ndarray, n: int, seconds: float) -> EpochStats:
    loss, ce, kd = (sums / max(n, 1)).tolist()
    return EpochStats(epoch, loss, ce, kd, seconds, n / seconds if seconds > 0 else 0.0)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, device: torch.device, batch: int = 256) -> torch.Tensor:
    """Logits for uint8 images, in eval mode, on the CPU."""
    model.eval()
    outs = [model(to_input(images[i : i + batch], device)).float().cpu() for i in range(0, len(images), batch)]
    return torch.cat(outs) if outs else torch.zeros(0)


def evaluate(model: torch.nn.Module, data: ImageSet, n_classes: int, device: torch.device) -> Evaluation:
    """Accuracy, per-class recall and confusion matrix of ``model`` on ``data``."""
    if len(data) == 0:
        return Evaluation(0.0, [0.0] * n_classes, [[0] * n_classes for _ in range(n_classes)], 0)
    pred = predict_logits(model, data.images, device).argmax(1)
    return score(pred, data.labels, n_classes)


def score(pred: torch.Tensor, labels: torch.Tensor, n_classes: int) -> Evaluation:
    """Metrics from predictions and labels."""
    cm = torch.zeros(n_classes, n_classes, dtype=torch.int64)
    cm.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    support = cm.sum(1).clamp(min=1)
    recall = (cm.diag().double() / support).tolist()
    accuracy = float(cm.diag().sum()) / max(int(cm.sum()), 1)
    return Evaluation(accuracy, recall, cm.tolist(), int(cm.sum()))


def model_from_state(arch: str, state: dict[str, torch.Tensor], spec: ImageSpec, device: torch.device) -> torch.nn.Module:
    """Rebuild a trained model from its relayed or saved state."""
    model = create_model(arch, len(spec.classes), spec.channels)
    load_state(model, state, arch)
    return model.to(device).eval()
