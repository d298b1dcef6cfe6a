"""What a federated run leaves in the coordinator's output dir: results.json, the final model and its card."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from weckd.chain import __version__
from weckd.chain.artifacts import ModelCard, save_model, write_json, write_yaml
from weckd.chain.config import config_to_mapping
from weckd.chain.delivery import deliver_rule, delivery_json, evaluations_accuracy
from weckd.chain.files import atomic_write, inside, private_dir
from weckd.chain.payload import decode_arrays, payload_from_bytes
from weckd.chain.peers import COORDINATOR, load_party

from .schedule import ChainOutcome
from .settings import RESULTS_FILE, Federation, coordinator_sealing
from .state import LinkRecord

log = logging.getLogger(__name__)



def mean_eval(record: LinkRecord) -> float | None:
    """Sample-weighted accuracy of a link's model over the sites that evaluated it."""
    evs = record.evaluations.values()
    n = sum(e["n"] for e in evs)
    return sum(e["accuracy"] * e["n"] for e in evs) / n if n else None


def _square(flat: list[int], n: int) -> list[list[int]]:
    return [list(flat[i * n:(i + 1) * n]) for i in range(n)]


def held_out(r: LinkRecord, n_classes: int) -> dict[str, Any] | None:
    """The link's model on every evaluating site's validation split, pooled: accuracy, recall, confusion."""
    evs = [e for e in r.evaluations.values() if len(e.get("confusion", [])) == n_classes * n_classes]
    if not evs:
        return None
    conf = np.sum([np.array(_square(e["confusion"], n_classes)) for e in evs], axis=0)
    support = np.maximum(conf.sum(1), 1)
    return {"accuracy": float(np.trace(conf)) / max(int(conf.sum()), 1), "n": int(conf.sum()),
            "recall": (np.diag(conf) / support).tolist(), "confusion": conf.tolist(),
            "sites": sorted(r.evaluations)}


def _link_json(r: LinkRecord) -> dict[str, Any]:
    m = r.metrics
    n_classes = len(m["val-recall"])
    conf = _square(list(m["val-confusion"]), n_classes)
    row = {
        "name": f"link {r.index + 1}", "kind": "link",
        "link": r.index + 1, "site": r.site, "arch": r.arch, "init": r.init,
        "val": {"accuracy": m["val-accuracy"], "recall": list(m["val-recall"]), "confusion": conf, "n": m["val-n"]},
        "epochs": [{"epoch": i + 1, "loss": lo, "ce": ce, "kd": kd, "seconds": s} for i, (lo, ce, kd, s) in
                   enumerate(zip(m["epoch-loss"], m["epoch-ce"], m["epoch-kd"], m["epoch-seconds"]))],
        "samples": {k[len("samples-"):]: v for k, v in m.items() if k.startswith("samples-")},
        "train_seconds": m["seconds"], "round_trip_seconds": r.round_trip_s,
        "bytes_to_site": r.bytes_to_site, "bytes_from_site": r.bytes_from_site,
        "evaluations": r.evaluations, "eval_accuracy": mean_eval(r),
    }
    privacy = {k[len("privacy-"):]: v for k, v in m.items() if k.startswith("privacy-")}
    if privacy:  # DP-SGD at the site: the spent epsilon and the mechanism (chain.privacy.PrivacySpent)
        row["privacy"] = privacy
    if "teacher-val-accuracy" in m:  # do_no_harm: the teacher on this site, and what was handed on
        row["do_no_harm"] = {"teacher_val_accuracy": m["teacher-val-accuracy"],
                             "kept": "teacher" if m["teacher-kept"] else "student"}
    test = held_out(r, n_classes)
    if test is not None:
        row["test"] = test
    return row


def results(fed: Federation, outcome: ChainOutcome, seconds: float) -> dict[str, Any]:
    cfg = fed.chain
    links = [_link_json(r) for r in outcome.links]
    first, last = links[0]["eval_accuracy"], links[-1]["eval_accuracy"]
    summary: dict[str, Any] = {"link1_eval_accuracy": first, "last_eval_accuracy": last,
                               "gain_over_link1": (last - first) if first is not None and last is not None else None,
                               "seconds": seconds}
    extra: dict[str, Any] = {}
    if fed.settings.algorithm == "fedavg":
        extra["algorithm"] = {"name": "fedavg", "rounds": len(outcome.links), "epochs_per_round": 1}
    elif outcome.final is not None and deliver_rule(cfg.chain.deliver, cfg.chain.mode, fed.settings.evaluate) == "best":
        pooled = [evaluations_accuracy(r.evaluations) for r in outcome.links]
        extra["delivered"] = delivery_json("best", outcome.final.link, pooled)
        summary["delivered_eval_accuracy"] = links[outcome.final.link]["eval_accuracy"]
    return {"weckd_version": __version__, "seed": cfg.seed, "mode": cfg.chain.mode, "classes": list(cfg.data.classes),
            "order": list(cfg.chain.order), "cycles": cfg.chain.cycles, "evaluate": fed.settings.evaluate,
            "sites": {s: {"counts": i["counts"]} for s, i in outcome.sites.items()},
            "links": links, "baselines": [], "summary": summary,
            "held_out": "federated evaluation: each link's model on the evaluating sites' validation splits",
            **extra}


def final_model(fed: Federation, outcome: ChainOutcome, run_id: str) -> tuple[str, dict[str, Any]] | None:
    """(arch, state) of the delivered model as the coordinator can read it; None when it is sealed for
    sites only (the coordinator then keeps the sealed blob and cannot open it)."""
    relay = outcome.final
    if relay is None:
        return None
    where = f"final model (link {relay.link + 1}, site {relay.site})"
    if relay.sealed:
        sealing = coordinator_sealing(fed)
        if sealing is None:
            return None
        party = load_party(COORDINATOR, sealing, fed.source)
        data = party.open_from(relay.blob("weights", COORDINATOR), sender=relay.site, run_id=run_id,
                               link=relay.link, kind="weights")
    else:
        data = relay.blob("weights", COORDINATOR)
    header, arrays = payload_from_bytes(data, where)
    return decode_arrays(header, arrays, link=relay.link, where=where)


def write_outputs(out: Path, fed: Federation, outcome: ChainOutcome, seconds: float, run_id: str) -> None:
    """results.json, config.effective.yaml, model/ (safetensors + model card) where the coordinator may
    read the final model, and sealed/final-model.sealed (the final model as sealed for its recipients) in a
    sealed run."""
    private_dir(out)
    cfg = fed.chain
    model = final_model(fed, outcome, run_id)
    if model is not None:
        arch, state = model
        provenance = {"seed": cfg.seed, "mode": cfg.chain.mode, "order": list(cfg.chain.order),
                      "cycles": cfg.chain.cycles, "federated": True, "run_id": run_id, "skipped": outcome.skipped,
                      "links": [{"link": r.index + 1, "site": r.site, "arch": r.arch, "init": r.init}
                                for r in outcome.links],
                      "val_accuracy": outcome.links[-1].metrics["val-accuracy"]}
        card = ModelCard(arch, list(cfg.data.classes), cfg.data.image_size, cfg.data.channels, provenance)
        save_model(out / "model", state, card)
    if outcome.final is not None and outcome.final.sealed:
        sealed = out / "sealed"
        private_dir(sealed)
        if "weights" in outcome.final.blobs:
            atomic_write(inside(sealed, "final-model.sealed"), outcome.final.blobs["weights"])
    write_yaml(out / "config.effective.yaml", config_to_mapping(cfg))
    data = results(fed, outcome, seconds)
    data["run_id"], data["skipped"] = run_id, outcome.skipped
    write_json(out / RESULTS_FILE, data)
    log.info("results written to %s (weckd-server draws the report from them: weckd.server.plots)", out)
