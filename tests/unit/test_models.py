"""Models by timm name, local weights files, and strict state loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from weckd.chain.errors import ConfigError, PayloadError
from weckd.chain.models import check_arch, create_model, load_state, state_of


def test_unknown_arch_lists_close_matches() -> None:
    with pytest.raises(ConfigError, match=r"unknown timm architecture 'resnet19'; did you mean 'resnet1"):
        check_arch("resnet19")


def test_model_has_requested_classes_and_channels() -> None:
    model = create_model("test_resnet", num_classes=3, in_chans=1)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_file_loads(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    source = create_model("test_resnet", 3, 1)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(state_of(source), str(path))
    else:
        torch.save(state_of(source), path)
    torch.manual_seed(2)
    loaded = create_model("test_resnet", 3, 1, weights=str(path))
    for k, v in state_of(source).items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_weights_with_other_head_keep_backbone(tmp_path: Path) -> None:
    source = create_model("test_resnet", 10, 1)
    save_file(state_of(source), str(tmp_path / "w.safetensors"))
    model = create_model("test_resnet", 2, 1, weights=str(tmp_path / "w.safetensors"))
    assert model.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 2)


def test_missing_weights_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="weights file not found"):
        create_model("test_resnet", 2, 1, weights=str(tmp_path / "none.safetensors"))


def test_load_state_rejects_wrong_shapes_without_partial_load() -> None:
    model = create_model("test_resnet", 2, 1)
    before = state_of(model)
    other = state_of(create_model("test_resnet", 5, 1))
    with pytest.raises(PayloadError, match="has shape"):
        load_state(model, other, "link 2")
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v)


def test_load_state_rejects_other_architecture() -> None:
    model = create_model("test_resnet", 2, 1)
    with pytest.raises(PayloadError, match="do not fit the architecture"):
        load_state(model, state_of(create_model("test_efficientnet", 2, 1)), "link 2")
