"""Weights mode with different architectures along the chain (the chain can compress as it goes)."""
from __future__ import annotations

import pytest
from weckd.chain.artifacts import load_model_files

from .conftest import FederatedRun

pytestmark = pytest.mark.slow


def test_weights_chain_across_architectures_warm_starts_only_where_they_match(hetero_weights_run: FederatedRun) -> None:
    assert hetero_weights_run.server_rc == 0
    links = hetero_weights_run.results["links"]
    assert [(r["arch"], r["init"]) for r in links] == [
        ("test_resnet", "scratch"), ("test_efficientnet", "scratch"), ("test_efficientnet", "predecessor")]
    assert all(r["epochs"][-1]["kd"] > 0 for r in links[1:])  # distilled from a teacher of another arch too


def test_next_site_evaluates_each_link(hetero_weights_run: FederatedRun) -> None:
    links = hetero_weights_run.results["links"]
    assert [sorted(r["evaluations"]) for r in links] == [["B"], ["C"], ["A", "B", "C"]]


def test_delivered_model_is_the_last_architecture(hetero_weights_run: FederatedRun) -> None:
    card, _ = load_model_files(hetero_weights_run.out / "model")
    assert card["arch"] == "test_efficientnet"
    assert [link["arch"] for link in card["provenance"]["links"]] == ["test_resnet", "test_efficientnet",
                                                                      "test_efficientnet"]


def test_a_set_override_changes_what_the_sites_train(hetero_weights_run: FederatedRun) -> None:
    assert [len(r["epochs"]) for r in hetero_weights_run.results["links"]] == [2, 2, 2]  # the YAML says 3


def test_sites_started_before_the_coordinator_wait_for_it_and_join(hetero_weights_run: FederatedRun) -> None:
    """Started first, every site found no coordinator, kept waiting (the fixture fails if one exited),
    and joined once it came up: the chain completed with every site."""
    assert hetero_weights_run.server_rc == 0
    assert [r["site"] for r in hetero_weights_run.results["links"]] == ["A", "B", "C"]
    for site in ("A", "B", "C"):
        log = (hetero_weights_run.scaffold.root / "logs" / f"weckd-client-{site}.log").read_text()
        assert "not reachable yet" in log and "connected to the coordinator" in log
