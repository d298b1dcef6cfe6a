"""Shared fixtures: paths to the repository, the shared real dataset and small configs."""

from __future__ import annotations

import os
import zlib
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
# once. The unit tests (CPU-bound) run in three groups, so that they can fill the time the e2e tests spend
# waiting on their processes; the e2e modules reading the same live federations share one group, other e2e
# modules one group each, and scenarios that each start their own federation one per test.
# The groups are the scopes of a LoadScope scheduler (xdist's xdist_group marks need pytest < 9).
SHARED_FEDERATIONS = {"test_federation_weights", "test_federation_wire", "test_monitoring", "test_federation_logits"}
SERVICE_FEDERATION = {"test_federation_hetero", "test_service"}  # both read the service federation's jobs
ONE_PER_TEST = {"test_failures"}


# The unit tests in three groups of about equal time: the four longest modules placed by hand, the rest by a
# stable hash of their name.
UNIT_GROUPS = 3
HEAVY_UNIT = {"test_privacy": 0, "test_bench": 1, "test_cli_chain": 2, "test_perf": 2}


def _group_of(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    module = Path(path).stem
    if "/unit/" in f"/{path}":
        return f"unit-{HEAVY_UNIT.get(module, zlib.crc32(module.encode()) % UNIT_GROUPS)}"
    if module in SHARED_FEDERATIONS:
        return "shared-federations"
    if module in SERVICE_FEDERATION:
        return "service-federation"
    if module in ONE_PER_TEST:
        return nodeid
    return path


# Seconds each group takes on the 2-core CI machine (measured, rounded; the unit groups split the unit tests'
# measured total): the longest start first, so the
# run does not end with one worker busy on a long federation while the other waits.
GROUP_SECONDS = {"unit-0": 110, "unit-1": 100, "unit-2": 110,
                 "shared-federations": 250, "tests/e2e/test_demo_predict.py": 130,
                 "service-federation": 150, "tests/e2e/test_malicious_coordinator.py": 90,
                 "tests/e2e/test_onboarding.py": 60}


def _cost(nodeid: str) -> int:
    group = _group_of(nodeid)
    return GROUP_SECONDS.get(group, 100 if Path(nodeid.split("::", 1)[0]).stem in ONE_PER_TEST else 30)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # the order below, not xdist's (by number of tests)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Groups in decreasing cost (stable: tests keep their order within a group)."""
    items.sort(key=lambda item: -_cost(item.nodeid))


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    from xdist.scheduler import LoadScopeScheduling

    class Groups(LoadScopeScheduling):
        """Whole groups to a worker, in the order of the collection (see pytest_collection_modifyitems)."""

        def _split_scope(self, nodeid: str) -> str:
            return _group_of(nodeid)

    return Groups(config, log)
