"""The package installs from a wheel as weckd.chain / weckd.server / weckd.client with its commands."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_wheel_installs_and_runs(repo: Path, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    # built with this environment's setuptools (pyproject's build requirements), not a fresh isolated one
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(repo)], check=True, timeout=300)
    wheel = next(dist.glob("weckd-*.whl"))
    # the checksum file the runbook makes and the onboarding guide checks (docs/runbook.md, docs/onboarding.md)
    subprocess.run("sha256sum weckd-*.whl > SHA256SUMS", shell=True, cwd=dist, check=True, timeout=60)
    ok = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=dist, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == f"{wheel.name}: OK"
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = ("import weckd.chain, weckd.server, weckd.client, pathlib;"
             "print(pathlib.Path(weckd.chain.__file__).parent, pathlib.Path(weckd.client.__file__).parent)")
    where = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                           cwd=tmp_path, env=env, timeout=120).stdout.split()
    assert where == [str(target / "weckd" / "chain"), str(target / "weckd" / "client")]
    help_text = subprocess.run([sys.executable, str(target / "bin" / "weckd"), "--help"], check=True,
                               capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120).stdout
    assert "chain" in help_text
