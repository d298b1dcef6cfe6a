"""A site admits only requests inside its own policy and run state, whatever the coordinator sends."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from weckd.chain.protocol import DeliverRequest, Reason, Refused, TrainRequest, error_text, reason_from_error
from weckd.client.admit import admit_deliver, admit_evaluate, admit_train
from weckd.client.linkstore import LinkOutput, LinkStore
from weckd.client.policy import SitePolicy, check_delivery
from weckd.client.runstate import RunState
from weckd.client.site import SiteConfig

RUN = "20261130T090000Z-aaaaaaaaaaaa"
LATER = "20261130T100000Z-bbbbbbbbbbbb"
EARLIER = "20261129T090000Z-cccccccccccc"


def _cfg(tmp_path: Path, **policy: Any) -> SiteConfig:
    return SiteConfig(site="B", state_dir=str(tmp_path / "state"), policy=SitePolicy(**policy))


def _data(n_train: int = 100) -> Any:
    return SimpleNamespace(site=SimpleNamespace(train=[0] * n_train))


def _train_config(**over: Any) -> dict[str, Any]:
    base = {"link": 1, "n-links": 3, "seed": 7, "mode": "weights", "wire-dtype": "float16", "augment": False,
            "deliver": False, "run-id": RUN, "schedule": ["A", "B", "C"], "seal-for": "weights:C,weights:A"}
    return {**base, **over}


def _link(**over: Any) -> dict[str, Any]:
    return {"arch": "test_resnet", "epochs": 2, "batch_size": 16, "lr": 0.05, **over}


def _admit(tmp_path: Path, config: dict[str, Any] | None = None, link: dict[str, Any] | None = None,
           payload: bool = True, **policy: Any) -> Any:
    cfg = _cfg(tmp_path, **policy)
    return admit_train(cfg, _data(), None, RunState(cfg.state_dir, cfg.policy), config or _train_config(),
                       link or _link(), payload)


def _refused(reason: Reason, fn: Any, *args: Any, **kwargs: Any) -> Refused:
    with pytest.raises(Refused) as err:
        fn(*args, **kwargs)
    assert err.value.reason is reason, str(err.value)
    return err.value


def test_a_request_inside_the_policy_is_admitted_with_the_sender_from_the_schedule(tmp_path: Path) -> None:
    ok = _admit(tmp_path)
    assert (ok.req.link, ok.sender, ok.settings.arch) == (1, "A", "test_resnet")


@pytest.mark.parametrize("run_id", ["../../../escape", "/abs/path", "", ".", "..", "a" * 65, "x/y"])
def test_run_ids_that_are_not_plain_names_are_refused(tmp_path: Path, run_id: str) -> None:
    _refused(Reason.BAD_RUN_ID, _admit, tmp_path, _train_config(**{"run-id": run_id}))


@pytest.mark.parametrize(("link", "policy", "reason"), [
    (_link(arch="vit_giant_patch14_clip_224"), {}, Reason.ARCH_NOT_ALLOWED),
    (_link(epochs=10000), {}, Reason.EPOCHS_OVER_LIMIT),
    (_link(batch_size=65536), {}, Reason.BATCH_OVER_LIMIT),
    (_link(epochs=50), {"max_images_per_link": 1000}, Reason.IMAGES_OVER_LIMIT),
    (_link(), {"require_dp": True}, Reason.DP_REQUIRED),
    (_link(**{"privacy.epsilon": 8.0}), {"max_epsilon_per_link": 2.0}, Reason.EPSILON_OVER_LIMIT),
    (_link(weights="/etc/hostname"), {}, Reason.WEIGHTS_FROM_WIRE),
    (_link(weights=""), {}, Reason.WEIGHTS_FROM_WIRE),
    (_link(epochs="3"), {}, Reason.BAD_REQUEST),
])
def test_link_settings_outside_the_policy_are_refused(tmp_path: Path, link: dict[str, Any], policy: dict[str, Any],
                                                      reason: Reason) -> None:
    _refused(reason, _admit, tmp_path, link=link, **policy)


def test_logits_mode_is_refused_where_the_policy_forbids_it(tmp_path: Path) -> None:
    _refused(Reason.LOGITS_NOT_ALLOWED, _admit, tmp_path, _train_config(mode="logits", **{"seal-for": "logits:C"}),
             allow_logits=False)


def test_a_later_link_without_a_teacher_is_refused(tmp_path: Path) -> None:
    _refused(Reason.MISSING_TEACHER, _admit, tmp_path, payload=False)


def test_the_first_link_with_a_teacher_is_refused(tmp_path: Path) -> None:
    config = _train_config(link=0, schedule=["B", "A", "C"], **{"seal-for": "weights:A"})
    _refused(Reason.BAD_REQUEST, _admit, tmp_path, config)


def test_a_link_the_schedule_gives_to_another_site_is_refused(tmp_path: Path) -> None:
    _refused(Reason.BAD_REQUEST, _admit, tmp_path, _train_config(link=2, deliver=True))


def test_a_schedule_naming_the_coordinator_is_refused(tmp_path: Path) -> None:
    config = _train_config(schedule=["coordinator", "B", "C"])
    _refused(Reason.COORDINATOR_SENDER, _admit, tmp_path, config)


def test_a_schedule_against_the_agreed_order_is_refused(tmp_path: Path) -> None:
    config = _train_config(schedule=["C", "B", "A"], **{"seal-for": "weights:A"})
    _refused(Reason.NOT_PREDECESSOR, _admit, tmp_path, config, order=("A", "B", "C"))


def test_cycles_and_skipped_sites_follow_the_agreed_order(tmp_path: Path) -> None:
    config = _train_config(link=3, schedule=["A", "B", "A", "B"], deliver=True, **{"n-links": 4, "seal-for": ""})
    assert _admit(tmp_path, config, order=("A", "B", "C")).sender == "A"  # C skipped for good


def test_a_skipped_site_that_comes_back_is_against_the_agreed_order(tmp_path: Path) -> None:
    config = _train_config(link=3, schedule=["A", "C", "A", "B", "C"], **{"n-links": 5, "seal-for": "weights:C"})
    _refused(Reason.NOT_PREDECESSOR, _admit, tmp_path, config, order=("A", "B", "C"))


def test_more_links_of_a_run_than_the_policy_allows_are_refused(tmp_path: Path) -> None:
    config = _train_config(schedule=["A", "B", "A", "B", "C"], **{"n-links": 5})
    _refused(Reason.LINKS_OVER_LIMIT, _admit, tmp_path, config, max_links_per_run=1)


def test_sealing_for_the_coordinator_before_the_last_link_is_refused(tmp_path: Path) -> None:
    config = _train_config(**{"seal-for": "weights:C,weights:coordinator"})
    _refused(Reason.RECIPIENT_NOT_ALLOWED, _admit, tmp_path, config, deliver_to=("coordinator",))


def test_the_final_model_goes_to_the_coordinator_only_if_the_policy_lists_it(tmp_path: Path) -> None:
    config = _train_config(link=2, schedule=["A", "C", "B"], deliver=True, **{"seal-for": "weights:coordinator"})
    _refused(Reason.RECIPIENT_NOT_ALLOWED, _admit, tmp_path, config)
    assert _admit(tmp_path / "listed", config, deliver_to=("coordinator",)).req.deliver


def test_sealing_a_kind_the_link_does_not_produce_is_refused_before_training(tmp_path: Path) -> None:
    _refused(Reason.BAD_REQUEST, _admit, tmp_path, _train_config(**{"seal-for": "logits:C"}))


def test_sealing_for_a_site_outside_the_run_is_refused(tmp_path: Path) -> None:
    _refused(Reason.RECIPIENT_NOT_ALLOWED, _admit, tmp_path, _train_config(**{"seal-for": "weights:Z"}))


@pytest.mark.parametrize("change", [{"link": True}, {"extra": 1}, {"schedule": "A,B,C"}, {"seal-for": "weights"},
                                    {"deliver": True}, {"mode": "pickle"}])
def test_malformed_request_fields_are_refused(tmp_path: Path, change: dict[str, Any]) -> None:
    _refused(Reason.BAD_REQUEST, _admit, tmp_path, _train_config(**change))


def _join(cfg: SiteConfig, run: str, link: int, schedule: tuple[str, ...] = ("A", "B", "C")) -> RunState:
    runs = RunState(cfg.state_dir, cfg.policy)
    rec = runs.admit_train(run, link, schedule, None, "test")
    runs.commit(run, rec, link, schedule, trained=True)
    return runs


def test_a_run_the_site_left_is_refused(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _join(cfg, RUN, 1)
    _join(cfg, LATER, 1)
    _refused(Reason.STALE_RUN, _admit, tmp_path, _train_config())


def test_a_run_older_than_the_current_one_is_refused_even_if_never_seen(tmp_path: Path) -> None:
    _join(_cfg(tmp_path), RUN, 1)
    _refused(Reason.STALE_RUN, _admit, tmp_path, _train_config(**{"run-id": EARLIER}))


def test_link_numbers_only_move_forward(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _join(cfg, RUN, 3, ("A", "B", "C", "B"))
    config = _train_config(schedule=["A", "B", "C", "B"], **{"n-links": 4})
    _refused(Reason.LINK_NOT_FORWARD, _admit, tmp_path, config)


def test_the_same_link_may_be_asked_for_again(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _join(cfg, RUN, 1)
    assert _admit(tmp_path).record.links == [1]


def test_links_already_routed_cannot_be_rerouted(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _join(cfg, RUN, 1)
    config = _train_config(link=3, schedule=["C", "B", "A", "B"], **{"n-links": 4, "seal-for": ""})
    _refused(Reason.BAD_REQUEST, _admit, tmp_path, config)


def test_the_epsilon_budget_holds_across_runs(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, epsilon_budget=10.0)
    runs = _join(cfg, RUN, 1)
    runs.spend(runs.ledger.runs[RUN], 7.0)
    config = _train_config(**{"run-id": LATER})
    _refused(Reason.EPSILON_BUDGET, _admit, tmp_path, config, link=_link(**{"privacy.epsilon": 4.0}),
             epsilon_budget=10.0)
    assert _admit(tmp_path, config, link=_link(**{"privacy.epsilon": 3.0}), epsilon_budget=10.0).req.run_id == LATER


def _evaluate_config(**over: Any) -> dict[str, Any]:
    return {"link": 1, "run-id": RUN, "sender": "B", "deliver": False, "schedule": ["A", "B", "C"], **over}


def test_a_model_to_evaluate_from_the_coordinator_is_refused(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    runs = RunState(cfg.state_dir, cfg.policy)
    _refused(Reason.COORDINATOR_SENDER, admit_evaluate, cfg, None, runs, _evaluate_config(sender="coordinator"))


def test_a_model_to_evaluate_from_another_site_than_the_links_is_refused(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    runs = RunState(cfg.state_dir, cfg.policy)
    _refused(Reason.NOT_PREDECESSOR, admit_evaluate, cfg, None, runs, _evaluate_config(sender="C"))


def test_evaluations_beyond_the_policy_are_refused(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, max_evaluations_per_run=2)
    for _ in range(2):
        runs = RunState(cfg.state_dir, cfg.policy)
        ok = admit_evaluate(cfg, None, runs, _evaluate_config())
        runs.commit(RUN, ok.record, 1, ok.req.schedule, evaluated=True)
    runs = RunState(cfg.state_dir, cfg.policy)
    _refused(Reason.EVALUATIONS_OVER_LIMIT, admit_evaluate, cfg, None, runs, _evaluate_config())


def test_the_run_ledger_is_private_and_survives_a_restart(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _join(cfg, RUN, 1)
    path = Path(cfg.state_dir) / "runs.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert RunState(cfg.state_dir, cfg.policy).ledger.current == RUN


def test_the_error_a_site_sends_names_the_reason_and_nothing_local() -> None:
    text = error_text(Reason.WEIGHTS_FROM_WIRE)
    assert reason_from_error(text) is Reason.WEIGHTS_FROM_WIRE
    assert "/" not in text.split(" ", 1)[1]


def test_train_requests_round_trip_through_their_config_record() -> None:
    req = TrainRequest.from_config(_train_config(), "test")
    assert TrainRequest.from_config(req.to_config(), "test") == req
    assert replace(req, link=2, deliver=True).to_config()["deliver"] is True


# -- a hand-over of this site's link as the final model (the links after it were skipped) ------------------

def _deliver_config(**over: Any) -> dict[str, Any]:
    return {"link": 1, "run-id": RUN, "schedule": ["A", "B"], "seal-for": "weights:coordinator,weights:A", **over}


def test_deliver_requests_round_trip_through_their_config_record() -> None:
    req = DeliverRequest.from_config(_deliver_config(), "test")
    assert req.seal_for == (("weights", "coordinator"), ("weights", "A"))
    assert DeliverRequest.from_config(req.to_config(), "test") == req


@pytest.mark.parametrize("change", [{"link": 2}, {"link": -1}, {"seal-for": "logits:A"}, {"schedule": "A,B"},
                                    {"extra": 1}, {"link": True}])
def test_malformed_deliver_requests_are_refused(change: dict[str, Any]) -> None:
    _refused(Reason.BAD_REQUEST, DeliverRequest.from_config, _deliver_config(**change), "test")


def test_a_hand_over_goes_where_a_final_model_may_go(tmp_path: Path) -> None:
    req = DeliverRequest.from_config(_deliver_config(), "test")
    check_delivery(SitePolicy(deliver_to=("coordinator",)), req, "test")
    _refused(Reason.RECIPIENT_NOT_ALLOWED, check_delivery, SitePolicy(), req, "test")  # coordinator not listed
    outside = DeliverRequest.from_config(_deliver_config(**{"seal-for": "weights:Z"}), "test")
    _refused(Reason.RECIPIENT_NOT_ALLOWED, check_delivery, SitePolicy(), outside, "test")
    check_delivery(SitePolicy(deliver_to=("Z",)), outside, "test")


def test_only_a_link_this_site_trained_in_its_current_run_is_handed_over(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    runs = _join(cfg, RUN, 1)
    runs.admit_deliver(RUN, 1, ("A", "B"), "test")
    _refused(Reason.BAD_REQUEST, runs.admit_deliver, RUN, 0, ("A", "B"), "test")  # A trained link 1
    _refused(Reason.STALE_RUN, runs.admit_deliver, EARLIER, 1, ("A", "B"), "test")
    _refused(Reason.BAD_REQUEST, runs.admit_deliver, LATER, 1, ("A", "B"), "test")  # a run it never trained in


def test_a_site_hands_over_one_model_per_run(tmp_path: Path) -> None:
    """chain.deliver: best: the coordinator may ask for an earlier link of this site, but it cannot collect
    several of its models (one delivery per run)."""
    cfg = _cfg(tmp_path, deliver_to=("coordinator",))
    schedule = ("A", "B", "C", "A", "B", "C")
    runs = _join(cfg, RUN, 1, schedule)
    rec = runs.admit_train(RUN, 4, schedule, None, "test")
    runs.commit(RUN, rec, 4, schedule, trained=True)
    runs = RunState(cfg.state_dir, cfg.policy)
    req = admit_deliver(cfg, None, runs, _deliver_config(link=1, schedule=list(schedule)))  # its link 2: allowed
    runs.delivered(RUN, runs.ledger.runs[RUN], req.link)
    runs = RunState(cfg.state_dir, cfg.policy)  # the ledger remembers it across restarts
    assert admit_deliver(cfg, None, runs, _deliver_config(link=1, schedule=list(schedule))).link == 1  # a retry
    _refused(Reason.BAD_REQUEST, admit_deliver, cfg, None, runs, _deliver_config(link=4, schedule=list(schedule)))
    _refused(Reason.BAD_REQUEST, admit_deliver, cfg, None, runs,  # a link another site trained
             _deliver_config(link=2, schedule=list(schedule)))


def test_a_train_request_may_not_deliver_a_second_model_of_the_run(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, deliver_to=("coordinator",))
    runs = _join(cfg, RUN, 1, ("A", "B", "C", "B"))
    runs.delivered(RUN, runs.ledger.runs[RUN], 1)
    _refused(Reason.BAD_REQUEST, admit_train, cfg, _data(), None, RunState(cfg.state_dir, cfg.policy),
             _train_config(link=3, schedule=["A", "B", "C", "B"], deliver=True, **{"n-links": 4}),
             {"arch": "test_resnet"}, True)


def test_the_last_link_may_train_without_delivering_but_no_other_link_delivers() -> None:
    last = TrainRequest.from_config(_train_config(link=2, schedule=["A", "B", "C"], deliver=False), "test")
    assert not last.deliver  # chain.deliver: best: the best link is handed over once all are scored
    _refused(Reason.BAD_REQUEST, TrainRequest.from_config, _train_config(link=1, deliver=True), "test")


def test_the_link_store_keeps_the_earlier_links_of_the_run_and_forgets_other_runs(tmp_path: Path) -> None:
    store = LinkStore(tmp_path)
    outs = [LinkOutput({"weights": bytes([k]) * 10}, {"val-accuracy": 0.1 * k}, {"arch": "test_resnet"})
            for k in range(3)]
    for k in (0, 3, 6):
        store.put(f"{k:064d}", outs[k // 3], RUN, k)
    assert [store.get_link(RUN, k) for k in (0, 3, 6)] == outs
    assert store.get(f"{6:064d}") == outs[2]  # the latest link still answers a repeated request
    store.put("f" * 64, outs[0], LATER, 1)
    assert store.get_link(RUN, 0) is None and store.get_link(RUN, 3) is None
    assert not (tmp_path / "kept-links").exists()


def test_the_link_store_finds_the_kept_link_by_run_and_link(tmp_path: Path) -> None:
    store = LinkStore(tmp_path)
    out = LinkOutput({"weights": b"w" * 10}, {"val-accuracy": 0.5}, {"arch": "test_resnet"})
    store.put("k" * 64, out, RUN, 1)
    assert store.get_link(RUN, 1) == out
    assert store.get_link(RUN, 0) is None and store.get_link(LATER, 1) is None


def test_a_hand_over_is_admitted_only_for_this_sites_last_link(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, deliver_to=("coordinator",))
    _join(cfg, RUN, 1)
    runs = RunState(cfg.state_dir, cfg.policy)
    req = admit_deliver(cfg, None, runs, _deliver_config())
    assert (req.link, req.schedule) == (1, ("A", "B"))
    _refused(Reason.BAD_REQUEST, admit_deliver, cfg, None, runs,
             _deliver_config(schedule=["B", "A"]))  # the schedule puts A at the last link
    _refused(Reason.COORDINATOR_SENDER, admit_deliver, cfg, None, runs,
             _deliver_config(schedule=["A", "coordinator", "B"], link=2))
    _refused(Reason.BAD_REQUEST, admit_deliver, cfg, None, runs, _deliver_config(**{"run-id": LATER}))
