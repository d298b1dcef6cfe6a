"""``weckd bench perf``: performance ratios, each measured side by side in one run.

Its parts: ``trainer`` (here: the link trainer against a bare PyTorch loop with the same model, batch
size, optimizer and thread count, alternating the order over repetitions so neither side profits
from a warmer machine) and the federation's parts, which live with the coordinator and register
under the ``weckd.perf`` entry-point group (``federation``, ``relay``, ``memory``, ``coordinator``,
``large``). Every part writes its table and JSON into the output folder and returns its checks against
the targets; the command writes them all into ``summary.md``.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

import torch

from .artifacts import write_json
from .config import LinkSettings
from .data import ImageSpec, SiteData, make_site, read_labelled, to_input
from .files import atomic_write_text, private_dir
from .link import train_link
from .models import create_model, pick_device


@dataclass(frozen=True)
class PerfOptions:
    """What ``weckd bench perf`` was asked to measure; each part reads the fields it needs."""

    out: Path
    reps: int = 3
    device: str = "auto"
    archs: tuple[str, ...] = ("test_resnet", "resnet18")
    image_size: int = 64
    batch_size: int = 32
    images: int = 320
    epochs: int = 2
    links: tuple[int, ...] = (3, 10, 30)
    seeds: int = 3
    relay_configs: tuple[str, ...] = ()
    real_data: str = ""  # coordinator: a MedMNIST .npz for real-image links ("" = synthetic images)


@dataclass(frozen=True)
class TargetCheck:
    """One measured figure against its target."""

    part: str
    what: str
    measured: str
    target: str
    met: bool


Part = Callable[[PerfOptions], list[TargetCheck]]


def machine_line() -> str:
    """The machine and software the figures were measured on, and how busy it was at the end."""
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        flwr = version("flwr")
    except PackageNotFoundError:
        flwr = "not installed"
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores{gpu}, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, flwr {flwr}; load average {load:.1f} "
            "at the end of the part")


def summary_markdown(checks: list[TargetCheck], parts: list[str]) -> str:
    """Every part's figures against their targets, with the machine."""
    lines = ["# weckd bench perf: summary", "",
             f"Parts (measured on): {', '.join(parts)}.", "",
             f"Machine: {machine_line()}.", "",
             "| part | what | measured | target | met |", "|---|---|---|---|---|"]
    lines += [f"| {c.part} | {c.what} | {c.measured} | {c.target} | {'yes' if c.met else '**no**'} |"
              for c in checks]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ThroughputResult:
    arch: str
    image_size: int
    batch_size: int
    images: int
    epochs: int
    threads: int
    trainer: list[float]
    bare: list[float]

    @property
    def ratio(self) -> float:
        """Median over repetitions of trainer / bare images/s, each pair measured back to back: the
        machine's speed drifts between repetitions (shared cores), much less within one."""
        return statistics.median(t / b for t, b in zip(self.trainer, self.bare, strict=True))


def _site(spec: ImageSpec, n: int) -> SiteData:
    data = read_labelled("synthetic", spec, synthetic_args=(n, 1.8, 5))
    return make_site("bench", data, 0.1, seed=0)


def bare_loop(settings: LinkSettings, site: SiteData, spec: ImageSpec, device: torch.device, seed: int) -> float:
    """Images/s of the plainest equivalent loop: shuffled batches, forward, CE, backward, SGD step."""
    torch.manual_seed(seed)
    model = create_model(settings.arch, len(spec.classes), spec.channels).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                          weight_decay=settings.weight_decay, nesterov=True)
    images, labels = site.train.images, site.train.labels
    n = len(labels)
    start = time.perf_counter()
    seen = 0
    for _ in range(settings.epochs):
        perm = torch.randperm(n)
        for i in range(0, n - 1, settings.batch_size):
            idx = perm[i : i + settings.batch_size]
            x = to_input(images[idx], device)
            loss = torch.nn.functional.cross_entropy(model(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
    return seen / (time.perf_counter() - start)


def trainer_throughput(arch: str, image_size: int, batch_size: int, n_images: int, epochs: int, reps: int,
                       device: torch.device) -> ThroughputResult:
    spec = ImageSpec(("c0", "c1", "c2", "c3"), image_size, 3)
    site = _site(spec, n_images)
    settings = LinkSettings(arch=arch, epochs=epochs, batch_size=batch_size, init="scratch")
    trainer: list[float] = []
    bare: list[float] = []
    bare_loop(settings, site, spec, device, seed=0)  # warm-up: allocator, kernels
    for rep in range(reps):
        order = ("trainer", "bare") if rep % 2 == 0 else ("bare", "trainer")
        for side in order:
            if side == "bare":
                bare.append(bare_loop(settings, site, spec, device, seed=rep))
            else:
                result = train_link(settings, site, spec, seed=rep, device=device, augment_images=False,
                                    label=f"bench {arch}")
                trainer.append(result.images_per_s)
    return ThroughputResult(arch, image_size, batch_size, len(site.train), epochs, torch.get_num_threads(),
                            trainer, bare)


def trainer_part(opts: PerfOptions) -> list[TargetCheck]:
    """(a) The link trainer's images/s against a bare loop, per architecture: trainer.md, trainer.json."""
    device = pick_device(opts.device)
    rows: list[dict[str, Any]] = []
    for arch in opts.archs:
        result = trainer_throughput(arch, opts.image_size, opts.batch_size, opts.images, opts.epochs, opts.reps,
                                    device)
        rows.append({**dataclasses.asdict(result), "ratio": result.ratio})
    lines = ["# Trainer throughput: the link trainer vs a bare PyTorch loop", "",
             f"Measured by the trainer part of `weckd bench perf` (`--reps {opts.reps}`) on "
             f"{time.strftime('%Y-%m-%d', time.gmtime())}, device {device}.", "", f"Machine: {machine_line()}.", "",
             f"Setup: {opts.images} synthetic RGB images, {opts.epochs} epochs per measurement, SGD with momentum, "
             f"no teacher, no augmentation; {opts.reps} repetitions, each a trainer run and a bare-loop run back to "
             "back (alternating which goes first), after one warm-up of the bare loop. Images/s: medians over the "
             "repetitions; ratio: the median of each repetition's trainer / bare loop.", "",
             "| arch | size | batch | threads | trainer img/s | bare loop img/s | ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['image_size']} | {r['batch_size']} | {r['threads']} | "
                     f"{statistics.median(r['trainer']):.1f} | {statistics.median(r['bare']):.1f} | {r['ratio']:.3f} |")
    private_dir(opts.out)
    write_json(opts.out / "trainer.json", {"device": str(device), "machine": machine_line(), "rows": rows})
    atomic_write_text(opts.out / "trainer.md", "\n".join(lines) + "\n")
    return [TargetCheck("trainer", f"{r['arch']} trainer / bare loop images/s", f"{r['ratio']:.3f}×", "≥ 0.95×",
                        r["ratio"] >= 0.95) for r in rows]
