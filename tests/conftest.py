"""Shared fixtures: paths to the repository, the shared real dataset and small configs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BREASTMNIST = REPO.parent / "shared" / "data" / "breastmnist.npz"


@pytest.fixture(autouse=True)
def _fixed_threads() -> None:
    """Two threads, as on the CI machine, so timings and float reductions match across runs."""
    torch.set_num_threads(2)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The common umask: files weckd writes must get their private modes whatever the umask."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def breastmnist() -> Path:
    if not BREASTMNIST.is_file():
        pytest.skip(f"real dataset not present at {BREASTMNIST} (it ships in the team's shared/ folder)")
    return BREASTMNIST
