"""docs/onboarding.md, followed step by step: every ``bash`` block of the guide, unchanged, run against
a live coordinator on this machine, ends with the site connected (as the site and the coordinator
both report it)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import yaml
from PIL import Image
from weckd.chain.procs import free_port

pytestmark = pytest.mark.slow

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "onboarding.md"
BLOCK = re.compile(r"```bash\n(.*?)```", re.S)
PART_1, PART_2 = "<!-- onboarding: part 1 -->", "<!-- onboarding: part 2 -->"


def guide_parts() -> tuple[str, str, str]:
    """(setup block, part 1 blocks, part 2 blocks) of the guide, as written."""
    text = GUIDE.read_text(encoding="utf-8")
    head, rest = text.split(PART_1)
    one, two = rest.split(PART_2)
    blocks = [BLOCK.findall(t) for t in (head, one, two)]
    assert len(blocks[0]) == 1 and blocks[1] and blocks[2], "the guide lost its structure"
    return blocks[0][0], "".join(blocks[1]), "".join(blocks[2])


def _bash(script: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, start_new_session=True)


def _weckd(*args: str, cwd: Path) -> None:
    subprocess.run([str(Path(sys.executable).with_name(args[0])), *args[1:]], cwd=cwd, check=True,
                   capture_output=True, stdin=subprocess.DEVNULL)


def _images(root: Path) -> Path:
    """A small ImageFolder of real PNG files (64 px grayscale), two classes."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("normal", "abnormal")):
        (root / name).mkdir(parents=True)
        for i in range(30):
            img = rng.integers(0, 120, (64, 64), dtype=np.uint8) + np.uint8(100 * label)
            Image.fromarray(img).save(root / name / f"{name}-{i:02d}.png")
    return root


def _coordinator(root: Path, site_outbox: Path, site_inbox: Path, fleet: str) -> Path:
    """The coordinator's side (docs/runbook.md §1): CA, server certificate, its sealing keys, a second
    site B (which never connects), federation.yaml; sends the site what the guide says it receives."""
    root.mkdir()
    _weckd("weckd", "certs", "ca", "--out", "certs", cwd=root)
    _weckd("weckd", "certs", "server", "--ca-dir", "certs", "--name", "localhost", "--ip", "127.0.0.1", cwd=root)
    _weckd("weckd", "keys", "--site", "coordinator", "--out", "keys", cwd=root)
    _weckd("weckd", "certs", "site", "--site", "B", "--out", "keys", cwd=root)
    _weckd("weckd", "keys", "--site", "B", "--out", "keys", cwd=root)
    for name in ("site-A.pub", "site-A.x25519.pub", "site-A.ed25519.pub"):
        (root / "keys" / name).write_bytes((site_outbox / name).read_bytes())
    site_inbox.mkdir()
    (site_inbox / "ca.crt").write_bytes((root / "certs" / "ca.crt").read_bytes())
    for party in ("B", "coordinator"):
        for alg in ("x25519", "ed25519"):
            name = f"site-{party}.{alg}.pub"
            (site_inbox / name).write_bytes((root / "keys" / name).read_bytes())
    cfg = {"seed": 0, "chain": {"order": ["A", "B"]}, "link": {"arch": "test_resnet", "epochs": 1},
           "data": {"classes": ["normal", "abnormal"], "image_size": 64, "channels": 1},
           "federation": {"fleet_address": fleet, "control_port": free_port(), "state_dir": "state",
                          "output_dir": "out", "ca": "certs/ca.crt", "cert": "certs/server.pem",
                          "key": "certs/server.key", "metrics_address": "127.0.0.1", "metrics_port": free_port(),
                          "discovery_timeout": 600.0, "shutdown_timeout": 5.0,
                          "sites": {"A": {"auth_key": "keys/site-A.pub"}, "B": {"auth_key": "keys/site-B.pub"}},
                          "sealing": {"deliver_to": ["coordinator", "A"], "keys": "keys",
                                      "peers": {"A": "keys", "B": "keys"}}}}
    (root / "federation.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return root / "federation.yaml"


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)


def test_the_onboarding_guide_brings_a_site_up_against_a_coordinator(
        tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    setup, part1, part2 = guide_parts()
    fleet = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "SITE": "A", "WECKD_ETC": str(tmp_path / "site" / "etc"), "STATE": str(tmp_path / "site"),
           "DATA": str(_images(tmp_path / "site" / "data")), "COORDINATOR": fleet,
           "OUTBOX": str(tmp_path / "outbox"), "INBOX": str(tmp_path / "inbox"), "METRICS_PORT": str(free_port()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    first = _bash(setup + part1, env, 120)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in (tmp_path / "outbox").iterdir()) == [
        "site-A.ed25519.pub", "site-A.pub", "site-A.x25519.pub"]  # public halves only
    assert "ed25519 fingerprint" in first.stdout

    federation = _coordinator(tmp_path / "coordinator", tmp_path / "outbox", tmp_path / "inbox", fleet)
    server = subprocess.Popen([str(Path(sys.executable).with_name("weckd-server")), "-c", str(federation)],
                              cwd=federation.parent, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=(tmp_path / "server.log").open("wb"), start_new_session=True)
    processes.append(server)
    ready = federation.parent / "state" / "ready"
    for _ in range(600):
        if ready.is_file() or server.poll() is not None:
            break
        time.sleep(0.1)
    assert ready.is_file(), (tmp_path / "server.log").read_text()

    second = subprocess.Popen(["bash", "-euo", "pipefail", "-c", setup + part2], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    processes.append(second)  # its process group holds the weckd-client started in the background
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    assert "config and data OK" in err
    assert "weckd_site_connected 1.0" in out
    assert "site A: connected to the coordinator" in out

    metrics = yaml.safe_load(federation.read_text())["federation"]["metrics_port"]
    for _ in range(100):  # the coordinator sees site A online (B never comes: the chain does not start)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode()
        if 'weckd_site_connected{site="A"} 1.0' in text:
            break
        time.sleep(0.5)
    assert 'weckd_site_connected{site="A"} 1.0' in text
    assert 'weckd_site_connected{site="B"} 0.0' in text
