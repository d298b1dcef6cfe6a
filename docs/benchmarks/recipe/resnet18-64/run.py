"""The recipe at the product's target scale: ``resnet18`` at 64 px on both dev datasets, 5 seeds, every model
of every study in one pool of worker processes (one GPU trains many such small models side by side).

    python run.py OUT DATA_DIR WORKERS [SEEDS] [--quick] [--adamw]

``DATA_DIR`` holds ``breastmnist.npz`` and ``pneumoniamnist.npz``. Writes ``OUT/jobs.jsonl`` as models finish
(one line each: study, seed, name, test accuracy, seconds) and, at the end, ``OUT/results.json``: one
``weckd bench ablation`` result per study, which ``render.py`` turns into the tables. Jobs already in
``OUT/jobs.jsonl`` are not run again. ``--quick`` is the smoke run (the small architecture at 28 px, 1 epoch).
``--adamw`` runs the second set: every model (link 1 and pooled too) with AdamW lr 1e-3, its levers, and
the small architecture at 28 px under both optimisers.
"""
import json
import platform
import sys
import time
from pathlib import Path

import torch
from weckd.chain.bench import AblationJob, ablation_jobs, ablation_result, parse_variant, run_jobs

HERE = Path(__file__).resolve().parent
# the first set runs the recipe as it was (SGD lr 0.02) for every model its variants do not change
SGD = ("link.optimizer=sgd", "link.lr=0.02", "link.weight_decay=0.0005")
PREVIOUS = "link.lr_schedule=link,link.do_no_harm=false,chain.deliver=last"
ADAMW = "link.optimizer=adamw,link.lr=0.001,link.weight_decay=0.05"
FULL = [
    "shipped:",
    "cwt:link.alpha=1.0",
    f"previous defaults:{PREVIOUS}",
    f"previous CWT:link.alpha=1.0,{PREVIOUS}",
    f"pooled AdamW:pooled,{ADAMW},link.lr_schedule=link",
    f"AdamW:{ADAMW}",
    f"cwt AdamW:link.alpha=1.0,{ADAMW}",
    f"frequent AdamW:link.epochs=3,chain.cycles=5,{ADAMW}",
    f"cwt frequent AdamW:link.alpha=1.0,link.epochs=3,chain.cycles=5,{ADAMW}",
]
LABELLED = ["shipped:", "cwt:link.alpha=1.0", f"AdamW:{ADAMW}", f"cwt AdamW:link.alpha=1.0,{ADAMW}"]


def studies(data_dir: Path, quick: bool) -> dict[str, tuple[str, tuple[str, ...], list[str]]]:
    """name → (config, overrides for every model, variants); the longest first."""
    scale = ("link.arch=test_resnet", "data.image_size=28", "link.epochs=1") if quick else (
        "link.arch=resnet18", "data.image_size=64")
    out = {}
    for ds in ("pneumoniamnist", "breastmnist"):
        base = (*scale, f"data.dataset={data_dir / f'{ds}.npz'}", "runtime.threads=1", *SGD)
        out[f"{ds}-full"] = (str(HERE.parent / f"{ds}.yaml"), base, FULL)
    for frac in ("0.3", "0.1"):
        for ds in ("pneumoniamnist", "breastmnist"):
            base = (*scale, f"data.dataset={data_dir / f'{ds}.npz'}", "runtime.threads=1", *SGD,
                    f"data.labelled_fraction={frac}")
            out[f"{ds}-labelled-{frac}"] = (str(HERE.parent / f"{ds}.yaml"), base, LABELLED)
    return out


ADAMW_LEVERS = [
    "shipped:",
    "cwt:link.alpha=1.0",
    "alpha 0.8:link.alpha=0.8",
    "lr 3e-4:link.lr=0.0003",
    "lr 3e-3:link.lr=0.003",
    "frequent:link.epochs=3,chain.cycles=5",
    "levers off:link.do_no_harm=false,chain.deliver=last",
]
SMALL = ["shipped:", "cwt:link.alpha=1.0", "SGD lr 0.02:link.optimizer=sgd,link.lr=0.02,link.weight_decay=0.0005"]


def adamw_studies(data_dir: Path, quick: bool) -> dict[str, tuple[str, tuple[str, ...], list[str]]]:
    """The second set: AdamW lr 1e-3 for every model, at the target scale and at the small one."""
    adamw = tuple(ADAMW.split(","))
    scale = ("link.arch=test_resnet", "data.image_size=28", "link.epochs=1") if quick else (
        "link.arch=resnet18", "data.image_size=64")
    small = ("link.arch=test_resnet", "data.image_size=28") + (("link.epochs=1",) if quick else ())
    out = {}
    for ds in ("pneumoniamnist", "breastmnist"):
        base = (*scale, f"data.dataset={data_dir / f'{ds}.npz'}", "runtime.threads=1", *adamw)
        out[f"{ds}-adamw"] = (str(HERE.parent / f"{ds}.yaml"), base, ADAMW_LEVERS)
    for ds in ("pneumoniamnist", "breastmnist"):
        base = (*small, f"data.dataset={data_dir / f'{ds}.npz'}", "runtime.threads=1", *adamw)
        out[f"{ds}-adamw-small"] = (str(HERE.parent / f"{ds}.yaml"), base, SMALL)
    return out


def main() -> None:
    out, data_dir, workers = Path(sys.argv[1]), Path(sys.argv[2]).resolve(), int(sys.argv[3])
    seeds = list(range(int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4].isdigit() else 5))
    quick = "--quick" in sys.argv
    out.mkdir(parents=True, exist_ok=True)
    log = out / "jobs.jsonl"
    done = {(r["study"], r["seed"], r["name"]): r["acc"] for r in map(json.loads, log.open())} if log.exists() else {}
    plan = {name: (cfg, base, [parse_variant(v) for v in vs])
            for name, (cfg, base, vs) in (adamw_studies if "--adamw" in sys.argv else studies)(data_dir, quick).items()}
    todo: list[tuple[str, tuple[str, ...], AblationJob]] = []
    study_of: dict[int, str] = {}  # id of a job → its study (two studies may share a config and overrides)
    for name, (cfg, base, variants) in plan.items():
        for job in ablation_jobs(seeds, variants):
            if (name, job.seed, job.name) not in done:
                todo.append((cfg, base, job))
                study_of[id(job)] = name
    machine = (f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}, torch {torch.__version__}, "
               f"Python {platform.python_version()}, {workers} worker processes")
    print(machine, f"| {len(todo)} models to train, {len(done)} done before", flush=True)
    start = time.monotonic()
    with log.open("a") as fh:
        def finished(cfg: str, base: tuple[str, ...], job: AblationJob, acc: float, seconds: float) -> None:
            rec = {"study": study_of[id(job)], "seed": job.seed, "name": job.name, "acc": acc,
                   "seconds": round(seconds, 1), "at": round(time.monotonic() - start, 1)}
            done[(rec["study"], job.seed, job.name)] = acc
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            print(json.dumps(rec), flush=True)

        run_jobs(todo, workers, finished)
    results = {}
    for name, (cfg, base, variants) in plan.items():
        jobs = ablation_jobs(seeds, variants)
        results[name] = {"config": str(Path(cfg).relative_to(HERE.parent.parent.parent.parent)),
                         "overrides": [o for o in base if not o.startswith("data.dataset=")], "machine": machine,
                         **ablation_result(seeds, variants, jobs, [done[(name, j.seed, j.name)] for j in jobs])}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"all done in {time.monotonic() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
