"""``weckd audit verify FILE [--json]``: check an audit log's hash chain and summarise it.

Exit 0 when the chain holds, 1 when it is broken (one stderr line naming the first bad line and
why), 2 on usage errors (a missing file included).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .audit import AuditSummary, head_path, verify
from .cli import run_command
from .errors import ConfigError


def audit_command(argv: Sequence[str]) -> int:
    """Verify a party's hash-chained audit log (weckd audit verify FILE)."""
    parser = argparse.ArgumentParser(prog="weckd audit", description=audit_command.__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("verify", help="check the chain and the head; print a summary")
    check.add_argument("file", help=f"the audit log (its {head_path(Path('audit.log')).name} sidecar next to it)")
    check.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    return run_command(lambda: _verify(Path(args.file), args.json))


def _verify(path: Path, as_json: bool) -> int:
    if not path.is_file():
        raise ConfigError(f"{path}: no such audit log; give the path of a party's audit.log")
    summary = verify(path)
    if as_json:
        print(json.dumps(summary.to_json(), indent=2, sort_keys=True))
    else:
        print(format_summary(summary))
    if not summary.ok:
        more = f" ({len(summary.problems) - 1} more problem(s))" if len(summary.problems) > 1 else ""
        print(f"weckd: audit: {path}: broken at {summary.problems[0]}{more}", file=sys.stderr)
        return 1
    return 0


def format_summary(s: AuditSummary) -> str:
    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"

    span = f"{s.first_time} .. {s.last_time}" if s.lines else "empty"
    return "\n".join([f"{s.path}: {s.lines} line(s), {span}: {'chain ok' if s.ok else 'CHAIN BROKEN'}",
                      f"  events:    {counts(s.events)}",
                      f"  decisions: {counts(s.decisions)}",
                      f"  reasons:   {counts(s.reasons)}"])
