"""The attacker's messages: every one starts as the message weckd's own coordinator would send
(``weckd.server.schedule`` builds it) and is then mutated. So when the message format changes,
only ``weckd.server.schedule`` changes, and these scenarios follow.

The attacker holds what the coordinator host holds: federation.yaml, the coordinator's sealing keys.
Payloads "sealed by A" (or C) stand for blobs the coordinator relayed in a real run and kept; the
test seals them with A's private keys from the scaffold to have such blobs at hand.

Imported by ``weckd_attacker`` in the SuperLink's ServerApp process (PYTHONPATH), not by pytest.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from flwr.app import ConfigRecord, RecordDict
from weckd.chain.payload import encode_state, payload_bytes
from weckd.chain.peers import COORDINATOR, Party, SealingSettings, load_party
from weckd.chain.protocol import KEY_CONFIG, KEY_LINK, MSG_DELIVER, MSG_EVALUATE, MSG_QUERY, MSG_TRAIN, DeliverRequest
from weckd.server.relay import Relay
from weckd.server.schedule import ChainRun, discover
from weckd.server.settings import Federation, load_federation
from weckd.server.state import ChainState
from weckd.server.transport import Exchange

OLD_RUN = "r0000-old"  # sorts before every run id the scenarios use (r0001-…)
ESCAPE = "../../../escape"
LEGIT_S = 90.0  # a request the site should serve (trains one epoch)
REFUSE_S = 45.0  # a request the site should refuse at once (today it may train instead)
HANG_S = 15.0  # a request that today keeps the site busy for a long time


@dataclass
class Step:
    site: str
    kind: str  # MSG_TRAIN / MSG_EVALUATE / MSG_QUERY / MSG_DELIVER
    content: RecordDict
    run_id: str
    timeout: float = REFUSE_S


class _Capture:
    """Stands in for ``server.transport.Transport``: keeps what ChainRun would send, answers nothing."""

    def __init__(self, sites: list[str]) -> None:
        nodes = [SimpleNamespace(name=s, node_id=i + 1) for i, s in enumerate(sites)]
        self.grid = SimpleNamespace(get_nodes=lambda: nodes)
        self.nodes: dict[str, int] = {}
        self.sent: dict[str, RecordDict] = {}

    def exchange_all(self, kind: str, contents: dict[str, RecordDict], group: str, timeout: float | None = None
                     ) -> Exchange:
        self.sent.update(contents)
        return Exchange({}, {})

    def exchange(self, kind: str, contents: dict[str, RecordDict], group: str, timeout: float | None = None
                 ) -> dict[str, Any]:
        self.sent.update(contents)
        return {}


class _AnyRecipient(Relay):
    """A relay that forwards its blob to whoever it is told, whatever the blob's header names (what an
    attacker holding the coordinator does)."""

    def blob(self, kind: str, recipient: str) -> bytes:
        return self.blobs[kind]


class Forge:
    """Legitimate messages as weckd's coordinator builds them, and payloads sealed by any party."""

    def __init__(self, federation: str, keys: Path, scratch: Path, escape_abs: str) -> None:
        self.fed: Federation = load_federation(federation)
        self.keys, self.scratch, self.escape_abs = keys, scratch, escape_abs
        self.order = list(dict.fromkeys(self.fed.chain.chain.order))
        self._parties: dict[str, Party] = {}
        self._models: dict[tuple[int, str], bytes] = {}

    # -- parties and payloads ------------------------------------------------------------------------

    def party(self, name: str) -> Party:
        if name not in self._parties:
            peers = {p: str(self.keys / "public") for p in [*self.order, COORDINATOR] if p != name}
            settings = SealingSettings(keys=str(self.keys / "sealing" / name), peers=peers)
            self._parties[name] = load_party(name, settings, "attacker")
        return self._parties[name]

    def model(self, link: int, wire_dtype: str | None = None) -> bytes:
        """A weights payload of link ``link``'s architecture (fresh random weights), as a site sends it."""
        dtype = wire_dtype or self.fed.chain.chain.wire_dtype
        if (link, dtype) not in self._models:
            from weckd.chain.models import create_model  # torch: only when a payload is needed

            data = self.fed.chain.data
            arch = self.fed.chain.link_settings(link).arch
            net = create_model(arch, len(data.classes), data.channels)
            self._models[link, dtype] = payload_bytes(encode_state(net.state_dict(), arch, link, dtype))
        return self._models[link, dtype]

    def sealed(self, sender: str, recipient: str, run_id: str, link: int, payload: bytes | None = None) -> bytes:
        return self.party(sender).seal_for([recipient], payload if payload is not None else self.model(link),
                                           run_id=run_id, link=link, kind="weights")

    def relay(self, sender: str, recipient: str, run_id: str, link: int, blob: bytes | None = None) -> Relay:
        """Link ``link``'s output as the coordinator holds it: one blob for ``recipient``."""
        data = blob if blob is not None else self.sealed(sender, recipient, run_id, link)
        return _AnyRecipient(link, sender, {"weights": data}, True)

    # -- legitimate messages (weckd.server.schedule) --------------------------------------------------

    def _chain(self, run_id: str, relay: Relay | None, capture: _Capture | None = None) -> ChainRun:
        state = ChainState(run_id=run_id, config_sha256="", relay=relay)
        return ChainRun(capture or _Capture(self.order), self.fed, {}, lambda event: None, state,  # type: ignore
                        self.scratch)

    def train(self, run_id: str, k: int, schedule: list[str], teacher: Relay | None) -> RecordDict:
        """The train message of link ``k`` of ``schedule`` carrying ``teacher`` (link k-1's output)."""
        return self._chain(run_id, teacher)._train_content(k, list(schedule))

    def evaluate(self, run_id: str, k: int, model: Relay, site: str, deliver: bool = False,
                 schedule: list[str] | None = None) -> RecordDict:
        """The evaluate message for link ``k``'s model (from ``model.site``) to ``site``."""
        capture = _Capture(self.order)
        self._chain(run_id, model, capture)._evaluate(k, model, [site], list(schedule or self.order),
                                                      (site,) if deliver else ())
        return capture.sent[site]

    def deliver(self, run_id: str, k: int, schedule: list[str], recipients: list[str]) -> RecordDict:
        """The hand-over message of link ``k`` (the last of ``schedule``), as ``ChainRun._hand_over`` builds it."""
        req = DeliverRequest(run_id, k, tuple(schedule), tuple(("weights", r) for r in recipients))
        return RecordDict({KEY_CONFIG: ConfigRecord(req.to_config())})

    def query(self) -> RecordDict:
        capture = _Capture(self.order)
        capture.nodes = {s: i for i, s in enumerate(self.order)}
        discover(capture, self.fed)  # type: ignore[arg-type]
        return next(iter(capture.sent.values()))


# -- mutations -------------------------------------------------------------------------------------------

def with_config(content: RecordDict, changes: dict[str, Any]) -> RecordDict:
    content[KEY_CONFIG] = ConfigRecord({**dict(content.config_records[KEY_CONFIG]), **changes})
    return content


def with_link(content: RecordDict, drop_prefix: str = "", **changes: Any) -> RecordDict:
    old = dict(content.config_records[KEY_LINK])
    kept = {k: v for k, v in old.items() if not (drop_prefix and k.startswith(drop_prefix))}
    content[KEY_LINK] = ConfigRecord({**kept, **changes})
    return content


def _rewrite_head(payload: bytes, rewrite: Callable[[dict[str, Any]], bytes]) -> bytes:
    """``payload`` (header length, 8 bytes little-endian | JSON header | tensor bytes) with its JSON header
    replaced."""
    (head_len,) = struct.unpack_from("<Q", payload)
    head = rewrite(json.loads(payload[8:8 + head_len]))
    return struct.pack("<Q", len(head)) + head + payload[8 + head_len:]


def nested_header(payload: bytes, depth: int = 10_000) -> bytes:
    """A header with a value nested ``depth`` lists deep (a recursive JSON parser overflows)."""
    def rewrite(head: dict[str, Any]) -> bytes:
        text = json.dumps({**head, "note": "NEST"}, sort_keys=True, separators=(",", ":"))
        return text.replace('"NEST"', "[" * depth + "]" * depth).encode()
    return _rewrite_head(payload, rewrite)


def huge_dims(payload: bytes) -> bytes:
    """A header whose first tensor declares a dimension of 10**30."""
    def rewrite(head: dict[str, Any]) -> bytes:
        name = next(k for k in head if k != "__metadata__")
        head[name]["shape"] = [10**30, *head[name]["shape"][1:]]
        return json.dumps(head, sort_keys=True, separators=(",", ":")).encode()
    return _rewrite_head(payload, rewrite)


# -- scenarios: name -> steps ----------------------------------------------------------------------------

ABC = ["A", "B", "C"]
B_FIRST = ["B", "A", "C"]  # a chain that starts at B: link 0 needs no teacher


def _join(f: Forge, rid: str) -> list[Step]:
    """Legitimate: link 0 of a newer run at B (B's run state moves to it)."""
    return [Step("B", MSG_TRAIN, f.train(rid, 0, B_FIRST, None), rid, LEGIT_S)]


def _stale_run(f: Forge, rid: str) -> list[Step]:
    """A payload A sealed for B in an older run, replayed by naming that run."""
    return [Step("B", MSG_TRAIN, f.train(OLD_RUN, 1, ABC, f.relay("A", "B", OLD_RUN, 0)), OLD_RUN)]


def _coordinator_teacher(f: Forge, rid: str) -> list[Step]:
    """The coordinator names itself as link 0 and sends a teacher it sealed and signed."""
    schedule = [COORDINATOR, "B", "C"]
    return [Step("B", MSG_TRAIN, f.train(rid, 1, schedule, f.relay(COORDINATOR, "B", rid, 0)), rid)]


def _coordinator_model(f: Forge, rid: str) -> list[Step]:
    """A model to evaluate that the coordinator sealed and signed (sender: coordinator)."""
    return [Step("B", MSG_EVALUATE, f.evaluate(rid, 0, f.relay(COORDINATOR, "B", rid, 0), "B"), rid)]


def _seal_for_coordinator(f: Forge, rid: str) -> list[Step]:
    """Link 1 of 3 (not the last) asked to seal its model for the coordinator too."""
    content = f.train(rid, 1, ABC, f.relay("A", "B", rid, 0))
    seal_for = str(content.config_records[KEY_CONFIG]["seal-for"])
    return [Step("B", MSG_TRAIN, with_config(content, {"seal-for": f"{seal_for},weights:{COORDINATOR}"}), rid)]


def _missing_teacher(f: Forge, rid: str) -> list[Step]:
    """Link 1 (B's place in A→B→C) without A's payload."""
    return [Step("B", MSG_TRAIN, f.train(rid, 1, ABC, None), rid)]


def _bad_run_id(run_id: str) -> Callable[[Forge, str], list[Step]]:
    def steps(f: Forge, rid: str) -> list[Step]:
        """The final model (from C, for B to keep) under a run id that is a path."""
        bad = run_id or f.escape_abs
        model = f.relay("C", "B", bad, 2, f.sealed("C", "B", bad, 2, f.model(2, "float32")))
        return [Step("B", MSG_EVALUATE, f.evaluate(bad, 2, model, "B", deliver=True), bad)]
    return steps


def _weights_from_wire(f: Forge, rid: str) -> list[Step]:
    return [Step("B", MSG_TRAIN, with_link(f.train(rid, 0, B_FIRST, None), weights="/etc/hostname"), rid)]


def _teacher_blob(blob: Callable[[Forge, str], bytes]) -> Callable[[Forge, str], list[Step]]:
    def steps(f: Forge, rid: str) -> list[Step]:
        return [Step("B", MSG_TRAIN, f.train(rid, 1, ABC, f.relay("A", "B", rid, 0, blob(f, rid))), rid)]
    return steps


def _link_change(timeout: float = REFUSE_S, **changes: Any) -> Callable[[Forge, str], list[Step]]:
    def steps(f: Forge, rid: str) -> list[Step]:
        return [Step("B", MSG_TRAIN, with_link(f.train(rid, 0, B_FIRST, None), **changes), rid, timeout)]
    return steps


def _evaluations(f: Forge, rid: str) -> list[Step]:
    """Three evaluations of link 0's model in one run (B's policy allows 2)."""
    model = f.relay("A", "B", rid, 0)
    return [Step("B", MSG_EVALUATE, f.evaluate(rid, 0, model, "B"), rid, LEGIT_S) for _ in range(3)]


def _dp_dropped(f: Forge, rid: str) -> list[Step]:
    """Link 0 at C (whose policy requires DP) with every privacy.* setting dropped."""
    content = with_link(f.train(rid, 0, ["C", "A", "B"], None), drop_prefix="privacy.")
    return [Step("C", MSG_TRAIN, content, rid)]


def _deliver_untrained(f: Forge, rid: str) -> list[Step]:
    """B asked to hand over link 1 of A→B as the final model, a link it never trained in that run."""
    return [Step("B", MSG_DELIVER, f.deliver(rid, 1, ["A", "B"], ["A"]), rid)]


def _deliver_outsider(f: Forge, rid: str) -> list[Step]:
    """B asked to seal a handed-over final model for a party outside the run and its policy."""
    return [Step("B", MSG_DELIVER, f.deliver(rid, 1, ["A", "B"], ["Z"]), rid)]


def _foreign_app(f: Forge, rid: str) -> list[Step]:
    """Any request in a run whose bundle names another ClientApp: the discovery query will do."""
    return [Step("B", MSG_QUERY, f.query(), rid)]


SCENARIOS: dict[str, Callable[[Forge, str], list[Step]]] = {
    "join": _join,
    "stale-run": _stale_run,
    "coordinator-teacher": _coordinator_teacher,
    "coordinator-model": _coordinator_model,
    "seal-for-coordinator": _seal_for_coordinator,
    "missing-teacher": _missing_teacher,
    "run-id-relative": _bad_run_id(ESCAPE),
    "run-id-absolute": _bad_run_id(""),
    "weights-from-wire": _weights_from_wire,
    "garbage-teacher": _teacher_blob(lambda f, rid: bytes(range(256)) * 16),
    "truncated-teacher": _teacher_blob(lambda f, rid: (b := f.sealed("A", "B", rid, 0))[:len(b) // 2]),
    "nested-header": _teacher_blob(lambda f, rid: f.sealed("A", "B", rid, 0, nested_header(f.model(0)))),
    "huge-dims": _teacher_blob(lambda f, rid: f.sealed("A", "B", rid, 0, huge_dims(f.model(0)))),
    "batch-over-limit": _link_change(batch_size=65536),
    "evaluations-over-limit": _evaluations,
    "dp-required": _dp_dropped,
    # today these keep the site busy (a ~1e9-parameter model; 10000 epochs): keep them last
    "arch-not-allowed": _link_change(HANG_S, arch="vit_giant_patch14_clip_224"),
    "epochs-over-limit": _link_change(HANG_S, epochs=10000),
    "deliver-untrained": _deliver_untrained,
    "deliver-outsider": _deliver_outsider,
    "foreign-app": _foreign_app,
}
