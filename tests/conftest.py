"""Shared fixtures: paths to the repository, the shared real dataset and small configs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BREASTMNIST = REPO.parent / "shared" / "data" / "breastmnist.npz"


# One torch thread per test process when pytest-xdist runs several at once (the suite's default: they would
# otherwise oversubscribe the cores), two (as on the CI machine) when one process runs them all.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(autouse=True)
def _fixed_threads() -> None:
    """The same thread count for every test of a run, so float reductions match across its tests."""
    torch.set_num_threads(THREADS)


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


# Parallel runs (pytest-xdist, ``-n``): tests that share an expensive fixture run in one worker, so it is built
# once. The unit tests (CPU-bound) run in one worker; the e2e modules reading the same live federations share one
# group, other e2e modules one group each, and scenarios that each start their own federation one per test.
SHARED_FEDERATIONS = {"test_federation_weights", "test_federation_wire", "test_monitoring", "test_federation_logits"}
ONE_PER_TEST = {"test_failures"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else item.nodeid
        if module in SHARED_FEDERATIONS:
            group = "shared-federations"
        elif module in ONE_PER_TEST:
            group = item.nodeid
        elif "/unit/" in f"/{item.nodeid}":
            group = "unit"  # CPU-bound: one worker runs them one after another while the others wait on processes
        else:
            group = item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: "/unit/" not in f"/{item.nodeid}")  # the unit group starts first, beside the e2e
