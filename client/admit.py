"""Admission of a request at a site: decode it strictly, check it against the site's policy and run state.

Everything here happens before any patient data is touched. A request that passes is returned as a
typed value; one that does not raises :class:`~weckd.chain.protocol.Refused` with its reason. The
payload itself is verified afterwards by the handler (``weckd.client.app``) against the sender this
module derived from the schedule, never against a sender the message names for itself.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from weckd.chain.config import LinkSettings, link_from_mapping
from weckd.chain.errors import ConfigError
from weckd.chain.peers import COORDINATOR, Party
from weckd.chain.protocol import DeliverRequest, EvaluateRequest, Reason, Refused, TrainRequest
from weckd.chain.rounds import RoundEvaluateRequest, RoundRequest

from .policy import (
    check_arch,
    check_delivery,
    check_evaluate,
    check_fedavg,
    check_recipients,
    check_round,
    check_schedule,
    check_settings,
    check_train,
)
from .runstate import RunRecord, RunState
from .site import LocalData, SiteConfig, pretrained_file


@dataclass(frozen=True)
class AdmittedTrain:
    req: TrainRequest
    settings: LinkSettings
    link_config: dict[str, Any]
    sender: str  # the site of the previous link ('' for the first link)
    record: RunRecord


@dataclass(frozen=True)
class AdmittedEvaluate:
    req: EvaluateRequest
    record: RunRecord


def pinned_sites(party: Party | None) -> set[str] | None:
    """The sites whose keys this site pins (None: an unsealed site, which pins nobody)."""
    return None if party is None else set(party.peers) - {COORDINATOR}


def link_settings(values: Mapping[str, Any], where: str) -> LinkSettings:
    """The link's settings from the wire; a local path (``weights``) is never taken from there."""
    if "weights" in values:  # the coordinator never sends it (chain.config.link_to_mapping); any value is a path
        raise Refused(Reason.WEIGHTS_FROM_WIRE, f"{where}: link settings name a weights file; only this site's "
                      "own config may name local files")
    try:
        return link_from_mapping(values, source=where)
    except ConfigError as err:
        raise Refused(Reason.BAD_REQUEST, f"{where}: link settings do not validate: {str(err)[:300]}") from None


def site_link_settings(cfg: SiteConfig, link_config: Mapping[str, Any], where: str) -> LinkSettings:
    """The link's settings from the wire, with starting weights named by SHA-256 resolved to this site's own
    file (checked against the hash)."""
    settings = link_settings(link_config, where)
    if settings.pretrained is not None:
        settings = dataclasses.replace(settings, weights=pretrained_file(cfg, settings.pretrained, where))
    return settings


def admit_train(cfg: SiteConfig, data: LocalData, party: Party | None, runs: RunState, config: Mapping[str, Any],
                link_config: Mapping[str, Any], has_payload: bool) -> AdmittedTrain:
    where = f"site {cfg.site} train"
    req = TrainRequest.from_config(config, where)
    where = f"site {cfg.site} link {req.link + 1} of run {req.run_id[:64]!r}"
    if req.schedule[req.link] != cfg.site:
        raise Refused(Reason.BAD_REQUEST, f"{where}: the schedule gives this link to {req.schedule[req.link]!r}")
    settings = site_link_settings(cfg, link_config, where)
    if cfg.policy.require_do_no_harm and not settings.do_no_harm:  # the site's own rule, not the coordinator's
        settings = dataclasses.replace(settings, do_no_harm=True)
    check_schedule(cfg.policy, cfg.site, req.schedule, pinned_sites(party), where)
    check_train(cfg.policy, req, settings, len(data.site.train), where)
    check_recipients(cfg.policy, req, cfg.site, where)
    if req.link > 0 and not has_payload:
        raise Refused(Reason.MISSING_TEACHER, f"{where}: no payload from the previous link's site")
    if req.link == 0 and has_payload:
        raise Refused(Reason.BAD_REQUEST, f"{where}: the first link of a run has no teacher")
    epsilon = settings.privacy.epsilon if settings.privacy is not None else None
    record = runs.admit_train(req.run_id, req.link, req.schedule, epsilon, where)
    if req.deliver:
        runs.check_one_delivery(record, req.link, where)
    sender = req.schedule[req.link - 1] if req.link > 0 else ""
    return AdmittedTrain(req, settings, dict(link_config), sender, record)


@dataclass(frozen=True)
class AdmittedRound:
    req: RoundRequest
    settings: LinkSettings
    link_config: dict[str, Any]
    record: RunRecord


def admit_round(cfg: SiteConfig, data: LocalData, party: Party | None, runs: RunState, config: Mapping[str, Any],
                link_config: Mapping[str, Any], has_payload: bool) -> AdmittedRound:
    """A FedAvg round: the policy allows FedAvg, the settings fit it, round 0 carries no model and every
    later round the coordinator's average (opened by the handler under the coordinator's pinned key)."""
    where = f"site {cfg.site} fedavg"
    req = RoundRequest.from_config(config, where)
    where = f"site {cfg.site} fedavg round {req.round + 1} of run {req.run_id[:64]!r}"
    check_round(cfg.policy, cfg.site, req, pinned_sites(party), where)
    settings = site_link_settings(cfg, link_config, where)
    check_settings(cfg.policy, "weights", settings, len(data.site.train), where)
    if req.round > 0 and not has_payload:
        raise Refused(Reason.MISSING_TEACHER, f"{where}: no averaged model from the coordinator")
    if req.round == 0 and has_payload:
        raise Refused(Reason.BAD_REQUEST, f"{where}: the first round starts from the seed, not from a model")
    epsilon = settings.privacy.epsilon if settings.privacy is not None else None
    record = runs.admit_round(req.run_id, req.round, req.sites, epsilon, where)
    return AdmittedRound(req, settings, dict(link_config), record)


def admit_round_evaluate(cfg: SiteConfig, party: Party | None, runs: RunState, config: Mapping[str, Any]
                         ) -> tuple[RoundEvaluateRequest, RunRecord]:
    where = f"site {cfg.site} fedavg evaluate"
    req = RoundEvaluateRequest.from_config(config, where)
    where = f"site {cfg.site} fedavg evaluate round {req.round + 1} of run {req.run_id[:64]!r}"
    check_fedavg(cfg.policy, cfg.site, req.sites, pinned_sites(party), where)
    return req, runs.admit_round(req.run_id, req.round, req.sites, None, where, evaluate=True)


def admit_evaluate(cfg: SiteConfig, party: Party | None, runs: RunState, config: Mapping[str, Any]
                   ) -> AdmittedEvaluate:
    where = f"site {cfg.site} evaluate"
    req = EvaluateRequest.from_config(config, where)
    where = f"site {cfg.site} evaluate link {req.link + 1} of run {req.run_id[:64]!r}"
    check_schedule(cfg.policy, cfg.site, req.schedule, pinned_sites(party), where)
    check_evaluate(req, where)
    return AdmittedEvaluate(req, runs.admit_evaluate(req.run_id, req.link, req.schedule, where))


def admit_deliver(cfg: SiteConfig, party: Party | None, runs: RunState, config: Mapping[str, Any]
                  ) -> DeliverRequest:
    """A hand-over of this site's link as the final model: the schedule gives that link to this site, the
    recipients are allowed by its policy, the link is one it trained in its current run, the schedule is
    done, and no other link of the run was delivered."""
    where = f"site {cfg.site} deliver"
    req = DeliverRequest.from_config(config, where)
    where = f"site {cfg.site} deliver link {req.link + 1} of run {req.run_id[:64]!r}"
    check_schedule(cfg.policy, cfg.site, req.schedule, pinned_sites(party), where)
    if req.schedule[req.link] != cfg.site:
        raise Refused(Reason.BAD_REQUEST, f"{where}: the schedule puts {req.schedule[req.link][:64]!r} at that link, "
                      "not this site")
    check_delivery(cfg.policy, req, where)
    runs.admit_deliver(req.run_id, req.link, req.schedule, where)
    return req


def check_model_arch(cfg: SiteConfig, arch: str, where: str) -> None:
    """A received model's architecture is built here too: the same policy applies to it."""
    check_arch(cfg.policy, arch, where)
