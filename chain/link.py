"""Train and evaluate one link of the chain.

A link is a student trained on one site's labelled data with cross-entropy plus distillation from
its predecessor: a live teacher model (weights mode) or the predecessor's logits on a shared proxy
set of unlabelled images (logits mode). Where the architectures match and ``init: predecessor``,
the student starts from the predecessor's weights. With ``privacy`` set, the link trains with DP-SGD
(:mod:`chain.privacy`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
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
from .privacy import PrivacySpent, PrivateTraining, make_private, student_arch, warm_start_mismatch
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
    privacy: PrivacySpent | None = None  # ε spent at δ when the link trained with DP-SGD
    teacher_val: Evaluation | None = None  # the incoming teacher on this site's validation split (do_no_harm)
    kept: str = "student"  # "teacher" when do_no_harm handed the teacher on unchanged


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
    initial_state: dict[str, torch.Tensor] | None = None,
    position: tuple[int, int] = (0, 1),
) -> LinkResult:
    """Train one student on ``site`` (plus distillation from ``teacher``) and evaluate it.

    ``initial_state`` starts the student from given weights without a teacher (FedAvg rounds).
    ``position`` is (link index, number of links): with ``lr_schedule: chain`` it picks this link's
    slice of the chain-wide learning-rate schedule.
    """
    torch.manual_seed(seed)
    arch = student_arch(settings)
    student = create_model(arch, len(spec.classes), spec.channels, settings.weights)
    if initial_state is not None:
        load_state(student, initial_state, label)
        init = "given"
    else:
        init = _warm_start(student, arch, settings, teacher, label)
    if teacher is not None and teacher.proxy_logits is not None and proxy is None:
        raise LinkError(f"{label}: logits mode needs the proxy set at this site")
    _check_private_inputs(settings, site, teacher, label)
    scored = _score_teacher(settings, site, spec, teacher, device)
    loop = _Loop(
        settings,
        site,
        student.to(device),
        _teacher_model(teacher, spec, device, settings, label),
        teacher,
        proxy,
        device,
        augment_images,
        torch.Generator().manual_seed(seed),
        label,
        lr_window(settings, *position),
    )
    history = loop.run(on_epoch)
    spent = _close_private(loop.private, label)
    student_pred = predict_logits(student, site.val.images, device).argmax(1) if len(site.val) else None
    val = score(student_pred, site.val.labels, len(spec.classes)) if student_pred is not None else evaluate(
        student, site.val, len(spec.classes), device)
    own_proxy = predict_logits(student, proxy.images, device) if proxy is not None else None
    samples = {"train": len(site.train), "val": len(site.val), "unlabelled": len(loop.extra) if loop.extra else 0}
    rate = loop.seen / loop.seconds if loop.seconds > 0 else 0.0
    result = LinkResult(arch, state_of(student), val, history, samples, init, loop.seconds, rate, own_proxy, spent)
    if scored is None or teacher is None or teacher.state is None or student_pred is None:
        return result
    teacher_val, teacher_pred = scored
    if not clearly_worse(student_pred, teacher_pred, site.val.labels):
        return dataclasses.replace(result, teacher_val=teacher_val)
    log.info(
        "%s: do_no_harm: the student scores %.3f on this site's validation split, the teacher %.3f (clearly "
        "better on the same images): handing the teacher on unchanged",
        label,
        val.accuracy,
        teacher_val.accuracy,
    )
    state = {k: v.float() if v.is_floating_point() else v.clone() for k, v in teacher.state.items()}
    return dataclasses.replace(result, state=state, val=teacher_val, teacher_val=teacher_val, kept="teacher")


def lr_window(settings: LinkSettings, index: int, n_links: int) -> tuple[float, float]:
    """The slice of the cosine schedule that link ``index`` of ``n_links`` trains: all of it with
    ``lr_schedule: link``, its k-th N-th with ``lr_schedule: chain``."""
    if settings.lr_schedule != "chain" or n_links <= 1:
        return (0.0, 1.0)
    if not 0 <= index < n_links:
        raise LinkError(f"link index {index} is outside the chain of {n_links} links")
    return (index / n_links, (index + 1) / n_links)


DO_NO_HARM_Z = 2.0


def clearly_worse(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> bool:
    """Whether the student is clearly worse than the teacher on the same images (McNemar): of the images
    exactly one of them gets right, the teacher's lead ``b − c`` exceeds ``DO_NO_HARM_Z·√(b + c)``. A site's
    validation split holds tens of images, so a lead of one or two is noise; the guard is for a link that
    truly set the chain back (a diverged or collapsed student)."""
    s_ok, t_ok = student == labels, teacher == labels
    b, c = int((t_ok & ~s_ok).sum()), int((s_ok & ~t_ok).sum())
    return b - c > DO_NO_HARM_Z * math.sqrt(b + c)


def _score_teacher(
    settings: LinkSettings, site: SiteData, spec: ImageSpec, teacher: Teacher | None, device: torch.device
) -> tuple[Evaluation, torch.Tensor] | None:
    """With ``do_no_harm``: the teacher on this site's validation split before training (its metrics and
    its predictions)."""
    if not settings.do_no_harm or teacher is None or teacher.state is None or len(site.val) == 0:
        return None
    if teacher.arch != student_arch(settings):
        log.warning("do_no_harm: the teacher is a %s, this link a %s: the student is handed on", teacher.arch,
                    student_arch(settings))
        return None
    model = create_model(teacher.arch, len(spec.classes), spec.channels)
    load_state(model, teacher.state, "teacher")
    pred = predict_logits(model.to(device), site.val.images, device).argmax(1)
    return score(pred, site.val.labels, len(spec.classes)), pred


def _check_private_inputs(settings: LinkSettings, site: SiteData, teacher: Teacher | None, label: str) -> None:
    """What DP-SGD here does not cover is refused (proxy distillation) or left out (unlabelled images)."""
    if settings.privacy is None:
        return
    if teacher is not None and teacher.proxy_logits is not None:
        raise LinkError(f"{label}: privacy is not supported in logits mode past link 1; use chain.mode: weights")
    if teacher is not None and site.unlabelled is not None and len(site.unlabelled) > 0:
        log.warning(
            "%s: privacy on: the site's %d unlabelled images are not used (DP-SGD covers labelled images only)",
            label,
            len(site.unlabelled),
        )


def _close_private(private: PrivateTraining | None, label: str) -> PrivacySpent | None:
    """Detach Opacus and account: the ε spent, logged and checked against the target."""
    if private is None:
        return None
    private.close()
    spent = private.spent()
    log.info(
        "%s privacy: epsilon=%.3f spent (target %.3f) at delta=%g, noise=%.3f, clip=%g, %d steps",
        label,
        spent.epsilon,
        spent.target_epsilon,
        spent.delta,
        spent.noise_multiplier,
        spent.max_grad_norm,
        spent.steps,
    )
    if spent.epsilon > spent.target_epsilon * (1 + 1e-9):
        raise LinkError(
            f"{label}: spent epsilon {spent.epsilon:.4f} exceeds the target {spent.target_epsilon}; "
            "the model is withheld (a bug in the step budget: please report it)"
        )
    return spent


class _Loop:
    """The optimisation loop of one link: batches, the loss with its parts, epochs, progress."""

    def __init__(
        self,
        settings: LinkSettings,
        site: SiteData,
        student: torch.nn.Module,
        teacher_model: torch.nn.Module | None,
        teacher: Teacher | None,
        proxy: ImageSet | None,
        device: torch.device,
        augment_images: bool,
        gen: torch.Generator,
        label: str,
        window: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        self.s, self.site, self.student, self.teacher_model = settings, site, student, teacher_model
        self.device, self.augment, self.gen, self.label = device, augment_images, gen, label
        optimizer = _optimizer(settings, student)
        self.optimizer: torch.optim.Optimizer = optimizer
        self.model = student  # what the training forward calls: Opacus' wrapper when private
        self.private: PrivateTraining | None = None
        total = _n_batches(len(site.train), settings.batch_size) * settings.epochs
        if settings.privacy is not None:
            sample = to_input(site.train.images[:2], device)
            self.private = make_private(student, optimizer, settings, len(site.train), sample, gen, label)
            self.model, self.optimizer = self.private.model, self.private.optimizer
            total = min(self.private.steps_per_epoch * settings.epochs, self.private.budget)
        # on the plain optimizer: with DP-SGD it takes its step after the noise is added
        self.schedule = _cosine(optimizer, max(total, 1), window)
        self.bar = Progress(total, label)
        use_extra = teacher_model is not None and site.unlabelled is not None and settings.privacy is None
        self.extra = site.unlabelled if use_extra else None
        self.extra_iter = _cycle(len(self.extra), settings.batch_size, gen) if self.extra else None
        self.proxy_logits = teacher.proxy_logits if teacher is not None else None
        self.proxy = proxy if self.proxy_logits is not None else None
        self.proxy_iter = _cycle(len(self.proxy), settings.batch_size, gen) if self.proxy else None
        self.seen = 0
        self.seconds = 0.0

    def run(self, on_epoch: EpochHook | None) -> list[EpochStats]:
        history = []
        start = time.perf_counter()
        for epoch in range(1, self.s.epochs + 1):
            stats = self._epoch(epoch)
            history.append(stats)
            if not self.bar.on_terminal:
                log.info(
                    "%s epoch %d/%d loss=%.4f ce=%.4f kd=%.4f %.0f img/s",
                    self.label,
                    epoch,
                    self.s.epochs,
                    stats.loss,
                    stats.ce,
                    stats.kd,
                    stats.images_per_s,
                )
            if on_epoch is not None:
                on_epoch(stats)
        self.bar.close()
        self.seconds = time.perf_counter() - start
        return history

    def _epoch(self, epoch: int) -> EpochStats:
        t0 = time.perf_counter()
        sums = np.zeros(3)
        self.model.train()
        private = self.private
        batches = private.batches() if private else _batches(len(self.site.train), self.s.batch_size, self.gen)
        seen = 0
        for idx in batches:
            if private is not None and len(idx) == 0:  # an empty Poisson batch: noise only
                private.noise_only_step()
                self.schedule.step()
                self.bar.update(1, f"ep {epoch}/{self.s.epochs} (empty batch)")
                continue
            self.optimizer.zero_grad(set_to_none=True)  # before the forward: Opacus checks it
            total, ce, kd = self._loss(idx)
            total.backward()
            self.optimizer.step()
            self.schedule.step()
            if not torch.isfinite(total):
                raise LinkError(f"{self.label}: loss became {total.item()} at epoch {epoch}; lower link.lr")
            sums += (total.item() * len(idx), ce.item() * len(idx), kd.item() * len(idx))
            self.seen += len(idx)
            seen += len(idx)
            self.bar.update(1, f"ep {epoch}/{self.s.epochs} loss {total.item():.3f}")
        n = seen if private is not None else len(self.site.train)  # Poisson batches vary in size
        return _epoch_stats(epoch, sums, n, time.perf_counter() - t0)

    def _loss(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Total, CE and KD of one step: labelled batch, plus unlabelled or proxy distillation."""
        s = self.s
        x = to_input(self.site.train.images[idx], self.device)
        if self.augment:
            x = augment(x, self.gen)
        logits = self.model(x)
        with torch.no_grad():
            t_logits = self.teacher_model(x) if self.teacher_model is not None else None
        parts = kd_loss(
            logits, self.site.train.labels[idx].to(self.device), t_logits, s.alpha, s.temperature, s.distill
        )
        if self.extra_iter is not None and self.extra is not None and self.teacher_model is not None:
            ux = to_input(self.extra.images[next(self.extra_iter)], self.device)
            with torch.no_grad():
                u_teacher = self.teacher_model(ux)
            u_kd = kd_term(self.student(ux), u_teacher, s.temperature, s.distill)
            return parts.total + (1.0 - s.alpha) * u_kd, parts.ce, (parts.kd + u_kd) / 2
        if self.proxy_iter is not None and self.proxy is not None and self.proxy_logits is not None:
            pidx = next(self.proxy_iter)
            p_student = self.student(to_input(self.proxy.images[pidx], self.device))
            p_kd = kd_term(p_student, self.proxy_logits[pidx].to(self.device), s.temperature, s.distill)
            return s.alpha * parts.ce + (1.0 - s.alpha) * p_kd, parts.ce, p_kd
        return parts.total, parts.ce, parts.kd


def _cosine(
    optimizer: torch.optim.Optimizer, steps: int, window: tuple[float, float]
) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine from ``lr`` to 0 over ``steps`` (window (0, 1)), or over the slice ``window`` of a longer one."""
    if window == (0.0, 1.0):
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    start, end = window

    def factor(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * (start + (end - start) * min(step, steps) / steps)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _warm_start(
    student: torch.nn.Module, arch: str, settings: LinkSettings, teacher: Teacher | None, label: str
) -> str:
    if settings.init != "predecessor" or teacher is None:
        return "scratch"
    if teacher.state is None:
        log.warning("%s: init=predecessor but only logits travel in logits mode: starting from scratch", label)
        return "scratch"
    mismatch = warm_start_mismatch(arch, teacher.arch)
    if mismatch:
        raise LinkError(f"{label}: init=predecessor: this link {mismatch}")
    if teacher.arch != arch:
        log.warning(
            "%s: init=predecessor but architectures differ (%s → %s): starting from scratch",
            label,
            teacher.arch,
            arch,
        )
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
        return torch.optim.SGD(
            params,
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
            nesterov=settings.momentum > 0,
        )
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
def predict_logits(
    model: torch.nn.Module, images: torch.Tensor, device: torch.device, batch: int = 256
) -> torch.Tensor:
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


def model_from_state(
    arch: str, state: dict[str, torch.Tensor], spec: ImageSpec, device: torch.device
) -> torch.nn.Module:
    """Rebuild a trained model from its relayed or saved state."""
    model = create_model(arch, len(spec.classes), spec.channels)
    load_state(model, state, arch)
    return model.to(device).eval()
