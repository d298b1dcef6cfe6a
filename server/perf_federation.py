"""``weckd bench perf`` part ``federation``: fixed cost per chain link and bytes relayed per link.

fixed cost per link = (coordinator's round trip for a link's ``train`` message: push → reply pulled)
                      − (the same link trained in one process with the same settings and threads)

Both sides train exactly the same thing (same data split, seeds and threads), so the difference is
what the federation adds: relay over gRPC + TLS, SuperNode polling, ClientApp dispatch, payload
encode/decode, sealing. Medians over every link of ``reps`` federated runs per mode (sealed and
unsealed, alternating) and the in-process runs of the same links.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from weckd.chain.artifacts import write_json
from weckd.chain.config import config_from_mapping, merge_mappings
from weckd.chain.errors import LinkError
from weckd.chain.files import atomic_write_text, private_dir
from weckd.chain.link import evaluate, model_from_state, train_link
from weckd.chain.models import pick_device
from weckd.chain.payload import round_state
from weckd.chain.perf import PerfOptions, TargetCheck, machine_line
from weckd.chain.prepare import prepare
from weckd.chain.runner import link_seed, next_teacher
from weckd.chain.schema import Origin

from .demo import LocalFederation
from .scaffold import chain_settings, make_scaffold
from .status import read_events

THREADS = 1
EPOCHS = 1
ARCH = "test_resnet"
# a link that trains this long is the regime the federated/in-process wall-time target speaks of
LONG_LINK_S = 120.0
# the wide mode: more sites, every one of them scoring every link (federation.evaluate: all)
WIDE = "sealed, 6 sites, evaluate all"
WIDE_SITES = ("A", "B", "C", "D", "E", "F")


def in_process_seconds(root: Path, chain: dict[str, Any], evaluate_all: bool = False) -> list[float]:
    """Wall seconds of each link of ``chain`` (the settings a scaffold under ``root`` was made from) trained in
    this process, as ``weckd.chain.runner.run_chain`` does it; with ``evaluate_all``, each link's model is also
    scored on every site's validation split, as the sites do it in a federation with ``evaluate: all``."""
    cfg = config_from_mapping(merge_mappings(chain, {"runtime": {"threads": THREADS, "device": "cpu"}}),
                              Origin(str(root / "federation.yaml"), root))
    torch.set_num_threads(THREADS)
    data = prepare(cfg.data, cfg.chain.order, cfg.seed, cfg.chain.mode == "logits")
    teacher, out = None, []
    for k in range(cfg.n_links):
        start = time.perf_counter()
        result = train_link(cfg.link_settings(k), data.sites[cfg.site_of(k)], data.spec, seed=link_seed(cfg.seed, k),
                            device=pick_device("cpu"), teacher=teacher, proxy=data.proxy,
                            augment_images=cfg.data.augment, label=f"link {k + 1}")
        if evaluate_all:
            model = model_from_state(result.arch, round_state(result.state, cfg.chain.wire_dtype), data.spec,
                                     pick_device("cpu"))
            for site in data.sites.values():
                evaluate(model, site.val, len(data.spec.classes), pick_device("cpu"))
        out.append(time.perf_counter() - start)
        teacher = next_teacher(cfg, result)
    return out


def federated_run(root: Path, chain: dict[str, Any], sealed: bool = True, evaluate: str = "none") -> dict[str, Any]:
    """One real federation (weckd-server + one weckd-client per site on loopback); its results.json, with
    ``link_seconds``: each link from its start to its end as the coordinator saw it (training, and the
    evaluations where ``evaluate`` asks for them)."""
    scaffold = make_scaffold(root, chain, {"evaluate": evaluate}, threads=THREADS, sealed=sealed)
    fed = LocalFederation(scaffold)
    start = time.monotonic()
    try:
        fed.start_server()
        fed.wait_ready()
        for site in scaffold.sites:
            fed.start_site(site)
        if fed.wait_server(900.0) != 0:
            raise LinkError(f"benchmark federation failed; logs in {root / 'logs'}")
    finally:
        fed.stop()
    res = fed.results()
    res["wall_seconds"] = time.monotonic() - start
    events = [e for p in sorted((root / "state" / "server").glob("progress-*.jsonl")) for e in read_events(p)]
    starts = {e["link"]: e["t"] for e in events if e.get("event") == "link-start"}
    res["link_seconds"] = [e["t"] - starts[e["link"]] for e in events if e.get("event") == "link-done"]
    return res


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


def report(reps: int, modes: dict[str, Samples]) -> str:
    rows = [("train round trip per link, federated (s)", "trips", ".2f"),
            ("same link in one process (s)", "local", ".2f"),
            ("**fixed cost per link** (s)", "fixed", ".2f"),
            ("bytes to the site per link (teacher payload)", "to_site", ",.0f"),
            ("bytes from the site per link (every payload it returns)", "from_site", ",.0f"),
            ("whole federated run incl. start-up (s)", "walls", ".1f")]
    names = list(modes)
    sealed = modes["sealed"]
    ratio = statistics.median(sealed.trips) / statistics.median(sealed.local)
    fixed = statistics.median(sealed.fixed)
    return "\n".join([
        "# Federation overhead: fixed cost and bytes per chain link", "",
        f"Measured by `weckd bench perf --parts federation --reps {reps}` on "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}.", "",
        f"Machine: {machine_line()}.", "",
        f"Setup: weckd-server + 3 weckd-client processes on loopback (gRPC + TLS + SuperNode auth), weights mode, "
        f"{ARCH}, {EPOCHS} epoch per link, synthetic data (1200 images, 32 px, 1 channel), {THREADS} torch thread "
        f"per site, evaluation off, relayed weights in float16 (the default); {reps} federated runs × 3 links per "
        "mode, sealed and unsealed runs alternating, and the same links trained in this process after each run. "
        "Sealed: every payload sealed end to end for its recipient (X25519 + HKDF + AES-256-GCM, Ed25519-signed); "
        "the last link seals the float32 final model for two recipients (the coordinator and site A). "
        f"{WIDE.capitalize()}: the same, sealed, with {len(WIDE_SITES)} sites (200 images each) and "
        "`federation.evaluate: all`: every site scores every link's model on its validation split, so a link "
        "there runs from its train message to its last evaluation reply (the coordinator's link-start to "
        "link-done), against training plus the same evaluations in one process.", "",
        "Median (min–max) over every link:", "",
        "| quantity | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
        *(f"| {label} | " + " | ".join(_cell(getattr(modes[m], key), fmt) for m in names) + " |"
          for label, key, fmt in rows), "",
        f"Federated / in-process time of one link, sealed, at this link size: {ratio:.2f}× (a {EPOCHS}-epoch link "
        f"of {ARCH} trains in well under a second, so the fixed cost dominates). The fixed cost does not grow "
        f"with the link's training time, so for a link that trains {LONG_LINK_S:.0f} s it adds "
        f"{fixed / LONG_LINK_S * 100:.1f}%: ({LONG_LINK_S:.0f} + {fixed:.2f}) / {LONG_LINK_S:.0f} = "
        f"{(LONG_LINK_S + fixed) / LONG_LINK_S:.3f}×.", "",
        "Link 1 carries no teacher (0 bytes to the site). Stock Flower 1.39 measured ~6.3 s fixed cost per link "
        "on this machine class; the target is ≤ 1.5 s (DESIGN.md).", ""])


def federation_part(opts: PerfOptions) -> list[TargetCheck]:
    """(b) Federated vs in-process link time and the fixed cost per link: federation.md, federation.json."""
    chain = chain_settings({"link": {"epochs": EPOCHS, "arch": ARCH}})
    wide = chain_settings({"link": {"epochs": EPOCHS, "arch": ARCH}, "chain": {"order": list(WIDE_SITES)}})
    modes = {"sealed": Samples(), "unsealed": Samples(), WIDE: Samples()}
    for _ in range(opts.reps):
        for name, m in modes.items():
            with tempfile.TemporaryDirectory(prefix="weckd-bench-") as tmp:
                if name == WIDE:  # a link: its training and every site's evaluation of it
                    res = federated_run(Path(tmp), wide, evaluate="all")
                    secs = in_process_seconds(Path(tmp), wide, evaluate_all=True)
                    trips = res["link_seconds"]
                else:
                    res = federated_run(Path(tmp), chain, sealed=name == "sealed")
                    secs = in_process_seconds(Path(tmp), chain)
                    trips = [link["round_trip_seconds"] for link in res["links"]]
            for link, trip, own in zip(res["links"], trips, secs, strict=True):
                m.trips.append(trip)
                m.local.append(own)
                m.fixed.append(trip - own)
                m.to_site.append(link["bytes_to_site"])
                m.from_site.append(link["bytes_from_site"])
            m.walls.append(res["wall_seconds"])
    private_dir(opts.out)
    write_json(opts.out / "federation.json", {"machine": machine_line(), "reps": opts.reps,
                                              "modes": {k: vars(v) for k, v in modes.items()}})
    atomic_write_text(opts.out / "federation.md", report(opts.reps, modes))
    return federation_checks(modes)


def federation_checks(modes: dict[str, Samples]) -> list[TargetCheck]:
    fixed = {name: statistics.median(m.fixed) for name, m in modes.items()}
    long_ratio = (LONG_LINK_S + fixed["sealed"]) / LONG_LINK_S
    return [TargetCheck("federation", f"fixed cost per link, {name}", f"{value:.2f} s", "≤ 1.5 s", value <= 1.5)
            for name, value in fixed.items()] + [
        TargetCheck("federation", f"federated / in-process wall time, {LONG_LINK_S:.0f} s link (from the fixed cost)",
                    f"{long_ratio:.3f}×", "≤ 1.05×", long_ratio <= 1.05)]
