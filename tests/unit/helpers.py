"""Small builders for unit tests: tiny YAML configs and image folders on disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

# torch threads of an in-process chain in a test: one per process when pytest-xdist runs tests beside the
# e2e federations (two would oversubscribe two cores), two when one process runs the suite
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2

TINY_CHAIN: dict[str, Any] = {
    "seed": 3,
    "chain": {"order": ["A", "B"], "cycles": 1, "mode": "weights"},
    # SGD lr 0.05: a tiny synthetic set learns in one epoch with it (AdamW lr 1e-3, the default, needs more)
    "link": {"arch": "test_resnet", "epochs": 1, "batch_size": 16, "optimizer": "sgd", "lr": 0.05},
    "data": {
        "dataset": "synthetic",
        "classes": ["c0", "c1", "c2", "c3"],
        "image_size": 32,
        "synthetic": {"samples": 160},
    },
    "baselines": {"sites": True, "pooled": True},
    "runtime": {"device": "cpu", "threads": THREADS},
}


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_image_folder(root: Path, classes: dict[str, int], size: int = 20, seed: int = 0) -> Path:
    """An ImageFolder with ``n`` random PNGs per class."""
    rng = np.random.default_rng(seed)
    for name, n in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"img{i:03d}.png")
    return root
