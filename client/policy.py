"""What a site agrees to do: the ``policy:`` section of its own config, checked before any work.

The coordinator is not trusted (DESIGN.md, security model): every request is checked here against
the site's own policy and the run state it holds itself (:mod:`weckd.client.runstate`), and a
request outside either is refused with a :class:`~weckd.chain.protocol.Reason` before a byte of
patient data is touched. The defaults are the safe side of every switch except two that the
federation needs to work at all: logits mode is allowed, and the chain order is whatever order of
pinned sites the run names, unless ``order`` pins it.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from weckd.chain.config import LinkSettings
from weckd.chain.peers import COORDINATOR
from weckd.chain.protocol import DeliverRequest, EvaluateRequest, Reason, Refused, TrainRequest
from weckd.chain.rounds import RoundRequest


def _m(**meta: Any) -> Any:
    return meta


# timm families of up to ~90M parameters, plus the tiny test models; '+gn' variants match too
DEFAULT_ARCHITECTURES = (
    "test_*", "resnet*", "resnext*", "seresnet*", "mobilenet*", "efficientnet_b[0-4]*", "tf_efficientnet_b[0-4]*",
    "densenet*", "regnet*", "convnext_atto*", "convnext_femto*", "convnext_pico*", "convnext_nano*",
    "convnext_tiny*", "convnext_small*", "convnext_base*", "vit_tiny_*", "vit_small_*", "vit_base_*", "deit_*",
)


@dataclass(frozen=True)
class SitePolicy:
    """Bounds on what this site does for the federation (``policy:`` in ``site-A.yaml``)."""

    architectures: tuple[str, ...] = DEFAULT_ARCHITECTURES  # fnmatch patterns of timm names
    max_epochs: int = field(default=100, metadata=_m(min=1, max=100_000))
    max_batch_size: int = field(default=512, metadata=_m(min=1, max=65_536))
    max_images_per_link: int = field(default=5_000_000, metadata=_m(min=1))  # epochs × training images
    max_links_per_run: int = field(default=32, metadata=_m(min=1, max=100_000))
    max_evaluations_per_run: int = field(default=256, metadata=_m(min=0, max=1_000_000))
    allow_logits: bool = True
    require_dp: bool = False
    # hand the teacher on when this site's student is clearly worse on its validation split, whatever the
    # coordinator's link.do_no_harm says
    require_do_no_harm: bool = False
    max_epsilon_per_link: float = field(default=0.0, metadata=_m(min=0.0))  # 0: no per-link limit
    epsilon_budget: float = field(default=0.0, metadata=_m(min=0.0))  # cumulative over links and runs; 0: none
    # who may receive this site's final model besides the sites of the chain ('coordinator' only if listed)
    deliver_to: tuple[str, ...] = ()
    # the chain order this site agreed to (each run's schedule must follow it, cycles allowed); empty: any
    order: tuple[str, ...] = ()
    # FedAvg rounds (weckd.chain.rounds): this site's updates go to the coordinator, which reads them, and it
    # trains the models the coordinator averaged; off by default, as the chain never trusts the coordinator so
    allow_fedavg: bool = False


def arch_allowed(policy: SitePolicy, arch: str) -> bool:
    base = arch[:-3] if arch.endswith("+gn") else arch
    return any(fnmatch.fnmatchcase(base, pattern) for pattern in policy.architectures)


def check_arch(policy: SitePolicy, arch: str, where: str) -> None:
    if not arch_allowed(policy, arch):
        raise Refused(Reason.ARCH_NOT_ALLOWED, f"{where}: architecture {arch[:80]!r} is not allowed by this site's "
                      f"policy.architectures ({', '.join(policy.architectures[:6])}…)")


def check_schedule(policy: SitePolicy, site: str, schedule: tuple[str, ...], pinned: set[str] | None,
                   where: str) -> None:
    """Every link of the run goes to a site (never the coordinator), pinned where this site seals, in the
    agreed order, and this site is asked for at most ``max_links_per_run`` links."""
    if COORDINATOR in schedule:
        raise Refused(Reason.COORDINATOR_SENDER, f"{where}: the schedule names the coordinator as a link")
    if pinned is not None and not set(schedule) <= pinned:
        unknown = sorted(set(schedule) - pinned)[:4]
        raise Refused(Reason.UNKNOWN_PEER, f"{where}: the schedule names site(s) {unknown} this site has not pinned")
    if schedule.count(site) > policy.max_links_per_run:
        raise Refused(Reason.LINKS_OVER_LIMIT, f"{where}: the run asks this site for {schedule.count(site)} links; "
                      f"policy.max_links_per_run is {policy.max_links_per_run}")
    if policy.order and not _follows(schedule, policy.order):
        raise Refused(Reason.NOT_PREDECESSOR, f"{where}: the schedule {list(schedule)[:8]} does not follow "
                      f"policy.order {list(policy.order)} (cycles, and sites skipped, allowed)")


def _follows(schedule: tuple[str, ...], order: tuple[str, ...]) -> bool:
    """``schedule`` is ``order`` repeated minus skipped sites: laid along the repeated order, every slot it
    passes over belongs to a site that never comes again (a skipped site drops out for good)."""
    pos, n = 0, len(order)  # position in the endlessly repeated order
    for i, s in enumerate(schedule):
        if s not in order:
            return False
        while order[pos % n] != s:
            if order[pos % n] in schedule[i:]:
                return False
            pos += 1
        pos += 1
    return True


def check_train(policy: SitePolicy, req: TrainRequest, settings: LinkSettings, n_train: int, where: str) -> None:
    """The request's own settings against the policy (run state and ε are checked by the caller)."""
    check_settings(policy, req.mode, settings, n_train, where)


def check_settings(policy: SitePolicy, mode: str, settings: LinkSettings, n_train: int, where: str) -> None:
    """Link settings (a chain link's or a FedAvg round's) against the policy."""
    check_arch(policy, settings.arch, where)
    if settings.epochs > policy.max_epochs:
        raise Refused(Reason.EPOCHS_OVER_LIMIT, f"{where}: {settings.epochs} epochs; policy.max_epochs is "
                      f"{policy.max_epochs}")
    if settings.batch_size > policy.max_batch_size:
        raise Refused(Reason.BATCH_OVER_LIMIT, f"{where}: batch size {settings.batch_size}; policy.max_batch_size "
                      f"is {policy.max_batch_size}")
    if settings.epochs * n_train > policy.max_images_per_link:
        raise Refused(Reason.IMAGES_OVER_LIMIT, f"{where}: {settings.epochs} epochs × {n_train} images; "
                      f"policy.max_images_per_link is {policy.max_images_per_link}")
    if mode == "logits" and not policy.allow_logits:
        raise Refused(Reason.LOGITS_NOT_ALLOWED, f"{where}: logits mode; policy.allow_logits is false")
    if settings.privacy is None and policy.require_dp:
        raise Refused(Reason.DP_REQUIRED, f"{where}: the link has no privacy settings; policy.require_dp is true")
    if settings.privacy is not None and policy.max_epsilon_per_link and \
            settings.privacy.epsilon > policy.max_epsilon_per_link:
        raise Refused(Reason.EPSILON_OVER_LIMIT, f"{where}: epsilon {settings.privacy.epsilon:g}; "
                      f"policy.max_epsilon_per_link is {policy.max_epsilon_per_link:g}")


def check_round(policy: SitePolicy, site: str, req: RoundRequest, pinned: set[str] | None, where: str) -> None:
    """A FedAvg round: only where the policy allows FedAvg, with this site among pinned participants (inside
    ``policy.order`` where it names one), at most ``max_links_per_run`` rounds, and the update sealed for
    the coordinator alone (unsealed sites: sealed for nobody)."""
    check_fedavg(policy, site, req.sites, pinned, where)
    if req.rounds > policy.max_links_per_run:
        raise Refused(Reason.LINKS_OVER_LIMIT, f"{where}: the run asks this site for {req.rounds} rounds; "
                      f"policy.max_links_per_run is {policy.max_links_per_run}")
    wanted = () if pinned is None else (("weights", COORDINATOR),)
    if req.seal_for != wanted:
        other = next((r for _, r in req.seal_for if r != COORDINATOR), "")
        raise Refused(Reason.RECIPIENT_NOT_ALLOWED, f"{where}: a FedAvg update is sealed for the coordinator alone"
                      + (f", not for {other[:64]!r}" if other else "") + f"; asked for {list(req.seal_for)[:4]}")


def check_fedavg(policy: SitePolicy, site: str, sites: tuple[str, ...], pinned: set[str] | None, where: str) -> None:
    """FedAvg at all: allowed by the policy, this site a participant, every participant a pinned site."""
    if not policy.allow_fedavg:
        raise Refused(Reason.FEDAVG_NOT_ALLOWED, f"{where}: FedAvg gives the coordinator this site's models; "
                      "policy.allow_fedavg is false")
    if COORDINATOR in sites or site not in sites:
        raise Refused(Reason.BAD_REQUEST, f"{where}: the participants {list(sites)[:8]} must be sites, this one "
                      "among them")
    if pinned is not None and not set(sites) <= pinned:
        unknown = sorted(set(sites) - pinned)[:4]
        raise Refused(Reason.UNKNOWN_PEER, f"{where}: the round names site(s) {unknown} this site has not pinned")
    if policy.order and not set(sites) <= set(policy.order):
        outside = sorted(set(sites) - set(policy.order))[:4]
        raise Refused(Reason.NOT_PREDECESSOR, f"{where}: site(s) {outside} are outside policy.order "
                      f"{list(policy.order)}")


def check_recipients(policy: SitePolicy, req: TrainRequest, site: str, where: str) -> None:
    """Blobs go to later sites of this run's schedule (teacher, evaluation); the final model also to
    ``policy.deliver_to``. The coordinator only ever gets the final model, and only if listed there."""
    later = set(req.schedule[req.link + 1:]) | {site}
    evaluating = set(req.schedule)  # the run's sites evaluate each link's model (evaluate: all)
    # what the link will produce (weckd.client.app.link_output): asked for anything else, refuse before training
    kinds = {req.mode} | ({"weights"} if req.deliver else set())
    for kind, recipient in req.seal_for:
        if kind not in kinds:
            raise Refused(Reason.BAD_REQUEST, f"{where}: asked to seal a {kind} payload; this link produces "
                          f"{sorted(kinds)}")
        if req.deliver and kind == "weights":
            ok = may_receive_final_model(policy, req.schedule, recipient)
        elif recipient == COORDINATOR:
            ok = False
        else:
            ok = recipient in later or (kind == "weights" and recipient in evaluating)
        if not ok:
            raise Refused(Reason.RECIPIENT_NOT_ALLOWED, f"{where}: asked to seal a {kind} payload for "
                          f"{recipient[:64]!r}, which this site's policy does not allow at this link "
                          "(policy.deliver_to lists who may receive the final model)")


def may_receive_final_model(policy: SitePolicy, schedule: tuple[str, ...], recipient: str) -> bool:
    """The chain's final model goes to the run's sites and to ``policy.deliver_to`` (the coordinator only if
    listed there)."""
    if recipient == COORDINATOR:
        return COORDINATOR in policy.deliver_to
    return recipient in schedule or recipient in policy.deliver_to


def check_delivery(policy: SitePolicy, req: DeliverRequest, where: str) -> None:
    """A hand-over of this site's link as the final model: the same recipients as a final link's."""
    for _, recipient in req.seal_for:
        if not may_receive_final_model(policy, req.schedule, recipient):
            raise Refused(Reason.RECIPIENT_NOT_ALLOWED, f"{where}: asked to seal the final model for "
                          f"{recipient[:64]!r}, which this site's policy does not allow "
                          "(policy.deliver_to lists who may receive the final model)")


def check_sender(sender: str, schedule: tuple[str, ...], link: int, where: str) -> None:
    """A payload made at link ``link`` comes from the site the schedule puts there, never the coordinator."""
    if sender == COORDINATOR:
        raise Refused(Reason.COORDINATOR_SENDER, f"{where}: the coordinator is named as the payload's sender")
    if not 0 <= link < len(schedule) or schedule[link] != sender:
        raise Refused(Reason.NOT_PREDECESSOR, f"{where}: sender {sender[:64]!r} is not the site of link {link + 1} "
                      "in the run's schedule")


def check_evaluate(req: EvaluateRequest, where: str) -> None:
    check_sender(req.sender, req.schedule, req.link, where)
