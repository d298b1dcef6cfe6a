"""weckd tunes Flower 1.39 internals (poll sleep, pull backoff): fail loudly if they move."""
from __future__ import annotations

from weckd.chain.flower import check_internals


def test_flower_internals_weckd_patches_are_where_1_39_has_them() -> None:
    check_internals()  # raises ConfigError naming what moved


def test_the_flower_version_is_read_without_importing_flower() -> None:
    import subprocess
    import sys

    code = ("import sys; from weckd.chain.flower import check_flower_version; "
            "print(check_flower_version(), 'flwr' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[0].startswith("1.39.") and out.stdout.split()[1] == "False"
