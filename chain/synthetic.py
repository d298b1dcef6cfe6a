"""The built-in synthetic dataset: deterministic images with class-dependent structure plus noise.

Each class is a grating whose orientation (0° or 90°, so a horizontal flip keeps the class) and
spatial frequency depend on the class, shown in a Gaussian window at a random place, with random
phase, contrast and orientation jitter, distractor blobs and pixel noise. A small CNN learns it
well above chance, but not to 100% from a few hundred images, which is the regime the chain is for.
"""

from __future__ import annotations

import math

import numpy as np


def make_synthetic(
    n: int, n_classes: int, size: int, channels: int, noise: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``n`` uint8 images shaped (n, channels, size, size) and balanced int64 labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % n_classes
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = np.empty((n, channels, size, size), dtype=np.uint8)
    for i, c in enumerate(labels):
        img = _one_image(rng, int(c), n_classes, xx, yy, noise)
        images[i, :] = np.clip(128.0 + 60.0 * img, 0, 255).astype(np.uint8)
    return images, labels


def make_unlabelled(n: int, n_classes: int, size: int, channels: int, noise: float, seed: int) -> np.ndarray:
    """Unlabelled images from the same distribution (a proxy set), drawn from another stream."""
    images, _ = make_synthetic(n, n_classes, size, channels, noise, seed + 7_919)
    return images


def _one_image(rng: np.random.Generator, c: int, k: int, xx: np.ndarray, yy: np.ndarray, noise: float) -> np.ndarray:
    theta = math.pi / 2 * (c % 2) + rng.normal(0.0, 0.2)
    freq = 1.5 + 0.8 * (c // 2) + rng.normal(0.0, 0.15)
    phase = rng.uniform(0.0, 2 * math.pi)
    cx, cy = rng.uniform(0.3, 0.7, size=2)
    width = rng.uniform(0.25, 0.37)
    window = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width**2))
    wave = np.cos(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
    img = rng.uniform(0.6, 1.0) * window * wave
    for _ in range(3):
        bx, by = rng.uniform(0.0, 1.0, size=2)
        bw = rng.uniform(0.04, 0.12)
        img += rng.normal(0.0, 0.6) * np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * bw**2))
    img += rng.normal(0.0, noise, size=img.shape)
    return img.astype(np.float32)
