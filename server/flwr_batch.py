"""``python -m weckd.server.flwr_batch``: several ``flwr`` CLI commands in one process.

Each ``flwr`` process spends ~1.5 s of CPU importing Flower's CLI before it sends one request; at
start-up the coordinator needs one command per site (``supernode register``) and one ``run``. This
runs them one after another in a single process: it reads a JSON list of argument lists on stdin
(``--format json`` is added to each) and prints one JSON list with each command's JSON answer, in
order (``{"success": false, "error-message": …}`` where a command printed none). ``supernode register``
answers carry Flower's own ``error-code`` (``weckd.chain.flower.register_node``).
"""
from __future__ import annotations

import io
import json
import sys
from typing import Any


def run_one(app: Any, args: list[str]) -> dict[str, Any]:
    """One command through Flower's CLI app, its JSON answer captured (the CLI prints it to ``sys.__stdout__``
    on purpose, past its own redirection of ``sys.stdout``)."""
    buf, real = io.StringIO(), sys.__stdout__
    sys.__stdout__ = buf  # type: ignore[misc]
    try:
        app(args=[*args, "--format", "json"], prog_name="flwr", standalone_mode=False)
    except SystemExit:
        pass
    except Exception as err:  # noqa: BLE001 - reported as the command's answer, like the CLI's own errors
        if not buf.getvalue().strip():
            return {"success": False, "error-message": f"{type(err).__name__}: {err}"[:500]}
    finally:
        sys.__stdout__ = real  # type: ignore[misc]
        sys.stdout, sys.stderr = real, sys.__stderr__
    text = buf.getvalue().strip()
    try:
        out = json.loads(text)
    except json.JSONDecodeError:
        return {"success": False, "error-message": text[-500:] or "no answer"}
    return out if isinstance(out, dict) else {"success": False, "error-message": str(out)[:500]}


def register(args: list[str]) -> dict[str, Any]:
    """``supernode register KEY CONNECTION --name NAME``, answered with Flower's typed error code
    (``weckd.chain.flower.register_node``) instead of the CLI's words."""
    from weckd.chain.flower import register_node

    key, connection, flag, name = args[2:6]
    assert flag == "--name" and len(args) == 6, args
    buf, real = io.StringIO(), (sys.stdout, sys.__stdout__)
    sys.stdout = sys.__stdout__ = buf  # type: ignore[misc]  # Flower prints which SuperLink it uses
    try:
        return register_node(connection, key, name)
    finally:
        sys.stdout, sys.__stdout__ = real  # type: ignore[misc]


def main() -> int:
    commands = json.loads(sys.stdin.read())
    if not isinstance(commands, list) or not all(isinstance(c, list) and all(isinstance(a, str) for a in c)
                                                 for c in commands):
        print("flwr_batch: stdin must hold a JSON list of argument lists", file=sys.stderr)
        return 2
    from flwr.cli.app import app

    answers = [register(args) if args[:2] == ["supernode", "register"] else run_one(app, args) for args in commands]
    sys.stdout.write(json.dumps(answers))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
