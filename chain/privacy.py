"""Differentially private training of one link: DP-SGD with Opacus.

A relayed model is a white-box target for membership inference, so a site may train its link with
(ε, δ)-differential privacy for its labelled training images::

    link:                      # every link; or one entry of links: for that link only
      privacy: {epsilon: 8.0, delta: 1e-5, max_grad_norm: 1.0}   # accountant: prv (default) | rdp

Only ``epsilon`` is required. A ``links:`` entry overrides the ``link:`` mapping key by key, and
``privacy: null`` there turns it off for that link. Absent or ``null`` means ordinary training,
exactly as without this module. In a federation the settings travel in the link's ConfigRecord as
``privacy.epsilon``, ``privacy.delta``, ``privacy.max_grad_norm`` and ``privacy.accountant``
(:func:`chain.config.link_to_mapping`).

What a DP link does:

* It trains the GroupNorm variant of ``link.arch``, named ``<arch>+gn`` (:mod:`chain.models`):
  BatchNorm mixes the samples of a batch, which DP-SGD cannot account for. The name travels with
  the weights (LinkResult.arch, payloads, model cards), so ``model_from_state`` rebuilds the same
  network anywhere; the returned state has the plain keys (no Opacus ``_module.`` prefix).
  GroupNorm needs room: timm models end in 1×1 maps on 32-px images, where the GroupNorm variants
  barely train even without DP; 48 px and up are fine.
* Opacus' ``make_private_with_epsilon`` picks the noise multiplier that spends at most ``epsilon``
  at ``delta`` over ``link.epochs`` epochs of Poisson-sampled batches (expected size
  ``link.batch_size``), each sample's gradient clipped to ``max_grad_norm``. The accountant
  (``prv``, the default and tighter, or ``rdp``, the classic bound and several times faster to
  compute) reports the ε actually spent: LinkResult.privacy and one INFO line per link. An empty
  Poisson batch still takes a noise-only step, and a link never takes more steps than the noise
  was planned for.
* Per-sample gradients come from expanded weights, which tolerate timm's in-place operations
  (ResNets); architectures it cannot trace (ViT, ConvNeXt, DenseNet) use Opacus' hooks instead.

ε is per link. A site that trains several links on the same images (``chain.cycles`` > 1, or
baselines) spends the composition of their ε on that data (at most their sum).

Warm start (``init: predecessor``) loads the predecessor's tensors, so both links need the same
normalisation. A chain whose links all use privacy (or ``arch: <arch>+gn``) warm-starts as usual.
A DP link right after a non-DP link, or a non-DP link right after a DP one, is refused: a
ConfigError when the config is loaded (naming the link and the fix: ``init: scratch`` for that
link, or the same normalisation on both), a LinkError if such a teacher reaches training anyway.
There is no silent fallback to scratch: a DP link that quietly lost its warm start would show up
in the results as a cost of privacy. Architectures the researcher chose to differ keep the usual
behaviour (a warning, then scratch).

The teacher runs in inference only. It is fixed while this link trains, so its logits on each
sample are part of that sample's loss and need no noise of their own; a DP teacher (``+gn``)
distils into a non-DP student like any other model.

Not covered by the guarantee: the site's unlabelled images (not used on a DP link; a WARNING says
so), logits mode past link 1 (refused: its proxy-set distillation runs outside DP-SGD), the
validation metrics and the per-epoch training losses a link reports (computed on the site's data
without noise). Sampling and noise come from generators seeded by the link seed, so runs are
reproducible; they are not a cryptographic RNG (Opacus' ``secure_mode`` needs torchcsprng), which a
production release of a DP model should state.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .archnames import student_arch, warm_start_mismatch  # noqa: F401 (re-exported)
from .errors import LinkError

if TYPE_CHECKING:
    from .config import LinkSettings, PrivacySettings

log = logging.getLogger(__name__)

# Opacus warnings that say nothing to a user of this module (see the module docstring on secure_mode)
_QUIET = ("Secure RNG turned off", "Optimal order is the largest alpha", "Optimal order is the smallest alpha")


@dataclass(frozen=True)
class PrivacySpent(Mapping[str, float]):
    """What one DP link spent: ε at δ, and the mechanism that gave it.

    Also a read-only mapping of these numbers (``dict(spent)``), the shape results files and a
    Flower MetricRecord take.
    """

    epsilon: float
    delta: float
    target_epsilon: float
    max_grad_norm: float
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __getitem__(self, key: str) -> float:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def _names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self))


class PrivateTraining:
    """A student made private: the module to call, the DP optimizer, Poisson batches, the accountant."""

    def __init__(
        self,
        engine: Any,
        model: Any,
        optimizer: Any,
        loader: Any,
        sample_rate: float,
        budget: int,
        settings: PrivacySettings,
    ) -> None:
        self.engine, self.model, self.optimizer, self.loader = engine, model, optimizer, loader
        self.settings, self.sample_rate = settings, sample_rate
        self.steps_per_epoch = len(loader)
        self.budget = budget  # the step count the noise multiplier was computed for
        self.steps = 0

    def batches(self) -> Iterator[torch.Tensor]:
        """One epoch of Poisson-sampled index batches (possibly empty), never past the planned steps."""
        for (idx,) in self.loader:
            if self.steps >= self.budget:
                return
            self.steps += 1
            yield idx

    def noise_only_step(self) -> None:
        """The step of an empty Poisson batch: no gradient, only noise, counted by the accountant."""
        self.optimizer.zero_grad(set_to_none=True)
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    p.grad_sample = p.new_zeros((0, *p.shape))  # what Opacus makes of an empty batch
        self.optimizer.step()

    def spent(self) -> PrivacySpent:
        s = self.settings
        with warnings.catch_warnings():
            _quiet()
            epsilon = float(self.engine.get_epsilon(s.delta))
        noise = float(self.optimizer.noise_multiplier)
        return PrivacySpent(epsilon, s.delta, s.epsilon, s.max_grad_norm, noise, self.sample_rate, self.steps)

    def close(self) -> None:
        """Detach Opacus from the student (hooks, per-sample gradient attributes)."""
        self.model.cleanup()


@functools.lru_cache(maxsize=64)
def noise_multiplier(epsilon: float, delta: float, sample_rate: float, epochs: int, accountant: str) -> float:
    """The noise that spends ``epsilon`` at ``delta`` over ``epochs`` (as ``make_private_with_epsilon``
    finds it). The search takes seconds (RDP: ~7 s on 2 cores); a warm site executor does it once for a
    link's settings, not again at every cycle."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                      epochs=epochs, accountant=accountant))


def make_private(
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    settings: LinkSettings,
    n_train: int,
    sample: torch.Tensor,
    gen: torch.Generator,
    label: str,
) -> PrivateTraining:
    """Wrap ``student`` and ``optimizer`` for DP-SGD over ``n_train`` labelled images.

    ``sample`` is one input batch of the right shape (to pick how per-sample gradients are computed);
    ``gen`` drives the Poisson sampling and seeds the noise.
    """
    from opacus import PrivacyEngine  # imported here: a second of start-up that non-DP runs skip
    from opacus.validators.errors import UnsupportedModuleError

    p = settings.privacy
    assert p is not None
    if p.delta >= 1.0 / max(n_train, 1):
        log.warning("%s: privacy.delta=%g is not below 1/%d training images: a weak guarantee", label, p.delta, n_train)
    mode = _grad_sample_mode(student, sample, label)
    if mode == "hooks":
        _no_inplace(student)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.arange(n_train)), batch_size=settings.batch_size, generator=gen
    )
    # Opacus plans the noise for int(epochs / sample_rate) steps, which rounding can put one below
    # epochs × batches per epoch: never take more steps than planned
    sample_rate = 1.0 / len(loader)
    budget = int(settings.epochs / sample_rate)
    noise_gen = torch.Generator(sample.device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    try:
        with warnings.catch_warnings():
            _quiet()
            engine = PrivacyEngine(accountant=p.accountant)
            model, dp_optimizer, dp_loader = engine.make_private(
                module=student,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=noise_multiplier(p.epsilon, p.delta, sample_rate, settings.epochs,
                                                  engine.accountant.mechanism()),
                max_grad_norm=p.max_grad_norm,
                poisson_sampling=True,
                grad_sample_mode=mode,
                noise_generator=noise_gen,
            )
    except UnsupportedModuleError as err:
        raise LinkError(f"{label}: the model cannot train with DP-SGD: {err}") from err
    except ValueError as err:
        if "privacy budget" not in str(err):  # get_noise_multiplier: "The privacy budget is too low."
            raise
        raise LinkError(
            f"{label}: privacy.epsilon={p.epsilon} at delta={p.delta} is out of reach over {settings.epochs} "
            f"epochs of {n_train} images ({err}); raise epsilon or lower link.epochs"
        ) from err
    return PrivateTraining(engine, model, dp_optimizer, dp_loader, sample_rate, budget, p)


def _grad_sample_mode(student: torch.nn.Module, sample: torch.Tensor, label: str) -> str:
    """Expanded weights where the model allows it, else Opacus' hooks; fail with both reasons."""
    from opacus.grad_sample.utils import wrap_model

    reasons = []
    devices = [sample.device] if sample.device.type == "cuda" else []
    for mode in ("ew", "hooks"):
        probe = copy.deepcopy(student).train()
        if mode == "hooks":
            _no_inplace(probe)
        try:
            with torch.random.fork_rng(devices=devices):
                wrap_model(probe, grad_sample_mode=mode)(sample).float().sum().backward()
            return mode
        except (RuntimeError, NotImplementedError, ValueError) as err:
            reasons.append(f"{mode}: {str(err).splitlines()[0]}")
    raise LinkError(f"{label}: no per-sample gradients for this architecture ({'; '.join(reasons)}); pick another arch")


def _no_inplace(model: torch.nn.Module) -> None:
    """Opacus' backward hooks forbid in-place activations on a hooked layer's output."""
    for module in model.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False  # type: ignore[assignment]


def _quiet() -> None:
    for message in _QUIET:
        warnings.filterwarnings("ignore", message=message)
