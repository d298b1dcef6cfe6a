#!/usr/bin/env python
"""Fixed cost per chain link of the federation, and bytes relayed per link.

fixed cost per link = (coordinator's round trip for a link's ``train`` message: push → reply pulled)
                      − (the same link trained in one process with the same settings and threads)

Both sides train exactly the same thing (same data split, seeds and threads), so the difference is
what the federation adds: relay over gRPC + TLS, SuperNode polling, ClientApp dispatch, payload
encode/decode. Medians over every link of ``--reps`` federated runs and in-process runs.

    python benchmarks/federation_overhead.py --reps 3 --out docs/benchmarks/federation-overhead.md
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flwr
import torch
from weckd.chain.link import train_link
from weckd.chain.models import pick_device
from weckd.chain.prepare import prepare
from weckd.chain.runner import link_seed, next_teacher
from weckd.server.demo import LocalFederation
from weckd.server.scaffold import chain_settings, make_scaffold
from weckd.server.settings import load_federation

THREADS = 1


def in_process_seconds(federation: Path) -> list[float]:
    """Wall seconds of each link trained in this process, as ``weckd.chain.runner.run_chain`` does it."""
    cfg = load_federation(federation).chain
    torch.set_num_threads(THREADS)
    data = prepare(cfg.data, cfg.chain.order, cfg.seed, cfg.chain.mode == "logits")
    teacher, out = None, []
    for k in range(cfg.n_links):
        start = time.perf_counter()
        result = train_link(cfg.link_settings(k), data.sites[cfg.site_of(k)], data.spec, seed=link_seed(cfg.seed, k),
                            device=pick_device("cpu"), teacher=teacher, proxy=data.proxy,
                            augment_images=cfg.data.augment, label=f"link {k + 1}")
        out.append(time.perf_counter() - start)
        teacher = next_teacher(cfg, result)
    return out


def federated_run(root: Path, chain: dict[str, Any], sealed: bool) -> dict[str, Any]:
    scaffold = make_scaffold(root, chain, {"evaluate": "none"}, threads=THREADS, sealed=sealed)
    fed = LocalFederation(scaffold)
    start = time.monotonic()
    try:
        fed.start_server()
        fed.wait_ready()
        for site in scaffold.sites:
            fed.start_site(site)
        if fed.wait_server(900.0) != 0:
            raise SystemExit(f"federated run failed; logs in {root / 'logs'}")
    finally:
        fed.stop()
    res = fed.results()
    res["wall_seconds"] = time.monotonic() - start
    return res


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, flwr {flwr.__version__}; "
            f"load average {load:.1f} at the end of the benchmark")


@dataclass
class Samples:
    """Per-link samples of one mode (sealed or not) over every rep."""

    fixed: list[float] = field(default_factory=list)
    local: list[float] = field(default_factory=list)
    trips: list[float] = field(default_factory=list)
    to_site: list[int] = field(default_factory=list)
    from_site: list[int] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)


def _cell(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def report(args: argparse.Namespace, modes: dict[str, Samples]) -> str:
    rows = [("train round trip per link, federated (s)", "trips", ".2f"),
            ("same link in one process (s)", "local", ".2f"),
            ("**fixed cost per link** (s)", "fixed", ".2f"),
            ("bytes to the site per link (teacher payload)", "to_site", ",.0f"),
            ("bytes from the site per link (every payload it returns)", "from_site", ",.0f"),
            ("whole federated run incl. start-up (s)", "walls", ".1f")]
    names = list(modes)
    return "\n".join([
        "# Federation overhead: fixed cost and bytes per chain link", "",
        f"Measured by `python benchmarks/federation_overhead.py --reps {args.reps} --epochs {args.epochs}` "
        f"on {time.strftime('%Y-%m-%d', time.gmtime())}.", "",
        f"Machine: {machine()}.", "",
        f"Setup: weckd-server + 3 weckd-client processes on loopback (gRPC + TLS + SuperNode auth), weights mode, "
        f"{args.arch}, {args.epochs} epoch(s) per link, synthetic data (1200 images, 32 px, 1 channel), "
        f"{THREADS} torch thread per site, evaluation off, relayed weights in float16 (the default); "
        f"{args.reps} federated runs × 3 links per mode, sealed and unsealed runs alternating. Sealed: every "
        "payload sealed end to end for its recipient (X25519 + HKDF + AES-256-GCM, Ed25519-signed); the last "
        "link seals the float32 final model for two recipients (the coordinator and site A).", "",
        "Median (min–max) over every link:", "",
        "| quantity | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
        *(f"| {label} | " + " | ".join(_cell(getattr(modes[m], key), fmt) for m in names) + " |"
          for label, key, fmt in rows), "",
        "Link 1 carries no teacher (0 bytes to the site). Stock Flower 1.39 measured ~6.3 s fixed cost per link "
        "on this machine class; the target is ≤ 3 s.", ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--arch", default="test_resnet")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/federation-overhead.md"))
    args = parser.parse_args()
    chain = chain_settings({"link": {"epochs": args.epochs, "arch": args.arch}})
    modes = {"sealed": Samples(), "unsealed": Samples()}
    for rep in range(args.reps):
        for name, m in modes.items():
            with tempfile.TemporaryDirectory(prefix="weckd-bench-") as tmp:
                res = federated_run(Path(tmp), chain, sealed=name == "sealed")
                secs = in_process_seconds(Path(tmp) / "federation.yaml")
            for link, own in zip(res["links"], secs, strict=True):
                m.trips.append(link["round_trip_seconds"])
                m.local.append(own)
                m.fixed.append(link["round_trip_seconds"] - own)
                m.to_site.append(link["bytes_to_site"])
                m.from_site.append(link["bytes_from_site"])
            m.walls.append(res["wall_seconds"])
            print(f"rep {rep + 1} {name}: round trips {[round(x, 2) for x in m.trips[-3:]]}, in-process "
                  f"{[round(x, 2) for x in secs]}", file=sys.stderr)
    text = report(args, modes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
