"""Every weckd command the operator docs tell someone to type exists, with those flags (read from the CLIs'
own ``--help``); the onboarding guide's blocks are also run end to end in tests/e2e/test_onboarding.py."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from .deploy_cli import check_command, shell_commands

DOCS = Path(__file__).resolve().parents[2] / "docs"
FENCE = re.compile(r"```(?:bash|text|console)\n(.*?)```", re.S)


@pytest.mark.parametrize("doc", ["onboarding.md", "runbook.md"])
def test_every_documented_command_and_flag_exists(doc: str) -> None:
    text = (DOCS / doc).read_text(encoding="utf-8")
    commands = [cmd for block in FENCE.findall(text) for cmd in shell_commands(block.replace("\\\n", " "))]
    assert len(commands) >= 3, f"{doc}: expected weckd commands in its code blocks"
    problems = [p for cmd in commands for p in check_command(cmd)]
    assert not problems, problems


@pytest.mark.parametrize("doc", ["onboarding.md", "runbook.md", "threat-model.md"])
def test_docs_name_only_files_that_exist(doc: str) -> None:
    root = DOCS.parent
    text = (DOCS / doc).read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:deploy|docs|tests|configs|chain|server|client)/[\w./@-]+)`", text))
    assert named, doc
    missing = sorted(p for p in named if not (root / p.split("::")[0]).exists())
    assert not missing, f"{doc} names missing files: {missing}"


@pytest.mark.parametrize(("cmd", "problems"), [
    ("weckd submit job.yaml -c f.yaml --kind cwt", []),
    ("weckd compare a b c -c f.yaml", []),  # any number of runs
    ("weckd submit job.yaml other.yaml -c f.yaml", ["weckd submit: unexpected argument 'other.yaml'"]),
    ("weckd submit job.yaml", ["weckd submit: missing required --config/-c"]),
    ("weckd-server -c f.yaml extra", ["weckd-server: unexpected argument 'extra'"]),
    ("weckd status -c f.yaml --jsn", None),
])
def test_the_command_check_sees_positionals_and_flags(cmd: str, problems: list[str] | None) -> None:
    found = check_command(cmd.split())
    if problems is None:
        assert len(found) == 1 and "no flag '--jsn'" in found[0]
    else:
        assert found == problems
