"""The config loader: typed values, and one line naming file and key for every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
from weckd.chain.config import load_config
from weckd.chain.errors import ConfigError

from .helpers import TINY_CHAIN, deep_merge, write_yaml


def _load(tmp_path: Path, extra: dict, overrides: tuple[str, ...] = ()):
    path = write_yaml(tmp_path / "c.yaml", deep_merge(TINY_CHAIN, extra))
    return load_config(path, overrides)


def test_valid_config_builds_frozen_typed_settings(tmp_path: Path) -> None:
    cfg = _load(tmp_path, {"link": {"lr": 1}})
    assert cfg.link.lr == 1.0 and isinstance(cfg.link.lr, float)
    assert cfg.chain.order == ("A", "B")
    assert cfg.n_links == 2
    with pytest.raises(AttributeError):
        cfg.link.lr = 2.0  # type: ignore[misc]


def test_unknown_key_suggests_the_close_match(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"c\.yaml: link: unknown key 'temprature'; did you mean 'temperature'\?"):
        _load(tmp_path, {"link": {"temprature": 3}})


def test_wrong_type_names_file_and_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"c\.yaml: link\.epochs: expected an integer, got a string 'ten'"):
        _load(tmp_path, {"link": {"epochs": "ten"}})


def test_boolean_is_not_an_integer(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"link\.epochs: expected an integer"):
        _load(tmp_path, {"link": {"epochs": True}})


def test_out_of_range_value_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"link\.alpha: 1\.5 is above the maximum 1\.0"):
        _load(tmp_path, {"link": {"alpha": 1.5}})


def test_choice_typo_suggests_the_close_choice(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"chain\.mode: 'logit' is not one of weights, logits; did you mean 'logits'\?"
    ):
        _load(tmp_path, {"chain": {"mode": "logit"}})


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config(tmp_path / "nope.yaml")
    assert "\n" not in str(info.value)


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("link:\n  epochs: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+ column \d+: YAML syntax error"):
        load_config(path)


def test_per_link_overrides_merge_with_defaults(tmp_path: Path) -> None:
    cfg = _load(tmp_path, {"links": [{"arch": "test_efficientnet"}, {"epochs": 2}]})
    assert cfg.link_settings(0).arch == "test_efficientnet"
    assert cfg.link_settings(0).epochs == 1
    assert cfg.link_settings(1).arch == "test_resnet" and cfg.link_settings(1).epochs == 2


def test_more_link_entries_than_links_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="3 entries but the chain has 2 links"):
        _load(tmp_path, {"links": [{}, {}, {}]})


def test_cycles_repeat_the_order(tmp_path: Path) -> None:
    cfg = _load(tmp_path, {"chain": {"cycles": 2}})
    assert [cfg.site_of(k) for k in range(cfg.n_links)] == ["A", "B", "A", "B"]


def test_set_override_wins_over_yaml(tmp_path: Path) -> None:
    cfg = _load(tmp_path, {}, ("link.epochs=7", "chain.mode=weights"))
    assert cfg.link.epochs == 7


def test_set_override_is_validated_like_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"link\.lr: -1\.0 must be greater than 0\.0"):
        _load(tmp_path, {}, ("link.lr=-1",))


def test_relative_data_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    cfg = _load(tmp_path, {"data": {"dataset": "data/set.npz"}})
    assert cfg.data.dataset == str(tmp_path / "data" / "set.npz")


def test_logits_mode_needs_a_proxy_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.proxy: logits mode needs a proxy set"):
        _load(tmp_path, {"chain": {"mode": "logits"}})


def test_per_site_data_needs_a_path_for_every_site(tmp_path: Path) -> None:
    extra = {"data": {"dataset": None, "sites": {"A": "a"}, "test": "t"}}
    with pytest.raises(ConfigError, match=r"data\.sites: no data path for site\(s\) B"):
        _load(tmp_path, extra)


def test_lr_decay_scales_later_links_only(tmp_path: Path) -> None:
    cfg = _load(tmp_path, {"chain": {"lr_decay": 0.5}, "link": {"lr": 0.08}})
    assert [cfg.link_settings(k).lr for k in range(2)] == [0.08, 0.04]
    assert cfg.link_settings(1, decay=False).lr == 0.08


def test_optimizer_defaults_to_adamw_and_each_optimizer_brings_its_own_lr_and_weight_decay(tmp_path: Path) -> None:
    plain = {k: v for k, v in TINY_CHAIN["link"].items() if k not in ("optimizer", "lr")}

    def _load(tmp_path: Path, extra: dict, overrides: tuple[str, ...] = ()):  # TINY_CHAIN without its optimizer
        raw = deep_merge({**TINY_CHAIN, "link": plain}, extra)
        return load_config(write_yaml(tmp_path / "c.yaml", raw), overrides)

    cfg = _load(tmp_path, {})
    assert (cfg.link.optimizer, cfg.link.lr, cfg.link.weight_decay) == ("adamw", 1e-3, 0.05)
    sgd = _load(tmp_path, {}, ("link.optimizer=sgd",))
    assert (sgd.link.lr, sgd.link.weight_decay) == (0.05, 5e-4)
    adam = _load(tmp_path, {"link": {"optimizer": "adam"}})
    assert (adam.link.lr, adam.link.weight_decay) == (1e-3, 0.0)
    mine = _load(tmp_path, {"link": {"optimizer": "sgd", "lr": 0.2}})  # what a config names is kept
    assert (mine.link.lr, mine.link.weight_decay) == (0.2, 5e-4)
    # a per-link optimizer brings its own defaults, not the chain's; one without an optimizer inherits
    per_link = _load(tmp_path, {"links": [{"optimizer": "sgd"}, {"epochs": 2}]})
    assert [(k.optimizer, k.lr, k.weight_decay) for k in per_link.links] == [("sgd", 0.05, 5e-4),
                                                                            ("adamw", 1e-3, 0.05)]
    with pytest.raises(ConfigError, match="link.optimizer"):
        _load(tmp_path, {"link": {"optimizer": "lion"}})
