"""The two roles stay apart and the processes that never train stay light.

``server/`` (the coordinator) and ``client/`` (a site) never import each other: what both need lives in
``chain/`` (Flower-free, except ``chain/flower.py``, the one adapter over Flower). The coordinator's
processes and a site's supervisor and SuperNode never import torch, timm or matplotlib; the e2e
federation checks the same of the running processes (``tests/e2e/conftest.py``, ``TorchWatch``).
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "timm", "torchvision", "opacus", "matplotlib")
# the modules each non-training process starts from (weckd-server, the ServerApp, the coordinator's SuperExec and
# SuperLink, weckd-client's supervisor, its SuperNode)
LIGHT_ENTRIES = ("weckd.server.cli", "weckd.server.app", "weckd.server.flower_superlink",
                 "weckd.client.cli", "weckd.client.supernode")


def _imports(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names, relative imports resolved to ``weckd.*``."""
    package = "weckd." + path.parent.name
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package if node.level == 1 else "weckd"
                out.add(f"{base}.{node.module}" if node.module else base)
            else:
                out.add(node.module or "")
    return out


@pytest.mark.parametrize(("folder", "other"), [("server", "weckd.client"), ("client", "weckd.server")])
def test_the_roles_never_import_each_other(folder: str, other: str) -> None:
    found = {f"{path.relative_to(REPO)}: {name}" for path in sorted((REPO / folder).glob("*.py"))
             for name in _imports(path) if name == other or name.startswith(other + ".")}
    assert not found, f"{folder}/ imports the other role: {sorted(found)}"


def test_chain_imports_neither_role_and_only_its_adapter_imports_flower() -> None:
    bad = set()
    for path in sorted((REPO / "chain").glob("*.py")):
        for name in _imports(path):
            if name.startswith(("weckd.server", "weckd.client")):
                bad.add(f"{path.name}: {name}")
            if name.split(".")[0] == "flwr" and path.name != "flower.py":
                bad.add(f"{path.name}: {name}")
    assert not bad, sorted(bad)


def test_the_import_check_sees_a_role_import(tmp_path: Path) -> None:
    """The check above can fail: it finds a relative and an absolute import of the other role."""
    mod = tmp_path / "server" / "x.py"
    mod.parent.mkdir()
    mod.write_text("from weckd.client.site import SiteConfig\nfrom .relay import Relay\n")
    assert _imports(mod) == {"weckd.client.site", "weckd.server.relay"}


@pytest.mark.parametrize("entry", LIGHT_ENTRIES)
def test_processes_that_never_train_import_no_torch(entry: str) -> None:
    code = f"import sys, json, {entry}; print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout) == [], f"{entry} imports {out.stdout.strip()}"


def test_the_site_executor_does_import_torch() -> None:
    """The same probe on the process that trains: it sees torch (the probe is not blind)."""
    code = "import sys, weckd.client.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "True"


def test_listing_the_commands_imports_none_of_them() -> None:
    """``weckd --help`` shows every command's summary from its source: no command module (predict and bench load
    torch) is imported to list them."""
    code = ("import json, sys; from weckd.chain.cli import main, _commands; main(['--help']);"
            "print(json.dumps([sorted(n for n, ep in _commands().items() if ep.module in sys.modules),"
            "'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.splitlines()[-1]) == [["chain"], False]  # chain's module is the CLI itself
    assert "predict    Predict the class of images with a model saved by 'weckd chain'." in out.stdout


def test_the_bench_measures_sites_with_the_site_configs_own_heartbeat() -> None:
    """``server/`` may not import the site's config type, so the shipped default is written there again: kept equal."""
    from weckd.client.site import SiteConfig
    from weckd.server.scaffold import SITE_HEARTBEAT

    assert SiteConfig(site="A").heartbeat == SITE_HEARTBEAT
