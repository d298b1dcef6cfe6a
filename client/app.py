"""The weckd ClientApp: one site's side of the chain protocol (thin: decode, call ``weckd.chain``, encode).

* ``query``: who the site is (weckd version, classes, image size, proxy hash) and counts only;
* ``train``: one chain link: the teacher payload → ``weckd.chain.link.train_link`` with exactly the
  arguments ``weckd.chain.runner.run_chain`` uses → the student's payload and metrics;
* ``evaluate``: a received model on the site's local validation split;
* ``query.deliver``: hand over a link this site trained as the final model;
* ``train.fedavg`` / ``evaluate.fedavg``: FedAvg rounds, only where the site's policy allows FedAvg
  (``weckd.client.rounds``).

Every request is first admitted (``weckd.client.admit``: strict decoding, the site's own policy and
run state), then its payload is opened under the sender the site itself derived; a refusal is one
line in the site's log, one line in its audit log (``<state_dir>/audit.log``) and a count in
``weckd_site_requests_refused_total{reason}``, and the coordinator gets the reason code only.

The decoded site data is cached per site config path in :data:`_DATA` for the life of the process:
``weckd-client`` runs one warm executor per site, so data is read once and not per message. This is
the only module-level cache in weckd and it lives only in ``weckd.client``.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from weckd.chain import __version__
from weckd.chain.audit import AUDIT_FILE, AuditLog
from weckd.chain.errors import LinkError, PayloadError, SecurityError
from weckd.chain.flower import config_dict
from weckd.chain.link import Teacher, evaluate, model_from_state, train_link
from weckd.chain.payload import decode_logits, decode_state
from weckd.chain.peers import load_party
from weckd.chain.protocol import (
    KEY_CONFIG,
    KEY_INFO,
    KEY_LINK,
    KEY_METRICS,
    EvalMetrics,
    Reason,
    Refused,
    SiteCounts,
    SiteInfo,
    reason_of,
)

from .admit import admit_deliver, admit_evaluate, admit_train, check_model_arch
from .exchange import (
    Received,
    Site,
    has_payload,
    keep_delivered,
    link_output,
    payload_reply,
    receive,
    site_device,
)
from .linkstore import LinkOutput, LinkStore, link_key
from .metrics import SiteStatus, status_path
from .rounds import evaluate_round, train_round
from .runstate import RunState
from .site import LocalData, load_local_data, load_site_config

__all__ = ["app", "receive", "refuse_bundle", "warm_site_data"]

log = logging.getLogger(__name__)

NODE_SITE = "site-id"
NODE_CONFIG = "site-config"

app = ClientApp()

_DATA: dict[str, Site] = {}


def site_data(context: Context) -> Site:
    """The site's config, decoded data and sealing keys, read once per process (see the module docstring)."""
    path = str(context.node_config.get(NODE_CONFIG, ""))
    if not path:
        raise LinkError("SuperNode node config lacks 'site-config'; start the site with weckd-client")
    return warm_site_data(path)


def warm_site_data(path: str) -> Site:
    """Read (once) and cache the site config, data and sealing keys at ``path``."""
    if path not in _DATA:
        cfg = load_site_config(path)
        party = load_party(cfg.site, cfg.sealing, cfg.source) if cfg.sealing is not None else None
        _DATA[path] = Site(cfg, load_local_data(cfg), party)
    return _DATA[path]


def _guarded(kind: str, site: Site, msg: Message, work: Callable[[SiteStatus, AuditLog], Message]) -> Message:
    """Run one request; a refusal is logged as one line, audited and counted by reason, then re-raised (the
    executor answers the coordinator with the reason code only)."""
    status = SiteStatus(status_path(site.cfg.state_dir))  # weckd.client.metrics: read by weckd-client's /metrics
    audit = AuditLog(Path(site.cfg.state_dir) / AUDIT_FILE)
    try:
        return work(status, audit)
    except (PayloadError, SecurityError) as err:
        reason = reason_of(err)
        log.warning("site %s refused a %s request (%s): %s", site.cfg.site, kind, reason.value, err)
        status.request_refused(reason.value)
        _audit_refusal(audit, kind, msg, reason)
        raise


def _audit_refusal(audit: AuditLog, kind: str, msg: Message, reason: Reason) -> None:
    config = msg.content.config_records.get(KEY_CONFIG, {})
    run, link = config.get("run-id", ""), config.get("link")
    audit.append(kind, run=run[:64] if isinstance(run, str) else "", link=link if type(link) is int else None,
                 decision="refused", reason=reason.value, flower_run=int(msg.metadata.run_id))


def refuse_bundle(context: Context, msg: Message, err: Refused) -> None:
    """The executor refused the run's bundle: the same one line, audit line and count as any refusal."""
    def work(*_: Any) -> Message:
        raise err

    _guarded(msg.metadata.message_type, site_data(context), msg, work)


@app.query()
def query(msg: Message, context: Context) -> Message:
    site = site_data(context)
    cfg, data, party = site

    def work(status: SiteStatus, audit: AuditLog) -> Message:
        info = ConfigRecord(SiteInfo(cfg.site, __version__, tuple(data.spec.classes), data.spec.size,
                                     data.spec.channels, data.proxy_sha256,
                                     party.fingerprint if party else "").to_record())
        counts = MetricRecord(SiteCounts(len(data.site.train), len(data.site.val),
                                         len(data.site.unlabelled) if data.site.unlabelled is not None else 0,
                                         len(data.proxy) if data.proxy is not None else 0).to_record())
        audit.append("query", decision="accepted", flower_run=int(msg.metadata.run_id))
        return Message(RecordDict({KEY_INFO: info, KEY_METRICS: counts}), reply_to=msg)

    return _guarded("query", site, msg, work)


def _teacher(received: Received | None, data: LocalData, link: int, mode: str, where: str) -> Teacher | None:
    if received is None:
        return None
    if mode == "logits":
        n_proxy = len(data.proxy) if data.proxy is not None else 0
        arch, logits = decode_logits(received.header, received.arrays, n_classes=len(data.spec.classes),
                                     n_proxy=n_proxy, link=link - 1, where=where)
        return Teacher(arch, None, logits)
    arch, state = decode_state(received.header, received.arrays, link=link - 1, where=where)
    return Teacher(arch, state, None)


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = site_data(context)
    return _guarded("train", site, msg, lambda status, audit: _train(site, msg, status, audit))


def _train(site: Site, msg: Message, status: SiteStatus, audit: AuditLog) -> Message:
    cfg, data, party = site
    runs = RunState(cfg.state_dir, cfg.policy)
    ok = admit_train(cfg, data, party, runs, config_dict(msg.content, KEY_CONFIG, f"site {cfg.site}"),
                     config_dict(msg.content, KEY_LINK, f"site {cfg.site}"), has_payload(msg.content))
    req, link = ok.req, ok.req.link
    where = f"site {cfg.site} link {link + 1}"
    received = status.checked(lambda: receive(msg.content, party, req.mode, ok.sender, req.run_id, link - 1, where))
    teacher = status.checked(lambda: _teacher(received, data, link, req.mode, where))
    if teacher is not None:
        check_model_arch(cfg, teacher.arch, where)
    runs.commit(req.run_id, ok.record, link, req.schedule, trained=True)
    if req.deliver:
        runs.delivered(req.run_id, ok.record, link)
    teacher_sha = hashlib.sha256(received.raw).hexdigest() if received is not None else ""
    audit.append("train", run=req.run_id, link=link, decision="accepted", sender=ok.sender,
                 payload_sha256=teacher_sha, signer=ok.sender if party is not None and received is not None else "",
                 arch=ok.settings.arch, epochs=ok.settings.epochs)
    store = LinkStore(cfg.state_dir)
    key = link_key(req.to_config(), ok.link_config, received.raw if received is not None else b"")
    out = store.get(key)
    if out is not None:
        log.info("%s: this link of run %s was trained here already; sending the stored result", where, req.run_id)
    else:
        log.info("%s: training (teacher %s)", where, f"from site {ok.sender}" if received is not None else "none")
        with status.activity("training", link + 1, ok.settings.epochs):
            result = train_link(ok.settings, data.site, data.spec, seed=req.seed, device=site_device(cfg),
                                teacher=teacher, proxy=data.proxy if req.mode == "logits" else None,
                                augment_images=req.augment, label=f"link {link + 1}/{req.n_links} site {cfg.site}",
                                on_epoch=status.on_epoch, position=(link, req.n_links))
        out = link_output(result, req.mode, link, req.deliver, req.wire_dtype, cfg.site, where)
        store.put(key, out, req.run_id, link)
        if result.privacy is not None:
            runs.spend(ok.record, float(dict(result.privacy)["epsilon"]))
    records: dict[str, Any] = {KEY_METRICS: MetricRecord(out.metrics), KEY_INFO: ConfigRecord(out.info)}
    records.update(payload_reply(out, party, req.run_id, link, req.seal_for))
    audit.append("train-reply", run=req.run_id, link=link, decision="sent",
                 sent_to=[f"{k}:{r}" for k, r in req.seal_for] if party is not None else ["coordinator"],
                 payload_sha256={k: hashlib.sha256(v).hexdigest() for k, v in out.payloads.items()},
                 epsilon=float(out.metrics.get("privacy-epsilon", 0.0)))
    return Message(RecordDict(records), reply_to=msg)


@app.evaluate()
def evaluate_model(msg: Message, context: Context) -> Message:
    site = site_data(context)
    return _guarded("evaluate", site, msg, lambda status, audit: _evaluate(site, msg, status, audit))


def _evaluate(site: Site, msg: Message, status: SiteStatus, audit: AuditLog) -> Message:
    cfg, data, party = site
    runs = RunState(cfg.state_dir, cfg.policy)
    ok = admit_evaluate(cfg, party, runs, config_dict(msg.content, KEY_CONFIG, f"site {cfg.site}"))
    req, link = ok.req, ok.req.link
    where = f"site {cfg.site} evaluate link {link + 1}"
    received = status.checked(lambda: receive(msg.content, party, "weights", req.sender, req.run_id, link, where))
    if received is None:
        raise Refused(Reason.BAD_REQUEST, f"{where}: evaluate message carries no model")
    decoded = status.checked(lambda: decode_state(received.header, received.arrays, link=link, where=where))
    assert decoded is not None
    arch, state = decoded
    check_model_arch(cfg, arch, where)
    runs.commit(req.run_id, ok.record, link, req.schedule, evaluated=True)
    audit.append("evaluate", run=req.run_id, link=link, decision="accepted", sender=req.sender,
                 payload_sha256=hashlib.sha256(received.raw).hexdigest(),
                 signer=req.sender if party is not None else "", deliver=req.deliver)
    device = site_device(cfg)
    with status.activity("evaluating", link + 1):
        model = model_from_state(arch, state, data.spec, device)
        ev = evaluate(model, data.site.val, len(data.spec.classes), device)
    if req.deliver:
        keep_delivered(cfg, data, arch, state, req.run_id, req.link, req.sender)
    metrics = MetricRecord(EvalMetrics(float(ev.accuracy), int(ev.n), tuple(float(r) for r in ev.recall),
                                       tuple(int(c) for row in ev.confusion for c in row)).to_record())
    audit.append("evaluate-reply", run=req.run_id, link=link, decision="sent", sent_to=["coordinator"],
                 n=int(ev.n))
    return Message(RecordDict({KEY_METRICS: metrics}), reply_to=msg)


@app.train("fedavg")
def fedavg_round(msg: Message, context: Context) -> Message:
    site = site_data(context)
    return _guarded("fedavg", site, msg, lambda status, audit: train_round(site, msg, status, audit))


@app.evaluate("fedavg")
def fedavg_evaluate(msg: Message, context: Context) -> Message:
    site = site_data(context)
    return _guarded("fedavg-evaluate", site, msg, lambda status, audit: evaluate_round(site, msg, status, audit))


@app.query("deliver")
def hand_over(msg: Message, context: Context) -> Message:
    site = site_data(context)
    return _guarded("deliver", site, msg, lambda status, audit: _hand_over(site, msg, audit))


def _hand_over(site: Site, msg: Message, audit: AuditLog) -> Message:
    """One of this site's links, as trained and kept here, becomes the final model (the best link, or the
    last one that completed when later links were skipped), sealed for the recipients its policy allows
    (no training, no payload received)."""
    cfg, data, party = site
    runs = RunState(cfg.state_dir, cfg.policy)
    req = admit_deliver(cfg, party, runs, config_dict(msg.content, KEY_CONFIG, f"site {cfg.site}"))
    where = f"site {cfg.site} deliver link {req.link + 1}"
    out = LinkStore(cfg.state_dir).get_link(req.run_id, req.link)
    if out is None or "weights" not in out.payloads:
        raise Refused(Reason.BAD_REQUEST, f"{where}: this site keeps no model of that link (the weights of its "
                      "links of the current run are kept; logits-mode links keep none)")
    weights = LinkOutput({"weights": out.payloads["weights"]}, out.metrics, out.info)
    records: dict[str, Any] = {KEY_METRICS: MetricRecord(out.metrics), KEY_INFO: ConfigRecord(out.info)}
    records.update(payload_reply(weights, party, req.run_id, req.link, req.seal_for))
    audit.append("deliver", run=req.run_id, link=req.link, decision="sent",
                 sent_to=[r for _, r in req.seal_for] if party is not None else ["coordinator"],
                 payload_sha256=hashlib.sha256(weights.payloads["weights"]).hexdigest())
    runs.delivered(req.run_id, runs.ledger.runs[req.run_id], req.link)
    log.info("%s: handed over as the chain's final model", where)
    return Message(RecordDict(records), reply_to=msg)
