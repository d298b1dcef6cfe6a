"""Pretrained starting weights without a hub: a timm checkpoint file a test writes, named by its SHA-256.

In-process, ``link.weights`` is the file and ``link.pretrained`` (optional) its SHA-256. In a federation the
coordinator names only the SHA-256; each site maps it to its own file (``pretrained:`` in its config) and
refuses a name it does not hold or a file that does not hash to it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from weckd.chain.config import load_config
from weckd.chain.errors import ConfigError
from weckd.chain.models import create_model
from weckd.chain.protocol import Reason, Refused
from weckd.client.admit import admit_train
from weckd.client.runstate import RunState
from weckd.client.site import SiteConfig, load_site_config, pretrained_file

from .helpers import TINY_CHAIN, deep_merge, write_yaml
from .test_site_policy import _data, _train_config


def _checkpoint(tmp_path: Path, fmt: str = "safetensors") -> tuple[Path, str, dict[str, torch.Tensor]]:
    """A timm checkpoint as timm publishes it: the ImageNet head (1000 classes), 3 input channels."""
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in timm.create_model("test_resnet", num_classes=1000).state_dict().items()}
    path = tmp_path / f"test_resnet.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest(), state


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_a_timm_checkpoint_loads_for_its_name_with_a_new_head(tmp_path: Path, fmt: str) -> None:
    path, _, state = _checkpoint(tmp_path, fmt)
    model = create_model("test_resnet", num_classes=4, in_chans=3, weights=str(path))
    own = model.state_dict()
    loaded = [k for k in state if k in own and own[k].shape == state[k].shape]
    assert len(loaded) > 0.9 * len(state)  # everything but the classifier
    assert all(torch.equal(own[k], state[k]) for k in loaded)
    head = next(k for k in state if k not in loaded)
    assert own[head].shape[0] == 4  # the new 4-class head, from random weights


def test_in_process_the_named_sha256_must_be_the_weights_file(tmp_path: Path) -> None:
    path, sha, _ = _checkpoint(tmp_path)
    raw = deep_merge(TINY_CHAIN, {"data": {"channels": 3}, "link": {"weights": str(path), "pretrained": sha}})
    assert load_config(write_yaml(tmp_path / "ok.yaml", raw)).link.pretrained == sha
    wrong = deep_merge(raw, {"link": {"pretrained": "0" * 64}})
    with pytest.raises(ConfigError, match=f"has SHA-256 {sha}, not link.pretrained 0000"):
        load_config(write_yaml(tmp_path / "wrong.yaml", wrong))
    with pytest.raises(ConfigError, match="is not a SHA-256"):
        load_config(write_yaml(tmp_path / "bad.yaml", deep_merge(raw, {"link": {"pretrained": "sha256:abc"}})))


def test_a_site_maps_the_sha256_to_its_own_file_and_refuses_anything_else(tmp_path: Path) -> None:
    path, sha, _ = _checkpoint(tmp_path)
    site = {"site": "B", "data": {"sites": {"B": "synthetic"}, "test": "synthetic"}}
    cfg_path = write_yaml(tmp_path / "site-B.yaml", {**site, "pretrained": {sha: path.name}})
    cfg = load_site_config(cfg_path)
    assert pretrained_file(cfg, sha, "site B") == str(path)
    with pytest.raises(Refused) as err:
        pretrained_file(cfg, "1" * 64, "site B")
    assert err.value.reason is Reason.PRETRAINED_UNKNOWN
    path.write_bytes(path.read_bytes() + b"\0")  # the file changed since the config named it
    with pytest.raises(Refused) as err:
        pretrained_file(cfg, sha, "site B")
    assert err.value.reason is Reason.PRETRAINED_MISMATCH and str(path) in str(err.value)
    with pytest.raises(ConfigError, match="is not a SHA-256"):
        load_site_config(write_yaml(tmp_path / "bad.yaml", {**site, "pretrained": {"resnet18": "x.pth"}}))


def test_a_train_request_naming_pretrained_weights_trains_from_the_sites_file(tmp_path: Path) -> None:
    path, sha, _ = _checkpoint(tmp_path)
    cfg = SiteConfig(site="B", state_dir=str(tmp_path / "state"), pretrained={sha: str(path)})
    runs = RunState(cfg.state_dir, cfg.policy)
    link = {"arch": "test_resnet", "epochs": 2, "batch_size": 16, "lr": 0.05, "pretrained": sha}
    ok = admit_train(cfg, _data(), None, runs, _train_config(link=0, schedule=["B", "A", "C"],
                                                                **{"seal-for": "weights:A"}), link, False)
    assert ok.settings.weights == str(path) and ok.link_config["pretrained"] == sha
    with pytest.raises(Refused) as err:
        admit_train(cfg, _data(), None, runs, _train_config(link=0, schedule=["B", "A", "C"],
                                                           **{"seal-for": "weights:A"}),
                    {**link, "pretrained": "2" * 64}, False)
    assert err.value.reason is Reason.PRETRAINED_UNKNOWN
    with pytest.raises(Refused) as err:  # a path where a hash belongs: refused before any lookup
        admit_train(cfg, _data(), None, runs, _train_config(link=0, schedule=["B", "A", "C"],
                                                           **{"seal-for": "weights:A"}),
                    {**link, "pretrained": "../../etc/passwd"}, False)
    assert err.value.reason is Reason.BAD_REQUEST and "passwd" not in str(err.value)


def test_the_coordinator_names_weights_by_sha256_never_by_a_local_path(tmp_path: Path) -> None:
    from .fake_grid import federation

    with pytest.raises(ConfigError, match="link.weights: does nothing at the coordinator: it names a file on the "
                                          "coordinator"):
        federation(tmp_path, ["A", "B"], link={"arch": "test_resnet", "weights": "w.safetensors"})


def test_a_site_with_a_wrong_pretrained_copy_fails_its_check_in_one_line(tmp_path: Path) -> None:
    from weckd.client.cli import check_pretrained_files

    path, sha, _ = _checkpoint(tmp_path)
    cfg = SiteConfig(site="B", source="site-B.yaml", pretrained={sha: str(path)})
    check_pretrained_files(cfg)  # the right copy: nothing to say
    path.write_bytes(b"not the checkpoint")
    with pytest.raises(ConfigError, match=f"site-B.yaml: pretrained: {path} has SHA-256 [0-9a-f]{{64}}, not {sha}"):
        check_pretrained_files(cfg)
