"""Logits mode: only logits on the shared proxy set travel between links, across two architectures."""
from __future__ import annotations

import pytest
import torch
from weckd.chain.artifacts import image_spec_of_card, load_model_files
from weckd.chain.link import model_from_state

from .conftest import FederatedRun

pytestmark = pytest.mark.slow


def test_heterogeneous_logits_chain_completes(logits_run: FederatedRun) -> None:
    assert logits_run.server_rc == 0
    links = logits_run.results["links"]
    assert [r["arch"] for r in links] == ["test_resnet", "test_efficientnet", "test_resnet"]
    assert all(r["init"] == "scratch" for r in links)  # only logits travel: no warm start
    assert all(r["epochs"][-1]["kd"] > 0 for r in links[1:])  # links 2 and 3 distilled


def test_only_logits_travel_between_links(logits_run: FederatedRun) -> None:
    sent = [m for m in logits_run.wire if m["direction"] == "sent" and m["type"] == "train"]
    n_proxy = logits_run.results["sites"]["A"]["counts"]["proxy"]
    declared = [m["tensors"]["plain/payload"] for m in sent[1:]]
    assert declared and all(t == [{"name": "logits", "shape": [n_proxy, 4], "dtype": "float32"}] for t in declared)
    sizes = [next(a["bytes"] for a in m["arrays"]["plain"]) - m["headers"]["plain/payload"] for m in sent[1:]]
    assert sizes == [n_proxy * 4 * 4] * len(sent[1:])


def test_final_model_is_delivered_and_predicts(logits_run: FederatedRun) -> None:
    card, state = load_model_files(logits_run.out / "model")
    spec = image_spec_of_card(card)
    assert card["arch"] == "test_resnet"
    model = model_from_state(card["arch"], state, spec, torch.device("cpu"))
    assert model(torch.zeros(2, spec.channels, spec.size, spec.size)).shape == (2, 4)
