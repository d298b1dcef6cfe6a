"""One link: warm start, teachers in both modes, unlabelled images, metrics."""

from __future__ import annotations

import logging

import pytest
import torch
from weckd.chain.config import LinkSettings
from weckd.chain.data import ImageSpec, make_site, read_labelled, read_unlabelled
from weckd.chain.link import Teacher, score, train_link

SPEC = ImageSpec(("c0", "c1", "c2", "c3"), 32, 1)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def site():
    data = read_labelled("synthetic", SPEC, synthetic_args=(96, 1.0, 4))
    return make_site("A", data, 0.25, seed=0)


def _settings(**kw) -> LinkSettings:
    return LinkSettings(**{"arch": "test_resnet", "epochs": 1, "batch_size": 16, **kw})


def test_scratch_link_reports_metrics(site) -> None:
    result = train_link(_settings(), site, SPEC, seed=1, device=CPU)
    assert result.init == "scratch"
    assert result.samples == {"train": 72, "val": 24, "unlabelled": 0}
    assert len(result.epochs) == 1 and result.epochs[0].ce > 0 and result.epochs[0].kd == 0
    assert result.val.n == 24 and 0.0 <= result.val.accuracy <= 1.0
    assert result.seconds > 0 and result.images_per_s > 0


def test_predecessor_weights_warm_start_the_student(site) -> None:
    first = train_link(_settings(), site, SPEC, seed=1, device=CPU)
    teacher = Teacher(first.arch, first.state)
    warm = train_link(_settings(epochs=1, lr=1e-9), site, SPEC, seed=2, device=CPU, teacher=teacher)
    assert warm.init == "predecessor"
    diff = max(
        (warm.state[k].float() - first.state[k].float()).abs().max().item()
        for k in first.state
        if first.state[k].is_floating_point() and "running" not in k
    )
    assert diff < 1e-3
    assert warm.epochs[0].kd > 0


def test_other_architecture_warns_and_starts_from_scratch(site, caplog: pytest.LogCaptureFixture) -> None:
    first = train_link(_settings(), site, SPEC, seed=1, device=CPU)
    with caplog.at_level(logging.WARNING):
        second = train_link(
            _settings(arch="test_efficientnet"),
            site,
            SPEC,
            seed=2,
            device=CPU,
            teacher=Teacher(first.arch, first.state),
        )
    assert second.init == "scratch" and second.arch == "test_efficientnet"
    assert "architectures differ" in caplog.text
    assert second.epochs[0].kd > 0  # still distils across architectures


def test_logits_mode_distils_on_proxy_and_returns_own_proxy_logits(site) -> None:
    proxy = read_unlabelled("synthetic", SPEC, synthetic_args=(40, 1.0, 4))
    first = train_link(_settings(init="scratch"), site, SPEC, seed=1, device=CPU, proxy=proxy)
    assert first.proxy_logits is not None and first.proxy_logits.shape == (40, 4)
    second = train_link(
        _settings(init="scratch", arch="test_efficientnet"),
        site,
        SPEC,
        seed=2,
        device=CPU,
        teacher=Teacher(first.arch, None, first.proxy_logits),
        proxy=proxy,
    )
    assert second.epochs[0].kd > 0
    assert second.proxy_logits is not None and second.proxy_logits.shape == (40, 4)


def test_unlabelled_site_images_add_distillation(site) -> None:
    unl = read_unlabelled("synthetic", SPEC, synthetic_args=(32, 1.0, 8))
    with_unl = make_site("A", read_labelled("synthetic", SPEC, synthetic_args=(96, 1.0, 4)), 0.25, 0, unl)
    first = train_link(_settings(), site, SPEC, seed=1, device=CPU)
    result = train_link(_settings(), with_unl, SPEC, seed=2, device=CPU, teacher=Teacher(first.arch, first.state))
    assert result.samples["unlabelled"] == 32


def test_same_seed_gives_identical_weights(site) -> None:
    a = train_link(_settings(), site, SPEC, seed=7, device=CPU)
    b = train_link(_settings(), site, SPEC, seed=7, device=CPU)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_score_counts_confusion_and_recall() -> None:
    pred = torch.tensor([0, 1, 1, 1, 0])
    labels = torch.tensor([0, 0, 1, 1, 1])
    ev = score(pred, labels, 2)
    assert ev.confusion == [[1, 1], [1, 2]]
    assert ev.accuracy == pytest.approx(3 / 5)
    assert ev.recall == pytest.approx([0.5, 2 / 3])
