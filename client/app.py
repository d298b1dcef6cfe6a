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
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from weckd.chain import __version__
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
    decode_logits,
    decode_state,
    encode_logits,
    encode_state,
)

from .metrics import SiteStatus, status_path
from .records import config_dict, payload_records, read_payload
from .site import LocalData, SiteConfig, load_local_data, load_site_config

log = logging.getLogger(__name__)

NODE_SITE = "site-id"
NODE_CONFIG = "site-config"

app = ClientApp()

_DATA: dict[str, tuple[SiteConfig, LocalData]] = {}


def site_data(context: Context) -> tuple[SiteConfig, LocalData]:
    """The site's config and decoded data, read once per process (see the module docstring)."""
    path = str(context.node_config.get(NODE_CONFIG, ""))
    if not path:
        raise LinkError("SuperNode node config lacks 'site-config'; start the site with weckd-client")
    return warm_site_data(path)


def warm_site_data(path: str) -> tuple[SiteConfig, LocalData]:
    """Read (once) and cache the site config and data at ``path``."""
    if path not in _DATA:
        cfg = load_site_config(path)
        _DATA[path] = (cfg, load_local_data(cfg))
    return _DATA[path]


def _device(cfg: SiteConfig) -> torch.device:
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    return pick_device(cfg.runtime.device)


@app.query()
def query(msg: Message, context: Context) -> Message:
    cfg, data = site_data(context)
    info = ConfigRecord({"site-id": cfg.site, "weckd-version": __version__, "classes": list(data.spec.classes),
                         "image-size": data.spec.size, "channels": data.spec.channels,
                         "proxy-sha256": data.proxy_sha256})
    counts = MetricRecord({"train": len(data.site.train), "val": len(data.site.val),
                           "unlabelled": len(data.site.unlabelled) if data.site.unlabelled is not None else 0,
                           "proxy": len(data.proxy) if data.proxy is not None else 0})
    return Message(RecordDict({KEY_INFO: info, KEY_METRICS: counts}), reply_to=msg)


def _teacher(msg: Message, data: LocalData, link: int, mode: str, where: str) -> Teacher | None:
    received = read_payload(msg.content, where)
    if received is None:
        return None
    header, arrays = received
    if mode == "logits":
        n_proxy = len(data.proxy) if data.proxy is not None else 0
        arch, logits = decode_logits(header, arrays, n_classes=len(data.spec.classes), n_proxy=n_proxy,
                                     link=link - 1, where=where)
        return Teacher(arch, None, logits)
    arch, state = decode_state(header, arrays, link=link - 1, where=where)
    return Teacher(arch, state, None)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, data = site_data(context)
    run = config_dict(msg.content, KEY_CONFIG, f"site {cfg.site}")
    link, n_links, mode = int(run["link"]), int(run["n-links"]), str(run["mode"])
    where = f"site {cfg.site} link {link + 1}"
    settings = link_from_mapping(config_dict(msg.content, KEY_LINK, where), source=where)
    status = SiteStatus(status_path(cfg.state_dir))  # weckd.client.metrics: read by weckd-client's /metrics
    teacher = status.checked(lambda: _teacher(msg, data, link, mode, where))
    with status.activity("training", link + 1, settings.epochs):
        result = train_link(settings, data.site, data.spec, seed=int(run["seed"]), device=_device(cfg),
                            teacher=teacher, proxy=data.proxy if mode == "logits" else None,
                            augment_images=bool(run["augment"]), label=f"link {link + 1}/{n_links} site {cfg.site}",
                            on_epoch=status.on_epoch)
    if mode == "logits":
        if result.proxy_logits is None:
            raise LinkError(f"{where}: logits mode but no proxy logits were produced; set data.proxy")
        payload = encode_logits(result.proxy_logits, result.arch, link)
    else:  # the delivered final model stays float32; relayed weights travel in the chain's wire dtype
        wire = "float32" if bool(run["deliver"]) else str(run["wire-dtype"])
        payload = encode_state(result.state, result.arch, link, wire)
    records: dict[str, Any] = {**payload_records(payload), KEY_METRICS: link_metrics(result),
                               KEY_INFO: ConfigRecord({"site-id": cfg.site, "arch": result.arch, "init": result.init})}
    if mode == "logits" and bool(run["deliver"]):
        records.update(payload_records(encode_state(result.state, result.arch, link),
                                       KEY_MODEL_HEADER, KEY_MODEL_ARRAYS))
    return Message(RecordDict(records), reply_to=msg)


def link_metrics(result: LinkResult) -> MetricRecord:
    """Aggregates only: accuracy, recall, confusion counts, loss parts per epoch, counts, seconds."""
    return MetricRecord({
        "val-accuracy": result.val.accuracy, "val-n": result.val.n,
        "val-recall": [float(r) for r in result.val.recall],
        "val-confusion": [int(c) for row in result.val.confusion for c in row],
        "epoch-loss": [e.loss for e in result.epochs], "epoch-ce": [e.ce for e in result.epochs],
        "epoch-kd": [e.kd for e in result.epochs], "epoch-seconds": [e.seconds for e in result.epochs],
        "seconds": result.seconds, "images-per-s": result.images_per_s,
        **{f"samples-{k}": int(v) for k, v in result.samples.items()},
    })


@app.evaluate()
def evaluate_model(msg: Message, context: Context) -> Message:
    cfg, data = site_data(context)
    run = config_dict(msg.content, KEY_CONFIG, f"site {cfg.site}")
    where = f"site {cfg.site} evaluate link {int(run['link']) + 1}"
    received = read_payload(msg.content, where)
    if received is None:
        raise LinkError(f"{where}: evaluate message carries no model")
    status = SiteStatus(status_path(cfg.state_dir))
    decoded = status.checked(lambda: decode_state(*received, link=int(run["link"]), where=where))
    assert decoded is not None
    arch, state = decoded
    device = _device(cfg)
    with status.activity("evaluating", int(run["link"]) + 1):
        model = model_from_state(arch, state, data.spec, device)
        ev = evaluate(model, data.site.val, len(data.spec.classes), device)
    metrics = MetricRecord({"accuracy": ev.accuracy, "n": ev.n, "recall": [float(r) for r in ev.recall],
                            "confusion": [int(c) for row in ev.confusion for c in row]})
    return Message(RecordDict({KEY_METRICS: metrics, KEY_INFO: ConfigRecord({"site-id": cfg.site})}), reply_to=msg)
