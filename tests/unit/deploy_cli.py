"""What the deployment files may pass to the CLIs, read from the CLIs' own ``--help``.

The flags are parsed from the real help text (``weckd-server --help``, ``weckd-client --help``, ``weckd certs
server --help`` …), never hard-coded, so a flag that is renamed or removed in ``server/cli.py`` or
``client/cli.py`` fails the deploy tests that still use it.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

from weckd.chain.cli import main as weckd_main
from weckd.client.cli import main as client_main
from weckd.server.cli import main as server_main

PROGRAMS: dict[str, Callable[[Sequence[str]], int]] = {
    "weckd-server": server_main,
    "weckd-client": client_main,
    "weckd": weckd_main,
}
OPTION_LINE = re.compile(r"^\s{2,}(-{1,2}[A-Za-z].*?)(?:\s{2,}|$)")
SUBCOMMANDS = re.compile(r"\{([\w,-]+)\}")


@dataclass(frozen=True)
class Usage:
    """One (sub)command's interface: every flag (and whether it takes a value), the required ones, subcommands."""

    flags: dict[str, bool]
    required: tuple[frozenset[str], ...]
    subcommands: frozenset[str]
    positionals: int = 0  # how many plain arguments it takes (-1: any number)


def help_text(prog: str, args: Sequence[str] = ()) -> str:
    """``PROG ARGS… --help``, run in-process; what it printed (help goes to stdout, exit 0)."""
    out = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "400"  # one line per option
    try:
        with contextlib.redirect_stdout(out):
            code = PROGRAMS[prog]([*args, "--help"])
    except SystemExit as err:
        code = err.code
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    assert code in (0, None), f"{prog} {' '.join(args)} --help exited {code}"
    return out.getvalue()


@lru_cache(maxsize=None)
def usage(prog: str, args: tuple[str, ...] = ()) -> Usage:
    text = help_text(prog, args)
    flags: dict[str, bool] = {}
    groups: list[frozenset[str]] = []
    for line in text.splitlines():
        m = OPTION_LINE.match(line)
        if not m:
            continue
        names = []
        for spec in m.group(1).split(", "):
            parts = spec.split()
            flags[parts[0]] = len(parts) > 1
            names.append(parts[0])
        groups.append(frozenset(names))
    head = text.split("\n\n", 1)[0]
    while re.search(r"\[[^\[\]]*\]", head):  # drop optional parts, innermost first
        head = re.sub(r"\[[^\[\]]*\]", "", head)
    required = set(re.findall(r"(?<![\w-])(-{1,2}[A-Za-z][\w-]*)", head.removeprefix("usage:")))
    usage_line = text.split("\n\n", 1)[0]
    subs = SUBCOMMANDS.search(re.sub(r"-[\w-]+ \{[^}]*\}", "", usage_line))  # a flag's choices are not commands
    section = text.split("positional arguments:\n", 1)[1].split("\n\n", 1)[0] if "positional arguments:" in text else ""
    names = re.findall(r"^\s{2}([a-z][\w-]*)\b", section, flags=re.M)
    positionals = -1 if any(f"{n} ..." in usage_line for n in names) else len(names)
    return Usage(flags, tuple(g for g in groups if g & required),
                 frozenset(subs.group(1).split(",")) if subs else frozenset(), 0 if subs else positionals)


def weckd_subcommands() -> frozenset[str]:
    """``weckd``'s commands, from its help text (an entry-point list, not argparse)."""
    text = help_text("weckd")
    return frozenset(re.findall(r"^\s{2,}([a-z][\w-]*)\s", text, flags=re.M))


def check_command(argv: Sequence[str]) -> list[str]:
    """Problems with one weckd command line: unknown program, subcommand or flag, missing value or required flag."""
    argv = [os.path.basename(argv[0]), *argv[1:]]
    prog, rest = argv[0], list(argv[1:])
    if prog not in PROGRAMS:
        return [f"{prog}: not a weckd command ({', '.join(PROGRAMS)})"]
    path: list[str] = []
    if prog == "weckd":
        if not rest or rest[0] not in weckd_subcommands():
            return [f"weckd: unknown command {rest[:1]}; commands: {sorted(weckd_subcommands())}"]
        path.append(rest.pop(0))
    problems = []
    while True:
        u = usage(prog, tuple(path))
        if not u.subcommands:
            break
        if not rest or rest[0] not in u.subcommands:
            return [f"{prog} {' '.join(path)}: expected one of {sorted(u.subcommands)}, got {rest[:1]}"]
        path.append(rest.pop(0))
    where = " ".join([prog, *path])
    seen: set[str] = set()
    i, plain = 0, 0
    while i < len(rest):
        token = rest[i]
        flag, eq, _ = token.partition("=")
        if not token.startswith("-"):
            plain += 1
            if u.positionals != -1 and plain > u.positionals:
                problems.append(f"{where}: unexpected argument {token!r}")
        elif flag not in u.flags:
            problems.append(f"{where}: no flag {flag!r} (has {sorted(u.flags)})")
        else:
            seen.add(flag)
            if u.flags[flag] and not eq:
                if i + 1 >= len(rest) or rest[i + 1].startswith("-"):
                    problems.append(f"{where}: {flag} needs a value")
                else:
                    i += 1
        i += 1
    for group in u.required:
        if not group & seen:
            problems.append(f"{where}: missing required {'/'.join(sorted(group))}")
    return problems


def shell_commands(script: str) -> list[list[str]]:
    """The weckd commands in a POSIX shell snippet (one simple command per line or after && / || / ;)."""
    found = []
    for line in script.splitlines():
        for part in re.split(r"&&|\|\||;", line.split("#", 1)[0]):
            words = shlex.split(part)
            while words and words[0] in ("exec", "then", "do", "else"):
                words = words[1:]
            if words and os.path.basename(words[0]) in PROGRAMS:
                found.append(words)
    return found
