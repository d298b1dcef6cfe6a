"""Performance benchmarks that need no federation, measured side by side in one process.

Trainer throughput: the link trainer (``train_link``, no teacher, no augmentation) against a bare
PyTorch loop with the same model, batch size, optimizer and thread count, alternating the order
over repetitions so neither side profits from a warmer machine.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .config import LinkSettings
from .data import ImageSpec, SiteData, make_site, read_labelled, to_input
from .link import train_link
from .models import create_model


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
        return statistics.median(self.trainer) / statistics.median(self.bare)


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
