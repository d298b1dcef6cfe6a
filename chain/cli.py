"""The ``weckd`` command and its ``weckd chain`` subcommand.

Subcommands are found through the ``weckd.commands`` entry-point group, so the coordinator and
site packages add theirs (``demo``, ``certs``…) without this package importing them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from . import __version__
from .errors import ConfigError, WeckdError

if TYPE_CHECKING:
    from .config import ChainConfig

log = logging.getLogger(__name__)

Command = Callable[[Sequence[str]], int]
ERROR_PREFIX = "weckd: error: "  # every CLI's one-line error; weckd-client shows its executor's by it


def main(argv: Sequence[str] | None = None) -> int:
    """``weckd COMMAND [ARGS…]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not args or args[0] in ("-h", "--help"):
        _print_help(commands)
        return 0 if args else 2
    if args[0] == "--version":
        print(f"weckd {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in commands:
        print(f"weckd: error: unknown command {name!r}; commands: {', '.join(sorted(commands))}", file=sys.stderr)
        return 2
    return commands[name].load()(rest)


def run_command(body: Callable[[], int]) -> int:
    """Run a CLI body: one stderr line and the error's exit code for a WeckdError, 130 on Ctrl-C."""
    try:
        return body()
    except WeckdError as err:
        print(f"{ERROR_PREFIX}{err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("weckd: interrupted", file=sys.stderr)
        return 130


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def chain_command(argv: Sequence[str]) -> int:
    """Run the distillation chain in one process, with its baselines."""
    parser = argparse.ArgumentParser(prog="weckd chain", description=chain_command.__doc__)
    parser.add_argument("-c", "--config", required=True, help="chain config YAML")
    parser.add_argument("-o", "--out", help="output folder (default: runtime.output_dir)")
    parser.add_argument("--seed", type=int, help="override the config's seed")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override runtime.device")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set link.epochs=3 (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_command(lambda: _chain(args))


def _chain(args: argparse.Namespace) -> int:
    # torch and the training stack load here, not with the module: the coordinator and the site's
    # supervisor share run_command/setup_logging and never train
    from .artifacts import ModelCard, save_model, staged_dir, write_json, write_yaml
    from .config import config_to_mapping, load_config
    from .prepare import prepare
    from .report import write_report
    from .runner import format_table, provenance, results_json, run_chain, timings_json

    overrides = list(args.set)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.device is not None:
        overrides.append(f"runtime.device={args.device}")
    cfg = load_config(args.config, overrides)
    check_archs(cfg)
    out = Path(args.out or cfg.runtime.output_dir)
    prepared = prepare(cfg.data, cfg.chain.order, cfg.seed, cfg.chain.mode == "logits")
    run = run_chain(cfg, prepared)
    with staged_dir(out) as stage:
        write_json(stage / "results.json", results_json(run))
        write_json(stage / "timings.json", timings_json(run))
        write_yaml(stage / "config.effective.yaml", config_to_mapping(cfg))
        card = ModelCard(
            run.final.arch, list(cfg.data.classes), cfg.data.image_size, cfg.data.channels, provenance(run)
        )
        save_model(stage / "model", run.final.result.state, card)
        write_report(stage)
    print(format_table(run))
    print(f"outputs: {out}")
    return 0


def check_archs(cfg: ChainConfig) -> None:
    """Every link's architecture must be a timm model; fail before any data is read."""
    from .models import check_arch

    for i in range(cfg.n_links):
        arch = cfg.link_settings(i).arch
        key = f"links[{i}].arch" if i < len(cfg.links) else "link.arch"
        try:
            check_arch(arch, key)
        except ConfigError as err:
            raise ConfigError(f"{cfg.source}: {err}") from None


def _commands() -> dict:
    found = {ep.name: ep for ep in entry_points(group="weckd.commands")}
    if not found:  # running from a tree whose metadata was never installed
        raise SystemExit("weckd: error: no commands registered; install the package with 'pip install -e .'")
    return found


def _print_help(commands: dict) -> None:
    print(f"usage: weckd COMMAND [ARGS...]   (weckd {__version__})\n\ncommands:")
    for name in sorted(commands):
        doc = _summary(commands[name]).strip().splitlines()
        print(f"  {name:<10} {doc[0] if doc else ''}")
    print("\nRun 'weckd COMMAND --help' for a command's options.")


def _summary(ep: Any) -> str:
    """A command's docstring, read from its module's source: listing the commands imports none of them (some
    load torch, seconds each)."""
    import ast
    import importlib.util

    try:
        spec = importlib.util.find_spec(ep.module)
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8")) if spec and spec.origin else None
    except (ImportError, OSError, SyntaxError, ValueError):
        tree = None
    for node in tree.body if tree is not None else ():
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == ep.attr:
            return ast.get_docstring(node) or ""
    return ep.load().__doc__ or ""
