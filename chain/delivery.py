"""Which link is the chain's model (``chain.deliver``): the rule both the in-process chain and the
coordinator apply. Torch-free: the coordinator imports it.

``last``: the last link. ``best``: judged on the validation splits of all sites together (each site's
split weighted by its number of images): the latest link whose accuracy there is within one standard
error of the best link's. Validation splits of hospital sites are small (tens of images each), so links
that differ by less than that noise are taken as tied, and a tie goes to the later link, which has seen
more of the chain; an earlier link is delivered only when it is clearly better than every later one.
Every site scores every link (``federation.evaluate: all``), so the choice uses only validation data the
sites already hold, never the test split.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

RULE_BEST = ("best pooled validation accuracy over all sites; links within one standard error of the best "
             "are tied and a tie goes to the later link")
RULE_LAST = "the last link"


def deliver_rule(deliver: str, mode: str, evaluate: str = "all") -> str:
    """The rule a run applies: ``chain.deliver``, with ``auto`` resolved to best where every site scores
    every link (weights mode, ``evaluate: all``) and to last elsewhere."""
    if deliver != "auto":
        return deliver
    return "best" if mode == "weights" and evaluate == "all" else "last"


def pooled_accuracy(scores: Iterable[tuple[float, int]]) -> float:
    """Accuracy over several validation splits together, from (accuracy, number of images) per split: the
    images predicted right, summed as whole numbers, so the order of the sites cannot change a tie."""
    pairs = list(scores)
    n = sum(count for _, count in pairs)
    return sum(round(acc * count) for acc, count in pairs) / n if n else 0.0


def best_link(accuracies: list[float], n: int) -> int:
    """The index of the link to deliver: the latest whose pooled validation accuracy is within one standard
    error (of a difference of two accuracies on ``n`` images) of the best one."""
    if not accuracies:
        raise ValueError("no link to choose from")
    best = max(accuracies)
    margin = math.sqrt(2.0 * best * (1.0 - best) / n) if n > 0 else 0.0
    return max(i for i, a in enumerate(accuracies) if a >= best - margin - 1e-12)


def delivery_json(rule: str, index: int, pooled_val: list[float]) -> dict[str, Any]:
    """Which link is the chain's model and why, for results.json and the report."""
    out: dict[str, Any] = {"link": index + 1, "rule": RULE_BEST if rule == "best" else RULE_LAST}
    if pooled_val:
        out["pooled_val_accuracy"] = pooled_val
    return out


def evaluations_accuracy(evaluations: Mapping[str, Mapping[str, Any]]) -> float:
    """A federated link's pooled validation accuracy from its per-site evaluations."""
    return pooled_accuracy((float(e["accuracy"]), int(e["n"])) for e in evaluations.values())


def evaluations_count(evaluations: Mapping[str, Mapping[str, Any]]) -> int:
    """The validation images behind a federated link's pooled accuracy."""
    return sum(int(e["n"]) for e in evaluations.values())
