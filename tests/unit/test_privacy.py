"""DP-SGD links: the privacy settings, the GroupNorm variant, ε accounting, warm start, reporting."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from weckd.chain import privacy
from weckd.chain.config import (
    ChainConfig,
    LinkSettings,
    PrivacySettings,
    apply_override,
    link_from_mapping,
    link_to_mapping,
    load_config,
)
from weckd.chain.data import ImageSpec, make_site, read_labelled, read_unlabelled
from weckd.chain.errors import ConfigError, LinkError
from weckd.chain.link import Teacher, evaluate, model_from_state, train_link
from weckd.chain.models import check_arch, create_model, state_of
from weckd.chain.runner import ChainRun, Row, format_table, results_json

from .helpers import TINY_CHAIN, deep_merge, write_yaml

SPEC = ImageSpec(("c0", "c1", "c2", "c3"), 32, 1)
CPU = torch.device("cpu")
DP = {"epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0}


def _load(tmp_path: Path, extra: dict) -> ChainConfig:
    return load_config(write_yaml(tmp_path / "c.yaml", deep_merge(TINY_CHAIN, extra)))


def _settings(**kw) -> LinkSettings:
    return LinkSettings(**{"arch": "test_resnet", "epochs": 1, "batch_size": 16, **kw})


def _rdp(epsilon: float = 8.0, **kw) -> PrivacySettings:
    """The RDP accountant: several times faster to calibrate than the default PRV, for quick tests."""
    return PrivacySettings(epsilon=epsilon, accountant="rdp", **kw)


@pytest.fixture(scope="module")
def site():
    return make_site("A", read_labelled("synthetic", SPEC, synthetic_args=(96, 1.0, 4)), 0.25, seed=0)


@pytest.fixture(scope="module")
def dp_result(site):
    """One DP link with the default (PRV) accountant, shared by the accounting and state tests."""
    return train_link(_settings(epochs=2, privacy=PrivacySettings(**DP)), site, SPEC, seed=1, device=CPU)


# --- settings -------------------------------------------------------------------------------------


def test_privacy_mapping_under_link_applies_to_every_link(tmp_path: Path) -> None:
    cfg = _load(tmp_path, {"link": {"privacy": {"epsilon": 8}}})
    expected = PrivacySettings(epsilon=8.0, delta=1e-5, max_grad_norm=1.0, accountant="prv")
    assert cfg.link_settings(0).privacy == expected and cfg.link_settings(1).privacy == expected


def test_privacy_is_off_by_default(tmp_path: Path) -> None:
    assert _load(tmp_path, {}).link.privacy is None


def test_exponent_without_a_dot_reads_as_a_number(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    text = write_yaml(path, TINY_CHAIN).read_text() + "\n"
    path.write_text(text.replace("link:\n", "link:\n  privacy: {epsilon: 8.0, delta: 1e-5}\n"))
    privacy_settings = load_config(path).link.privacy
    assert privacy_settings is not None and privacy_settings.delta == 1e-5


def test_per_link_privacy_overrides_the_default_key_by_key(tmp_path: Path) -> None:
    cfg = _load(tmp_path, {"link": {"privacy": {"epsilon": 8, "delta": 1e-6}}, "links": [{"privacy": {"epsilon": 2}}]})
    assert cfg.link_settings(0).privacy == PrivacySettings(epsilon=2.0, delta=1e-6)
    assert cfg.link_settings(1).privacy == PrivacySettings(epsilon=8.0, delta=1e-6)


def test_unknown_privacy_key_suggests_the_close_match(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"c\.yaml: link\.privacy: unknown key 'max_grad_nrom'; did you mean"):
        _load(tmp_path, {"link": {"privacy": {"epsilon": 8, "max_grad_nrom": 1.0}}})


def test_epsilon_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"c\.yaml: link\.privacy\.epsilon: 0\.0 must be greater than 0\.0"):
        _load(tmp_path, {"link": {"privacy": {"epsilon": 0}}})


def test_delta_must_be_below_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"link\.privacy\.delta: 1\.0 must be less than 1"):
        _load(tmp_path, {"link": {"privacy": {"epsilon": 8, "delta": 1.0}}})


def test_epsilon_is_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"link\.privacy\.epsilon: missing required key"):
        _load(tmp_path, {"link": {"privacy": {"delta": 1e-5}}})


def test_unknown_accountant_suggests_the_close_choice(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"link\.privacy\.accountant: 'rpd' is not one of prv, rdp; did you mean"):
        _load(tmp_path, {"link": {"privacy": {"epsilon": 8, "accountant": "rpd"}}})


def test_override_sets_a_privacy_key() -> None:
    raw: dict = {"link": {}}
    apply_override(raw, "link.privacy.epsilon=1e1")
    assert raw == {"link": {"privacy": {"epsilon": 10.0}}}


def test_dp_link_after_a_non_dp_link_is_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"c\.yaml: links\[1\]\.init: link 2 \(test_resnet\+gn.*set init: scratch"):
        _load(tmp_path, {"links": [{}, {"privacy": DP}]})


def test_dp_link_after_a_non_dp_link_loads_with_scratch_init(tmp_path: Path) -> None:
    cfg = _load(tmp_path, {"links": [{}, {"privacy": DP, "init": "scratch"}]})
    assert cfg.link_settings(0).privacy is None and cfg.link_settings(1).privacy is not None


def test_privacy_in_logits_mode_past_link_1_is_refused(tmp_path: Path) -> None:
    extra = {"chain": {"mode": "logits"}, "data": {"proxy": "synthetic"}, "link": {"privacy": DP}}
    with pytest.raises(ConfigError, match=r"link\.privacy: DP-SGD .* logits mode"):
        _load(tmp_path, extra)


def test_link_mapping_round_trips_as_flat_scalars() -> None:
    from flwr.app import ConfigRecord

    settings = _settings(privacy=PrivacySettings(epsilon=3.0, delta=1e-6, max_grad_norm=0.5, accountant="rdp"))
    values = link_to_mapping(settings)
    assert values["privacy.epsilon"] == 3.0 and values["privacy.accountant"] == "rdp" and "privacy" not in values
    record = ConfigRecord(values)  # raises on anything a ConfigRecord cannot hold
    assert link_from_mapping(dict(record)) == settings


def test_link_mapping_without_privacy_has_no_privacy_keys() -> None:
    values = link_to_mapping(_settings())
    assert not any(k.startswith("privacy") for k in values)
    assert link_from_mapping(values).privacy is None


def test_unknown_privacy_key_in_a_run_config_is_rejected() -> None:
    values = {**link_to_mapping(_settings(privacy=PrivacySettings(epsilon=3.0))), "privacy.epsilom": 1.0}
    with pytest.raises(ConfigError, match=r"site: link\.privacy: unknown key 'epsilom'"):
        link_from_mapping(values, source="site")


# --- the GroupNorm variant --------------------------------------------------------------------------


def test_group_norm_variant_has_no_batch_norm_and_the_same_parameter_names() -> None:
    plain, variant = create_model("test_efficientnet", 4, 1), create_model("test_efficientnet+gn", 4, 1)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in variant.modules())
    assert [n for n, _ in variant.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert not any("running" in k for k in variant.state_dict())


def test_unknown_base_architecture_with_suffix_is_a_config_error() -> None:
    check_arch("test_resnet+gn")
    with pytest.raises(ConfigError, match=r"unknown timm architecture 'test_resnat\+gn'; did you mean 'test_resnet'"):
        check_arch("test_resnat+gn")


# --- training and accounting ----------------------------------------------------------------------


def test_dp_link_spends_at_most_its_epsilon(dp_result) -> None:
    spent = dp_result.privacy
    assert spent is not None and 0.0 < spent.epsilon <= 8.0
    assert spent.delta == 1e-5 and spent.target_epsilon == 8.0 and spent.max_grad_norm == 1.0
    assert spent.noise_multiplier > 0 and spent.steps == 2 * 5 and spent.sample_rate == pytest.approx(1 / 5)


def test_privacy_spent_reads_as_a_mapping_of_numbers(dp_result) -> None:
    values = dict(dp_result.privacy)
    assert values["epsilon"] == dp_result.privacy.epsilon and values["steps"] == 10
    names = {"epsilon", "delta", "target_epsilon", "max_grad_norm", "noise_multiplier", "sample_rate", "steps"}
    assert set(values) == names
    assert all(isinstance(v, (int, float)) for v in values.values())


def test_dp_link_records_the_group_norm_architecture(dp_result) -> None:
    assert dp_result.arch == "test_resnet+gn" and dp_result.init == "scratch"


def test_dp_state_has_plain_keys_and_loads_back(dp_result, site) -> None:
    assert not any(k.startswith("_module") for k in dp_result.state)
    model = model_from_state(dp_result.arch, dp_result.state, SPEC, CPU)
    assert evaluate(model, site.val, 4, CPU) == dp_result.val


def test_dp_link_logs_the_epsilon_spent(site, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="weckd.chain.link"):
        train_link(_settings(privacy=_rdp()), site, SPEC, seed=1, device=CPU, label="link 1/2 site A")
    assert any(r.levelno == logging.INFO and "link 1/2 site A privacy: epsilon=" in r.message for r in caplog.records)


def test_same_seed_gives_identical_dp_weights(site) -> None:
    a = train_link(_settings(privacy=_rdp()), site, SPEC, seed=7, device=CPU)
    b = train_link(_settings(privacy=_rdp()), site, SPEC, seed=7, device=CPU)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_dp_link_learns_above_chance() -> None:
    """48 px: GroupNorm nets barely train on 32-px images (1×1 maps at the end), with or without DP.

    epsilon=1000 keeps Poisson sampling, clipping and noise (σ≈0.1) in play at unit-test size; at
    single-digit ε DP-SGD needs thousands of images, not the 300 a unit test can afford.
    """
    spec = ImageSpec(("c0", "c1", "c2", "c3"), 48, 1)
    site = make_site("A", read_labelled("synthetic", spec, synthetic_args=(400, 0.3, 5)), 0.25, seed=1)
    settings = LinkSettings(
        arch="test_efficientnet", epochs=3, batch_size=32, optimizer="sgd", lr=0.2, weight_decay=5e-4,
        privacy=_rdp(1000.0, max_grad_norm=5.0)
    )
    result = train_link(settings, site, spec, seed=1, device=CPU)
    assert result.privacy is not None and result.privacy.noise_multiplier > 0.05
    assert result.val.accuracy > 0.45  # chance: 0.25


def test_empty_poisson_batches_take_noise_only_steps(site, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = privacy.PrivateTraining.noise_only_step
    monkeypatch.setattr(privacy.PrivateTraining, "noise_only_step", lambda self: (calls.append(1), original(self)))
    result = train_link(_settings(batch_size=1, privacy=_rdp()), site, SPEC, seed=3, device=CPU)
    assert calls and result.privacy is not None and result.privacy.steps == 72
    assert result.privacy.epsilon <= 8.0


def test_steps_never_exceed_the_planned_budget() -> None:
    batches = [(torch.arange(2),)] * 5
    private = privacy.PrivateTraining(None, None, None, batches, 0.2, 12, _rdp())
    assert sum(len(list(private.batches())) for _ in range(3)) == 12


# --- warm start and teachers ----------------------------------------------------------------------


def test_dp_link_warm_starts_from_a_dp_predecessor(dp_result, site) -> None:
    teacher = Teacher(dp_result.arch, dp_result.state)
    result = train_link(_settings(privacy=_rdp()), site, SPEC, seed=2, device=CPU, teacher=teacher)
    assert result.init == "predecessor" and result.epochs[0].kd > 0


def test_dp_link_refuses_a_batch_norm_predecessor(site) -> None:
    teacher = Teacher("test_resnet", state_of(create_model("test_resnet", 4, 1)))
    with pytest.raises(LinkError, match=r"link: init=predecessor: .*BatchNorm.*set init: scratch"):
        train_link(_settings(privacy=_rdp()), site, SPEC, seed=2, device=CPU, teacher=teacher)


def test_dp_link_from_scratch_distils_from_a_batch_norm_teacher(site) -> None:
    teacher = Teacher("test_resnet", state_of(create_model("test_resnet", 4, 1)))
    result = train_link(_settings(init="scratch", privacy=_rdp()), site, SPEC, seed=2, device=CPU, teacher=teacher)
    assert result.init == "scratch" and result.epochs[0].kd > 0


def test_non_dp_link_refuses_a_group_norm_predecessor(dp_result, site) -> None:
    with pytest.raises(LinkError, match=r"init=predecessor: .*GroupNorm"):
        train_link(_settings(), site, SPEC, seed=2, device=CPU, teacher=Teacher(dp_result.arch, dp_result.state))


def test_dp_link_leaves_unlabelled_images_out_with_a_warning(dp_result, caplog: pytest.LogCaptureFixture) -> None:
    labelled = read_labelled("synthetic", SPEC, synthetic_args=(96, 1.0, 4))
    site = make_site("A", labelled, 0.25, 0, read_unlabelled("synthetic", SPEC, synthetic_args=(32, 1.0, 8)))
    teacher = Teacher(dp_result.arch, dp_result.state)
    with caplog.at_level(logging.WARNING):
        result = train_link(_settings(privacy=_rdp()), site, SPEC, seed=2, device=CPU, teacher=teacher)
    assert result.samples["unlabelled"] == 0
    assert "32 unlabelled images are not used" in caplog.text


# --- results --------------------------------------------------------------------------------------


def _run(*results) -> ChainRun:
    run = ChainRun(ChainConfig())
    for i, r in enumerate(results):
        run.links.append(Row("link", f"link {i + 1}", "A", r.arch, r.init, r, r.val))
    return run


def test_results_and_table_show_epsilon_for_dp_links(dp_result, site) -> None:
    plain = train_link(_settings(), site, SPEC, seed=1, device=CPU)
    run = _run(plain, dp_result)
    links = results_json(run)["links"]
    assert "privacy" not in links[0]
    assert links[1]["privacy"]["epsilon"] == dp_result.privacy.epsilon and links[1]["privacy"]["delta"] == 1e-5
    table = format_table(run).splitlines()
    assert table[0].split()[-1] == "epsilon"
    assert table[2].split()[-1] == "-" and table[3].split()[-1] == f"{dp_result.privacy.epsilon:.2f}"


def test_table_without_dp_links_has_no_epsilon_column(site) -> None:
    run = _run(train_link(_settings(), site, SPEC, seed=1, device=CPU))
    assert "epsilon" not in format_table(run)
