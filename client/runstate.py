"""What a site remembers of the runs it joined: ``<state_dir>/runs.json``, written atomically.

The site, not the message, decides whether a request belongs to a run it is in:

* run ids are plain names that sort by time (the coordinator makes them so); a site takes part in one
  run at a time and joins a new run only if its id sorts after the current one; requests of a run it
  left (or of an older one it never saw) are refused ``stale-run``, so a payload sealed for an old run
  cannot be replayed by naming that run;
* within a run, link numbers only move forward (a link may be asked for again: the link store answers
  a repeat without training twice) and the links already routed cannot be rerouted;
* per run, the site counts the links it trained and the models it evaluated against its policy;
* across runs, links and cycles, the ε spent by DP links is summed against ``policy.epsilon_budget``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from weckd.chain.errors import WeckdError
from weckd.chain.files import atomic_write_text, check_run_id, private_dir
from weckd.chain.protocol import Reason, Refused

from .policy import SitePolicy

log = logging.getLogger(__name__)

FILE = "runs.json"
KEEP_RUNS = 64  # runs remembered by id (older ones are refused by the ordering alone)


@dataclass
class RunRecord:
    routed: list[str] = field(default_factory=list)  # the schedule up to the latest link seen
    last_link: int = -1
    links: list[int] = field(default_factory=list)  # links trained here
    evaluations: int = 0
    epsilon: float = 0.0
    delivered: int = -1  # the one link of the run whose model this site sealed as the chain's model
    kind: str = "chain"  # or "fedavg": its links are rounds and ``routed`` its participants (weckd.chain.rounds)


@dataclass
class Ledger:
    current: str = ""
    runs: dict[str, RunRecord] = field(default_factory=dict)
    epsilon_spent: float = 0.0  # all DP links ever trained here


class RunState:
    """The site's ledger of runs; ``admit_*`` check a request, ``commit`` records it once accepted."""

    def __init__(self, state_dir: str | Path, policy: SitePolicy) -> None:
        self.path = Path(state_dir) / FILE
        self.policy = policy
        self.ledger = load_ledger(self.path)

    def _record(self, run_id: str, where: str) -> RunRecord:
        check_run_id(run_id)
        cur = self.ledger.current
        if run_id == cur:
            return self.ledger.runs[cur]
        if run_id in self.ledger.runs or (cur and run_id < cur):
            raise Refused(Reason.STALE_RUN, f"{where}: run {run_id!r} is not the run this site is in ({cur!r}) and "
                          "not a newer one")
        return RunRecord()

    def _forward(self, rec: RunRecord, link: int, schedule: tuple[str, ...], where: str) -> None:
        if link < rec.last_link:
            raise Refused(Reason.LINK_NOT_FORWARD, f"{where}: link {link + 1} after link {rec.last_link + 1}")
        if list(schedule[:len(rec.routed)]) != rec.routed:
            raise Refused(Reason.BAD_REQUEST, f"{where}: the run's schedule changed for links already routed")

    def _kind(self, rec: RunRecord, kind: str, where: str) -> RunRecord:
        if rec.kind != kind and (rec.links or rec.evaluations or rec.routed):
            raise Refused(Reason.BAD_REQUEST, f"{where}: run is a {rec.kind} run here, not a {kind} run")
        rec.kind = kind
        return rec

    def admit_train(self, run_id: str, link: int, schedule: tuple[str, ...], epsilon: float | None,
                    where: str) -> RunRecord:
        rec = self._kind(self._record(run_id, where), "chain", where)
        self._forward(rec, link, schedule, where)
        budget = self.policy.epsilon_budget
        spent = self.ledger.epsilon_spent
        if epsilon is not None and budget and link not in rec.links and spent + epsilon > budget:
            raise Refused(Reason.EPSILON_BUDGET, f"{where}: epsilon {epsilon:g} on top of {spent:g} spent exceeds "
                          f"policy.epsilon_budget {budget:g}")
        return rec

    def admit_evaluate(self, run_id: str, link: int, schedule: tuple[str, ...], where: str) -> RunRecord:
        rec = self._kind(self._record(run_id, where), "chain", where)
        self._forward(rec, link, schedule, where)
        if rec.evaluations >= self.policy.max_evaluations_per_run:
            raise Refused(Reason.EVALUATIONS_OVER_LIMIT, f"{where}: {rec.evaluations} models evaluated in this run; "
                          f"policy.max_evaluations_per_run is {self.policy.max_evaluations_per_run}")
        return rec

    def admit_round(self, run_id: str, rnd: int, sites: tuple[str, ...], epsilon: float | None, where: str,
                    evaluate: bool = False) -> RunRecord:
        """A FedAvg round (or an evaluation of the average after it): rounds only move forward, and the
        participants only shrink (a site skipped does not come back, no site is added)."""
        rec = self._kind(self._record(run_id, where), "fedavg", where)
        if rnd < rec.last_link:
            raise Refused(Reason.LINK_NOT_FORWARD, f"{where}: round {rnd + 1} after round {rec.last_link + 1}")
        if rec.routed and not set(sites) <= set(rec.routed):
            added = sorted(set(sites) - set(rec.routed))[:4]
            raise Refused(Reason.BAD_REQUEST, f"{where}: site(s) {added} joined the run after it started")
        if evaluate:
            if rec.evaluations >= self.policy.max_evaluations_per_run:
                raise Refused(Reason.EVALUATIONS_OVER_LIMIT, f"{where}: {rec.evaluations} models evaluated in this "
                              f"run; policy.max_evaluations_per_run is {self.policy.max_evaluations_per_run}")
            return rec
        budget, spent = self.policy.epsilon_budget, self.ledger.epsilon_spent
        if epsilon is not None and budget and rnd not in rec.links and spent + epsilon > budget:
            raise Refused(Reason.EPSILON_BUDGET, f"{where}: epsilon {epsilon:g} on top of {spent:g} spent exceeds "
                          f"policy.epsilon_budget {budget:g}")
        return rec

    def commit_round(self, run_id: str, rec: RunRecord, rnd: int, sites: tuple[str, ...], *, trained: bool = False,
                     evaluated: bool = False) -> None:
        """Record an accepted FedAvg request (before the work starts): ``routed`` holds its participants."""
        self.commit(run_id, rec, rnd, (), trained=trained, evaluated=evaluated, routed=list(sites))

    def admit_deliver(self, run_id: str, link: int, schedule: tuple[str, ...], where: str) -> RunRecord:
        """A hand-over of link ``link`` as the final model: only of this site's current run, only a link it
        trained, once the schedule is done, and one model per run (the coordinator cannot collect several)."""
        rec = self._kind(self._record(run_id, where), "chain", where)
        if run_id != self.ledger.current or link not in rec.links:
            raise Refused(Reason.BAD_REQUEST, f"{where}: this site did not train link {link + 1} of run {run_id!r}")
        self._forward(rec, len(schedule) - 1, schedule, where)
        self.check_one_delivery(rec, link, where)
        return rec

    @staticmethod
    def check_one_delivery(rec: RunRecord, link: int, where: str) -> None:
        if rec.delivered not in (-1, link):
            raise Refused(Reason.BAD_REQUEST, f"{where}: this site already delivered link {rec.delivered + 1} as this "
                          "run's final model; a run has one")

    def delivered(self, run_id: str, rec: RunRecord, link: int) -> None:
        """Record that link ``link``'s model went out as the run's final model."""
        rec.delivered = link
        if run_id == self.ledger.current:
            self._save()

    def commit(self, run_id: str, rec: RunRecord, link: int, schedule: tuple[str, ...], *, trained: bool = False,
               evaluated: bool = False, routed: list[str] | None = None) -> None:
        """Record an accepted request (before the work starts, so a crash cannot undo a count)."""
        rec.routed = list(schedule[:link + 1]) if routed is None else routed
        rec.last_link = max(rec.last_link, link)
        if trained and link not in rec.links:
            rec.links.append(link)
        rec.evaluations += int(evaluated)
        if run_id != self.ledger.current:
            self.ledger.current = run_id
            self.ledger.runs[run_id] = rec
            for old in sorted(self.ledger.runs)[:-KEEP_RUNS]:
                del self.ledger.runs[old]
        self._save()

    def spend(self, rec: RunRecord, epsilon: float) -> None:
        """ε a DP link actually spent (the accountant's figure, after training)."""
        rec.epsilon += epsilon
        self.ledger.epsilon_spent += epsilon
        self._save()

    def _save(self) -> None:
        data = {"current": self.ledger.current, "epsilon_spent": self.ledger.epsilon_spent,
                "runs": {k: asdict(v) for k, v in self.ledger.runs.items()}}
        private_dir(self.path.parent)
        atomic_write_text(self.path, json.dumps(data, sort_keys=True))


def load_ledger(path: Path) -> Ledger:
    """The site's run ledger at ``path`` (empty if none yet); WeckdError if it is unreadable or damaged."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Ledger()
    except (OSError, ValueError) as err:
        raise WeckdError(f"{path}: the site's run ledger is unreadable ({err}); restore it from a backup — "
                         "deleting it forgets the runs this site left and the epsilon it spent") from None
    try:
        runs = {str(k): RunRecord(**_record_fields(v)) for k, v in dict(raw["runs"]).items()}
        return Ledger(str(raw["current"]), runs, float(raw["epsilon_spent"]))
    except (KeyError, TypeError, ValueError) as err:
        raise WeckdError(f"{path}: the site's run ledger is damaged ({err}); restore it from a backup") from None


def _record_fields(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise TypeError("a run record is not a mapping")
    return {"routed": [str(s) for s in v["routed"]], "last_link": int(v["last_link"]),
            "links": [int(x) for x in v["links"]], "evaluations": int(v["evaluations"]),
            "epsilon": float(v["epsilon"]), "delivered": int(v.get("delivered", -1)),
            "kind": str(v.get("kind", "chain"))}
