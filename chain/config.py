"""The typed chain configuration: YAML in, frozen dataclasses out.

Unknown keys, wrong types and out-of-range values are rejected as one line naming the file and
the key. Relative paths are resolved against the config file's folder (one function,
:func:`chain.schema.resolve_path`). The same dataclasses are rebuilt from the run config a federation sends
to its sites (:func:`link_from_mapping`).

Each role has its own typed view: :class:`ChainConfig` for ``weckd chain`` (every site's data in one
process), :class:`FederatedChain` for the chain part of a coordinator's ``federation.yaml`` (what travels and
what the sites share; ``weckd.server.settings``) and ``weckd.client.site.SiteConfig`` for a site. A key that
does nothing in a role is refused there with one line saying where it belongs.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from .archnames import student_arch, warm_start_mismatch
from .errors import ConfigError, shown
from .schema import Origin, build


def _m(**meta: Any) -> Any:
    return meta


@dataclass(frozen=True)
class PrivacySettings:
    """Differential privacy of one link's training (DP-SGD, see :mod:`chain.privacy`)."""

    epsilon: float = field(metadata=_m(gt=0.0, max=1000.0))
    delta: float = field(default=1e-5, metadata=_m(gt=0.0, lt=1.0))
    max_grad_norm: float = field(default=1.0, metadata=_m(gt=0.0, max=1000.0))
    # Opacus accountant: prv (tighter ε, the default) or rdp (the classic bound, much faster to compute)
    accountant: str = field(default="prv", metadata=_m(choices=("prv", "rdp")))


@dataclass(frozen=True)
class LinkSettings:
    """How one link of the chain trains its student."""

    arch: str = "test_resnet"
    epochs: int = field(default=10, metadata=_m(min=1, max=10_000))
    # lr and weight_decay, when a config leaves them out, are the optimizer's own (OPTIMIZER_DEFAULTS)
    lr: float = field(default=1e-3, metadata=_m(gt=0.0, max=10.0))
    batch_size: int = field(default=32, metadata=_m(min=1, max=65_536))
    # AdamW: above SGD on both benchmark datasets, at 64 px resnet18 and 28 px test_resnet
    # (docs/benchmarks/recipe/resnet18-64)
    optimizer: str = field(default="adamw", metadata=_m(choices=("sgd", "adam", "adamw")))
    momentum: float = field(default=0.9, metadata=_m(min=0.0, lt=1.0))
    weight_decay: float = field(default=0.05, metadata=_m(min=0.0, max=1.0))
    temperature: float = field(default=4.0, metadata=_m(gt=0.0, max=100.0))
    # 0.9: closest to pooled training on both benchmark datasets (docs/benchmarks/ablation-*)
    alpha: float = field(default=0.9, metadata=_m(min=0.0, max=1.0))
    init: str = field(default="predecessor", metadata=_m(choices=("scratch", "predecessor")))
    distill: str = field(default="kl", metadata=_m(choices=("kl", "mse")))
    # "link": a cosine learning-rate schedule from ``lr`` to 0 within every link (a warm restart at each
    # link); "chain": one cosine over the whole chain, of which each link trains its own slice (link k
    # of N covers [k/N, (k+1)/N]), so later links take smaller steps and keep what earlier sites taught
    lr_schedule: str = field(default="chain", metadata=_m(choices=("link", "chain")))
    # score the incoming teacher on this site's validation split first, and hand it on unchanged when the
    # newly trained student is clearly worse there (chain.link.clearly_worse; weights mode, same architecture)
    do_no_harm: bool = True
    weights: str | None = field(default=None, metadata=_m(path=True))
    # the starting weights named by the SHA-256 of their file (what travels in a federation: each site maps
    # it to a local file in its own config, ``pretrained:``); in-process, link.weights must be that file
    pretrained: str | None = None
    # DP-SGD for this link (chain.privacy); absent or null: ordinary training
    privacy: PrivacySettings | None = None


@dataclass(frozen=True)
class ChainSettings:
    """Which sites form the chain, in what order, how often, and what travels between links."""

    order: tuple[str, ...] = ("A", "B", "C")
    cycles: int = field(default=1, metadata=_m(min=1, max=1000))
    mode: str = field(default="weights", metadata=_m(choices=("weights", "logits")))
    lr_decay: float = field(default=1.0, metadata=_m(gt=0.0, max=1.0))
    # dtype of floating tensors in weights payloads (teacher and relayed student; the delivered model
    # stays float32); the in-process chain rounds its teacher the same way. float16 by default: half
    # the bytes, accuracy unchanged within seed noise (docs/benchmarks/perf/relay.md)
    wire_dtype: str = field(default="float16", metadata=_m(choices=("float32", "float16")))
    # which link is the chain's model: "last"; "best" on the validation splits of all sites together
    # (chain.delivery); "auto": best where every site scores every link (weights mode and, in a
    # federation, evaluate: all), else last
    deliver: str = field(default="auto", metadata=_m(choices=("auto", "best", "last")))


@dataclass(frozen=True)
class SyntheticSettings:
    """The built-in synthetic dataset (deterministic, class-dependent structure plus noise)."""

    samples: int = field(default=900, metadata=_m(min=8, max=1_000_000))
    noise: float = field(default=1.8, metadata=_m(min=0.0, max=10.0))
    seed: int = 1234


@dataclass(frozen=True)
class DataSettings:
    """What the images are and where each site's data comes from."""

    classes: tuple[str, ...] = ("class_0", "class_1", "class_2", "class_3")
    image_size: int = field(default=32, metadata=_m(min=8, max=4096))
    channels: int = field(default=1, metadata=_m(choices=(1, 3)))
    val_fraction: float = field(default=0.2, metadata=_m(gt=0.0, lt=0.9))
    # the fraction of each site's training images that keeps its label (stratified, deterministic);
    # the rest are used without labels, for distillation from the teacher
    labelled_fraction: float = field(default=1.0, metadata=_m(gt=0.0, max=1.0))
    augment: bool = True
    dataset: str | None = field(default=None, metadata=_m(path=True))
    test: str | None = field(default=None, metadata=_m(path=True))
    test_fraction: float = field(default=0.2, metadata=_m(gt=0.0, lt=0.9))
    sites: dict[str, str] = field(default_factory=dict, metadata=_m(path=True))
    unlabelled: dict[str, str] = field(default_factory=dict, metadata=_m(path=True))
    proxy: str | None = field(default=None, metadata=_m(path=True))
    synthetic: SyntheticSettings = field(default_factory=SyntheticSettings)


@dataclass(frozen=True)
class SharedData:
    """The data settings a federation's sites share: the coordinator checks each site's classes and image
    format at discovery, and sends ``augment`` with every link. Where the images are is each site's own
    business (its ``data:`` section, a :class:`DataSettings`)."""

    classes: tuple[str, ...] = DataSettings.classes
    image_size: int = field(default=DataSettings.image_size, metadata=_m(min=8, max=4096))
    channels: int = field(default=DataSettings.channels, metadata=_m(choices=(1, 3)))
    augment: bool = True


@dataclass(frozen=True)
class RuntimeSettings:
    """Where and how the work runs."""

    device: str = field(default="auto", metadata=_m(choices=("auto", "cpu", "cuda")))
    threads: int = field(default=0, metadata=_m(min=0, max=1024))
    output_dir: str = "runs/chain"


@dataclass(frozen=True)
class BaselineSettings:
    """Baselines trained in the same run as the chain, on the same held-out test split."""

    sites: bool = True
    pooled: bool = True


class _ChainPlan:
    """The links of a chain (shared by the in-process and the federated view)."""

    chain: ChainSettings
    link: LinkSettings
    links: tuple[LinkSettings, ...]

    @property
    def n_links(self) -> int:
        return len(self.chain.order) * self.chain.cycles

    def link_settings(self, index: int, decay: bool = True) -> LinkSettings:
        """Settings of link ``index`` (0-based): the per-link entry, else the default.

        ``chain.lr_decay`` scales the learning rate of link k by ``lr_decay**k``: later links refine
        a warm-started model and need smaller steps to keep what earlier sites taught.
        """
        base = self.links[index] if index < len(self.links) else self.link
        if not decay or self.chain.lr_decay == 1.0 or index == 0:
            return base
        return dataclasses.replace(base, lr=base.lr * self.chain.lr_decay**index)

    def site_of(self, index: int) -> str:
        return self.chain.order[index % len(self.chain.order)]


@dataclass(frozen=True)
class ChainConfig(_ChainPlan):
    """A whole in-process chain experiment (``weckd chain``): every site's data in one process."""

    seed: int = 0
    chain: ChainSettings = field(default_factory=ChainSettings)
    link: LinkSettings = field(default_factory=LinkSettings)
    links: tuple[LinkSettings, ...] = ()
    data: DataSettings = field(default_factory=DataSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    baselines: BaselineSettings = field(default_factory=BaselineSettings)
    source: str = field(default="<defaults>", compare=False, metadata=_m(internal=True))


@dataclass(frozen=True)
class FederatedChain(_ChainPlan):
    """The chain a coordinator runs across its sites (the chain part of ``federation.yaml``): what travels to
    the sites and what they must share. No data paths, runtime or baselines: each site reads its own images
    on its own hardware, and baselines are jobs (``weckd submit --kind``)."""

    seed: int = 0
    chain: ChainSettings = field(default_factory=ChainSettings)
    link: LinkSettings = field(default_factory=LinkSettings)
    links: tuple[LinkSettings, ...] = ()
    data: SharedData = field(default_factory=SharedData)
    source: str = field(default="<defaults>", compare=False, metadata=_m(internal=True))


MAX_CONFIG_BYTES = 1 << 18  # 256 KiB: a config is a few KB (and PyYAML parses ~15 KB/s of lists)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponents without a dot (``1e-5``) as numbers, as YAML 1.2 does, and
    refuses aliases (``*name``): nested aliases expand a few hundred bytes into gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in weckd configs; write the value out",
                self.peek_event().start_mark)
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def parse_yaml(text: str) -> Any:
    """Parse YAML text like ``yaml.safe_load``, with ``1e-5`` read as a number rather than a string."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ChainConfig:
    """Load and validate a chain config file; ``overrides`` are ``dotted.key=value`` strings."""
    raw, origin = read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    return config_from_mapping(raw, origin)


def read_yaml(path: str | Path) -> tuple[dict[str, Any], Origin]:
    """Read a YAML mapping, turning a missing file or syntax error into one ConfigError line.

    A config is at most MAX_CONFIG_BYTES and may not use aliases (``*name``): a few hundred bytes of
    nested aliases expand to gigabytes (the "billion laughs"), and a config has no need of them.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found; pass an existing YAML file with -c")
    try:
        with p.open("rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: config file is over {MAX_CONFIG_BYTES} bytes; is this the right file?")
        raw = parse_yaml(data.decode("utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{p}:{where}: YAML syntax error: {problem[:200]}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{p}: cannot read config file: {shown(str(err), 200)}") from err
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw, Origin(str(p), p.resolve().parent)


def merge_mappings(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``over`` laid on it: mappings merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_mappings(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override (value parsed as YAML) to a raw mapping."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {shown(item)}: expected KEY=VALUE, e.g. link.epochs=3")
    try:
        value = parse_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {shown(item)}: value is not valid YAML") from err
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {shown(item)}: {shown(part)} is not a mapping")
        node = child
    node[parts[-1]] = value


# the learning rate and weight decay of each optimizer where a config names the optimizer but not them
OPTIMIZER_DEFAULTS: dict[str, dict[str, float]] = {
    "sgd": {"lr": 0.05, "weight_decay": 5e-4},
    "adam": {"lr": 1e-3, "weight_decay": 0.0},
    "adamw": {"lr": 1e-3, "weight_decay": 0.05},
}


def _with_optimizer_defaults(link: Any, optimizer: Any) -> Any:
    """``link`` (a raw mapping) with ``lr`` and ``weight_decay`` filled from ``optimizer``'s defaults."""
    if not isinstance(link, dict) or optimizer not in OPTIMIZER_DEFAULTS:
        return link  # build() reports what is wrong with it
    return {**OPTIMIZER_DEFAULTS[optimizer], **link}


def config_from_mapping(raw: dict[str, Any], origin: Origin) -> ChainConfig:
    """Validate a raw mapping into the in-process :class:`ChainConfig` (paths resolve against
    ``origin.base_dir``)."""
    cfg = _build_chain(ChainConfig, raw, origin)
    src, data = origin.source, cfg.data
    _check_data_paths(cfg, src)
    for site in list(data.unlabelled):
        if site not in cfg.chain.order:
            raise ConfigError(f"{src}: data.unlabelled.{site}: not a site of chain.order {list(cfg.chain.order)}")
    if cfg.chain.mode == "logits" and data.proxy is None:
        raise ConfigError(f"{src}: data.proxy: logits mode needs a proxy set of unlabelled images")
    _check_weights(cfg, src)
    return cfg


# Keys of a chain config that do nothing at the coordinator, and where they belong instead.
NOT_AT_COORDINATOR = {
    "runtime": "the coordinator trains nothing; set device and threads in each site's config (runtime:)",
    "baselines": "baselines across the sites are jobs of their own (weckd submit --kind cwt|local|fedavg)",
    **{f"data.{key}": f"the coordinator reads no images; each site names its own data in its config (data.{key})"
       for key in ("dataset", "val_fraction", "labelled_fraction", "test", "test_fraction", "sites", "unlabelled",
                   "proxy", "synthetic")},
    "link.weights": "it names a file on the coordinator, which trains nothing; name the starting weights by "
                    "their SHA-256 in link.pretrained, and map it to a local file in each site's config "
                    "(pretrained:)",
}


def federated_chain_from_mapping(raw: dict[str, Any], origin: Origin) -> FederatedChain:
    """Validate the chain part of ``federation.yaml`` (or of a job) into a :class:`FederatedChain`; a key that
    does nothing at the coordinator is refused with one line saying where it belongs."""
    refuse_keys(raw, NOT_AT_COORDINATOR, origin, "at the coordinator")
    for i, entry in enumerate(raw.get("links") or []):
        if isinstance(entry, dict) and "weights" in entry:
            raise ConfigError(f"{origin.source}: links[{i}].weights: does nothing at the coordinator: "
                              f"{NOT_AT_COORDINATOR['link.weights']}")
    cfg = _build_chain(FederatedChain, raw, origin)
    for k in range(cfg.n_links):
        check_pretrained(cfg.link_settings(k).pretrained, f"{origin.source}: link")
    return cfg


def federated_part(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A ``weckd chain`` config mapping without the keys that do nothing at a coordinator: the chain part of a
    ``federation.yaml`` made from it (the sites' data settings go to their own configs)."""
    out = copy.deepcopy(dict(raw))
    for dotted in NOT_AT_COORDINATOR:
        *parents, last = dotted.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    for entry in out.get("links") or []:
        if isinstance(entry, dict):
            entry.pop("weights", None)
    return out


def refuse_keys(raw: Mapping[str, Any], keys: Mapping[str, str], origin: Origin, role: str) -> None:
    """One ConfigError line for the first dotted ``keys`` entry present in ``raw``: it does nothing in ``role``."""
    for dotted, why in keys.items():
        node: Any = raw
        for part in dotted.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT:
            raise ConfigError(f"{origin.source}: {dotted}: does nothing {role}: {why}")


_ABSENT = object()
_Chain = TypeVar("_Chain", ChainConfig, FederatedChain)


def _build_chain(cls: type[_Chain], raw: dict[str, Any], origin: Origin) -> _Chain:
    """The checks every view of a chain shares: keys and types, per-link settings, order, classes, privacy and
    delivery."""
    raw = dict(raw)
    link_raw = raw.get("link", {}) if raw.get("link") is not None else {}
    raw["link"] = _with_optimizer_defaults(link_raw, link_raw.get("optimizer", LinkSettings.optimizer)
                                           if isinstance(link_raw, dict) else None)
    links_raw = raw.pop("links", None)
    base = build(cls, raw, "", origin)
    links = _resolve_links(base, links_raw, origin)
    cfg = dataclasses.replace(base, links=links, source=origin.source)
    _check_consistency(cfg, origin)
    return cfg


def _resolve_links(base: _ChainPlan, links_raw: Any, origin: Origin) -> tuple[LinkSettings, ...]:
    if links_raw is None:
        return ()
    if not isinstance(links_raw, list):
        raise ConfigError(f"{origin.source}: links: expected a list of per-link settings")
    if len(links_raw) > base.n_links:
        raise ConfigError(
            f"{origin.source}: links: {len(links_raw)} entries but the chain has {base.n_links} links "
            "(order × cycles); remove the extra entries"
        )
    default = dataclasses.asdict(base.link)
    resolved = []
    for i, entry in enumerate(links_raw):
        if entry is not None and not isinstance(entry, dict):
            raise ConfigError(f"{origin.source}: links[{i}]: expected a mapping of link settings")
        if entry and "optimizer" in entry and entry["optimizer"] != base.link.optimizer:
            entry = _with_optimizer_defaults(entry, entry["optimizer"])  # its own optimizer's lr, not the base's
        merged = {**default, **(entry or {})}
        for key, value in (entry or {}).items():  # a nested mapping (privacy) overrides key by key
            if isinstance(value, dict) and isinstance(default.get(key), dict):
                merged[key] = {**default[key], **value}
        resolved.append(build(LinkSettings, merged, f"links[{i}]", origin))
    return tuple(resolved)


def _check_consistency(cfg: ChainConfig | FederatedChain, origin: Origin) -> None:
    src = origin.source
    order = cfg.chain.order
    if not order:
        raise ConfigError(f"{src}: chain.order: list at least one site")
    if len(set(order)) != len(order):
        raise ConfigError(f"{src}: chain.order: site names must be unique, got {list(order)}")
    if len(cfg.data.classes) < 2 or len(set(cfg.data.classes)) != len(cfg.data.classes):
        raise ConfigError(f"{src}: data.classes: list at least two distinct class names")
    _check_privacy(cfg, src)
    _check_delivery(cfg, src)


def _check_data_paths(cfg: ChainConfig, src: str) -> None:
    data, order = cfg.data, cfg.chain.order
    if data.dataset is None and not data.sites:
        raise ConfigError(
            f"{src}: data: set data.dataset (one dataset split across the sites, or 'synthetic') "
            "or data.sites (a data path per site)"
        )
    if data.dataset is not None and data.sites:
        raise ConfigError(f"{src}: data: set either data.dataset or data.sites, not both")
    if data.sites:
        missing = [s for s in order if s not in data.sites]
        if missing:
            raise ConfigError(f"{src}: data.sites: no data path for site(s) {', '.join(missing)}")
        if data.test is None:
            raise ConfigError(f"{src}: data.test: a held-out test set is required with data.sites")


SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def check_pretrained(value: str | None, where: str) -> None:
    """``link.pretrained`` is the lower-case hex SHA-256 of a weights file."""
    if value is not None and not SHA256_HEX.fullmatch(value):
        raise ConfigError(f"{where}: pretrained: {shown(value, 80)} is not a SHA-256 (64 lower-case hex digits); "
                          "sha256sum prints it")


def _check_weights(cfg: ChainConfig, src: str) -> None:
    """In-process, a named SHA-256 must be that of link.weights (the file it trains from)."""
    from .files import file_sha256

    for k in range(cfg.n_links):
        settings = cfg.link_settings(k)
        where = f"{src}: links[{k}]" if k < len(cfg.links) else f"{src}: link"
        check_pretrained(settings.pretrained, where)
        if settings.pretrained is None or not settings.weights:
            continue
        actual = file_sha256(Path(settings.weights), where)
        if actual != settings.pretrained:
            raise ConfigError(f"{where}.weights: {settings.weights} has SHA-256 {actual}, not link.pretrained "
                              f"{settings.pretrained}")


def _check_delivery(cfg: ChainConfig | FederatedChain, src: str) -> None:
    if cfg.chain.deliver == "best" and cfg.chain.mode != "weights":
        raise ConfigError(f"{src}: chain.deliver: best needs chain.mode: weights (every site scores every link's "
                          "model); use chain.deliver: last in logits mode")


def _check_privacy(cfg: ChainConfig | FederatedChain, src: str) -> None:
    """DP links need weights mode past link 1 and cannot warm-start across BatchNorm/GroupNorm."""
    for k in range(1, cfg.n_links):
        settings, before = cfg.link_settings(k), cfg.link_settings(k - 1)
        where = f"links[{k}]" if k < len(cfg.links) else "link"
        if settings.privacy is not None and cfg.chain.mode == "logits":
            raise ConfigError(
                f"{src}: {where}.privacy: DP-SGD covers the site's labelled images but not the proxy-set "
                "distillation of logits mode past link 1; use chain.mode: weights"
            )
        if cfg.chain.mode == "weights" and settings.init == "predecessor":
            mismatch = warm_start_mismatch(student_arch(settings), student_arch(before))
            if mismatch:
                raise ConfigError(f"{src}: {where}.init: link {k + 1} {mismatch}")


def link_to_mapping(settings: LinkSettings) -> dict[str, Any]:
    """Flatten link settings for a message's ConfigRecord (site-local paths stay behind).

    A ConfigRecord holds scalars only: nested settings become dotted keys (``privacy.epsilon``) and
    unset optional ones (``privacy: null``) are left out.
    """
    out: dict[str, Any] = {}
    for key, value in dataclasses.asdict(settings).items():
        if key == "weights" or value is None:
            continue
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def link_from_mapping(values: Mapping[str, Any], source: str = "run config") -> LinkSettings:
    """Rebuild link settings from a ConfigRecord with the same validation as the YAML loader."""
    raw: dict[str, Any] = {}
    for key, value in values.items():
        head, dot, tail = str(key).partition(".")
        if dot:
            nested = raw.setdefault(head, {})
            if isinstance(nested, dict):
                nested[tail] = value
                continue
        raw[key] = value
    return build(LinkSettings, raw, "link", Origin(source, Path.cwd()))


def config_to_mapping(cfg: ChainConfig | FederatedChain) -> dict[str, Any]:
    """The effective config as plain data, to write next to a run's outputs."""
    out = dataclasses.asdict(cfg)
    out.pop("source")
    return _plain(out)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
