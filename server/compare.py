"""``weckd compare JOB…``: chains and baselines run across the same sites, side by side.

Each argument is a job id of the coordinator named with ``-c`` (its outputs are in
``<output_dir>/<job id>/``), an output folder, or a ``results.json``. For every run: the accuracy each
site gets on its own validation split, pooled over the sites (sample-weighted), the compute it took
(site-epochs, training seconds) and the bytes the coordinator relayed. For the chain, cyclic weight
transfer and FedAvg a site's figure is the delivered model's; for ``local`` (each site alone) it is the site's own
model, the one it would have without the federation.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from weckd.chain.cli import run_command, setup_logging
from weckd.chain.errors import ConfigError

from .settings import RESULTS_FILE, load_federation


def find_results(ref: str, output_dir: Path | None) -> Path:
    """The ``results.json`` that ``ref`` (a job id, a folder or the file) names."""
    p = Path(ref)
    for candidate in (p, p / RESULTS_FILE, *((output_dir / ref / RESULTS_FILE,) if output_dir else ())):
        if candidate.is_file() and candidate.name == RESULTS_FILE:
            return candidate
    where = f" or in {output_dir}" if output_dir else " (pass -c federation.yaml to name jobs by id)"
    raise ConfigError(f"{ref}: no {RESULTS_FILE} there{where}; name a completed job, its output folder or the file")


def _site_score(link: dict[str, Any], site: str) -> tuple[float, int] | None:
    ev = link.get("evaluations", {}).get(site)
    if isinstance(ev, dict) and "accuracy" in ev:
        return float(ev["accuracy"]), int(ev["n"])
    if link.get("site") == site:
        return float(link["val"]["accuracy"]), int(link["val"]["n"])
    return None


def run_row(data: dict[str, Any], label: str) -> dict[str, Any]:
    """One run's comparison row from its results."""
    job = data.get("job", {})
    kind = str(job.get("kind", "chain"))
    links = data["links"]
    sites = list(dict.fromkeys(data["order"]))
    scores: dict[str, tuple[float, int] | None] = {}
    if kind == "local":
        for site in sites:
            own = [link for link in links if link["site"] == site]
            scores[site] = _site_score(own[-1], site) if own else None
        model = "each site's own model"
    else:
        index = int(data.get("delivered", {}).get("link", len(links))) - 1
        scores = {site: _site_score(links[index], site) for site in sites}
        model = f"{'round' if kind == 'fedavg' else 'link'} {index + 1}"
    known = [v for v in scores.values() if v is not None]
    n = sum(k for _, k in known)
    return {
        "run": label, "job": job.get("id", ""), "name": job.get("name", ""), "kind": kind, "model": model,
        "run_id": data.get("run_id"), "seed": data.get("seed"), "sites": {s: (v[0] if v else None) for s, v in
                                                                          scores.items()},
        "val_n": {s: (v[1] if v else None) for s, v in scores.items()},
        "pooled": sum(a * k for a, k in known) / n if n else None,
        "site_epochs": sum(len(link.get("epochs", [])) for link in links),
        "train_seconds": sum(float(link.get("train_seconds", 0.0)) for link in links),
        "bytes": sum(int(link.get("bytes_to_site", 0)) + int(link.get("bytes_from_site", 0)) for link in links),
        "seconds": data.get("summary", {}).get("seconds"),
    }


def comparable(rows: list[dict[str, Any]]) -> list[str]:
    """Why these runs are not a like-for-like comparison (empty when they are)."""
    notes = []
    if len({r["seed"] for r in rows}) > 1:
        notes.append("the runs have different seeds (different initial weights)")
    if len({json.dumps(r["val_n"], sort_keys=True) for r in rows}) > 1:
        notes.append("the runs were scored on validation splits of different sizes")
    return notes


def format_table(rows: list[dict[str, Any]]) -> str:
    sites = list(dict.fromkeys(s for r in rows for s in r["sites"]))

    def pct(v: float | None) -> str:
        return f"{100 * v:.1f}" if v is not None else "-"

    head = f"{'job':<26} {'kind':<6} " + " ".join(f"{s:>7}" for s in sites) + \
        f" {'pooled':>7} {'vs 1st':>7} {'site-ep':>7} {'train s':>8} {'MB moved':>9}"
    lines = ["validation accuracy (%) each site gets, pooled over the sites; compute and bytes relayed", head,
             "-" * len(head)]
    first = rows[0]["pooled"]
    for r in rows:
        diff = f"{100 * (r['pooled'] - first):+.1f}" if r["pooled"] is not None and first is not None else "-"
        label = (r["name"] or r["run"])[:26]
        lines.append(f"{label:<26} {r['kind']:<6} " + " ".join(f"{pct(r['sites'].get(s)):>7}" for s in sites)
                     + f" {pct(r['pooled']):>7} {diff:>7} {r['site_epochs']:>7} {r['train_seconds']:>8.1f}"
                     f" {r['bytes'] / 1e6:>9.2f}")
    lines += [f"note: {n}" for n in comparable(rows)]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """A grouped bar chart: per-site and pooled accuracy of every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*dict.fromkeys(s for r in rows for s in r["sites"]), "pooled"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(groups), 3.6))
    width = 0.8 / len(rows)
    values = [[(r["pooled"] if g == "pooled" else r["sites"].get(g)) for g in groups] for r in rows]
    for i, (r, vals) in enumerate(zip(rows, values)):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(groups))]
        heights = [100 * v if v is not None else 0 for v in vals]
        ax.bar(xs, heights, width, label=f"{r['name'] or r['run']} ({r['kind']})")
    known = [100 * v for vals in values for v in vals if v is not None]
    if known:
        ax.set_ylim(max(0.0, min(known) - 10), min(100.0, max(known) + 5))
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_command(argv: Sequence[str]) -> int:
    """Compare chains and baselines run across the same sites (per-site and pooled accuracy, compute, bytes)."""
    parser = argparse.ArgumentParser(prog="weckd compare", description=compare_command.__doc__)
    parser.add_argument("runs", nargs="+", help="job ids (with -c), output folders or results.json files")
    parser.add_argument("-c", "--config", help="the coordinator's federation YAML (to name jobs by id)")
    parser.add_argument("--plot", metavar="PNG", help="also draw the comparison into this PNG")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    setup_logging(False)

    def body() -> int:
        output = Path(load_federation(args.config).settings.output_dir) if args.config else None
        rows = []
        for ref in args.runs:
            path = find_results(ref, output)
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                rows.append(run_row(data, ref))
            except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
                raise ConfigError(f"{path}: not a weckd federation results file ({type(err).__name__}: "
                                  f"{str(err)[:120]})") from err
        print(json.dumps(rows, indent=1) if args.json else format_table(rows))
        if args.plot:
            plot(rows, Path(args.plot))
        return 0

    return run_command(body)
