"""The weckd ClientApp: one site's side of the chain protocol (thin: decode, call ``weckd.chain``, encode).

* ``query``: who the site is (weckd version, classes, image size, proxy hash) and counts only;
* ``train``: one chain link: the teacher payload → ``weckd.chain.link.train_link`` with exactly the
  arguments ``weckd.chain.runner.run_chain`` uses → the student's payload and metrics;
* ``evaluate``: a received model on the site's local validation split.

The decoded site data is cached per site config path in :data:`_DATA` for the life of the process:
``weckd-client`` runs one warm executor per site, so data is read once and not per message. This is
the only module-level cache in weckd and it lives only in ``weckd.client``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from weckd.chain import __version__
from weckd.chain.artifacts import ModelCard, save_model
from weckd.chain.config import link_from_mapping
from weckd.chain.errors import LinkError
from weckd.chain.link import LinkResult, Teacher, evaluate, model_from_state, train_link
from weckd.chain.models import pick_device
from weckd.chain.payload import (
    KEY_CONFIG,
    KEY_INFO,
    KEY_LINK,
    KEY_METRICS,
    KEY_MODEL_ARRAYS,
    KEY_MODEL_HEADER,
    KEY_SEALED,
    SEALED_ENTRY,
    decode_logits,
    decode_state,
    encode_logits,
    encode_state,
    pack_bytes,
    payload_bytes,
    payload_from_bytes,
)
from weckd.chain.peers import Party, load_party
from weckd.chain.seal import SealError

from .linkstore import LinkOutput, LinkStore, link_key
from .metrics import SiteStatus, status_path
from .records import config_dict, payload_records_from_bytes, read_payload
from .site import LocalData, SiteConfig, load_local_data, load_site_config

log = logging.getLogger(__name__)

NODE_SITE = "site-id"
NODE_CONFIG = "site-config"

app = ClientApp()

_DATA: dict[str, Site] = {}


class Site(NamedTuple):
    cfg: SiteConfig
    data: LocalData
    party: Party | None  # sealing keys and pinned peers; None: this site takes unsealed payloads


class Received(NamedTuple):
    header: dict[str, Any]
    arrays: dict[str, np.ndarray]
    raw: bytes  # exactly what arrived (sealed blob or plain payload bytes): part of the link's identity


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


def _device(cfg: SiteConfig) -> torch.device:
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    return pick_device(cfg.runtime.device)


@app.query()
def query(msg: Message, context: Context) -> Message:
    cfg, data, party = site_data(context)
    info = ConfigRecord({"site-id": cfg.site, "weckd-version": __version__, "classes": list(data.spec.classes),
                         "image-size": data.spec.size, "channels": data.spec.channels,
                         "proxy-sha256": data.proxy_sha256, "sealing": party.fingerprint if party else ""})
    counts = MetricRecord({"train": len(data.site.train), "val": len(data.site.val),
                           "unlabelled": len(data.site.unlabelled) if data.site.unlabelled is not None else 0,
                           "proxy": len(data.proxy) if data.proxy is not None else 0})
    return Message(RecordDict({KEY_INFO: info, KEY_METRICS: counts}), reply_to=msg)


def receive(content: RecordDict, party: Party | None, kind: str, sender: str, run_id: str, link: int,
            where: str) -> Received | None:
    """The payload a message carries, opened and checked (sealed: by its pinned sender, for this run and
    link); None when it carries none. A sealed site refuses unsealed payloads and the reverse."""
    if KEY_SEALED in content.array_records:
        if party is None:
            raise LinkError(f"{where}: a sealed payload arrived but this site has no sealing: section; add its keys")
        blob = content.array_records[KEY_SEALED][SEALED_ENTRY].numpy().tobytes()
        opened = party.open_from(blob, sender=sender, run_id=run_id, link=link, kind=kind)
        header, arrays = payload_from_bytes(opened, where, party.max_bytes)
        return Received(header, arrays, blob)
    plain = read_payload(content, where)
    if plain is None:
        return None
    if party is not None:
        raise SealError("unsealed", f"{where}: an unsealed payload arrived but this site accepts sealed payloads "
                        "only; the coordinator must set federation.sealing")
    return Received(plain[0], plain[1], pack_bytes(*plain))


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
    cfg, data, party = site_data(context)
    run = config_dict(msg.content, KEY_CONFIG, f"site {cfg.site}")
    link, n_links, mode = int(run["link"]), int(run["n-links"]), str(run["mode"])
    where = f"site {cfg.site} link {link + 1}"
    link_cfg = config_dict(msg.content, KEY_LINK, where)
    settings = link_from_mapping(link_cfg, source=where)
    status = SiteStatus(status_path(cfg.state_dir))  # weckd.client.metrics: read by weckd-client's /metrics
    schedule = [str(s) for s in run.get("schedule", [])]
    sender = schedule[link - 1] if 0 < link <= len(schedule) else ""
    received = status.checked(lambda: receive(msg.content, party, mode, sender, str(run.get("run-id", "")),
                                              link - 1, where))
    store = LinkStore(cfg.state_dir)
    key = link_key(run, link_cfg, received.raw if received is not None else b"")
    out = store.get(key)
    if out is not None:
        log.info("%s: this link of run %s was trained here already; sending the stored result", where,
                 run.get("run-id"))
    else:
        log.info("%s: training (teacher %s)", where, f"from site {sender}" if received is not None else "none")
        teacher = status.checked(lambda: _teacher(received, data, link, mode, where))
        with status.activity("training", link + 1, settings.epochs):
            result = train_link(settings, data.site, data.spec, seed=int(run["seed"]), device=_device(cfg),
                                teacher=teacher, proxy=data.proxy if mode == "logits" else None,
                                augment_images=bool(run["augment"]), label=f"link {link + 1}/{n_links} site {cfg.site}",
                                on_epoch=status.on_epoch)
        out = link_output(result, mode, link, bool(run["deliver"]), str(run["wire-dtype"]), cfg.site, where)
        store.put(key, out)
    records: dict[str, Any] = {KEY_METRICS: MetricRecord(out.metrics), KEY_INFO: ConfigRecord(out.info)}
    if party is not None:
        records[KEY_SEALED] = _sealed(out, party, str(run["run-id"]), link, str(run.get("seal-for", "")))
    else:
        records.update(_plain(out, mode))
    return Message(RecordDict(records), reply_to=msg)


def link_output(result: LinkResult, mode: str, link: int, deliver: bool, wire_dtype: str, site: str, where: str
                ) -> LinkOutput:
    """The link's payloads as bytes (relayed weights in the wire dtype; the delivered model in float32)."""
    payloads: dict[str, bytes] = {}
    if mode == "logits":
        if result.proxy_logits is None:
            raise LinkError(f"{where}: logits mode but no proxy logits were produced; set data.proxy")
        payloads["logits"] = payload_bytes(encode_logits(result.proxy_logits, result.arch, link))
    if mode == "weights" or deliver:
        payloads["weights"] = payload_bytes(encode_state(result.state, result.arch, link,
                                                         "float32" if deliver else wire_dtype))
    return LinkOutput(payloads, link_metrics(result), {"site-id": site, "arch": result.arch, "init": result.init})


def _sealed(out: LinkOutput, party: Party, run_id: str, link: int, seal_for: str) -> ArrayRecord:
    """One sealed blob per ``kind:recipient`` the coordinator asked for."""
    blobs = {}
    for item in filter(None, seal_for.split(",")):
        kind, _, recipient = item.partition(":")
        if kind not in out.payloads:
            raise LinkError(f"site {party.name} link {link + 1}: asked to seal a {kind!r} payload it does not have")
        blob = party.seal_for(recipient, out.payloads[kind], run_id=run_id, link=link, kind=kind)
        blobs[item] = Array(np.frombuffer(blob, dtype=np.uint8))
    return ArrayRecord(blobs)


def _plain(out: LinkOutput, mode: str) -> dict[str, Any]:
    """Unsealed payload records: the relayed payload, plus the final weights in logits mode."""
    records = payload_records_from_bytes(out.payloads[mode])
    if mode == "logits" and "weights" in out.payloads:
        records.update(payload_records_from_bytes(out.payloads["weights"], KEY_MODEL_HEADER, KEY_MODEL_ARRAYS))
    return records


def link_metrics(result: LinkResult) -> dict[str, Any]:
    """Aggregates only: accuracy, recall, confusion counts, loss parts per epoch, counts, seconds."""
    metrics = {
        "val-accuracy": result.val.accuracy, "val-n": result.val.n,
        "val-recall": [float(r) for r in result.val.recall],
        "val-confusion": [int(c) for row in result.val.confusion for c in row],
        "epoch-loss": [e.loss for e in result.epochs], "epoch-ce": [e.ce for e in result.epochs],
        "epoch-kd": [e.kd for e in result.epochs], "epoch-seconds": [e.seconds for e in result.epochs],
        "seconds": result.seconds, "images-per-s": result.images_per_s,
        **{f"samples-{k}": int(v) for k, v in result.samples.items()},
    }
    if result.privacy is not None:  # DP-SGD: what the link spent (ε at δ) travels with its metrics
        metrics.update({f"privacy-{k}": float(v) for k, v in dict(result.privacy).items()})
    return metrics


@app.evaluate()
def evaluate_model(msg: Message, context: Context) -> Message:
    cfg, data, party = site_data(context)
    run = config_dict(msg.content, KEY_CONFIG, f"site {cfg.site}")
    link = int(run["link"])
    where = f"site {cfg.site} evaluate link {link + 1}"
    status = SiteStatus(status_path(cfg.state_dir))
    received = status.checked(lambda: receive(msg.content, party, "weights", str(run.get("sender", "")),
                                              str(run.get("run-id", "")), link, where))
    if received is None:
        raise LinkError(f"{where}: evaluate message carries no model")
    decoded = status.checked(lambda: decode_state(received.header, received.arrays, link=link, where=where))
    assert decoded is not None
    arch, state = decoded
    device = _device(cfg)
    with status.activity("evaluating", link + 1):
        model = model_from_state(arch, state, data.spec, device)
        ev = evaluate(model, data.site.val, len(data.spec.classes), device)
    if bool(run.get("deliver", False)):
        keep_delivered(cfg, data, arch, state, run)
    metrics = MetricRecord({"accuracy": ev.accuracy, "n": ev.n, "recall": [float(r) for r in ev.recall],
                            "confusion": [int(c) for row in ev.confusion for c in row]})
    return Message(RecordDict({KEY_METRICS: metrics, KEY_INFO: ConfigRecord({"site-id": cfg.site})}), reply_to=msg)


def keep_delivered(cfg: SiteConfig, data: LocalData, arch: str, state: dict[str, torch.Tensor],
                   run: Mapping[str, Any]) -> None:
    """Store the chain's final model delivered to this site (safetensors + model card) in its state dir."""
    out = Path(cfg.state_dir) / "delivered" / str(run.get("run-id", "run")) / "model"
    provenance = {"federated": True, "run_id": str(run.get("run-id", "")), "link": int(run["link"]) + 1,
                  "from_site": str(run.get("sender", "")), "received_by": cfg.site}
    save_model(out, state, ModelCard(arch, list(data.spec.classes), data.spec.size, data.spec.channels, provenance))
    log.info("site %s: final model of run %s stored in %s", cfg.site, run.get("run-id"), out)
