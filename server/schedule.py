"""The chain protocol on the coordinator: discover the sites, run every link in order, evaluate, deliver.

Link k goes to site ``schedule[k]`` with the link's settings, the link seed
(``weckd.chain.protocol.link_seed``) and link k−1's output, relayed as received: the coordinator
relays, it does not read (in a sealed federation it cannot). The schedule is ``chain.order`` ×
``cycles`` minus the sites skipped so far (``on_site_failure: skip``); it travels with every
message so a site knows whom to expect its teacher from.

A site that is offline, vanishes mid-link or exceeds the link timeout is retried up to
``federation.retries`` times (each retry first waits up to ``retry_wait`` for it to come back
online); then the run fails naming the site, or skips it and hands the last good output to the next
site. A site that *refuses* a payload (bad seal, replay, poisoned weights) fails the run at once:
routing around a tampering coordinator or peer is not a failure mode to hide. After every link the
chain is checkpointed (``server.state``), so a restarted coordinator continues at the next link.

Every decision also goes to the coordinator's audit log (``<state_dir>/audit.log``, ``weckd.chain.audit``):
each train request sent (with the SHA-256 of the teacher blob it relays and the seal-for list), each
reply accepted (the SHA-256 of every returned blob), each failure or refusal (its reason code), each
evaluation sent and answered, and the delivery. ``link`` there is the link index as on the wire (0-based).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from flwr.app import ConfigRecord, RecordDict
from weckd.chain import __version__
from weckd.chain.audit import AUDIT_FILE, AuditLog, sha256_hex
from weckd.chain.config import link_to_mapping
from weckd.chain.delivery import best_link, deliver_rule, evaluations_accuracy, evaluations_count
from weckd.chain.errors import LinkError
from weckd.chain.peers import COORDINATOR
from weckd.chain.protocol import (
    KEY_CONFIG,
    KEY_INFO,
    KEY_LINK,
    KEY_METRICS,
    MSG_DELIVER,
    MSG_EVALUATE,
    MSG_QUERY,
    MSG_TRAIN,
    DeliverRequest,
    EvalMetrics,
    EvaluateRequest,
    Event,
    Failure,
    LinkInfo,
    LinkMetrics,
    SiteCounts,
    SiteInfo,
    TrainRequest,
    link_seed,
)

from .relay import Relay, relay_from_reply
from .settings import Federation
from .state import ChainState, LinkRecord, held_on_disk, save_state
from .transport import Reply, SiteFailure, Transport, online_sites, wait_for_sites

log = logging.getLogger(__name__)

OnEvent = Callable[[dict[str, Any]], None]  # receives every progress event (chain.protocol.Event)


@dataclass
class ChainOutcome:
    sites: dict[str, dict[str, Any]]
    links: list[LinkRecord]
    final: Relay | None = None
    skipped: list[str] = field(default_factory=list)


def _query_all(transport: Transport, fed: Federation) -> dict[str, Reply]:
    """Every site's answer to ``query``. A site that proves unavailable (a node the SuperLink still listed from
    before a coordinator restart, whose SuperNode is reconnecting) is asked again once it is back online,
    within ``discovery_timeout``; any other failure stops discovery."""
    deadline = time.monotonic() + fed.settings.discovery_timeout
    replies: dict[str, Reply] = {}
    pending = list(transport.nodes)
    while True:
        ask = {site: RecordDict({KEY_CONFIG: ConfigRecord({"weckd-version": __version__})}) for site in pending}
        done = transport.exchange_all(MSG_QUERY, ask, "discovery", max(deadline - time.monotonic(), 1.0))
        replies.update(done.replies)
        for err in done.failures.values():
            if not err.transient or time.monotonic() >= deadline:
                raise err
        pending = sorted(done.failures)
        if not pending:
            return replies
        log.info("discovery: site(s) %s not reachable yet; asking again once they are online", ", ".join(pending))
        time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))
        back = wait_for_sites(transport.grid, pending, max(deadline - time.monotonic(), 0.0), transport.timing.poll)
        transport.nodes.update(back)


def discover(transport: Transport, fed: Federation) -> dict[str, dict[str, Any]]:
    """Query every connected site; refuse version, class, image-format, proxy or sealing mismatches."""
    replies = _query_all(transport, fed)
    infos: dict[str, dict[str, Any]] = {}
    data = fed.chain.data
    for site, rep in replies.items():
        where = f"discovery: site {site}"
        raw = rep.message.content.config_records.get(KEY_INFO, {})
        version = raw.get("weckd-version")  # first, so another version is named as such, not as a bad reply
        if version != __version__:
            raise LinkError(f"{where} runs weckd {str(version)[:40]}, the coordinator {__version__}; install the "
                            "same weckd version everywhere", Failure.SITE_MISMATCH)
        info = SiteInfo.from_record(raw, where)
        counts = SiteCounts.from_record(rep.message.content.metric_records.get(KEY_METRICS, {}), where)
        if info.site != site:
            log.warning("site %s: its site config says %r; identity comes from the registered name", site, info.site)
        if list(info.classes) != list(data.classes):
            raise LinkError(f"{where} has classes {list(info.classes)}, the federation "
                            f"{list(data.classes)}; fix data.classes in that site's config", Failure.SITE_MISMATCH)
        if (info.image_size, info.channels) != (data.image_size, data.channels):
            raise LinkError(f"{where} decodes {info.image_size} px × {info.channels} "
                            f"channels, the federation {data.image_size} × {data.channels}; align data settings",
                            Failure.SITE_MISMATCH)
        _check_sealing(fed, site, info.sealing)
        infos[site] = {**info.to_record(), "counts": counts.to_record()}
        log.info("site %s: weckd %s, %d train / %d val images, sealing %s", site, info.version,
                 counts.train, counts.val, info.sealing or "off")
    if fed.chain.chain.mode == "logits":
        hashes = {s: i.get("proxy-sha256", "") for s, i in infos.items()}
        if "" in hashes.values() or len(set(hashes.values())) != 1:
            raise LinkError(f"discovery: logits mode needs the same proxy set at every site; proxy hashes "
                            f"{ {s: h[:12] for s, h in hashes.items()} }; copy the same proxy folder to every site",
                            Failure.SITE_MISMATCH)
    return infos


def _check_sealing(fed: Federation, site: str, fingerprint: str) -> None:
    if fed.settings.sealing is not None and not fingerprint:
        raise LinkError(f"discovery: site {site} has no sealing keys but the federation seals every payload; "
                        "add a sealing: section to that site's config (weckd keys)", Failure.SITE_MISMATCH)
    if fed.settings.sealing is None and fingerprint:
        raise LinkError(f"discovery: site {site} requires sealed payloads; add federation.sealing to the "
                        "coordinator's config", Failure.SITE_MISMATCH)


def eval_targets(how: str, schedule: list[str], k: int) -> list[str]:
    """Which sites evaluate link k's model: all (still in the chain), the next link's site, or none."""
    if how == "none":
        return []
    sites = list(dict.fromkeys(schedule))
    if how == "next":
        return [schedule[k + 1]] if k + 1 < len(schedule) else sites
    return sites


class ChainRun:
    """Runs the links of one chain from its checkpoint to the end, checkpointing after each."""

    def __init__(self, transport: Transport, fed: Federation, infos: dict[str, dict[str, Any]], on_event: OnEvent,
                 state: ChainState, state_dir: Path, audit: AuditLog | None = None) -> None:
        self.transport, self.fed, self.infos, self.on_event = transport, fed, infos, on_event
        self.state, self.state_dir = state, state_dir
        self.audit = audit if audit is not None else AuditLog(state_dir / AUDIT_FILE)
        self.sealed = fed.settings.sealing is not None
        self.full = [fed.chain.site_of(k) for k in range(fed.chain.n_links)]
        # chain.deliver: best: no link delivers as it trains; once every link is scored, the best one is handed
        # over by the site that trained it
        self.best = deliver_rule(fed.chain.chain.deliver, fed.chain.chain.mode, fed.settings.evaluate) == "best"

    def schedule(self) -> list[str]:
        """Sites of the links done, then the remaining slots of the full schedule minus skipped sites."""
        done = [r.site for r in self.state.links]
        return done + [s for s in self.full[self.state.next_slot:] if s not in self.state.skipped]

    def _audit(self, event: str, decision: str, k: int, reason: str = "", **fields: Any) -> None:
        """One audit line for a decision about link k: names, counts and hashes only."""
        self.audit.append(event, run=self.state.run_id, link=k, decision=decision, reason=reason, **fields)

    def run(self) -> ChainOutcome:
        if self.state.links:
            self.on_event({"event": Event.RESUMED, "links_done": len(self.state.links), "links": len(self.schedule()),
                           "run_id": self.state.run_id})
        while len(self.state.links) < len(schedule := self.schedule()):
            k = len(self.state.links)
            site = schedule[k]
            rep = self._train(k, site, schedule)
            if rep is None:
                self.state.skipped.append(site)
                save_state(self.state_dir, self.state)
                continue
            record, relay = link_record(k, rep), relay_from_reply(rep.message.content, k, site, self.sealed)
            del rep  # the reply's arrays (another copy of the payload) go before the model is sent on
            self._finish_link(k, site, schedule, record, relay)
            # held as the state's relay from here, which the next link's push leaves on disk only: bound here as
            # well, the reply's arrays stayed in memory while that link trained (~1 payload)
            del relay
        if not self.state.links:
            raise LinkError("no link completed: every site failed or was skipped", Failure.SITE_FAILED)
        if self.state.relay is None or len(self.state.links) != len(self.schedule()):
            raise LinkError("the chain ended without a final model")
        if not self.state.delivered:  # the best link, or the last good one when the links after it were skipped
            self._hand_over(self._to_deliver(), self.schedule())
        return ChainOutcome(self.infos, list(self.state.links), self.state.relay, list(self.state.skipped))

    def _finish_link(self, k: int, site: str, schedule: list[str], record: LinkRecord, relay: Relay) -> None:
        eps = {"epsilon": float(record.metrics["privacy-epsilon"])} if "privacy-epsilon" in record.metrics else {}
        self._audit("train", "accepted", k, site=site, blobs={n: sha256_hex(b) for n, b in relay.blobs.items()},
                    recipients=sorted({r for kind in relay.blobs for r in relay.recipients(kind)}), **eps)
        final = k == len(schedule) - 1 and not self.best  # this link delivers its model as it trains
        deliver = tuple(r for r in self._recipients() if r != COORDINATOR) if final else ()
        if self.fed.chain.chain.mode == "weights" or k == len(schedule) - 1:
            targets = list(dict.fromkeys([*eval_targets(self.fed.settings.evaluate, schedule, k), *deliver]))
            record.evaluations = self._evaluate(k, relay, targets, schedule, deliver)
            missing = [s for s in deliver if s not in record.evaluations]
            if missing:
                raise LinkError(f"delivering the final model: site(s) {', '.join(missing)} did not take it; "
                                "restart weckd-server to retry the last link", Failure.SITE_FAILED)
        slot = next(i for i in range(self.state.next_slot, len(self.full)) if self.full[i] not in self.state.skipped)
        self.state.links.append(record)
        self.state.next_slot, self.state.relay, self.state.delivered = slot + 1, relay, final
        save_state(self.state_dir, self.state)
        if final:
            to = self._recipients()
            self._audit("deliver", "sent", k, to=to, model_sha256={r: _blob_sha(relay, "weights", r) for r in to})
        if final:
            self.on_event({"event": Event.DELIVERED, "sites": list(deliver), "link": k + 1, "rule": "last"})
        self.on_event({"event": Event.LINK_DONE, "link": k + 1, "links": len(schedule), "site": site,
                       "val_accuracy": record.metrics["val-accuracy"], "seconds": record.round_trip_s,
                       "evaluations": {s: e["accuracy"] for s, e in record.evaluations.items()},
                       **link_event_extras(record)})

    def _to_deliver(self) -> int:
        """The link to hand over: the best by pooled validation accuracy, or the last one that completed."""
        if not self.best:
            return len(self.state.links) - 1
        links = self.state.links
        return best_link([evaluations_accuracy(r.evaluations) for r in links],
                         min(evaluations_count(r.evaluations) for r in links))

    def _hand_over(self, k: int, schedule: list[str]) -> None:
        """Deliver link k as the final model: its site seals the model it kept for the recipients
        (``query.deliver``; nothing is trained again), the sites among them take it."""
        site = schedule[k]
        recipients = [r for r in self._recipients() if r not in self.state.skipped]  # a skipped site is gone
        req = DeliverRequest(self.state.run_id, k, tuple(schedule),
                             tuple(("weights", r) for r in recipients) if self.sealed else ())
        if self.best:
            log.info("delivering link %d (site %s): the best pooled validation accuracy of the chain, %.3f", k + 1,
                     site, evaluations_accuracy(self.state.links[k].evaluations))
        else:
            log.warning("the links after link %d were skipped: handing over link %d (site %s) as the final model",
                        k + 1, k + 1, site)
        self._audit("deliver", "sent", k, to=site, seal_for=[f"weights:{r}" for r in recipients])
        self._ensure_online(site, self.fed.settings.retry_wait)
        try:
            rep = self.transport.exchange(MSG_DELIVER, {site: RecordDict({KEY_CONFIG: ConfigRecord(req.to_config())})},
                                          f"deliver-{k + 1}")[site]
        except SiteFailure as err:
            self._audit("deliver", _decision(err), k, err.reason, site=site)
            raise LinkError(f"handing over link {k + 1} (site {site}) as the final model: {err}; restart "
                            "weckd-server to retry", err.failure) from None
        relay = relay_from_reply(rep.message.content, k, site, self.sealed)
        del rep  # the reply's arrays (another copy of the payload) go before the model is sent on
        deliver = tuple(r for r in recipients if r != COORDINATOR)
        record = self.state.links[k]
        if deliver:
            got = self._evaluate(k, relay, list(deliver), schedule, deliver)
            missing = [s for s in deliver if s not in got]
            if missing:
                raise LinkError(f"delivering the final model: site(s) {', '.join(missing)} did not take it; "
                                "restart weckd-server to retry", Failure.SITE_FAILED)
            record.evaluations.update({s: e for s, e in got.items() if s not in record.evaluations})
        self.state.relay, self.state.delivered = relay, True
        save_state(self.state_dir, self.state)
        self._audit("deliver", "sent", k, to=recipients,
                    model_sha256={r: _blob_sha(relay, "weights", r) for r in recipients})
        self.on_event({"event": Event.DELIVERED, "sites": list(deliver), "link": k + 1, "handed_over": True,
                       "rule": "best" if self.best else "last"})

    # -- one link, with retries and the failure policy ---------------------------------------------------

    def _train(self, k: int, site: str, schedule: list[str]) -> Reply | None:
        """Site ``site``'s reply for link k, None when it failed and the policy skips it."""
        s = self.fed.settings
        self.on_event({"event": Event.LINK_START, "link": k + 1, "links": len(schedule), "site": site,
                       "epochs": self.fed.chain.link_settings(k).epochs})
        teacher = _blob_sha(self.state.relay, self.fed.chain.chain.mode, site) if self.state.relay else ""
        failure: SiteFailure | None = None
        for attempt in range(1, s.retries + 2):
            try:
                self._ensure_online(site, s.retry_wait)
                self._audit("train", "sent", k, to=site, attempt=attempt, teacher_sha256=teacher,
                            seal_for=self._seal_for(k, schedule))
                contents = {site: self._train_content(k, schedule)}
                # once pushed, the teacher is held by the SuperLink and in the checkpoint, not here as well
                self.state.relay = held_on_disk(self.state.relay)
                return self.transport.exchange(MSG_TRAIN, contents, f"link-{k + 1}")[site]
            except SiteFailure as err:
                failure = err
                self._audit("train", _decision(err), k, err.reason, site=site, attempt=attempt)
                self.on_event({"event": Event.SITE_FAILURE, "site": site, "link": k + 1, "attempt": attempt,
                               "kind": err.kind, "reason": err.reason, "message": str(err)})
                if not err.transient:
                    raise LinkError(f"link {k + 1}: {err}; the run stops (a refused payload is never skipped)",
                                    err.failure) from None
                if attempt <= s.retries:
                    self.on_event({"event": Event.RETRY, "site": site, "link": k + 1, "reason": err.reason,
                                   "attempt": attempt + 1})
        assert failure is not None
        if s.on_site_failure == "fail":
            raise LinkError(f"link {k + 1}: site {site} failed after {s.retries + 1} attempt(s): {failure}; the run "
                            "stops (on_site_failure: fail; restart weckd-server to resume at this link)",
                            Failure.SITE_FAILED)
        self.on_event({"event": Event.SITE_SKIPPED, "site": site, "link": k + 1, "reason": failure.reason})
        log.warning("link %d: skipping site %s after %d attempt(s) (%s); its later links are dropped too",
                    k + 1, site, s.retries + 1, failure.reason)
        return None

    def _ensure_online(self, site: str, wait: float) -> None:
        """Map ``site`` to its node, waiting up to ``wait`` s for it to come (back) online."""
        found = wait_for_sites(self.transport.grid, [site], wait, self.fed.settings.poll_interval)
        if site not in found:
            raise SiteFailure(site, "offline", "offline", f"site {site} is not online (waited {wait:.0f}s)")
        self.transport.nodes[site] = found[site]

    def _train_content(self, k: int, schedule: list[str]) -> RecordDict:
        cfg, state = self.fed.chain, self.state
        final = k == len(schedule) - 1 and not self.best
        seal_for = tuple(tuple(item.split(":", 1)) for item in self._seal_for(k, schedule))
        req = TrainRequest(state.run_id, k, tuple(schedule), link_seed(cfg.seed, k), cfg.chain.mode,
                           cfg.chain.wire_dtype, cfg.data.augment, final, seal_for)  # type: ignore[arg-type]
        run = ConfigRecord(req.to_config())
        records: dict[str, Any] = {KEY_CONFIG: run, KEY_LINK: ConfigRecord(link_to_mapping(cfg.link_settings(k)))}
        if state.relay is not None:
            records.update(state.relay.records(cfg.chain.mode, schedule[k]))
        return RecordDict(records)

    def _seal_for(self, k: int, schedule: list[str]) -> list[str]:
        """``kind:recipient`` for every blob link k's site must seal: the next site (and, when failed sites
        are skipped, every later one), the sites evaluating its model, and at the end the recipients."""
        if not self.sealed:
            return []
        mode, later = self.fed.chain.chain.mode, schedule[k + 1:]
        relay_to = later if self.fed.settings.on_site_failure == "skip" else later[:1]
        keys = [f"{mode}:{r}" for r in relay_to]
        if mode == "weights" or k == len(schedule) - 1:
            keys += [f"weights:{r}" for r in eval_targets(self.fed.settings.evaluate, schedule, k)]
        if k == len(schedule) - 1 and not self.best:
            keys += [f"weights:{r}" for r in self._recipients()]
        return list(dict.fromkeys(keys))

    def _recipients(self) -> list[str]:
        sealing = self.fed.settings.sealing
        return list(sealing.deliver_to) if sealing is not None else [COORDINATOR]

    # -- evaluation and delivery ------------------------------------------------------------------------

    def _evaluate(self, k: int, relay: Relay, targets: list[str], schedule: list[str], deliver: tuple[str, ...] = ()
                  ) -> dict[str, dict[str, Any]]:
        """Link k's model on each target site's validation split; a site that fails is reported, not fatal."""
        online = online_sites(self.transport.grid)
        for site in [t for t in targets if t not in online]:
            self.on_event({"event": Event.EVALUATION_MISSING, "site": site, "link": k + 1, "reason": "offline"})
            self._audit("evaluate", "failed", k, "offline", site=site)
        targets = [t for t in targets if t in online]
        self.transport.nodes.update({t: online[t] for t in targets})
        contents = {s: RecordDict({KEY_CONFIG: ConfigRecord(EvaluateRequest(
                                       self.state.run_id, k, relay.site, tuple(schedule), s in deliver).to_config()),
                                   **relay.records("weights", s)}) for s in targets}
        for s in targets:
            self._audit("evaluate", "sent", k, to=s, sender=relay.site, deliver=s in deliver,
                        model_sha256=_blob_sha(relay, "weights", s))
        done = self.transport.exchange_all(MSG_EVALUATE, contents, f"evaluate-{k + 1}")
        for site, err in done.failures.items():
            self._audit("evaluate", _decision(err), k, err.reason, site=site)
            self.on_event({"event": Event.EVALUATION_MISSING, "site": site, "link": k + 1, "reason": err.reason,
                           "message": str(err)})
            if err.kind == "security":
                raise LinkError(f"evaluating link {k + 1}: {err}; the run stops", err.failure) from None
        out = {}
        for site, rep in done.replies.items():
            ev = EvalMetrics.from_record(rep.message.content.metric_records.get(KEY_METRICS, {}),
                                         f"evaluating link {k + 1}: site {site}")
            out[site] = {"accuracy": ev.accuracy, "n": ev.n, "confusion": list(ev.confusion)}
            self._audit("evaluate", "accepted", k, site=site, n=out[site]["n"], accuracy=out[site]["accuracy"])
        return out


def _decision(err: SiteFailure) -> str:
    """A site that refused a payload ``refused``; one that was offline, slow or broke ``failed``."""
    return "refused" if err.kind == "security" else "failed"


def _blob_sha(relay: Relay, kind: str, recipient: str) -> str:
    """SHA-256 of the blob handed to ``recipient`` ("" when the relay holds none for it)."""
    data = relay.blobs.get(kind)
    return sha256_hex(data) if data is not None and (not relay.sealed or recipient in relay.recipients(kind)) else ""

def link_event_extras(record: LinkRecord) -> dict[str, Any]:
    """Last-epoch loss parts and relayed bytes of a link, for the progress event (metrics, progress lines)."""
    m = record.metrics
    last = {key: float(m[f"epoch-{key}"][-1]) for key in ("loss", "ce", "kd") if len(m.get(f"epoch-{key}", []))}
    extras = {**last, "bytes_to_site": record.bytes_to_site, "bytes_from_site": record.bytes_from_site,
              "train_seconds": float(m.get("seconds", 0.0))}
    epoch_times = [float(t) for t in m.get("epoch-seconds", [])]
    if epoch_times:  # what `weckd status` estimates the running link's epoch from
        extras["epoch_seconds"] = sum(epoch_times) / len(epoch_times)
    if "privacy-epsilon" in m:
        extras["epsilon"] = float(m["privacy-epsilon"])
    return extras


def link_record(k: int, rep: Reply) -> LinkRecord:
    where = f"link {k + 1}: site {rep.site}"
    info = LinkInfo.from_record(rep.message.content.config_records.get(KEY_INFO, {}), where)
    metrics = LinkMetrics.from_record(rep.message.content.metric_records.get(KEY_METRICS, {}), where)
    log.info("link %d site %s: val acc %.3f, %.1fs round trip, %d B out, %d B back", k + 1, rep.site,
             metrics.val_accuracy, rep.seconds, rep.bytes_out, rep.bytes_in)
    return LinkRecord(k, rep.site, info.arch, info.init, metrics.to_record(), rep.seconds, rep.bytes_out,
                      rep.bytes_in)
