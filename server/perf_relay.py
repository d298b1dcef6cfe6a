"""``weckd bench perf`` part ``relay``: bytes relayed per link, float32 vs float16 on the wire, and the
accuracy of each; and whether compressing the float16 payload pays.

In one process (``weckd.chain.runner.run_chain``, whose teacher is rounded through the wire dtype
exactly as the federation relays it): last-link test accuracy over seeds for each config and wire
dtype, and the bytes of each link's payload from the real encoder (``encode_state(...)``).
Then one real federation per wire dtype (weckd-server + 3 weckd-client on loopback, sealed): the
array bytes of each ``train`` message and reply as the coordinator relays them. Compression: the
float16 payload with its bytes split into high and low planes, then zlib (level 6), against its
raw size, with the time to compress and decompress.
"""
from __future__ import annotations

import statistics
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from weckd.chain.artifacts import write_json
from weckd.chain.config import ChainConfig, config_from_mapping, load_config
from weckd.chain.files import atomic_write_text, private_dir
from weckd.chain.payload import encode_state
from weckd.chain.perf import PerfOptions, TargetCheck, machine_line
from weckd.chain.runner import run_chain
from weckd.chain.schema import Origin

from .perf_federation import federated_run
from .scaffold import chain_settings

WIRES = ("float32", "float16")
BUILTIN = "built-in synthetic"
THREADS = 2


def _config(name: str, seed: int, wire: str) -> ChainConfig:
    overrides = [f"seed={seed}", f"chain.wire_dtype={wire}", "baselines.sites=false", "baselines.pooled=false",
                 "runtime.device=cpu", f"runtime.threads={THREADS}"]
    if name != BUILTIN:
        return load_config(name, overrides)
    raw = chain_settings({"seed": seed, "chain": {"wire_dtype": wire}, "baselines": {"sites": False, "pooled": False},
                          "runtime": {"device": "cpu", "threads": THREADS}})
    return config_from_mapping(raw, Origin(BUILTIN, Path.cwd()))


def _payload_bytes(state: dict[str, torch.Tensor], arch: str, link: int, wire: str) -> int:
    return encode_state(state, arch, link, wire).nbytes


def _float_bytes(state: dict[str, torch.Tensor], wire: str) -> int:
    size = 2 if wire == "float16" else 4
    return int(sum(t.numel() * size for t in state.values() if t.is_floating_point()))


def one_chain(name: str, seed: int, wire: str) -> dict[str, Any]:
    run = run_chain(_config(name, seed, wire))
    state = run.links[0].result.state
    return {"seed": seed, "wire": wire, "arch": run.final.arch, "last_test_accuracy": run.final.test.accuracy,
            "state_dict_bytes": int(sum(t.numel() * t.element_size() for t in state.values())),
            "float_bytes": _float_bytes(state, wire),
            "payload_bytes": _payload_bytes(state, run.links[0].arch, 0, wire),
            "state": state if seed == 0 and wire == "float16" else None}


def compression(state: dict[str, torch.Tensor], arch: str) -> dict[str, float]:
    """Byte-plane split + zlib on the float16 payload: size ratio and seconds each way (median of 5)."""
    raw = b"".join(np.ascontiguousarray(a).tobytes() for a in encode_state(state, arch, 1, "float16").arrays.values())
    planes = np.frombuffer(raw[: len(raw) // 2 * 2], dtype=np.uint8).reshape(-1, 2)
    shuffled = planes[:, 1].tobytes() + planes[:, 0].tobytes() + raw[len(raw) // 2 * 2:]
    packs, unpacks = [], []
    for _ in range(5):
        start = time.perf_counter()
        packed = zlib.compress(shuffled, 6)
        packs.append(time.perf_counter() - start)
        start = time.perf_counter()
        zlib.decompress(packed)
        unpacks.append(time.perf_counter() - start)
    seconds = statistics.median(packs) + statistics.median(unpacks)
    saved = len(raw) - len(packed)
    return {"raw_bytes": len(raw), "compressed_bytes": len(packed), "ratio": len(packed) / len(raw),
            "compress_s": statistics.median(packs), "decompress_s": statistics.median(unpacks),
            # below this bandwidth the bytes saved take longer to send than compressing takes
            "break_even_mbit_s": saved * 8 / seconds / 1e6}


def federation_bytes() -> dict[str, list[dict[str, int]]]:
    out = {}
    for wire in WIRES:
        chain = chain_settings({"chain": {"wire_dtype": wire}, "link": {"epochs": 1}})
        with tempfile.TemporaryDirectory(prefix="weckd-relay-") as tmp:
            res = federated_run(Path(tmp), chain)
        out[wire] = [{"link": r["link"], "bytes_to_site": r["bytes_to_site"], "bytes_from_site": r["bytes_from_site"]}
                     for r in res["links"]]
    return out


def _stats(runs: list[dict[str, Any]], wire: str) -> tuple[float, float]:
    accs = [r["last_test_accuracy"] for r in runs if r["wire"] == wire]
    return statistics.fmean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0


def relay_part(opts: PerfOptions) -> list[TargetCheck]:
    """(c) Bytes per link, fp32 vs fp16 on the wire, with the accuracy of each: relay.md, relay.json."""
    configs = list(opts.relay_configs) or [BUILTIN]
    data: dict[str, Any] = {"machine": machine_line(), "seeds": opts.seeds, "configs": {}}
    comp: dict[str, float] = {}
    for name in configs:
        runs = [one_chain(name, seed, wire) for seed in range(opts.seeds) for wire in WIRES]
        if not comp:
            fp16 = next(r for r in runs if r["state"] is not None)
            comp = compression(fp16["state"], fp16["arch"])
        data["configs"][name] = [{k: v for k, v in r.items() if k != "state"} for r in runs]
    data["compression"] = comp
    data["federation"] = federation_bytes()
    private_dir(opts.out)
    write_json(opts.out / "relay.json", data)
    atomic_write_text(opts.out / "relay.md", report(data))
    return checks(data)


def checks(data: dict[str, Any]) -> list[TargetCheck]:
    out = []
    for name, runs in data["configs"].items():
        r32 = next(r for r in runs if r["wire"] == "float32")
        r16 = next(r for r in runs if r["wire"] == "float16")
        floats = r16["float_bytes"] / r32["float_bytes"]
        out.append(TargetCheck("relay", f"{name} ({r16['arch']}): floating-point tensors, float16 / float32 bytes",
                               f"{floats:.6f}×", "≤ 0.5×", floats <= 0.5))
        ratio = r16["payload_bytes"] / r32["state_dict_bytes"]
        out.append(TargetCheck("relay", f"{name} ({r16['arch']}): whole float16 payload / float32 state_dict "
                               "(int64 counters travel as they are)", f"{ratio:.6f}×", "≤ 0.5×", ratio <= 0.5))
        (m32, s32), (m16, s16) = _stats(runs, "float32"), _stats(runs, "float16")
        out.append(TargetCheck("relay", f"{name}: last-link accuracy, float16 − float32 (seed std)",
                               f"{100 * (m16 - m32):+.1f} points ({100 * max(s32, s16):.1f})",
                               "not below −1 seed std", m16 - m32 >= -max(s32, s16)))
    fed = data["federation"]
    teacher32 = max(x["bytes_to_site"] for x in fed["float32"])
    teacher16 = max(x["bytes_to_site"] for x in fed["float16"])
    out.append(TargetCheck("relay", "federation, sealed teacher bytes per link, float16 / float32",
                           f"{teacher16 / teacher32:.4f}×", "≤ 0.5×", teacher16 / teacher32 <= 0.5))
    return out


def report(data: dict[str, Any]) -> str:
    lines = ["# Relay: bytes per link and accuracy, weights on the wire as float32 vs float16", "",
             f"Measured by `weckd bench perf --parts relay --seeds {data['seeds']}` on "
             f"{time.strftime('%Y-%m-%d', time.gmtime())}.", "", f"Machine: {data['machine']}.", "",
             "## In one process: last-link test accuracy and payload bytes", "",
             "Chain of 3 links (A → B → C), weights mode, baselines off; the teacher handed to link k+1 is rounded "
             f"through the wire dtype as the federation relays it; {THREADS} torch threads, device cpu. Bytes: the "
             "real encoder's tensors (`encode_state(...)`) for one link's model.", "",
             "| config | arch | last-link test acc, fp32 | last-link test acc, fp16 | fp32 state_dict B | "
             "payload B, fp32 | payload B, fp16 | fp16 payload / fp32 state_dict | float tensors, fp16 / fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in data["configs"].items():
        r32 = next(r for r in runs if r["wire"] == "float32")
        r16 = next(r for r in runs if r["wire"] == "float16")
        (m32, s32), (m16, s16) = _stats(runs, "float32"), _stats(runs, "float16")
        lines.append(f"| {name} | {r16['arch']} | {m32:.3f} ± {s32:.3f} | {m16:.3f} ± {s16:.3f} | "
                     f"{r32['state_dict_bytes']:,} | {r32['payload_bytes']:,} | {r16['payload_bytes']:,} | "
                     f"**{r16['payload_bytes'] / r32['state_dict_bytes']:.5f}×** | "
                     f"{r16['float_bytes'] / r32['float_bytes']:.3f}× |")
    lines += ["", f"Mean ± std over {data['seeds']} seeds. Per seed (last-link test accuracy, fp32 / fp16):", ""]
    for name, runs in data["configs"].items():
        per = {r["seed"]: [x["last_test_accuracy"] for x in runs if x["seed"] == r["seed"]] for r in runs}
        lines.append(f"- {name}: " + ", ".join(f"seed {s}: {'/'.join(f'{a:.4f}' for a in v)}" for s, v in per.items()))
    lines += ["", "Integer buffers (BatchNorm `num_batches_tracked`, 8 B each) travel as int64, which puts the "
              "whole payload a few bytes above 0.5× the fp32 state_dict; every floating tensor is exactly 0.5×.", ""]
    fed = data["federation"]
    lines += ["## One real federation each way: bytes relayed per link", "",
              "weckd-server + 3 weckd-client on loopback (gRPC + TLS + SuperNode auth), payloads sealed end to end, "
              "built-in synthetic data, test_resnet, 1 epoch per link. Bytes: array bytes of the `train` message the "
              "coordinator sends (teacher) and of the site's reply, as relayed.", "",
              "| link | to site, fp32 | to site, fp16 | from site, fp32 | from site, fp16 |", "|---|---|---|---|---|"]
    for a, b in zip(fed["float32"], fed["float16"], strict=True):
        lines.append(f"| {a['link']} | {a['bytes_to_site']:,} | {b['bytes_to_site']:,} | {a['bytes_from_site']:,} | "
                     f"{b['bytes_from_site']:,} |")
    lines += ["", "A sealed blob adds a fixed few KB (seal header, nonce, tag, signature) and 60 B per recipient. "
              "The last link's reply is the delivered model, float32, encrypted once for all its recipients; "
              "link 1 carries no teacher.", ""]
    c = data["compression"]
    lines += ["## Compression of the float16 payload", "",
              f"Byte planes split, then zlib level 6: {c['compressed_bytes']:,} of {c['raw_bytes']:,} B "
              f"(**{c['ratio']:.3f}×**), {1000 * c['compress_s']:.0f} ms to compress and "
              f"{1000 * c['decompress_s']:.0f} ms to decompress (median of 5). It saves time only on links slower "
              f"than **{c['break_even_mbit_s']:.0f} Mbit/s**; the time scales with the model (both sides' CPU, "
              "every hop), so weckd relays float16 uncompressed.", ""]
    return "\n".join(lines)
