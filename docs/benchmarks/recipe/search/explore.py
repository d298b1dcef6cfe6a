"""The recipe search: chain variants and pooled references per seed, one JSON line per run.

    python explore.py CONFIG OUT.jsonl SEEDS ARCH SIZE [VARIANT,VARIANT,...]

Each line: the seed, the variant, the delivered model's test accuracy (``test``), the last link's
(``last``), link 1's and every link's. ``link1`` here is the chain's first link, which with
``lr_schedule: chain`` trains only the first slice of the schedule; the single-backbone baseline is in
the ablation tables (``weckd bench ablation``), not here. Variants set their keys explicitly, so the
lines stay comparable whatever the defaults.
"""
import dataclasses
import json
import logging
import sys
import time

from weckd.chain.config import load_config
from weckd.chain.prepare import prepare
from weckd.chain.runner import run_chain

F = ["link.epochs=3", "chain.cycles=5"]  # frequent transfer: 5 visits of 3 epochs instead of 1 of 15
CS = ["link.lr_schedule=chain"]
ADAMW = ["link.optimizer=adamw", "link.lr=0.001", "link.weight_decay=0.05"]
VARIANTS: dict[str, list[str] | str] = {
    "base": [], "cwt": ["link.alpha=1.0"], "sched": CS, "freq": F, "freq_sched": F + CS,
    "freq_sched_a05": F + CS + ["link.alpha=0.5"], "freq_sched_dnh": F + CS + ["link.do_no_harm=true"],
    "freq_sched_best": F + CS + ["chain.deliver=best"], "cwt_freq_sched": F + CS + ["link.alpha=1.0"],
    "freq_sched_adamw": F + CS + ADAMW, "cwt_sched": CS + ["link.alpha=1.0"], "sched_a05": CS + ["link.alpha=0.5"],
    "sched_dnh": CS + ["link.do_no_harm=true"], "sched_best": CS + ["chain.deliver=best"], "sched_adamw": CS + ADAMW,
    "dnh_best": ["link.do_no_harm=true", "chain.deliver=best"],
    "pooled_sgd": "pooled", "pooled_adamw": "pooled:adamw",
}
# the recipe as it was before the search, named explicitly (the defaults have changed since)
OFF = ["link.lr_schedule=link", "link.do_no_harm=false", "chain.deliver=last"]


def main() -> None:
    cfg_path, out, seeds, arch, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    only = sys.argv[6].split(",") if len(sys.argv) > 6 else list(VARIANTS)
    logging.basicConfig(level=logging.WARNING)
    # the search ran SGD lr 0.02, the recipe's optimizer then (AdamW lr 1e-3 is the default since)
    common = [f"link.arch={arch}", f"data.image_size={size}", "link.optimizer=sgd", "link.lr=0.02",
              "link.weight_decay=0.0005"]
    with open(out, "a") as fh:
        for seed in range(seeds):
            base = load_config(cfg_path, [*common, f"seed={seed}"])
            data = prepare(base.data, base.chain.order, seed, False)
            for name in only:
                t = time.time()
                rec = run(cfg_path, [*common, f"seed={seed}"], VARIANTS[name], data)
                rec.update(seed=seed, variant=name, seconds=round(time.time() - t, 1))
                fh.write(json.dumps(rec) + "\n")
                fh.flush()


def run(cfg_path: str, common: list[str], ov: list[str] | str, data: object) -> dict:
    if isinstance(ov, str):  # pooled: one model on all sites' data, the recipe's epochs
        cfg = load_config(cfg_path, [*common, *OFF, *(ADAMW if ov.endswith("adamw") else [])])
        cfg = dataclasses.replace(cfg, baselines=dataclasses.replace(cfg.baselines, sites=False, pooled=True),
                                  chain=dataclasses.replace(cfg.chain, order=cfg.chain.order[:1]))
        return {"test": run_chain(cfg, data).baselines[0].test.accuracy}
    cfg = load_config(cfg_path, [*common, *OFF, *ov])
    cfg = dataclasses.replace(cfg, baselines=dataclasses.replace(cfg.baselines, sites=False, pooled=False))
    r = run_chain(cfg, data)
    return {"test": r.final.test.accuracy, "last": r.last.test.accuracy, "link1": r.links[0].test.accuracy,
            "delivered": r.delivered + 1, "links": [x.test.accuracy for x in r.links],
            "kept": [x.result.kept for x in r.links]}


if __name__ == "__main__":
    main()
