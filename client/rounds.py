"""A site's side of FedAvg (``weckd.chain.rounds``): train one round from the coordinator's average, and
evaluate an average on the local validation split.

Both are admitted first (``weckd.client.admit``: ``policy.allow_fedavg``, the participants, the round
numbers and the link settings against the site's own policy and run ledger). The model a round starts
from is opened under the coordinator's pinned key, for this run and the previous round; the update goes
back sealed for the coordinator alone. Round 0 starts every site from the same seed.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from weckd.chain.audit import AuditLog
from weckd.chain.flower import config_dict
from weckd.chain.link import evaluate, model_from_state, student_arch, train_link
from weckd.chain.payload import decode_state
from weckd.chain.peers import COORDINATOR
from weckd.chain.protocol import KEY_CONFIG, KEY_INFO, KEY_LINK, KEY_METRICS, EvalMetrics, Reason, Refused

from .admit import admit_round, admit_round_evaluate, check_model_arch
from .exchange import (
    Site,
    has_payload,
    keep_delivered,
    link_output,
    payload_reply,
    receive,
    site_device,
)
from .linkstore import LinkStore, link_key
from .metrics import SiteStatus
from .runstate import RunState

log = logging.getLogger(__name__)


def train_round(site: Site, msg: Message, status: SiteStatus, audit: AuditLog) -> Message:
    cfg, data, party = site
    runs = RunState(cfg.state_dir, cfg.policy)
    ok = admit_round(cfg, data, party, runs, config_dict(msg.content, KEY_CONFIG, f"site {cfg.site}"),
                     config_dict(msg.content, KEY_LINK, f"site {cfg.site}"), has_payload(msg.content))
    req, rnd = ok.req, ok.req.round
    where = f"site {cfg.site} fedavg round {rnd + 1}"
    received = status.checked(lambda: receive(msg.content, party, "weights", COORDINATOR, req.run_id, rnd - 1, where))
    start = None
    if received is not None:
        decoded = status.checked(lambda: decode_state(received.header, received.arrays, link=rnd - 1,
                                                      arch=student_arch(ok.settings), where=where))
        check_model_arch(cfg, decoded[0], where)
        start = decoded[1]
    runs.commit_round(req.run_id, ok.record, rnd, req.sites, trained=True)
    raw = received.raw if received is not None else b""
    audit.append("fedavg-train", run=req.run_id, link=rnd, decision="accepted",
                 sender=COORDINATOR if received is not None else "", payload_sha256=hashlib.sha256(raw).hexdigest()
                 if raw else "", arch=ok.settings.arch, epochs=ok.settings.epochs, sites=list(req.sites))
    store = LinkStore(cfg.state_dir)
    key = link_key({"fedavg": req.to_config()}, ok.link_config, raw)
    out = store.get(key)
    if out is None:
        log.info("%s: training from %s", where, "the coordinator's average" if start is not None else "the seed")
        with status.activity("training", rnd + 1, ok.settings.epochs):
            result = train_link(ok.settings, data.site, data.spec, seed=req.seed, device=site_device(cfg),
                                augment_images=req.augment,
                                label=f"fedavg round {rnd + 1}/{req.rounds} site {cfg.site}",
                                on_epoch=status.on_epoch, initial_state=start, position=(rnd, req.rounds))
        out = link_output(result, "weights", rnd, False, req.wire_dtype, cfg.site, where)
        store.put(key, out, req.run_id, rnd)
        if result.privacy is not None:
            runs.spend(ok.record, float(dict(result.privacy)["epsilon"]))
    else:
        log.info("%s: this round of run %s was trained here already; sending the stored update", where, req.run_id)
    records: dict[str, Any] = {KEY_METRICS: MetricRecord(out.metrics), KEY_INFO: ConfigRecord(out.info)}
    records.update(payload_reply(out, party, req.run_id, rnd, req.seal_for))
    audit.append("fedavg-train-reply", run=req.run_id, link=rnd, decision="sent", sent_to=[COORDINATOR],
                 payload_sha256={k: hashlib.sha256(v).hexdigest() for k, v in out.payloads.items()})
    return Message(RecordDict(records), reply_to=msg)


def evaluate_round(site: Site, msg: Message, status: SiteStatus, audit: AuditLog) -> Message:
    cfg, data, party = site
    runs = RunState(cfg.state_dir, cfg.policy)
    req, record = admit_round_evaluate(cfg, party, runs, config_dict(msg.content, KEY_CONFIG, f"site {cfg.site}"))
    where = f"site {cfg.site} fedavg evaluate round {req.round + 1}"
    received = status.checked(lambda: receive(msg.content, party, "weights", COORDINATOR, req.run_id, req.round,
                                              where))
    if received is None:
        raise Refused(Reason.BAD_REQUEST, f"{where}: evaluate message carries no model")
    arch, state = status.checked(lambda: decode_state(received.header, received.arrays, link=req.round, where=where))
    check_model_arch(cfg, arch, where)
    runs.commit_round(req.run_id, record, req.round, req.sites, evaluated=True)
    audit.append("fedavg-evaluate", run=req.run_id, link=req.round, decision="accepted", sender=COORDINATOR,
                 payload_sha256=hashlib.sha256(received.raw).hexdigest(), deliver=req.deliver)
    device = site_device(cfg)
    with status.activity("evaluating", req.round + 1):
        ev = evaluate(model_from_state(arch, state, data.spec, device), data.site.val, len(data.spec.classes), device)
    if req.deliver:
        keep_delivered(cfg, data, arch, state, req.run_id, req.round, COORDINATOR)
    metrics = MetricRecord(EvalMetrics(float(ev.accuracy), int(ev.n), tuple(float(r) for r in ev.recall),
                                       tuple(int(c) for row in ev.confusion for c in row)).to_record())
    audit.append("fedavg-evaluate-reply", run=req.run_id, link=req.round, decision="sent", sent_to=[COORDINATOR],
                 n=int(ev.n))
    return Message(RecordDict({KEY_METRICS: metrics}), reply_to=msg)
