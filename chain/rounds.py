"""FedAvg across the sites, as the protocol carries it: one round request and one evaluation request.

FedAvg is a baseline the chain is measured against (``weckd submit --kind fedavg``): every round, each
site trains the coordinator's averaged model for one epoch on its own data and sends the update back;
the coordinator averages the updates (weighted by training images) and sends the average out again.
``link.epochs × chain.cycles`` rounds of one epoch give every site the chain's own site-epochs.

Unlike the chain, FedAvg makes the coordinator a party to the models: it reads every site's update
and is the sender of the model each site trains next. A site takes part only if its own policy says
so (``policy.allow_fedavg``); its updates are then sealed for the coordinator alone, and the models it
receives must be sealed and signed by the coordinator key it pinned, for this run and round.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .protocol import (
    MAX_SCHEDULE,
    Reason,
    Refused,
    link_seed,
    parse_seal_for,
    seal_for_text,
    site_names,
    typed_fields,
)

_ROUND_KEYS = {"run-id": str, "round": int, "rounds": int, "sites": list, "seed": int, "wire-dtype": str,
               "augment": bool, "seal-for": str}
_ROUND_EVALUATE_KEYS = {"run-id": str, "round": int, "rounds": int, "sites": list, "deliver": bool}


def _round_fields(v: Mapping[str, Any], where: str) -> tuple[str, ...]:
    """The participants, checked with the round numbers: 0 ≤ round < rounds ≤ MAX_SCHEDULE, no repeats."""
    sites = site_names(v["sites"], "sites", where)
    if not sites or len(set(sites)) != len(sites):
        raise Refused(Reason.BAD_REQUEST, f"{where}: request field 'sites' must name each participant once")
    if not 0 <= v["round"] < v["rounds"] <= MAX_SCHEDULE:
        raise Refused(Reason.BAD_REQUEST, f"{where}: round {v['round']} of {v['rounds']} is out of range")
    return sites


@dataclass(frozen=True)
class RoundRequest:
    """The ``config`` record of a ``train.fedavg`` message: train round ``round`` (0-based) of ``rounds``
    from the averaged model it carries (none in round 0: every site starts from the same seed)."""

    run_id: str
    round: int
    rounds: int
    sites: tuple[str, ...]  # the sites taking part in this round
    seed: int
    wire_dtype: str
    augment: bool
    seal_for: tuple[tuple[str, str], ...]  # ("weights", "coordinator") where the federation seals; else empty

    def to_config(self) -> dict[str, Any]:
        return {"run-id": self.run_id, "round": self.round, "rounds": self.rounds, "sites": list(self.sites),
                "seed": self.seed, "wire-dtype": self.wire_dtype, "augment": self.augment,
                "seal-for": seal_for_text(self.seal_for)}

    @classmethod
    def from_config(cls, values: Mapping[str, Any], where: str) -> RoundRequest:
        v = typed_fields(values, _ROUND_KEYS, where)
        sites = _round_fields(v, where)
        if v["wire-dtype"] not in ("float32", "float16"):
            raise Refused(Reason.BAD_REQUEST, f"{where}: wire dtype {v['wire-dtype'][:20]!r} unknown")
        seal_for = parse_seal_for(v["seal-for"], where)
        if any(kind != "weights" for kind, _ in seal_for):
            raise Refused(Reason.BAD_REQUEST, f"{where}: a FedAvg update is sealed as weights only")
        return cls(v["run-id"], v["round"], v["rounds"], sites, v["seed"], v["wire-dtype"], v["augment"], seal_for)


@dataclass(frozen=True)
class RoundEvaluateRequest:
    """The ``config`` record of an ``evaluate.fedavg`` message: the coordinator's average after round
    ``round``; ``deliver`` (last round only): keep it, it is the run's final model."""

    run_id: str
    round: int
    rounds: int
    sites: tuple[str, ...]
    deliver: bool

    def to_config(self) -> dict[str, Any]:
        return {"run-id": self.run_id, "round": self.round, "rounds": self.rounds, "sites": list(self.sites),
                "deliver": self.deliver}

    @classmethod
    def from_config(cls, values: Mapping[str, Any], where: str) -> RoundEvaluateRequest:
        v = typed_fields(values, _ROUND_EVALUATE_KEYS, where)
        sites = _round_fields(v, where)
        if v["deliver"] and v["round"] != v["rounds"] - 1:
            raise Refused(Reason.BAD_REQUEST, f"{where}: only the last round's model is delivered")
        return cls(v["run-id"], v["round"], v["rounds"], sites, v["deliver"])


def fedavg_rounds(epochs: int, cycles: int) -> int:
    """Rounds of one local epoch that give every site the chain's site-epochs (``epochs × cycles``)."""
    return epochs * cycles


def round_seed(seed: int, rnd: int, index: int, n_sites: int) -> int:
    """The training seed of site ``index`` in round ``rnd``: round 0 shares one (the sites start from the
    same weights, as FedAvg needs); later rounds differ per site (their own shuffles and augmentations)."""
    return link_seed(seed, 0 if rnd == 0 else rnd * n_sites + index)
