"""The chain recipe's levers: one learning-rate schedule over the chain, do-no-harm at a site, the labelled
fraction, and delivering the best link (in-process; the federated rule is in test_schedule)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from weckd.chain.config import LinkSettings, load_config
from weckd.chain.data import ImageSet, ImageSpec, make_site
from weckd.chain.delivery import best_link, evaluations_accuracy, pooled_accuracy
from weckd.chain.errors import ConfigError
from weckd.chain.link import Teacher, _cosine, clearly_worse, lr_window, train_link
from weckd.chain.runner import results_json, run_chain
from weckd.chain.synthetic import make_synthetic

from .helpers import THREADS, TINY_CHAIN, deep_merge, write_yaml

SPEC = ImageSpec(("c0", "c1", "c2", "c3"), 16, 1)


def _site(n: int = 240, seed: int = 1, labelled_fraction: float = 1.0) -> object:
    images, labels = make_synthetic(n, 4, 16, 1, 1.0, seed)
    data = ImageSet(torch.from_numpy(images), torch.from_numpy(labels))
    return make_site("A", data, 0.25, 0, labelled_fraction=labelled_fraction)


def _lrs(settings: LinkSettings, index: int, n_links: int, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=settings.lr)
    sched = _cosine(opt, steps, lr_window(settings, index, n_links))
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_the_chain_schedule_is_one_cosine_over_all_links_and_the_link_schedule_restarts() -> None:
    chain = LinkSettings(lr=0.1, lr_schedule="chain")
    joined = [lr for k in range(4) for lr in _lrs(chain, k, 4, 10)]
    one = [0.05 * (1 + math.cos(math.pi * t / 40)) for t in range(40)]
    assert joined == pytest.approx(one, abs=1e-9)
    restart = [lr for k in range(4) for lr in _lrs(LinkSettings(lr=0.1, lr_schedule="link"), k, 4, 10)]
    assert restart[0] == restart[10] == restart[30] == pytest.approx(0.1)  # every link starts at lr again
    with pytest.raises(Exception, match="outside the chain"):
        lr_window(chain, 4, 4)


def test_do_no_harm_hands_the_teacher_on_when_the_student_scores_lower_at_this_site() -> None:
    torch.set_num_threads(THREADS)
    site = _site()
    good = train_link(LinkSettings(epochs=6, optimizer="sgd", lr=0.05, batch_size=16), site, SPEC, seed=0,
                      device=torch.device("cpu"))
    assert good.val.accuracy > 0.5  # four classes: chance is 0.25
    teacher = Teacher(good.arch, good.state)
    weak = LinkSettings(epochs=1, lr=1e-5, batch_size=16, init="scratch", do_no_harm=True)
    out = train_link(weak, site, SPEC, seed=1, device=torch.device("cpu"), teacher=teacher)
    assert out.kept == "teacher" and out.teacher_val is not None
    assert out.val.accuracy == out.teacher_val.accuracy == pytest.approx(good.val.accuracy)
    assert all(torch.equal(out.state[k], good.state[k]) for k in good.state)
    strong = dataclasses.replace(weak, epochs=6, lr=0.05)
    untrained = train_link(dataclasses.replace(weak, lr=1e-9, do_no_harm=False), site, SPEC, seed=2,
                           device=torch.device("cpu"))
    out = train_link(strong, site, SPEC, seed=1, device=torch.device("cpu"), teacher=Teacher(untrained.arch,
                                                                                             untrained.state))
    assert out.kept == "student" and out.val.accuracy >= out.teacher_val.accuracy  # type: ignore[union-attr]


def test_a_site_that_requires_do_no_harm_applies_it_whatever_the_coordinator_sends(tmp_path: Path) -> None:
    from weckd.client.admit import admit_train
    from weckd.client.policy import SitePolicy
    from weckd.client.runstate import RunState
    from weckd.client.site import SiteConfig

    from .test_site_policy import _data, _train_config

    cfg = SiteConfig(site="B", state_dir=str(tmp_path / "state"), policy=SitePolicy(require_do_no_harm=True))
    link = {"arch": "test_resnet", "epochs": 2, "batch_size": 16, "lr": 0.05, "do_no_harm": False}
    ok = admit_train(cfg, _data(), None, RunState(cfg.state_dir, cfg.policy), _train_config(), link, True)
    assert ok.settings.do_no_harm is True


def test_clearly_worse_needs_more_than_a_few_images_of_lead() -> None:
    labels = torch.zeros(40, dtype=torch.long)

    def wrong_on(*index: int) -> torch.Tensor:
        pred = torch.zeros(40, dtype=torch.long)
        pred[list(index)] = 1
        return pred

    teacher = wrong_on()  # right on all 40
    assert not clearly_worse(wrong_on(0, 1), teacher, labels)  # b=2, c=0: noise on a small split
    assert clearly_worse(wrong_on(*range(8)), teacher, labels)  # b=8, c=0: 8 > 2·√8
    # the teacher misses 3 images the student gets right, the student 9 the teacher gets right: 6 < 2·√12
    assert not clearly_worse(wrong_on(*range(3, 12)), wrong_on(0, 1, 2), labels)
    assert clearly_worse(wrong_on(*range(3, 15)), wrong_on(0, 1, 2), labels)  # b=12, c=3: 9 > 2·√15


def test_labelled_fraction_keeps_labels_on_a_stratified_part_and_the_rest_is_unlabelled() -> None:
    full = _site()
    part = _site(labelled_fraction=0.3)
    assert torch.equal(part.val.labels, full.val.labels)  # the validation split is the same
    assert len(part.train) + len(part.unlabelled) == len(full.train)
    assert len(part.train) == pytest.approx(0.3 * len(full.train), abs=4)
    per_class = np.bincount(part.train.labels.numpy(), minlength=4)
    assert np.abs(per_class - 0.3 * np.bincount(full.train.labels.numpy(), minlength=4)).max() <= 1  # stratified
    assert (part.unlabelled.labels == -1).all()


def test_a_chain_with_a_labelled_fraction_distils_on_the_unlabelled_images(tmp_path: Path) -> None:
    cfg = load_config(write_yaml(tmp_path / "c.yaml", deep_merge(TINY_CHAIN, {
        "data": {"labelled_fraction": 0.25}, "baselines": {"sites": False, "pooled": False}})))
    run = run_chain(cfg)
    link2 = results_json(run)["links"][1]
    assert link2["samples"]["unlabelled"] > 2 * link2["samples"]["train"]
    assert any(e["kd"] > 0 for e in link2["epochs"])


def test_deliver_best_picks_the_link_with_the_best_pooled_validation_accuracy(tmp_path: Path) -> None:
    cfg = load_config(write_yaml(tmp_path / "c.yaml", deep_merge(TINY_CHAIN, {
        "chain": {"order": ["A", "B", "C"], "deliver": "best"}, "link": {"epochs": 2},
        "baselines": {"sites": False, "pooled": False}})))
    run = run_chain(cfg)
    assert len(run.pooled_val) == 3 and run.delivered == best_link(run.pooled_val, run.pooled_n)
    assert run.final.name == f"link {run.delivered + 1}"
    res = results_json(run)
    assert res["delivered"]["link"] == run.delivered + 1 and res["delivered"]["pooled_val_accuracy"] == run.pooled_val
    assert res["summary"]["delivered_test_accuracy"] == run.final.test.accuracy


def test_the_delivery_rule() -> None:
    assert best_link([0.5, 0.7, 0.6], 1000) == 1  # 10 points over the last link on 1000 images: clearly better
    assert best_link([0.7, 0.5, 0.7], 1000) == 2  # a tie: the later link
    assert best_link([0.80, 0.84, 0.82], 110) == 2  # within one standard error (4.9 points on 110 images): tied
    assert best_link([0.80, 0.84, 0.78], 110) == 1
    assert pooled_accuracy([(1.0, 10), (0.0, 30)]) == 0.25
    assert evaluations_accuracy({"A": {"accuracy": 0.5, "n": 20}, "B": {"accuracy": 1.0, "n": 60}}) == 0.875


def test_deliver_best_needs_weights_mode(tmp_path: Path) -> None:
    raw = deep_merge(TINY_CHAIN, {"chain": {"mode": "logits", "deliver": "best"}, "data": {"proxy": "synthetic"}})
    with pytest.raises(ConfigError, match="chain.deliver: best needs chain.mode: weights"):
        load_config(write_yaml(tmp_path / "c.yaml", raw))


def test_a_federation_delivering_the_best_link_needs_every_site_to_evaluate(tmp_path: Path) -> None:
    from .fake_grid import federation

    with pytest.raises(ConfigError, match="chain.deliver: best needs federation.evaluate: all"):
        federation(tmp_path, ["A", "B"], deliver="best", evaluate="next")


def test_the_real_images_config_runs_on_image_folders(tmp_path: Path) -> None:
    """configs/chain-real-images.yaml as a hospital copies it: RGB ImageFolders per site and a test folder
    (here tiny random PNGs and a tiny network: the check is that the shipped file loads and runs)."""
    from .helpers import make_image_folder

    repo = Path(__file__).resolve().parents[2]
    sets = [f"data.sites.{s}={make_image_folder(tmp_path / s, {'normal': 10, 'abnormal': 10}, seed=i)}"
            for i, s in enumerate("ABCD")]
    test = make_image_folder(tmp_path / "test", {"normal": 6, "abnormal": 6}, seed=9)
    cfg = load_config(repo / "configs" / "chain-real-images.yaml",
                      [*sets, f"data.test={test}", "link.arch=test_resnet", "link.epochs=1", "data.image_size=16",
                       f"runtime.threads={THREADS}", "runtime.device=cpu"])
    assert (cfg.link.lr_schedule, cfg.link.do_no_harm, cfg.chain.deliver, cfg.data.channels) == ("chain", True,
                                                                                                   "auto", 3)
    run = run_chain(dataclasses.replace(cfg, baselines=dataclasses.replace(cfg.baselines, sites=False,
                                                                           pooled=False)))
    assert len(run.links) == 4 and run.best is not None and len(run.pooled_val) == 4
