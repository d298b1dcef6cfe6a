"""The federation's protocol, used by both roles: message types and record keys, the typed requests a
site receives (:class:`TrainRequest`, :class:`EvaluateRequest`, :class:`DeliverRequest`, each with its
to/from-record functions and strict checks), the typed replies a coordinator reads (:class:`SiteInfo`,
:class:`SiteCounts`, :class:`LinkInfo`, :class:`LinkMetrics`, :class:`EvalMetrics`), the refusal
reasons, the coordinator's progress events (:class:`Event`) and failure labels (:class:`Failure`). No
behaviour depends on the wording of a message. Every message also carries its run's app-bundle version,
which a site checks (``chain.appbundle``: ``version-mismatch``).

A site that refuses a request raises :class:`Refused` with a :class:`Reason`. Its executor sends
back only ``weckd-refused:<reason>`` followed by that reason's fixed text from :data:`TEXT`, never
the exception's own words (they may hold local paths or file content). The coordinator maps the code
back with :func:`reason_from_error`, an exact lookup of the prefix, never a search of prose, and
counts refusals by reason. The seal reasons of ``weckd.chain.seal`` are members too.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping

from .errors import LinkError, SecurityError

ERROR_PREFIX = "weckd-refused:"

# Message types (Flower's reserved names) and the record keys inside a message's content.
MSG_QUERY = "query"
MSG_TRAIN = "train"
MSG_EVALUATE = "evaluate"
MSG_DELIVER = "query.deliver"  # hand over a link the site trained as the final model (the links after it skipped)
MSG_ROUND = "train.fedavg"  # one FedAvg round at a site (weckd.chain.rounds)
MSG_ROUND_EVALUATE = "evaluate.fedavg"  # the coordinator's averaged model on a site's validation split
KEY_CONFIG = "config"  # ConfigRecord: what the federation sends (link index, seed, mode, augment)
KEY_LINK = "link-settings"  # ConfigRecord: the link's LinkSettings (chain.config.link_to_mapping)
KEY_INFO = "info"  # ConfigRecord: what a site says about itself (version, classes, proxy hash)
KEY_METRICS = "metrics"  # MetricRecord: counts, accuracies, loss parts, seconds
# Payloads (``chain.payload`` bytes) travel as uint8 arrays, sealed (``chain.seal``) or plain, in the same
# layout: a reply holds one per kind (``weights``, ``logits``), a request exactly one, named PAYLOAD_ENTRY.
KEY_SEALED = "sealed"  # ArrayRecord: sealed payloads (a sealed federation)
KEY_PLAIN = "plain"  # ArrayRecord: plain payloads (an unsealed federation)
PAYLOAD_ENTRY = "payload"  # the name of the one payload in a request's record


class Reason(str, Enum):
    """Why a party refused a request (a metric label and an audit-log field)."""

    # the run bundle and the request itself
    FOREIGN_APP = "foreign-app"  # the run's bundle is not weckd's own config-only app for this version
    BAD_REQUEST = "bad-request"  # a field is missing, of the wrong type or out of range
    BAD_RUN_ID = "bad-run-id"  # a run id that is not a plain name
    VERSION_MISMATCH = "version-mismatch"
    # who sent what, for whom
    COORDINATOR_SENDER = "coordinator-sender"  # the coordinator is never a teacher or a model to evaluate
    NOT_PREDECESSOR = "not-predecessor"  # the named sender does not precede this link in the agreed order
    RECIPIENT_NOT_ALLOWED = "recipient-not-allowed"  # seal-for names a party the site's policy excludes
    # the site's own run state
    STALE_RUN = "stale-run"  # a run this site left behind
    LINK_NOT_FORWARD = "link-not-forward"  # link numbers only move forward within a run
    MISSING_TEACHER = "missing-teacher"  # a link after the first without its predecessor's payload
    # the site policy
    ARCH_NOT_ALLOWED = "arch-not-allowed"
    EPOCHS_OVER_LIMIT = "epochs-over-limit"
    BATCH_OVER_LIMIT = "batch-over-limit"
    IMAGES_OVER_LIMIT = "images-over-limit"
    LINKS_OVER_LIMIT = "links-over-limit"
    EVALUATIONS_OVER_LIMIT = "evaluations-over-limit"
    LOGITS_NOT_ALLOWED = "logits-not-allowed"
    DP_REQUIRED = "dp-required"
    EPSILON_OVER_LIMIT = "epsilon-over-limit"
    EPSILON_BUDGET = "epsilon-budget-exhausted"
    WEIGHTS_FROM_WIRE = "weights-from-wire"  # link.weights names a local file: only the site's config may
    PRETRAINED_UNKNOWN = "pretrained-unknown"  # link.pretrained names weights this site does not hold
    PRETRAINED_MISMATCH = "pretrained-mismatch"  # the site's file for link.pretrained has another SHA-256
    FEDAVG_NOT_ALLOWED = "fedavg-not-allowed"  # policy.allow_fedavg false: no update to, or model from, the coordinator
    # payloads (seal reasons keep their own names)
    MALFORMED_PAYLOAD = "malformed-payload"
    TOO_LARGE = "too-large"
    MALFORMED = "malformed"
    BAD_VERSION = "bad-version"
    BAD_SIGNATURE = "bad-signature"
    TAMPERED = "tampered"
    UNEXPECTED_SENDER = "unexpected-sender"
    WRONG_RECIPIENT = "wrong-recipient"
    REPLAY = "replay"
    WRONG_MODEL = "wrong-model"
    BAD_HASH = "bad-hash"
    UNKNOWN_PEER = "unknown-peer"
    UNSEALED = "unsealed"
    # anything else went wrong at the site: its own log says what
    INTERNAL = "internal"


TEXT: dict[Reason, str] = {
    Reason.FOREIGN_APP: "the run's app bundle is not weckd's own app for this site's installed version",
    Reason.BAD_REQUEST: "a request field is missing, of the wrong type or out of range",
    Reason.BAD_RUN_ID: "the run id is not a plain name (letters, digits, '.', '_', '-'; at most 64)",
    Reason.VERSION_MISMATCH: "the coordinator and the site run different weckd versions",
    Reason.COORDINATOR_SENDER: "the coordinator is never a valid sender of a teacher or of a model to evaluate",
    Reason.NOT_PREDECESSOR: "the payload's sender does not precede this link in the chain order the site agreed to",
    Reason.RECIPIENT_NOT_ALLOWED: "the site's policy does not let it seal its model for a recipient asked for",
    Reason.STALE_RUN: "the request names a run this site has already left",
    Reason.LINK_NOT_FORWARD: "link numbers only move forward within a run",
    Reason.MISSING_TEACHER: "a link after the first must carry its predecessor's payload",
    Reason.ARCH_NOT_ALLOWED: "the architecture is not allowed by the site's policy",
    Reason.EPOCHS_OVER_LIMIT: "the epochs asked for exceed the site's policy",
    Reason.BATCH_OVER_LIMIT: "the batch size asked for exceeds the site's policy",
    Reason.IMAGES_OVER_LIMIT: "the images processed per link (epochs x training images) exceed the site's policy",
    Reason.LINKS_OVER_LIMIT: "the run asks this site for more links than its policy allows",
    Reason.EVALUATIONS_OVER_LIMIT: "the run asks this site for more evaluations than its policy allows",
    Reason.LOGITS_NOT_ALLOWED: "the site's policy does not allow logits mode",
    Reason.DP_REQUIRED: "the site's policy requires differential privacy for every link",
    Reason.EPSILON_OVER_LIMIT: "the link's epsilon exceeds the site's per-link limit",
    Reason.EPSILON_BUDGET: "the link would exceed the site's cumulative epsilon budget",
    Reason.WEIGHTS_FROM_WIRE: "link.weights names a local file; only the site's own config may",
    Reason.PRETRAINED_UNKNOWN: "link.pretrained names starting weights this site does not hold",
    Reason.PRETRAINED_MISMATCH: "this site's file for link.pretrained has another SHA-256",
    Reason.FEDAVG_NOT_ALLOWED: "the site's policy does not allow FedAvg (updates to, and models from, the coordinator)",
    Reason.MALFORMED_PAYLOAD: "the payload is malformed or does not fit the model",
    Reason.TOO_LARGE: "the payload is over the site's size limit",
    Reason.MALFORMED: "the sealed payload is malformed",
    Reason.BAD_VERSION: "the sealed payload is of another format version",
    Reason.BAD_SIGNATURE: "the sealed payload's signature verifies under no key",
    Reason.TAMPERED: "the sealed payload was altered in transit or forged",
    Reason.UNEXPECTED_SENDER: "the sealed payload is not signed by the expected sender",
    Reason.WRONG_RECIPIENT: "the sealed payload is sealed for another party",
    Reason.REPLAY: "the sealed payload belongs to another run or link",
    Reason.WRONG_MODEL: "the sealed payload holds another kind of model",
    Reason.BAD_HASH: "the sealed payload does not match its declared hash",
    Reason.UNKNOWN_PEER: "the party named has no pinned keys at this site",
    Reason.UNSEALED: "an unsealed payload arrived at a site that takes sealed payloads only",
    Reason.INTERNAL: "the request failed at the site; its own log says why",
}


class Refused(SecurityError):
    """A party refused a request before doing any work for it; ``reason`` says why."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def error_text(reason: Reason) -> str:
    """What a site sends back for a refusal: the code and its fixed text, nothing local."""
    return f"{ERROR_PREFIX}{reason.value} {TEXT[reason]}"


def reason_from_error(text: str) -> Reason | None:
    """The reason of an error text a site sent, or None when it is not a weckd refusal."""
    if not text.startswith(ERROR_PREFIX):
        return None
    code = text[len(ERROR_PREFIX):].split(" ", 1)[0]
    try:
        return Reason(code)
    except ValueError:
        return None


def reason_of(err: BaseException) -> Reason:
    """The refusal reason of an exception raised while handling a request."""
    from .errors import PayloadError  # the tree's leaves; no cycle at import time

    reason = getattr(err, "reason", None)
    if isinstance(reason, Reason):
        return reason
    if isinstance(reason, str):
        try:
            return Reason(reason)
        except ValueError:
            pass
    if isinstance(err, PayloadError):
        return Reason.MALFORMED_PAYLOAD
    return Reason.INTERNAL


# -- requests a site receives -------------------------------------------------------------------------

_RUN_KEYS_TRAIN = {"link": int, "n-links": int, "seed": int, "mode": str, "wire-dtype": str, "augment": bool,
                   "deliver": bool, "run-id": str, "schedule": list, "seal-for": str}
_RUN_KEYS_EVALUATE = {"link": int, "run-id": str, "sender": str, "deliver": bool, "schedule": list}
MAX_SCHEDULE = 4096
MAX_NAME = 64


def typed_fields(values: Mapping[str, Any], spec: Mapping[str, type], where: str) -> dict[str, Any]:
    """``values`` with exactly the keys of ``spec``, each of exactly its type (bool is not int)."""
    missing, extra = sorted(set(spec) - set(values)), sorted(set(values) - set(spec))
    if missing or extra:
        raise Refused(Reason.BAD_REQUEST, f"{where}: request keys missing {missing[:8]} / unexpected {extra[:8]}; "
                      "the coordinator runs another weckd version or was tampered with")
    for key, want in spec.items():
        if type(values[key]) is not want:
            raise Refused(Reason.BAD_REQUEST, f"{where}: request field {key!r} must be {want.__name__}, got "
                          f"{type(values[key]).__name__}")
    return dict(values)


def site_names(values: list[Any], key: str, where: str) -> tuple[str, ...]:
    if len(values) > MAX_SCHEDULE or not all(type(v) is str and 0 < len(v) <= MAX_NAME for v in values):
        raise Refused(Reason.BAD_REQUEST, f"{where}: request field {key!r} must be a list of at most "
                      f"{MAX_SCHEDULE} site names of 1-{MAX_NAME} characters")
    return tuple(values)


def parse_seal_for(text: str, where: str) -> tuple[tuple[str, str], ...]:
    out = []
    for item in filter(None, text.split(",")):
        kind, sep, recipient = item.partition(":")
        if not sep or kind not in ("weights", "logits") or not 0 < len(recipient) <= MAX_NAME:
            raise Refused(Reason.BAD_REQUEST, f"{where}: seal-for entry {item[:80]!r} is not kind:recipient")
        out.append((kind, recipient))
    return tuple(out)


def seal_for_text(seal_for: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{k}:{r}" for k, r in seal_for)


@dataclass(frozen=True)
class TrainRequest:
    """The ``config`` record of a ``train`` message: which link of which run, routed how."""

    run_id: str
    link: int  # 0-based index in ``schedule``
    schedule: tuple[str, ...]  # the site of every link of the run, in order
    seed: int
    mode: str
    wire_dtype: str
    augment: bool
    deliver: bool  # only ever the last link: its model is also delivered (chain.deliver: last)
    seal_for: tuple[tuple[str, str], ...]  # (kind, recipient) of every blob to seal

    @property
    def n_links(self) -> int:
        return len(self.schedule)

    def to_config(self) -> dict[str, Any]:
        return {"link": self.link, "n-links": self.n_links, "seed": self.seed, "mode": self.mode,
                "wire-dtype": self.wire_dtype, "augment": self.augment, "deliver": self.deliver,
                "run-id": self.run_id, "schedule": list(self.schedule),
                "seal-for": seal_for_text(self.seal_for)}

    @classmethod
    def from_config(cls, values: Mapping[str, Any], where: str) -> TrainRequest:
        v = typed_fields(values, _RUN_KEYS_TRAIN, where)
        schedule = site_names(v["schedule"], "schedule", where)
        seal_for = parse_seal_for(v["seal-for"], where)
        if not 0 <= v["link"] < len(schedule) or v["n-links"] != len(schedule):
            raise Refused(Reason.BAD_REQUEST, f"{where}: link {v['link']} / n-links {v['n-links']} do not fit a "
                          f"schedule of {len(schedule)} links")
        if v["mode"] not in ("weights", "logits") or v["wire-dtype"] not in ("float32", "float16"):
            raise Refused(Reason.BAD_REQUEST, f"{where}: mode {v['mode'][:20]!r} / wire dtype "
                          f"{v['wire-dtype'][:20]!r} unknown")
        if v["deliver"] and v["link"] != len(schedule) - 1:
            raise Refused(Reason.BAD_REQUEST, f"{where}: only the last link of the schedule delivers its model")
        return cls(v["run-id"], v["link"], schedule, v["seed"], v["mode"], v["wire-dtype"], v["augment"],
                   v["deliver"], seal_for)


@dataclass(frozen=True)
class EvaluateRequest:
    """The ``config`` record of an ``evaluate`` message: link ``link``'s model, from ``sender``."""

    run_id: str
    link: int
    sender: str
    schedule: tuple[str, ...]
    deliver: bool  # keep the model: it is the chain's final model, delivered to this site

    def to_config(self) -> dict[str, Any]:
        return {"link": self.link, "run-id": self.run_id, "sender": self.sender, "deliver": self.deliver,
                "schedule": list(self.schedule)}

    @classmethod
    def from_config(cls, values: Mapping[str, Any], where: str) -> EvaluateRequest:
        v = typed_fields(values, _RUN_KEYS_EVALUATE, where)
        schedule = site_names(v["schedule"], "schedule", where)
        if not 0 <= v["link"] < len(schedule):
            raise Refused(Reason.BAD_REQUEST, f"{where}: link {v['link']} is outside the schedule")
        if v["deliver"] and v["link"] != len(schedule) - 1:
            raise Refused(Reason.BAD_REQUEST, f"{where}: only the last link's model is delivered")
        return cls(v["run-id"], v["link"], v["sender"], schedule, v["deliver"])


class Event(str, Enum):
    """The coordinator's progress events (``progress-*.jsonl``: one JSON object per line, ``{"event": …}``),
    read by ``weckd-server`` (progress lines, exit status) and its metrics."""

    STARTED = "started"  # the ServerApp began the run; ``pid``: its process, which weckd-server watches
    SITE_ONLINE = "site-online"
    SITES_ONLINE = "sites-online"
    DISCOVERED = "discovered"
    RESUMED = "resumed"
    LINK_START = "link-start"
    SITE_FAILURE = "site-failure"
    RETRY = "retry"
    SITE_SKIPPED = "site-skipped"
    EVALUATION_MISSING = "evaluation-missing"
    DELIVERED = "delivered"
    LINK_DONE = "link-done"
    COMPLETED = "completed"
    FAILED = "failed"


class Failure(str, Enum):
    """Why a chain run failed: the ``failed`` progress event's ``failure`` field and the coordinator's
    ``weckd_failures_total{reason}`` label, set where the failure is raised."""

    DISCOVERY_TIMEOUT = "discovery-timeout"  # sites not online within discovery_timeout
    SITE_MISMATCH = "site-mismatch"  # a site's version, classes, image format, proxy or sealing differ
    LINK_TIMEOUT = "link-timeout"  # no reply within link_timeout
    SITE_ERROR = "site-error"  # the request failed at the site (its own log says why)
    SITE_FAILED = "site-failed"  # a site stayed offline or unavailable through every retry
    SITE_REFUSED = "site-refused"  # a site refused a request (a Reason): never retried or skipped
    DEADLINE = "deadline"  # the whole run outlived its deadline
    OTHER = "other"


_RUN_KEYS_DELIVER = {"link": int, "run-id": str, "schedule": list, "seal-for": str}


@dataclass(frozen=True)
class DeliverRequest:
    """The ``config`` record of a ``query.deliver`` message: link ``link``'s model, which this site trained
    in this run, is the chain's final model (the best link under ``chain.deliver: best``, or the last one
    that completed when the links after it were skipped); seal it for the recipients."""

    run_id: str
    link: int
    schedule: tuple[str, ...]  # the run's schedule now, every link of it done
    seal_for: tuple[tuple[str, str], ...]  # ("weights", recipient) for each recipient (empty when unsealed)

    def to_config(self) -> dict[str, Any]:
        return {"link": self.link, "run-id": self.run_id, "schedule": list(self.schedule),
                "seal-for": seal_for_text(self.seal_for)}

    @classmethod
    def from_config(cls, values: Mapping[str, Any], where: str) -> DeliverRequest:
        v = typed_fields(values, _RUN_KEYS_DELIVER, where)
        schedule = site_names(v["schedule"], "schedule", where)
        if not 0 <= v["link"] < len(schedule):
            raise Refused(Reason.BAD_REQUEST, f"{where}: link {v['link']} is not a link of the schedule")
        seal_for = parse_seal_for(v["seal-for"], where)
        if any(kind != "weights" for kind, _ in seal_for):
            raise Refused(Reason.BAD_REQUEST, f"{where}: a delivered model is sealed as weights only")
        return cls(v["run-id"], v["link"], schedule, seal_for)


def link_seed(seed: int, index: int) -> int:
    """The training seed of link ``index`` (0-based); the federation sends the same one."""
    return seed * 1_000_003 + 7919 * (index + 1)


# -- replies: what a site sends back, typed at both ends ------------------------------------------------


class ReplyError(LinkError):
    """A site's reply does not have the protocol's fields and types (another weckd version, or a broken
    site): the link fails as ``site-error`` naming the site and the field."""

    def __init__(self, message: str) -> None:
        super().__init__(message, Failure.SITE_ERROR)


def _reply_value(values: Mapping[str, Any], key: str, want: type, where: str) -> Any:
    if key not in values:
        raise ReplyError(f"{where}: reply has no {key!r}; the site runs another weckd version?")
    v = values[key]
    if want is float and type(v) is int:
        v = float(v)
    if want is list:
        if type(v) is not list:
            raise ReplyError(f"{where}: reply field {key!r} must be a list, got {type(v).__name__}")
        return v
    if type(v) is not want:
        raise ReplyError(f"{where}: reply field {key!r} must be {want.__name__}, got {type(v).__name__}")
    return v


def _numbers(values: list[Any], key: str, want: type, where: str) -> tuple[Any, ...]:
    ok = (int, float) if want is float else (int,)
    if not all(type(v) in ok for v in values):
        raise ReplyError(f"{where}: reply field {key!r} must hold {want.__name__}s")
    return tuple(want(v) for v in values)


def _only(values: Mapping[str, Any], keys: set[str], prefixes: tuple[str, ...], where: str) -> None:
    extra = sorted(k for k in values if k not in keys and not k.startswith(prefixes))
    if extra:
        raise ReplyError(f"{where}: reply has unexpected fields {[k[:40] for k in extra[:8]]}")


@dataclass(frozen=True)
class SiteInfo:
    """The ``info`` record of a ``query`` reply: who the site is and what its data looks like."""

    site: str
    version: str
    classes: tuple[str, ...]
    image_size: int
    channels: int
    proxy_sha256: str  # "" without a proxy set
    sealing: str  # the site's X25519 fingerprint, "" when it does not seal

    def to_record(self) -> dict[str, Any]:
        return {"site-id": self.site, "weckd-version": self.version, "classes": list(self.classes),
                "image-size": self.image_size, "channels": self.channels, "proxy-sha256": self.proxy_sha256,
                "sealing": self.sealing}

    @classmethod
    def from_record(cls, values: Mapping[str, Any], where: str) -> SiteInfo:
        _only(values, set(cls("", "", (), 0, 0, "", "").to_record()), (), where)
        classes = _reply_value(values, "classes", list, where)
        if not all(type(c) is str for c in classes):
            raise ReplyError(f"{where}: reply field 'classes' must hold strings")
        return cls(_reply_value(values, "site-id", str, where), _reply_value(values, "weckd-version", str, where),
                   tuple(classes), _reply_value(values, "image-size", int, where),
                   _reply_value(values, "channels", int, where), _reply_value(values, "proxy-sha256", str, where),
                   _reply_value(values, "sealing", str, where))


@dataclass(frozen=True)
class SiteCounts:
    """The ``metrics`` record of a ``query`` reply: image counts of the site's splits."""

    train: int
    val: int
    unlabelled: int
    proxy: int

    def to_record(self) -> dict[str, Any]:
        return {"train": self.train, "val": self.val, "unlabelled": self.unlabelled, "proxy": self.proxy}

    @classmethod
    def from_record(cls, values: Mapping[str, Any], where: str) -> SiteCounts:
        _only(values, {"train", "val", "unlabelled", "proxy"}, (), where)
        return cls(*(_reply_value(values, k, int, where) for k in ("train", "val", "unlabelled", "proxy")))


@dataclass(frozen=True)
class LinkInfo:
    """The ``info`` record of a ``train`` or ``query.deliver`` reply: which model the link made, how."""

    site: str
    arch: str
    init: str  # predecessor / scratch / weights

    def to_record(self) -> dict[str, Any]:
        return {"site-id": self.site, "arch": self.arch, "init": self.init}

    @classmethod
    def from_record(cls, values: Mapping[str, Any], where: str) -> LinkInfo:
        _only(values, {"site-id", "arch", "init"}, (), where)
        return cls(*(_reply_value(values, k, str, where) for k in ("site-id", "arch", "init")))


_LINK_LISTS = {"val-recall": float, "val-confusion": int, "epoch-loss": float, "epoch-ce": float,
               "epoch-kd": float, "epoch-seconds": float}


_DO_NO_HARM = ("teacher-val-accuracy", "teacher-kept")


@dataclass(frozen=True)
class LinkMetrics:
    """The ``metrics`` record of a ``train`` reply: aggregates only (accuracy, recall, confusion counts,
    loss parts per epoch, image counts by use, seconds, and the DP budget spent where DP-SGD ran)."""

    val_accuracy: float
    val_n: int
    val_recall: tuple[float, ...]
    val_confusion: tuple[int, ...]  # row-major, classes × classes
    epoch_loss: tuple[float, ...]
    epoch_ce: tuple[float, ...]
    epoch_kd: tuple[float, ...]
    epoch_seconds: tuple[float, ...]
    seconds: float
    images_per_s: float
    samples: Mapping[str, int]  # images by use (train, unlabelled, …)
    privacy: Mapping[str, float] | None = None  # epsilon, delta, … of the link's DP-SGD
    # do_no_harm: the incoming teacher on this site's validation split, and whether it was handed on unchanged
    teacher_val_accuracy: float | None = None
    teacher_kept: bool | None = None

    def to_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"val-accuracy": self.val_accuracy, "val-n": self.val_n,
                               "val-recall": list(self.val_recall), "val-confusion": list(self.val_confusion),
                               "epoch-loss": list(self.epoch_loss), "epoch-ce": list(self.epoch_ce),
                               "epoch-kd": list(self.epoch_kd), "epoch-seconds": list(self.epoch_seconds),
                               "seconds": self.seconds, "images-per-s": self.images_per_s}
        out.update({f"samples-{k}": int(v) for k, v in self.samples.items()})
        out.update({f"privacy-{k}": float(v) for k, v in (self.privacy or {}).items()})
        if self.teacher_val_accuracy is not None:
            out["teacher-val-accuracy"] = self.teacher_val_accuracy
            out["teacher-kept"] = int(bool(self.teacher_kept))
        return out

    @classmethod
    def from_record(cls, values: Mapping[str, Any], where: str) -> LinkMetrics:
        _only(values, {"val-accuracy", "val-n", "seconds", "images-per-s", *_LINK_LISTS, *_DO_NO_HARM},
              ("samples-", "privacy-"), where)
        harm = [k for k in _DO_NO_HARM if k in values]
        if harm and len(harm) != len(_DO_NO_HARM):
            raise ReplyError(f"{where}: reply has {harm[0]!r} without "
                             f"{next(k for k in _DO_NO_HARM if k not in values)!r}")
        kept = _reply_value(values, "teacher-kept", int, where) if harm else None
        if kept not in (None, 0, 1):
            raise ReplyError(f"{where}: reply field 'teacher-kept' must be 0 or 1, got {kept}")
        lists = {k: _numbers(_reply_value(values, k, list, where), k, t, where) for k, t in _LINK_LISTS.items()}
        samples = {k[len("samples-"):]: _reply_value(values, k, int, where) for k in values if k.startswith("samples-")}
        privacy = {k[len("privacy-"):]: _reply_value(values, k, float, where)
                   for k in values if k.startswith("privacy-")}
        return cls(_reply_value(values, "val-accuracy", float, where), _reply_value(values, "val-n", int, where),
                   lists["val-recall"], lists["val-confusion"], lists["epoch-loss"], lists["epoch-ce"],
                   lists["epoch-kd"], lists["epoch-seconds"], _reply_value(values, "seconds", float, where),
                   _reply_value(values, "images-per-s", float, where), samples, privacy or None,
                   _reply_value(values, "teacher-val-accuracy", float, where) if harm else None,
                   bool(kept) if harm else None)


@dataclass(frozen=True)
class EvalMetrics:
    """The ``metrics`` record of an ``evaluate`` reply: the model on the site's validation split."""

    accuracy: float
    n: int
    recall: tuple[float, ...]
    confusion: tuple[int, ...]  # row-major, classes × classes

    def to_record(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "n": self.n, "recall": list(self.recall),
                "confusion": list(self.confusion)}

    @classmethod
    def from_record(cls, values: Mapping[str, Any], where: str) -> EvalMetrics:
        _only(values, {"accuracy", "n", "recall", "confusion"}, (), where)
        return cls(_reply_value(values, "accuracy", float, where), _reply_value(values, "n", int, where),
                   _numbers(_reply_value(values, "recall", list, where), "recall", float, where),
                   _numbers(_reply_value(values, "confusion", list, where), "confusion", int, where))
