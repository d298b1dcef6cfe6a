"""A run's report: ``report.md``, ``report.html`` and three PNG plots, from its results.json.

Everything is read back from the files a run leaves (results.json, and timings.json when present),
so a report can be rebuilt for any old run dir with ``weckd report RUN_DIR``. Figures are drawn
with matplotlib's Agg canvas at fixed sizes, without pyplot, so no global figure state is touched.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import ConfigError
from .files import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

DPI = 100
ACCURACY_PNG = "accuracy_per_link.png"
LOSS_PNG = "loss_curves.png"
CONFUSION_PNG = "confusion_matrix.png"
# Pixel sizes (width, height) of the plots: figure inches × DPI, never cropped.
PNG_SIZES: dict[str, tuple[int, int]] = {ACCURACY_PNG: (800, 500), LOSS_PNG: (1200, 400), CONFUSION_PNG: (600, 500)}
ROW_KEYS = ("name", "site", "arch", "init", "val", "test", "epochs")


@dataclass(frozen=True)
class RunResults:
    """A run dir's results.json (checked) and its per-model seconds from timings.json, if present."""

    run_dir: Path
    results: dict[str, Any]
    seconds: dict[str, float] | None


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    html: Path
    plots: list[Path]


# ---------------------------------------------------------------- reading


def load_run(run_dir: Path) -> RunResults:
    """Read and check a run dir's results.json; timings.json is optional."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: run dir not found; pass the output folder of 'weckd chain'")
    path = run_dir / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: results.json not found; is {run_dir} the output folder of 'weckd chain'?") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read results: {err}; rerun 'weckd chain' to rewrite it") from err
    _check_results(results, path)
    return RunResults(run_dir, results, _load_seconds(run_dir / "timings.json"))


def _check_results(results: Any, path: Path) -> None:
    def bad(what: str) -> ConfigError:
        return ConfigError(f"{path}: malformed results: {what}; rerun 'weckd chain' to rewrite it")

    if not isinstance(results, dict):
        raise bad("expected a JSON object")
    for key, kind in (("links", list), ("baselines", list), ("classes", list), ("summary", dict)):
        if not isinstance(results.get(key), kind):
            raise bad(f"'{key}' missing or not a {kind.__name__}")
    if not results["links"]:
        raise bad("'links' is empty")
    n = len(results["classes"])
    for group in ("links", "baselines"):
        for i, row in enumerate(results[group]):
            missing = [k for k in ROW_KEYS if not isinstance(row, dict) or k not in row]
            if missing:
                raise bad(f"{group}[{i}] lacks '{missing[0]}'")
            for split in ("val", "test"):
                if not isinstance(row[split], dict) or not isinstance(row[split].get("accuracy"), (int, float)):
                    raise bad(f"{group}[{i}].{split}.accuracy missing or not a number")
    confusion = results["links"][-1]["test"].get("confusion")
    if not (isinstance(confusion, list) and len(confusion) == n and all(len(r) == n for r in confusion)):
        raise bad(f"links[-1].test.confusion is not a {n}×{n} matrix")


def _load_seconds(path: Path) -> dict[str, float] | None:
    if not path.is_file():
        return None
    try:
        timings = json.loads(path.read_text(encoding="utf-8"))
        rows = timings["links"] + timings["baselines"]
        return {str(r["name"]): float(r["seconds"]) for r in rows}
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s: unreadable (%s): the report leaves out seconds", path, err)
        return None


# ---------------------------------------------------------------- plots


def _new_figure(name: str) -> Figure:
    width, height = PNG_SIZES[name]
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=DPI)
    atomic_write(path, png.getvalue())


def accuracy_range(values: Sequence[float], chance: float, margin: float = 0.05) -> tuple[float, float]:
    """Axis limits that hold ``values`` and the chance level with a margin, on a 0.05 grid within [0, 1]
    and at least 0.2 wide: zoomed to where the accuracies are, not the whole unit interval."""
    step = 0.05
    lo = max(0.0, math.floor((min([*values, chance]) - margin) / step + 1e-9) * step)
    hi = min(1.0, math.ceil((max([*values, chance]) + margin) / step - 1e-9) * step)
    if hi - lo < 0.2:
        lo, hi = max(0.0, min(lo, hi - 0.2)), min(1.0, max(hi, lo + 0.2))
    return round(lo, 2), round(hi, 2)


def chance_level(run: RunResults) -> float:
    """Accuracy of guessing among the run's classes."""
    return 1.0 / max(1, len(run.results.get("classes") or ()))


def plot_accuracy(run: RunResults) -> Path:
    """Val and test accuracy per link, with the baselines' test accuracy as horizontal lines."""
    links = run.results["links"]
    fig = _new_figure(ACCURACY_PNG)
    ax = fig.add_subplot()
    x = list(range(1, len(links) + 1))
    ax.plot(x, [r["val"]["accuracy"] for r in links], "o-", label="val")
    ax.plot(x, [r["test"]["accuracy"] for r in links], "s-", label="test")
    ax.axhline(links[0]["test"]["accuracy"], color="grey", linestyle="--", label="link 1 (test)")
    for i, row in enumerate(run.results["baselines"]):
        if row["kind"] == "site":
            ax.axhline(row["test"]["accuracy"], color=f"C{i + 2}", linestyle=":", label=f"{row['name']} (test)")
        elif row["kind"] == "pooled":
            ax.axhline(row["test"]["accuracy"], color="black", linestyle="-.", label="pooled (test)")
    chance = chance_level(run)
    ax.axhline(chance, color="red", linestyle=":", linewidth=1, label=f"chance ({chance:.0%})")
    ax.set_xticks(x, [f"{k}\n{r['site']}" for k, r in zip(x, links)])
    ax.set_xlabel("link (site)")
    ax.set_ylabel("accuracy")
    shown = [r[s]["accuracy"] for r in links for s in ("val", "test")]
    shown += [b["test"]["accuracy"] for b in run.results["baselines"] if b["kind"] in ("site", "pooled")]
    ax.set_ylim(*accuracy_range(shown, chance))
    ax.set_title("Accuracy per link")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    path = run.run_dir / ACCURACY_PNG
    _save_figure(fig, path)
    return path


def plot_losses(run: RunResults) -> Path:
    """Total loss, CE and KD per epoch, one line per link."""
    fig = _new_figure(LOSS_PNG)
    axes = fig.subplots(1, 3)
    for ax, part in zip(axes, ("loss", "ce", "kd")):
        for row in run.results["links"]:
            epochs = row["epochs"]
            ax.plot([e["epoch"] for e in epochs], [e[part] for e in epochs], "o-", ms=3, label=row["name"])
        ax.set_title(part)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    path = run.run_dir / LOSS_PNG
    _save_figure(fig, path)
    return path


def plot_confusion(run: RunResults) -> Path:
    """The final link's test confusion matrix (rows: true class, columns: predicted), with counts."""
    final = run.results["links"][-1]
    matrix = final["test"]["confusion"]
    classes = [str(c) for c in run.results["classes"]]
    fig = _new_figure(CONFUSION_PNG)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    top = max((max(r) for r in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            colour = "white" if count > top / 2 else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=9)
    ticks = list(range(len(classes)))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{final['name']} test confusion (acc {final['test']['accuracy']:.3f})")
    path = run.run_dir / CONFUSION_PNG
    _save_figure(fig, path)
    return path


# ---------------------------------------------------------------- tables


def _seconds(run: RunResults, row: dict[str, Any]) -> str:
    if run.seconds is None or row["name"] not in run.seconds:
        return "–"
    return f"{run.seconds[row['name']]:.1f}"


def link_rows(run: RunResults) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the per-link table."""
    head = ["link", "site", "arch", "init", "val acc", "test acc"] + (["seconds"] if run.seconds else [])
    rows = []
    for k, r in enumerate(run.results["links"], start=1):
        cells = [str(k), r["site"], r["arch"], r["init"], f"{r['val']['accuracy']:.3f}", f"{r['test']['accuracy']:.3f}"]
        rows.append(cells + ([_seconds(run, r)] if run.seconds else []))
    return head, rows


def baseline_rows(run: RunResults) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the baselines table."""
    head = ["baseline", "site", "arch", "val acc", "test acc"] + (["seconds"] if run.seconds else [])
    rows = []
    for r in run.results["baselines"]:
        cells = [r["name"], r["site"], r["arch"], f"{r['val']['accuracy']:.3f}", f"{r['test']['accuracy']:.3f}"]
        rows.append(cells + ([_seconds(run, r)] if run.seconds else []))
    return head, rows


def summary_lines(run: RunResults) -> list[str]:
    """Gain of the last link over link 1 and its gap to the pooled baseline, in points of test accuracy."""
    links = run.results["links"]
    first, last = links[0]["test"]["accuracy"], links[-1]["test"]["accuracy"]
    lines = [f"Last link vs link 1 (single backbone): {100 * (last - first):+.1f} points test accuracy"]
    pooled = next((r["test"]["accuracy"] for r in run.results["baselines"] if r.get("kind") == "pooled"), None)
    if pooled is not None:
        lines.append(f"Last link vs pooled: {100 * (last - pooled):+.1f} points test accuracy")
    else:
        lines.append("Last link vs pooled: no pooled baseline in this run")
    delivered = run.results.get("delivered")
    if isinstance(delivered, dict) and isinstance(delivered.get("link"), int):
        k = delivered["link"]
        scores = delivered.get("pooled_val_accuracy") or []
        score = f" ({100 * scores[k - 1]:.1f}% over all sites' validation splits)" if len(scores) >= k else ""
        lines.append(f"Delivered model: link {k}{score}; rule: {delivered.get('rule', '')}")
    return lines


def _run_facts(run: RunResults) -> str:
    r = run.results
    order = " → ".join(str(s) for s in r.get("order", []))
    return (
        f"weckd {r.get('weckd_version', '?')}, seed {r.get('seed', '?')}, mode {r.get('mode', '?')}, "
        f"order {order}, cycles {r.get('cycles', '?')}, {len(r['links'])} links"
        + (f"; test accuracy here is the {r['held_out']}" if r.get("held_out") else "")
    )


def render_markdown(run: RunResults) -> str:
    def table(head: list[str], rows: list[list[str]]) -> list[str]:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return out + ["| " + " | ".join(cells) + " |" for cells in rows]

    lines = ["# weckd run report", "", _run_facts(run), "", "## Links", ""]
    lines += table(*link_rows(run)) + [""] + [f"- {s}" for s in summary_lines(run)]
    lines += ["", "## Baselines", ""] + table(*baseline_rows(run))
    lines += ["", "## Plots", ""]
    for name in PNG_SIZES:
        lines += [f"![{name[:-4].replace('_', ' ')}]({name})", ""]
    return "\n".join(lines)


def render_html(run: RunResults) -> str:
    def table(head: list[str], rows: list[list[str]]) -> str:
        th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>\n" for cells in rows)
        return f"<table>\n<tr>{th}</tr>\n{body}</table>"

    title = "weckd run report"
    items = "".join(f"<li>{html.escape(s)}</li>" for s in summary_lines(run))
    imgs = "\n".join(
        f'<p><img src="{n}" width="{w}" height="{h}" alt="{n[:-4]}"></p>' for n, (w, h) in PNG_SIZES.items()
    )
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}th{background:#eee}"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{style}</style></head>\n<body>\n<h1>{title}</h1>\n<p>{html.escape(_run_facts(run))}</p>\n"
        f"<h2>Links</h2>\n{table(*link_rows(run))}\n<ul>{items}</ul>\n"
        f"<h2>Baselines</h2>\n{table(*baseline_rows(run))}\n<h2>Plots</h2>\n{imgs}\n</body></html>\n"
    )


# ---------------------------------------------------------------- writing


def write_report(run_dir: Path) -> ReportFiles:
    """Write report.md, report.html and the three plots into ``run_dir``."""
    run = load_run(Path(run_dir))
    plots = [plot_accuracy(run), plot_losses(run), plot_confusion(run)]
    markdown, page = run.run_dir / "report.md", run.run_dir / "report.html"
    atomic_write_text(markdown, render_markdown(run))
    atomic_write_text(page, render_html(run))
    log.debug("report written: %s (%d plots)", markdown, len(plots))
    return ReportFiles(markdown, page, plots)


def report_command(argv: Sequence[str]) -> int:
    """Write report.md, report.html and PNG plots for a run dir of 'weckd chain'."""
    from .cli import run_command, setup_logging  # cli imports this module for write_report

    parser = argparse.ArgumentParser(prog="weckd report", description=report_command.__doc__)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="output folder of 'weckd chain'")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        files = write_report(Path(args.run_dir))
        for path in [files.markdown, files.html, *files.plots]:
            print(path)
        return 0

    return run_command(body)
