"""Models: any timm architecture by name, from random weights or a local weights file.

Nothing is fetched from a hub at run time: hospitals are often offline, and a download would be a
hidden dependency of the result.

An architecture name may end in ``+gn`` (e.g. ``resnet18+gn``): the timm model with every BatchNorm
replaced by GroupNorm (``gcd(32, channels)`` groups, as Opacus' ``ModuleValidator.fix`` does). That
is the variant differentially private links train (BatchNorm mixes the samples of a batch, which
DP-SGD cannot account for); the suffix travels with the weights so any site rebuilds the same model.
"""

from __future__ import annotations

import difflib
import logging
import math
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from timm.layers import GroupNormAct

from .archnames import GROUP_NORM_SUFFIX, group_norm_arch, split_arch  # noqa: F401 (re-exported)
from .errors import ConfigError, PayloadError

log = logging.getLogger(__name__)

def is_arch(name: str) -> bool:
    """Whether ``name`` is a timm architecture, optionally with the ``+gn`` suffix."""
    return timm.is_model(split_arch(name)[0])


def check_arch(name: str, where: str = "link.arch") -> None:
    """Fail with close matches when ``name`` is not a timm architecture (``+gn`` allowed)."""
    base, _ = split_arch(name)
    if timm.is_model(base):
        return
    close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; see timm.list_models()"
    raise ConfigError(f"{where}: unknown timm architecture {name!r}{hint}")


def create_model(arch: str, num_classes: int, in_chans: int, weights: str | None = None) -> torch.nn.Module:
    """Build ``arch`` with random weights, then load a local weights file if one is given."""
    check_arch(arch)
    base, group_norm = split_arch(arch)
    model = timm.create_model(base, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    if group_norm:
        model = to_group_norm(model)
    if weights is not None:
        load_backbone(model, Path(weights))
    return model


def to_group_norm(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every BatchNorm of ``model`` in place by GroupNorm with ``gcd(32, channels)`` groups.

    timm's fused norm+activation layers (``BatchNormAct2d``) become ``GroupNormAct`` with the same
    activation and dropout, so the network computes the same function apart from the normalisation.
    Parameter names stay (``bn1.weight``, ``bn1.bias``); the running statistics disappear.
    """
    for name, child in list(model.named_children()):
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            setattr(model, name, _group_norm_like(child))
        else:
            to_group_norm(child)
    return model


def _group_norm_like(bn: torch.nn.modules.batchnorm._BatchNorm) -> torch.nn.Module:
    channels = bn.num_features
    groups = math.gcd(32, channels)
    act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)
    if isinstance(act, torch.nn.Module) and isinstance(drop, torch.nn.Module):
        fused = GroupNormAct(channels, num_groups=groups, eps=bn.eps, affine=bn.affine, apply_act=False)
        fused.act, fused.drop = act, drop
        return fused
    return torch.nn.GroupNorm(groups, channels, eps=bn.eps, affine=bn.affine)


def load_backbone(model: torch.nn.Module, path: Path) -> None:
    """Load a local pretrained file, skipping the classifier when its shape differs (new classes)."""
    if not path.is_file():
        raise ConfigError(f"link.weights: {path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            state: dict[str, torch.Tensor] = load_file(str(path))
        else:
            state = dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # any decoder failure is a bad file, reported as such
        raise ConfigError(f"link.weights: {path}: cannot read weights: {err}") from err
    nested = state.get("state_dict")
    if isinstance(nested, dict):
        state = nested
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    dropped = sorted(set(state) - set(usable))
    if not usable:
        raise ConfigError(f"link.weights: {path}: no tensor matches the architecture; is it the right model?")
    if dropped:
        log.warning("%s: %d tensor(s) not loaded (shape or name differs), e.g. %s", path, len(dropped), dropped[0])
    model.load_state_dict(usable, strict=False)


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached, contiguous CPU copy of the model's state (safe to serialise or relay)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a complete state dict, checking names and shapes first (no partial load)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        name = (missing or extra)[0]
        raise PayloadError(
            f"{where}: weights do not fit the architecture "
            f"({len(missing)} missing, {len(extra)} unexpected, e.g. {name!r})"
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise PayloadError(f"{where}: tensor {k!r} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict({k: state[k].to(own[k].dtype) for k in own})


def pick_device(name: str) -> torch.device:
    """'auto' → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device: 'cuda' requested but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)
