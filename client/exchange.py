"""What a site receives and sends: payloads opened under the sender the site derived, link outputs
encoded, sealed or plain, and the delivered final model kept (used by the chain and FedAvg handlers)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from weckd.chain.artifacts import ModelCard, save_model
from weckd.chain.errors import LinkError
from weckd.chain.files import check_run_id, inside, private_dir
from weckd.chain.flower import payload_records, read_payloads
from weckd.chain.link import LinkResult
from weckd.chain.models import pick_device
from weckd.chain.payload import encode_logits, encode_state, payload_bytes, payload_from_bytes
from weckd.chain.peers import Party
from weckd.chain.protocol import (
    KEY_PLAIN,
    KEY_SEALED,
    PAYLOAD_ENTRY,
    LinkInfo,
    LinkMetrics,
    Reason,
    Refused,
)
from weckd.chain.seal import SealError

from .linkstore import LinkOutput
from .site import LocalData, SiteConfig

log = logging.getLogger(__name__)


class Site(NamedTuple):
    cfg: SiteConfig
    data: LocalData
    party: Party | None  # sealing keys and pinned peers; None: this site takes unsealed payloads


class Received(NamedTuple):
    header: dict[str, Any]
    arrays: dict[str, np.ndarray]
    raw: bytes  # exactly what arrived (sealed blob or plain payload bytes): part of the link's identity



def site_device(cfg: SiteConfig) -> torch.device:
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    return pick_device(cfg.runtime.device)



def has_payload(content: RecordDict) -> bool:
    return KEY_SEALED in content.array_records or KEY_PLAIN in content.array_records


def receive(content: RecordDict, party: Party | None, kind: str, sender: str, run_id: str, link: int,
            where: str) -> Received | None:
    """The payload a message carries, opened and checked (sealed: by its pinned sender, for this run and
    link); None when it carries none. A sealed site refuses unsealed payloads and the reverse."""
    got = read_payloads(content, where)
    if got is None:
        return None
    sealed, blobs = got
    if list(blobs) != [PAYLOAD_ENTRY]:
        raise SealError("malformed", f"{where}: the payload record must hold exactly one {PAYLOAD_ENTRY!r} entry")
    blob = blobs[PAYLOAD_ENTRY]
    if sealed:
        if party is None:
            raise Refused(Reason.BAD_REQUEST, f"{where}: a sealed payload arrived but this site has no sealing: "
                          "section; add its keys")
        opened = party.open_from(blob, sender=sender, run_id=run_id, link=link, kind=kind)
        header, arrays = payload_from_bytes(opened, where, party.max_bytes)
        return Received(header, arrays, blob)
    if party is not None:
        raise SealError("unsealed", f"{where}: an unsealed payload arrived but this site accepts sealed payloads "
                        "only; the coordinator must set federation.sealing")
    header, arrays = payload_from_bytes(blob, where)
    return Received(header, arrays, blob)



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
    return LinkOutput(payloads, link_metrics(result), LinkInfo(site, result.arch, result.init).to_record())


def payload_reply(out: LinkOutput, party: Party | None, run_id: str, link: int,
                  seal_for: tuple[tuple[str, str], ...]) -> dict[str, ArrayRecord]:
    """The reply's payload record: each kind sealed once for every recipient the coordinator asked for
    (checked against the policy), or plain where this site does not seal."""
    if party is None:
        return payload_records(False, out.payloads)
    recipients: dict[str, list[str]] = {}
    for kind, recipient in seal_for:
        if kind not in out.payloads:
            raise Refused(Reason.BAD_REQUEST, f"site {party.name} link {link + 1}: asked to seal a {kind!r} payload "
                          "it does not have")
        recipients.setdefault(kind, []).append(recipient)
    return payload_records(True, {kind: party.seal_for(names, out.payloads[kind], run_id=run_id, link=link, kind=kind)
                                  for kind, names in recipients.items()})


def link_metrics(result: LinkResult) -> dict[str, Any]:
    """Aggregates only: accuracy, recall, confusion counts, loss parts per epoch, counts, seconds, and what
    the link spent where DP-SGD ran (ε at δ)."""
    return LinkMetrics(
        float(result.val.accuracy), int(result.val.n), tuple(float(r) for r in result.val.recall),
        tuple(int(c) for row in result.val.confusion for c in row), tuple(float(e.loss) for e in result.epochs),
        tuple(float(e.ce) for e in result.epochs), tuple(float(e.kd) for e in result.epochs),
        tuple(float(e.seconds) for e in result.epochs), float(result.seconds), float(result.images_per_s),
        {k: int(v) for k, v in result.samples.items()},
        {k: float(v) for k, v in dict(result.privacy).items()} if result.privacy is not None else None,
        float(result.teacher_val.accuracy) if result.teacher_val is not None else None,
        result.kept == "teacher" if result.teacher_val is not None else None,
    ).to_record()




def keep_delivered(cfg: SiteConfig, data: LocalData, arch: str, state: dict[str, torch.Tensor], run_id: str,
                   link: int, sender: str) -> None:
    """Store the chain's final model delivered to this site (safetensors + model card) in its state dir."""
    out = inside(private_dir(Path(cfg.state_dir) / "delivered"), check_run_id(run_id), "model")
    provenance = {"federated": True, "run_id": run_id, "link": link + 1, "from_site": sender,
                  "received_by": cfg.site}
    save_model(out, state, ModelCard(arch, list(data.spec.classes), data.spec.size, data.spec.channels, provenance))
    log.info("site %s: final model of run %s stored in %s", cfg.site, run_id, out)
