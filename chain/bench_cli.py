"""``weckd bench protocol`` and ``weckd bench perf``: benchmarks whose outputs go under docs/benchmarks/."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Sequence

import torch

from .artifacts import write_json
from .bench import (
    METHODS,
    REFERENCES,
    ablation_table,
    compute,
    markdown_table,
    paired,
    parse_variant,
    plot_summary,
    run_ablation,
    run_protocol,
    summarise,
)
from .cli import check_archs, run_command, setup_logging
from .config import load_config
from .errors import ConfigError
from .files import atomic_write_text, private_dir, staged_dir
from .perf import Part, PerfOptions, TargetCheck, machine_line, summary_markdown, trainer_part

PARTS = ("trainer", "federation", "relay", "memory", "coordinator", "large")


def bench_command(argv: Sequence[str]) -> int:
    """Benchmarks: the paper's protocol over seeds, and performance ratios."""
    parser = argparse.ArgumentParser(prog="weckd bench", description=bench_command.__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    proto = sub.add_parser("protocol", help="chain vs baselines, mean ± std over seeds")
    proto.add_argument("-c", "--config", required=True)
    proto.add_argument("-o", "--out", required=True, help="output folder (table.md, results.json, plot.png)")
    proto.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, …)")
    proto.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    proto.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    abl = sub.add_parser("ablation", help="last-link accuracy of config variants, mean ± std over seeds")
    abl.add_argument("-c", "--config", required=True)
    abl.add_argument("-o", "--out", required=True, help="output folder (table.md, results.json)")
    abl.add_argument("--seeds", type=int, default=3)
    abl.add_argument("--variant", action="append", required=True, metavar="NAME:KEY=VALUE,…",
                     help="a named set of overrides, e.g. 'alpha0.8:link.alpha=0.8' (repeatable)")
    abl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applies to every variant")
    abl.add_argument("--reference", default="", metavar="NAME",
                     help="a variant every other one is compared with seed by seed (e.g. cwt)")
    abl.add_argument("--workers", type=int, default=1,
                     help="models trained at once, each in its own process (e.g. 8 on one GPU; default 1)")
    perf = sub.add_parser("perf", help="performance ratios: trainer, federation overhead, relay bytes, memory")
    perf.add_argument("-o", "--out", required=True, help="output folder (one table and JSON per part, summary.md)")
    perf.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    perf.add_argument("--reps", type=int, default=3, help="repetitions (trainer, federation)")
    perf.add_argument("--arch", action="append", help="trainer: timm architectures (default: test_resnet, resnet18)")
    perf.add_argument("--size", type=int, default=64, help="trainer: image size")
    perf.add_argument("--batch", type=int, default=32, help="trainer: batch size")
    perf.add_argument("--images", type=int, default=320, help="trainer: images")
    perf.add_argument("--epochs", type=int, default=2, help="trainer: epochs per measurement")
    perf.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="trainer: device")
    perf.add_argument("--links", type=int, nargs="+", default=[3, 10, 30], help="memory: chain lengths")
    perf.add_argument("--seeds", type=int, default=3, help="relay: seeds per config and wire dtype")
    perf.add_argument("--real-data", default="", metavar="NPZ",
                      help="coordinator: a MedMNIST .npz for real-image links (default: synthetic images)")
    perf.add_argument("--relay-config", action="append", default=[], metavar="CONFIG",
                      help="relay: chain configs to compare float32 and float16 on (default: built-in synthetic)")
    args = parser.parse_args(argv)
    setup_logging()
    body = {"protocol": _protocol, "ablation": _ablation, "perf": _perf}[args.what]
    return run_command(lambda: body(args))


def _protocol(args: argparse.Namespace) -> int:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    cfg = load_config(args.config, args.set)
    check_archs(cfg)
    cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, threads=cfg.runtime.threads or 2))
    torch.set_num_threads(cfg.runtime.threads)
    results = run_protocol(cfg, list(range(args.seeds)), methods)
    summary = summarise(results)
    diffs = paired(results)
    cost = {m: compute(cfg, m) for m in summary}
    title = f"{Path(args.config).stem}: {len(cfg.chain.order)} sites, {args.seeds} seeds"
    table = markdown_table(summary, title, cost, diffs)
    with staged_dir(Path(args.out)) as stage:
        write_json(stage / "results.json", {
            "config": args.config, "overrides": args.set, "machine": machine_line(), "summary": summary,
            "site_epochs": cost, "paired": diffs,
            "per_seed": [{"seed": r.seed, "test_accuracy": r.test_accuracy} for r in results],
        })
        atomic_write_text(stage / "table.md", table)
        plot_summary(summary, stage / "plot.png", title, len(cfg.data.classes))
    print(table)
    return 0


def _ablation(args: argparse.Namespace) -> int:
    variants = [parse_variant(v) for v in args.variant]
    if args.reference and args.reference not in {v.name for v in variants}:
        raise ConfigError(f"--reference {args.reference!r}: not one of the --variant names")
    names = [v.name for v in variants]
    clash = sorted({n for n in names if names.count(n) > 1 or n in REFERENCES})
    if clash:
        raise ConfigError(f"--variant {', '.join(clash)}: a name used twice or taken by a reference "
                          f"({', '.join(REFERENCES)})")
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: expected 1 or more")
    cfg = load_config(args.config, args.set)
    check_archs(cfg)
    torch.set_num_threads(cfg.runtime.threads or 2)
    result = run_ablation(args.config, tuple(args.set), list(range(args.seeds)), variants, args.workers)
    title = f"{Path(args.config).stem}: ablation, {args.seeds} seeds"
    table = ablation_table(result, title, args.reference)
    with staged_dir(Path(args.out)) as stage:
        write_json(stage / "results.json", {"config": args.config, "overrides": args.set, "machine": machine_line(),
                                            **result})
        atomic_write_text(stage / "table.md", table)
    print(table)
    return 0


def _perf(args: argparse.Namespace) -> int:
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ConfigError(f"--parts: unknown part(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(PARTS)}")
    registered = {ep.name: ep for ep in entry_points(group="weckd.perf")}
    missing = [p for p in parts if p != "trainer" and p not in registered]
    if missing:
        raise ConfigError(f"--parts {', '.join(missing)}: not installed (the weckd.perf entry points come with "
                          "weckd's coordinator; reinstall weckd)")
    if any(n < 1 for n in args.links) or args.reps < 1 or args.seeds < 1:
        raise ConfigError("--links, --reps and --seeds take positive numbers")
    for path in args.relay_config if "relay" in parts else ():
        check_archs(load_config(path))  # a bad config fails now, not after the parts before it have run
    opts = PerfOptions(out=Path(args.out), reps=args.reps, device=args.device,
                       archs=tuple(args.arch or ("test_resnet", "resnet18")), image_size=args.size,
                       batch_size=args.batch, images=args.images, epochs=args.epochs, links=tuple(args.links),
                       seeds=args.seeds, relay_configs=tuple(args.relay_config), real_data=args.real_data)
    private_dir(opts.out)
    for name in parts:
        part: Part = trainer_part if name == "trainer" else registered[name].load()
        checks = part(opts)
        write_json(opts.out / f"checks-{name}.json", {"date": time.strftime("%Y-%m-%d", time.gmtime()),
                                                      "checks": [dataclasses.asdict(c) for c in checks]})
    # the summary covers every part measured into this folder, this run or an earlier one
    present = [p for p in PARTS if (opts.out / f"checks-{p}.json").is_file()]
    recorded = {p: json.loads((opts.out / f"checks-{p}.json").read_text(encoding="utf-8")) for p in present}
    text = summary_markdown([TargetCheck(**c) for p in present for c in recorded[p]["checks"]],
                            [f"{p} ({recorded[p]['date']})" for p in present])
    atomic_write_text(opts.out / "summary.md", text)
    print(text)
    return 0
