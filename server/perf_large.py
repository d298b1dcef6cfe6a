"""``weckd bench perf`` part ``large``: a large model through the federation, and state that stays bounded.

One federation on loopback (weckd-server + 3 weckd-client, gRPC + TLS + SuperNode auth, sealed,
``evaluate: all``, the final model delivered to the coordinator and site A) trains a 3-link chain of
``convnext_base`` (88M parameters; 1 epoch a link on a few synthetic 32-px images: the model's size,
not its training, is what is measured), then the same chain again with ``weckd-server --fresh``, three
chains in all, the sites staying up. Reported: seconds and bytes per link (each direction, as relayed),
whether every chain completed, and the size of the coordinator's and each site's state folder after the
first and after the last chain (target: no growth with the number of chains beyond the checkpoint).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from weckd.chain.artifacts import write_json
from weckd.chain.errors import LinkError
from weckd.chain.files import atomic_write_text, private_dir
from weckd.chain.perf import PerfOptions, TargetCheck, machine_line

from .demo import LocalFederation
from .scaffold import chain_settings, make_scaffold

ARCH = "convnext_base"
CHAINS = 3
GROWTH_MB = 50.0  # allowed growth of a state folder from the first chain to the last


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20 if path.is_dir() else 0.0


def _sizes(root: Path) -> dict[str, float]:
    """Each state folder's size; a site's ``delivered/`` (the final models it received: its outputs, kept by
    design) is listed on its own, as ``<site>/delivered``."""
    out = {}
    for p in sorted((root / "state").iterdir()):
        if p.is_dir():
            delivered = _size_mb(p / "delivered")
            out[p.name] = round(_size_mb(p) - delivered, 1)
            if delivered:
                out[f"{p.name}/delivered"] = round(delivered, 1)
    return out


def large_run(root: Path, arch: str = ARCH, chains: int = CHAINS) -> dict[str, Any]:
    chain = chain_settings({"link": {"arch": arch, "epochs": 1, "batch_size": 8, "lr": 0.001},
                            "data": {"image_size": 32, "channels": 3, "synthetic": {"samples": 160}}})
    scaffold = make_scaffold(root, chain, {"evaluate": "all", "link_timeout": 1800.0})
    fed = LocalFederation(scaffold)
    runs: list[dict[str, Any]] = []
    try:
        for site in scaffold.sites:
            fed.start_site(site)
        for i in range(chains):
            start = time.monotonic()
            if i:
                (root / "state" / "server" / "ready").unlink(missing_ok=True)
            fed.start_server(*(("--fresh",) if i else ()))
            rc = fed.wait_server(3600.0)
            if rc != 0:
                raise LinkError(f"chain {i + 1} of {arch} failed (exit {rc}); logs in {root / 'logs'}")
            res = json.loads((root / "out" / "results.json").read_text())
            runs.append({"chain": i + 1, "seconds": time.monotonic() - start, "run_id": res["run_id"],
                         "links": [{"link": r["link"], "site": r["site"], "round_trip_s": r["round_trip_seconds"],
                                    "train_s": r["train_seconds"], "bytes_to_site": r["bytes_to_site"],
                                    "bytes_from_site": r["bytes_from_site"]} for r in res["links"]],
                         "state_mb": _sizes(root)})
            fed.group.procs = [(n, p) for n, p in fed.group.procs if n != "weckd-server"]
    finally:
        fed.stop()
    return {"arch": arch, "chains": runs}


def report(data: dict[str, Any]) -> str:
    first, last = data["chains"][0], data["chains"][-1]
    lines = ["# A large model through the federation, and bounded state", "",
             f"Measured by `weckd bench perf --parts large` on {time.strftime('%Y-%m-%d', time.gmtime())}.", "",
             f"Machine: {machine_line()}.", "",
             f"Setup: weckd-server + 3 weckd-client on loopback (gRPC + TLS + SuperNode auth), sealed, evaluate: all, "
             f"final model to the coordinator and site A; {data['arch']}, 1 epoch a link on synthetic 32-px images; "
             f"{len(data['chains'])} chains of 3 links one after another (`--fresh`), the sites staying up.", "",
             "| chain | link | site | round trip (s) | training (s) | bytes to site | bytes from site |",
             "|---|---|---|---|---|---|---|"]
    for c in data["chains"]:
        for r in c["links"]:
            lines.append(f"| {c['chain']} | {r['link']} | {r['site']} | {r['round_trip_s']:.1f} | {r['train_s']:.1f} | "
                         f"{r['bytes_to_site']:,} | {r['bytes_from_site']:,} |")
    lines += ["", "State folders (MB) after each chain:", "", "| chain | " + " | ".join(first["state_mb"]) + " |",
              "|---|" + "---|" * len(first["state_mb"])]
    for c in data["chains"]:
        lines.append(f"| {c['chain']} | " + " | ".join(f"{c['state_mb'].get(k, 0.0):.1f}" for k in first["state_mb"])
                     + " |")
    growth = {k: last["state_mb"].get(k, 0.0) - v for k, v in first["state_mb"].items()}
    lines += ["", "Growth from the first chain to the last (MB): "
              + ", ".join(f"{k} {v:+.1f}" for k, v in growth.items()) + ". A site's `delivered/` holds the final "
              "models it received (its outputs, one per run, kept by design); the rest of every folder is state.", ""]
    return "\n".join(lines)


def large_part(opts: PerfOptions) -> list[TargetCheck]:
    """Bytes and seconds per link of a ~90M-parameter model, and state-folder sizes over several chains."""
    with tempfile.TemporaryDirectory(prefix="weckd-bench-") as tmp:
        data = large_run(Path(tmp))
    private_dir(opts.out)
    write_json(opts.out / "large.json", {"machine": machine_line(), **data})
    atomic_write_text(opts.out / "large.md", report(data))
    return checks(data)


def checks(data: dict[str, Any]) -> list[TargetCheck]:
    """Every chain completed; neither the coordinator's state folder nor a site's (its delivered models aside)
    grows from the first chain to the last by more than GROWTH_MB."""
    first, last = data["chains"][0], data["chains"][-1]
    growth = {k: last["state_mb"].get(k, 0.0) - v for k, v in first["state_mb"].items() if not k.endswith("/delivered")}
    site = max((v for k, v in growth.items() if k != "server"), default=0.0)
    return [TargetCheck("large", f"3-link {data['arch']} chains completed, sealed, 2 recipients",
                        f"{len(data['chains'])} of {CHAINS}", f"{CHAINS} of {CHAINS}", len(data["chains"]) == CHAINS),
            TargetCheck("large", f"coordinator state-folder growth from chain 1 to chain {len(data['chains'])}",
                        f"{growth.get('server', 0.0):+.1f} MB", f"≤ {GROWTH_MB:.0f} MB",
                        growth.get("server", 0.0) <= GROWTH_MB),
            TargetCheck("large", "site state-folder growth, delivered models aside (largest)", f"{site:+.1f} MB",
                        f"≤ {GROWTH_MB:.0f} MB", site <= GROWTH_MB)]
