"""FedAvg on the coordinator (``federation.algorithm: fedavg``, ``weckd submit --kind fedavg``).

Each round sends every participating site the averaged model of the round before (none in round 0: the
sites start from one seed), one local epoch each; the updates come back sealed for the coordinator, which
opens them under each site's pinned key, checks them like any payload (format, shapes, finite values)
and averages them weighted by training images with Flower's own aggregation
(``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords``, what its ``FedAvg`` strategy uses).
The average is sealed once for the sites and the coordinator, signed by the coordinator, evaluated at the
sites after every round and, after the last, kept by the sites the federation delivers to.

A round is checkpointed like a chain link (``server.state``: one record per round, the sealed average
as the relay), so a restarted coordinator resumes at the next round. A site that fails a round is
retried, then the run fails or drops it for the remaining rounds (``on_site_failure``); a site that
refuses stops the run. ``link.epochs × chain.cycles`` rounds give each site the chain's site-epochs.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from weckd.chain.audit import AuditLog, sha256_hex
from weckd.chain.config import link_to_mapping
from weckd.chain.errors import LinkError, PayloadError, SecurityError
from weckd.chain.payload import Payload, decode_arrays, payload_bytes, payload_from_bytes
from weckd.chain.peers import COORDINATOR, Party, load_party
from weckd.chain.protocol import (
    KEY_CONFIG,
    KEY_INFO,
    KEY_LINK,
    KEY_METRICS,
    MSG_ROUND,
    MSG_ROUND_EVALUATE,
    EvalMetrics,
    Event,
    Failure,
    LinkInfo,
    LinkMetrics,
)
from weckd.chain.rounds import RoundEvaluateRequest, RoundRequest, fedavg_rounds, round_seed

from .relay import Relay, relay_from_reply
from .schedule import ChainOutcome, OnEvent, link_event_extras
from .settings import Federation, coordinator_sealing
from .state import ChainState, LinkRecord, save_state
from .transport import Reply, SiteFailure, Transport, online_sites, wait_for_sites

log = logging.getLogger(__name__)

ROUND_SITE = "all"  # the site label of a round's record and events: every participant trained it


def rounds_of(fed: Federation) -> int:
    """FedAvg rounds of one local epoch with the chain's site-epochs."""
    cfg = fed.chain
    per_site = sum(cfg.link_settings(k).epochs for k in range(len(cfg.chain.order))) / len(cfg.chain.order)
    return fedavg_rounds(max(1, round(per_site)), cfg.chain.cycles)


@dataclasses.dataclass
class Update:
    arch: str
    arrays: dict[str, np.ndarray]
    metrics: LinkMetrics
    reply: Reply
    init: str = ""  # how the site started its model (round 1: from the seed, as its link settings say)


def average(updates: dict[str, Update]) -> tuple[str, dict[str, np.ndarray]]:
    """The sample-weighted average of the updates (floating tensors, Flower's aggregation; integer buffers
    from the first site); LinkError when they are not the same model."""
    first_site, first = next(iter(updates.items()))
    shapes = {k: (v.shape, v.dtype.kind) for k, v in first.arrays.items()}
    for site, up in updates.items():
        if up.arch != first.arch or {k: (v.shape, v.dtype.kind) for k, v in up.arrays.items()} != shapes:
            raise LinkError(f"fedavg: site {site}'s update is not the model site {first_site} trained "
                            f"({up.arch} vs {first.arch}); the run stops", Failure.SITE_ERROR)
        if up.metrics.samples.get("train", 0) <= 0:
            raise LinkError(f"fedavg: site {site} reports no training images", Failure.SITE_ERROR)
    floating = [k for k, (_, kind) in shapes.items() if kind == "f"]
    records = [RecordDict({"arrays": ArrayRecord({k: Array(up.arrays[k]) for k in floating}),
                           "metrics": MetricRecord({"n": int(up.metrics.samples["train"])})})
               for up in updates.values()]
    mean = aggregate_arrayrecords(records, "n")
    out = {k: np.asarray(mean[k].numpy(), dtype=np.float32) for k in floating}
    out.update({k: v.copy() for k, v in first.arrays.items() if k not in out})
    return first.arch, {k: out[k] for k in first.arrays}


def merged_metrics(parts: list[LinkMetrics]) -> dict[str, Any]:
    """One round's metrics over its sites: validation counts pooled, epochs and seconds of every site."""
    n = sum(p.val_n for p in parts)
    confusion = np.sum([np.asarray(p.val_confusion, dtype=np.int64) for p in parts], axis=0)
    k = int(round(len(confusion) ** 0.5))
    square = confusion.reshape(k, k)
    recall = [float(square[i, i] / row) if (row := square[i].sum()) else 0.0 for i in range(k)]
    samples: dict[str, int] = {}
    for p in parts:
        for key, v in p.samples.items():
            samples[key] = samples.get(key, 0) + int(v)
    eps = [dict(p.privacy)["epsilon"] for p in parts if p.privacy and "epsilon" in p.privacy]
    return LinkMetrics(
        sum(p.val_accuracy * p.val_n for p in parts) / n if n else 0.0, n, tuple(recall),
        tuple(int(c) for c in confusion), *(tuple(x for p in parts for x in getattr(p, f))
                                            for f in ("epoch_loss", "epoch_ce", "epoch_kd", "epoch_seconds")),
        sum(p.seconds for p in parts), sum(p.images_per_s for p in parts), samples,
        {"epsilon": max(eps)} if eps else None).to_record()


class FedAvgRun:
    """Runs the rounds of one FedAvg job from its checkpoint to the end, checkpointing after each."""

    def __init__(self, transport: Transport, fed: Federation, infos: dict[str, dict[str, Any]], on_event: OnEvent,
                 state: ChainState, state_dir: Path, audit: AuditLog) -> None:
        self.transport, self.fed, self.infos, self.on_event = transport, fed, infos, on_event
        self.state, self.state_dir, self.audit = state, state_dir, audit
        self.rounds = rounds_of(fed)
        self.settings = dataclasses.replace(fed.chain.link_settings(0), epochs=1)
        sealing = coordinator_sealing(fed)
        self.party: Party | None = load_party(COORDINATOR, sealing, fed.source) if sealing is not None else None

    def sites(self) -> list[str]:
        return [s for s in dict.fromkeys(self.fed.chain.chain.order) if s not in self.state.skipped]

    def run(self) -> ChainOutcome:
        if self.state.links:
            self.on_event({"event": Event.RESUMED, "links_done": len(self.state.links), "links": self.rounds,
                           "run_id": self.state.run_id})
        while self.state.next_slot < self.rounds:
            self._round(self.state.next_slot)
        if self.state.relay is None:
            raise LinkError("the FedAvg run ended without a model")
        return ChainOutcome(self.infos, list(self.state.links), self.state.relay, list(self.state.skipped))

    def _audit(self, event: str, decision: str, r: int, reason: str = "", **fields: Any) -> None:
        self.audit.append(event, run=self.state.run_id, link=r, decision=decision, reason=reason, **fields)

    def _round(self, r: int) -> None:
        start = time.monotonic()
        self.on_event({"event": Event.LINK_START, "link": r + 1, "links": self.rounds, "site": ROUND_SITE,
                       "sites": self.sites(), "epochs": 1})
        replies = self._train(r)
        updates = {site: self._open(r, site, rep) for site, rep in replies.items()}
        arch, mean = average(updates)
        final = r == self.rounds - 1
        relay = self._seal(r, arch, mean, final)
        self._audit("fedavg-average", "info", r, sites=sorted(updates), model_sha256=sha256_hex(relay.blobs["weights"]))
        metrics = merged_metrics([u.metrics for u in updates.values()])
        record = LinkRecord(r, ROUND_SITE, arch, "average" if r else next(iter(updates.values())).init, metrics,
                            time.monotonic() - start, sum(u.reply.bytes_out for u in updates.values()),
                            sum(u.reply.bytes_in for u in updates.values()))
        record.evaluations = self._evaluate(r, relay, final)
        self.state.links.append(record)
        self.state.next_slot, self.state.relay, self.state.delivered = r + 1, relay, final
        save_state(self.state_dir, self.state)
        if final:
            deliver = self._deliver_sites()
            self._audit("deliver", "sent", r, to=[*deliver, COORDINATOR],
                        model_sha256=sha256_hex(relay.blobs["weights"]))
            self.on_event({"event": Event.DELIVERED, "sites": deliver, "link": r + 1, "rule": "last"})
        self.on_event({"event": Event.LINK_DONE, "link": r + 1, "links": self.rounds, "site": ROUND_SITE,
                       "val_accuracy": metrics["val-accuracy"], "seconds": record.round_trip_s,
                       "evaluations": {s: e["accuracy"] for s, e in record.evaluations.items()},
                       **link_event_extras(record)})

    def _train(self, r: int) -> dict[str, Reply]:
        """Every participant's reply to round r, with retries; sites that fail every attempt are dropped
        (``on_site_failure: skip``) or fail the run."""
        s, replies = self.fed.settings, {}
        pending = self.sites()
        model = sha256_hex(self.state.relay.blobs["weights"]) if self.state.relay else ""
        for attempt in range(1, s.retries + 2):
            online = wait_for_sites(self.transport.grid, pending, s.retry_wait if attempt > 1 else 0.0, s.poll_interval)
            self.transport.nodes.update(online)
            contents = {site: self._content(r, site) for site in pending if site in online}
            for site in contents:
                self._audit("fedavg-train", "sent", r, to=site, attempt=attempt, model_sha256=model)
            done = self.transport.exchange_all(MSG_ROUND, contents, f"round-{r + 1}") if contents else None
            failures = dict(done.failures) if done else {}
            failures.update({site: SiteFailure(site, "offline", "offline", f"site {site} is not online")
                             for site in pending if site not in online})
            replies.update(done.replies if done else {})
            for site, err in failures.items():
                self._audit("fedavg-train", "refused" if err.kind == "security" else "failed", r, err.reason,
                            site=site, attempt=attempt)
                self.on_event({"event": Event.SITE_FAILURE, "site": site, "link": r + 1, "attempt": attempt,
                               "kind": err.kind, "reason": err.reason, "message": str(err)})
                if not err.transient:
                    raise LinkError(f"fedavg round {r + 1}: {err}; the run stops (a refusal is never skipped)",
                                    err.failure) from None
            pending = sorted(failures)
            if not pending:
                return replies
        if s.on_site_failure == "fail" or len(pending) == len(self.sites()):
            raise LinkError(f"fedavg round {r + 1}: site(s) {', '.join(pending)} failed after {s.retries + 1} "
                            "attempt(s); the run stops (restart weckd-server to resume at this round)",
                            Failure.SITE_FAILED)
        for site in pending:
            self.on_event({"event": Event.SITE_SKIPPED, "site": site, "link": r + 1, "reason": "failed"})
            self.state.skipped.append(site)
        log.warning("fedavg round %d: dropping site(s) %s for the remaining rounds", r + 1, ", ".join(pending))
        return replies

    def _content(self, r: int, site: str) -> RecordDict:
        cfg, sites = self.fed.chain, self.sites()
        req = RoundRequest(self.state.run_id, r, self.rounds, tuple(sites),
                           round_seed(cfg.seed, r, sites.index(site), len(sites)), cfg.chain.wire_dtype,
                           cfg.data.augment, (("weights", COORDINATOR),) if self.party is not None else ())
        records: dict[str, Any] = {KEY_CONFIG: ConfigRecord(req.to_config()),
                                   KEY_LINK: ConfigRecord(link_to_mapping(self.settings))}
        if self.state.relay is not None:
            records.update(self.state.relay.records("weights", site))
        return RecordDict(records)

    def _open(self, r: int, site: str, rep: Reply) -> Update:
        """A site's update, opened under its pinned key (sealed) and checked like any payload."""
        where = f"fedavg round {r + 1}: site {site}"
        content = rep.message.content
        metrics = LinkMetrics.from_record(content.metric_records.get(KEY_METRICS, {}), where)
        info = LinkInfo.from_record(content.config_records.get(KEY_INFO, {}), where)
        relay = relay_from_reply(content, r, site, self.party is not None)
        blob = relay.blob("weights", COORDINATOR)
        try:
            data = self.party.open_from(blob, sender=site, run_id=self.state.run_id, link=r, kind="weights") \
                if self.party is not None else blob
            header, named = payload_from_bytes(data, where, *((self.party.max_bytes,) if self.party else ()))
            arch, arrays = decode_arrays(header, named, link=r, where=where)
        except (PayloadError, SecurityError) as err:
            self._audit("fedavg-train", "refused", r, getattr(err, "reason", "malformed-payload"), site=site)
            raise LinkError(f"{where}: the update is refused: {err}; the run stops", Failure.SITE_REFUSED) from None
        declared = self.infos.get(site, {}).get("counts", {}).get("train")
        if metrics.samples.get("train") != declared:  # its weight in the average: what it declared at discovery
            raise LinkError(f"{where}: the update claims {metrics.samples.get('train')} training images, the site "
                            f"declared {declared} at discovery; the run stops", Failure.SITE_ERROR)
        self._audit("fedavg-train", "accepted", r, site=site, update_sha256=sha256_hex(blob),
                    n=int(metrics.samples.get("train", 0)))
        return Update(arch, arrays, metrics, rep, info.init)

    def _seal(self, r: int, arch: str, mean: dict[str, np.ndarray], final: bool) -> Relay:
        """The average as a weights payload (the wire dtype; float32 for the final model), sealed once for
        the sites and the coordinator and signed by the coordinator."""
        wire = "float32" if final else self.fed.chain.chain.wire_dtype
        arrays = {k: v.astype(wire) if v.dtype.kind == "f" else v for k, v in mean.items()}
        data = payload_bytes(Payload("weights", arch, r, arrays, wire))
        if self.party is None:
            return Relay(r, COORDINATOR, {"weights": data}, False)
        blob = self.party.seal_for([*self.sites(), COORDINATOR], data, run_id=self.state.run_id, link=r,
                                   kind="weights")
        return Relay(r, COORDINATOR, {"weights": blob}, True)

    def _deliver_sites(self) -> list[str]:
        sealing = self.fed.settings.sealing
        wanted = sealing.deliver_to if sealing is not None else ()
        return [s for s in wanted if s != COORDINATOR and s in self.sites()]

    def _evaluate(self, r: int, relay: Relay, final: bool) -> dict[str, dict[str, Any]]:
        """The average on each participant's validation split (``evaluate: none``: only where it is delivered)."""
        deliver = self._deliver_sites() if final else []
        targets = self.sites() if self.fed.settings.evaluate != "none" else list(deliver)
        online = online_sites(self.transport.grid)
        for site in [t for t in targets if t not in online]:
            self.on_event({"event": Event.EVALUATION_MISSING, "site": site, "link": r + 1, "reason": "offline"})
        targets = [t for t in targets if t in online]
        self.transport.nodes.update({t: online[t] for t in targets})
        sites = tuple(self.sites())
        contents = {s: RecordDict({KEY_CONFIG: ConfigRecord(RoundEvaluateRequest(
            self.state.run_id, r, self.rounds, sites, s in deliver).to_config()), **relay.records("weights", s)})
            for s in targets}
        done = self.transport.exchange_all(MSG_ROUND_EVALUATE, contents, f"evaluate-round-{r + 1}")
        for site, err in done.failures.items():
            self._audit("fedavg-evaluate", "refused" if err.kind == "security" else "failed", r, err.reason, site=site)
            self.on_event({"event": Event.EVALUATION_MISSING, "site": site, "link": r + 1, "reason": err.reason,
                           "message": str(err)})
            if err.kind == "security":
                raise LinkError(f"evaluating fedavg round {r + 1}: {err}; the run stops", err.failure) from None
        out = {}
        for site, rep in done.replies.items():
            ev = EvalMetrics.from_record(rep.message.content.metric_records.get(KEY_METRICS, {}),
                                         f"evaluating fedavg round {r + 1}: site {site}")
            out[site] = {"accuracy": ev.accuracy, "n": ev.n, "confusion": list(ev.confusion)}
            self._audit("fedavg-evaluate", "accepted", r, site=site, n=ev.n, accuracy=ev.accuracy)
        missing = [s for s in deliver if s not in out]
        if missing:
            raise LinkError(f"delivering the FedAvg model: site(s) {', '.join(missing)} did not take it; restart "
                            "weckd-server to retry the last round", Failure.SITE_FAILED)
        return out
