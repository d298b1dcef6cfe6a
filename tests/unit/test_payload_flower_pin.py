"""weckd tunes Flower 1.39 internals (poll sleep, pull backoff): fail loudly if they move."""
from __future__ import annotations

from weckd.chain.flower import check_internals


def test_flower_internals_weckd_patches_are_where_1_39_has_them() -> None:
    check_internals()  # raises ConfigError naming what moved
