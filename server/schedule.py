"""The chain protocol on the coordinator: discover the sites, run every link in order, evaluate.

Link k goes to site ``order[k mod K]`` with the link's settings, the link seed
(``weckd.chain.runner.link_seed``) and link k−1's payload, relayed as received: the coordinator
relays, it does not read. After each link the new model is evaluated at the sites per
``federation.evaluate`` (weights mode; in logits mode only the delivered final model travels).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from flwr.app import ConfigRecord, RecordDict
from weckd.chain import __version__
from weckd.chain.config import link_to_mapping
from weckd.chain.errors import LinkError
from weckd.chain.payload import (
    KEY_ARRAYS,
    KEY_CONFIG,
    KEY_HEADER,
    KEY_INFO,
    KEY_LINK,
    KEY_METRICS,
    KEY_MODEL_ARRAYS,
    KEY_MODEL_HEADER,
    MSG_EVALUATE,
    MSG_QUERY,
    MSG_TRAIN,
)
from weckd.chain.runner import link_seed

from .settings import Federation
from .transport import Reply, Transport

log = logging.getLogger(__name__)

Event = Callable[[dict[str, Any]], None]


@dataclass
class LinkRecord:
    """What the coordinator learned about one link (aggregates only)."""

    index: int
    site: str
    arch: str
    init: str
    metrics: dict[str, Any]
    round_trip_s: float
    bytes_to_site: int
    bytes_from_site: int
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class ChainOutcome:
    sites: dict[str, dict[str, Any]]
    links: list[LinkRecord]
    final_payload: tuple[dict[str, Any], dict[str, Any]] | None = None


def discover(transport: Transport, fed: Federation) -> dict[str, dict[str, Any]]:
    """Query every site; refuse version, class, image-format or proxy mismatches with the reason."""
    ask = {site: RecordDict({KEY_CONFIG: ConfigRecord({"weckd-version": __version__})}) for site in transport.nodes}
    replies = transport.exchange(MSG_QUERY, ask, "discovery")
    infos: dict[str, dict[str, Any]] = {}
    data = fed.chain.data
    for site, rep in replies.items():
        info = dict(rep.message.content.config_records[KEY_INFO])
        counts = dict(rep.message.content.metric_records[KEY_METRICS])
        if info.get("site-id") != site:
            log.warning("site %s: its site config says %r; identity comes from the registered name",
                        site, info.get("site-id"))
        if info.get("weckd-version") != __version__:
            raise LinkError(f"discovery: site {site} runs weckd {info.get('weckd-version')}, the coordinator "
                            f"{__version__}; install the same weckd version everywhere")
        if list(info.get("classes", [])) != list(data.classes):
            raise LinkError(f"discovery: site {site} has classes {info.get('classes')}, the federation "
                            f"{list(data.classes)}; fix data.classes in that site's config")
        if (info.get("image-size"), info.get("channels")) != (data.image_size, data.channels):
            raise LinkError(f"discovery: site {site} decodes {info.get('image-size')} px × {info.get('channels')} "
                            f"channels, the federation {data.image_size} × {data.channels}; align data settings")
        infos[site] = {**info, "counts": counts}
        log.info("site %s: weckd %s, %d train / %d val images", site, info.get("weckd-version"),
                 counts.get("train", 0), counts.get("val", 0))
    if fed.chain.chain.mode == "logits":
        hashes = {s: i.get("proxy-sha256", "") for s, i in infos.items()}
        if "" in hashes.values() or len(set(hashes.values())) != 1:
            raise LinkError(f"discovery: logits mode needs the same proxy set at every site; proxy hashes "
                            f"{ {s: h[:12] for s, h in hashes.items()} }; copy the same proxy folder to every site")
    return infos


def _train_content(fed: Federation, k: int, teacher: RecordDict | None) -> RecordDict:
    cfg = fed.chain
    run = ConfigRecord({"link": k, "n-links": cfg.n_links, "seed": link_seed(cfg.seed, k), "mode": cfg.chain.mode,
                        "wire-dtype": cfg.chain.wire_dtype, "augment": cfg.data.augment,
                        "deliver": k == cfg.n_links - 1})
    records: dict[str, Any] = {KEY_CONFIG: run, KEY_LINK: ConfigRecord(link_to_mapping(cfg.link_settings(k)))}
    if teacher is not None:
        records[KEY_HEADER] = teacher.config_records[KEY_HEADER]
        records[KEY_ARRAYS] = teacher.array_records[KEY_ARRAYS]
    return RecordDict(records)


def run_links(transport: Transport, fed: Federation, infos: dict[str, dict[str, Any]], on_event: Event) -> ChainOutcome:
    """Train every link in order, relaying each payload to the next site; evaluate after each link."""
    cfg = fed.chain
    outcome = ChainOutcome(infos, [])
    teacher: RecordDict | None = None
    for k in range(cfg.n_links):
        site = cfg.site_of(k)
        on_event({"event": "link-start", "link": k + 1, "links": cfg.n_links, "site": site})
        rep = transport.exchange(MSG_TRAIN, {site: _train_content(fed, k, teacher)}, f"link-{k + 1}")[site]
        record = _link_record(k, rep)
        teacher = rep.message.content
        weights = _weights_of(teacher, cfg.chain.mode)
        if weights is not None:
            record.evaluations = evaluate_link(transport, fed, k, weights)
        outcome.links.append(record)
        on_event({"event": "link-done", "link": k + 1, "links": cfg.n_links, "site": site,
                  "val_accuracy": record.metrics["val-accuracy"], "seconds": record.round_trip_s,
                  "evaluations": {s: e["accuracy"] for s, e in record.evaluations.items()},
                  **_link_event_extras(record)})
        if k == cfg.n_links - 1:
            outcome.final_payload = weights
    return outcome


def _link_event_extras(record: LinkRecord) -> dict[str, Any]:
    """Last-epoch loss parts and relayed bytes of a link, for the progress event (metrics, progress lines)."""
    m = record.metrics
    last = {key: float(m[f"epoch-{key}"][-1]) for key in ("loss", "ce", "kd") if len(m.get(f"epoch-{key}", []))}
    return {**last, "bytes_to_site": record.bytes_to_site, "bytes_from_site": record.bytes_from_site,
            "train_seconds": float(m.get("seconds", 0.0))}


def _link_record(k: int, rep: Reply) -> LinkRecord:
    info = dict(rep.message.content.config_records[KEY_INFO])
    metrics = dict(rep.message.content.metric_records[KEY_METRICS])
    log.info("link %d site %s: val acc %.3f, %.1fs round trip, %d B out, %d B back", k + 1, rep.site,
             metrics["val-accuracy"], rep.seconds, rep.bytes_out, rep.bytes_in)
    return LinkRecord(k, rep.site, str(info.get("arch")), str(info.get("init")), metrics, rep.seconds,
                      rep.bytes_out, rep.bytes_in)


def _weights_of(content: RecordDict, mode: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(header record, arrays record) of a reply's model weights, if it carries them."""
    hkey, akey = (KEY_HEADER, KEY_ARRAYS) if mode == "weights" else (KEY_MODEL_HEADER, KEY_MODEL_ARRAYS)
    if hkey not in content.config_records:
        return None
    return content.config_records[hkey], content.array_records[akey]


def eval_targets(fed: Federation, k: int) -> list[str]:
    """Which sites evaluate link k's model: all, the next link's site, or none."""
    cfg, how = fed.chain, fed.settings.evaluate
    if how == "none":
        return []
    if how == "next":
        return [cfg.site_of(k + 1)] if k + 1 < cfg.n_links else list(cfg.chain.order)
    return list(cfg.chain.order)


def evaluate_link(transport: Transport, fed: Federation, k: int, weights: tuple[Any, Any]
                  ) -> dict[str, dict[str, Any]]:
    """Evaluate link k's model on the targeted sites' local validation splits."""
    targets = eval_targets(fed, k)
    if not targets:
        return {}
    header, arrays = weights
    contents = {s: RecordDict({KEY_CONFIG: ConfigRecord({"link": k}), KEY_HEADER: header, KEY_ARRAYS: arrays})
                for s in targets}
    replies = transport.exchange(MSG_EVALUATE, contents, f"evaluate-{k + 1}")
    out = {}
    for site, rep in replies.items():
        m = dict(rep.message.content.metric_records[KEY_METRICS])
        out[site] = {"accuracy": float(m["accuracy"]), "n": int(m["n"]),
                     "confusion": [int(c) for c in m.get("confusion", [])]}
    return out
