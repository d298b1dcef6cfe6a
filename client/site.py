"""A site's local config and data: ``site-A.yaml`` in, the site's train/validation split out.

Everything here stays at the site: data paths, the auth and sealing private keys, device and threads. Only
counts, class names and the proxy set's content hash are ever reported to the coordinator.

Data comes either from a dataset split across the federation (``data.dataset`` plus
``split: {order: [A, B, C], part: A}``, the demo's and the tests' way: every site loads only its
own fraction, exactly as ``weckd chain`` splits it) or from the site's own data path
(``data.sites: {A: /data/otoscopy}``).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weckd.chain.config import SHA256_HEX, DataSettings, check_pretrained, read_yaml, refuse_keys
from weckd.chain.errors import ConfigError
from weckd.chain.files import file_sha256
from weckd.chain.peers import SealingSettings
from weckd.chain.procs import check_distinct_ports
from weckd.chain.protocol import Reason, Refused
from weckd.chain.schema import Origin, build, resolve_path

from .policy import SitePolicy

if TYPE_CHECKING:  # the data (and torch) load in the executor only: weckd-client's supervisor never trains
    import torch
    from weckd.chain.data import ImageSet, ImageSpec, SiteData

log = logging.getLogger(__name__)


def _m(**meta: Any) -> Any:
    return meta


@dataclass(frozen=True)
class SplitSettings:
    """This site's part of a dataset split across the federation (as ``weckd chain`` splits it)."""

    order: tuple[str, ...] = ("A", "B", "C")
    part: str = ""
    seed: int = 0


@dataclass(frozen=True)
class SiteRuntime:
    device: str = field(default="auto", metadata=_m(choices=("auto", "cpu", "cuda")))
    threads: int = field(default=0, metadata=_m(min=0, max=1024))


@dataclass(frozen=True)
class SiteConfig:
    """``site-A.yaml``: who the site is, where its data is, how it reaches the coordinator."""

    site: str
    superlink: str = "127.0.0.1:9092"
    ca: str = field(default="certs/ca.crt", metadata=_m(path=True))
    auth_key: str = field(default="keys/site.key", metadata=_m(path=True))
    data: DataSettings = field(default_factory=DataSettings)
    split: SplitSettings | None = None
    runtime: SiteRuntime = field(default_factory=SiteRuntime)
    clientappio_port: int = field(default=9094, metadata=_m(min=1, max=65535))
    state_dir: str = field(default="state", metadata=_m(path=True))
    max_wait: float = field(default=60.0, metadata=_m(min=0.0, max=86_400.0))  # 0: wait for the coordinator forever
    rejoin_wait: float = field(default=180.0, metadata=_m(min=0.0, max=86_400.0))  # see weckd.client.cli
    # SuperNode heartbeat period: the coordinator notices a site that died after about twice this (10 s is
    # the least Flower's SuperLink accepts: a shorter one is refused at activation)
    heartbeat: float = field(default=30.0, metadata=_m(min=10.0, max=1800.0))
    metrics: bool = True  # Prometheus /metrics (weckd.client.metrics); false or metrics_port 0: off
    metrics_address: str = "127.0.0.1"  # loopback unless the config opens it (docs/ports.md)
    metrics_port: int = field(default=9465, metadata=_m(min=0, max=65535))
    sealing: SealingSettings | None = None  # this site's sealing keys and pinned peers (weckd.chain.peers)
    policy: SitePolicy = field(default_factory=SitePolicy)  # what this site agrees to do (weckd.client.policy)
    # starting weights this site holds, by the SHA-256 a run names in link.pretrained: {sha256: local file}
    pretrained: dict[str, str] = field(default_factory=dict)
    source: str = field(default="<defaults>", compare=False, metadata=_m(internal=True))


@dataclass(frozen=True)
class LocalData:
    """What a site trains and evaluates on, plus the proxy set (logits mode) and its content hash."""

    spec: ImageSpec
    site: SiteData
    proxy: ImageSet | None
    proxy_sha256: str


def load_site_config(path: str | Path, site: str | None = None) -> SiteConfig:
    """Load ``site-A.yaml``; ``site`` (from ``--site``) must match the file's ``site:``."""
    raw, origin = read_yaml(path)
    refuse_keys(raw, NOT_AT_SITE, origin, "at a site")
    cfg = build(SiteConfig, raw, "", origin)
    cfg = SiteConfig(**{**cfg.__dict__, "source": origin.source,
                        "pretrained": _pretrained_files(cfg.pretrained, origin)})
    if site is not None and site != cfg.site:
        raise ConfigError(f"{origin.source}: site: the file is for site {cfg.site!r}, but --site is {site!r}")
    for key in ("sites", "unlabelled"):
        other = sorted(set(getattr(cfg.data, key)) - {cfg.site})
        if other:
            raise ConfigError(f"{origin.source}: data.{key}.{other[0]}: does nothing at a site: site {cfg.site} "
                              f"reads only its own data (data.{key}.{cfg.site})")
    _check_data(cfg, origin)
    check_distinct_ports({"clientappio_port": cfg.clientappio_port,
                          "metrics_port": cfg.metrics_port if cfg.metrics else 0}, origin.source)
    return cfg


# Keys of the data section that do nothing in a site's config, and where they belong instead.
NOT_AT_SITE = {"data.augment": "the coordinator sends it with every link (data.augment in federation.yaml)"}


def _pretrained_files(files: dict[str, str], origin: Origin) -> dict[str, str]:
    """``pretrained:`` with every key a SHA-256 and every path resolved against the config's folder."""
    out = {}
    for sha, path in files.items():
        check_pretrained(str(sha), f"{origin.source}: pretrained")
        if not isinstance(path, str) or not path or path == "synthetic":
            raise ConfigError(f"{origin.source}: pretrained.{sha}: expected the path of a weights file")
        out[str(sha)] = resolve_path(path, origin)
    return out


def pretrained_file(cfg: SiteConfig, sha: str, where: str) -> str:
    """The local file for ``link.pretrained``: listed in this site's config and with exactly that SHA-256."""
    if not SHA256_HEX.fullmatch(sha):  # the coordinator names weights by hash only, never by a path
        raise Refused(Reason.BAD_REQUEST, f"{where}: link.pretrained is not a SHA-256")
    path = cfg.pretrained.get(sha)
    if path is None:
        raise Refused(Reason.PRETRAINED_UNKNOWN, f"{where}: link.pretrained {sha[:16]}…: this site holds no such "
                      "weights file (list it under pretrained: in the site config)")
    try:
        actual = file_sha256(Path(path), f"{where}: pretrained")
    except ConfigError as err:
        raise Refused(Reason.PRETRAINED_UNKNOWN, str(err)) from None
    if actual != sha:
        raise Refused(Reason.PRETRAINED_MISMATCH, f"{where}: pretrained file {path} has SHA-256 {actual[:16]}…, not "
                      f"the {sha[:16]}… the run names (the file changed, or the config maps the wrong file)")
    return path


def _check_data(cfg: SiteConfig, origin: Origin) -> None:
    data, src = cfg.data, origin.source
    if data.dataset is not None:
        if cfg.split is None:
            raise ConfigError(f"{src}: split: data.dataset is shared, so give this site's part "
                              f"(split: {{order: [A, B, C], part: {cfg.site}}})")
        if cfg.split.part not in cfg.split.order:
            raise ConfigError(f"{src}: split.part: {cfg.split.part!r} is not one of split.order "
                              f"{list(cfg.split.order)}")
    elif cfg.site not in data.sites:
        raise ConfigError(f"{src}: data: set data.dataset with split, or data.sites.{cfg.site} (this site's data path)")


def load_local_data(cfg: SiteConfig, need_proxy: bool | None = None) -> LocalData:
    """Read and split the site's data (raises SiteDataError with the path on bad data)."""
    from weckd.chain.data import SiteData, make_site, read_labelled
    from weckd.chain.prepare import image_spec, load_proxy, site_fraction, site_unlabelled

    spec = image_spec(cfg.data)
    if cfg.data.dataset is not None:
        assert cfg.split is not None  # checked by load_site_config
        site = site_fraction(cfg.data, cfg.split.order, cfg.split.part, cfg.split.seed)
        site = SiteData(cfg.site, site.train, site.val, site.unlabelled)
    else:
        labelled = read_labelled(cfg.data.sites[cfg.site], spec)
        seed = cfg.split.seed if cfg.split is not None else 0
        site = make_site(cfg.site, labelled, cfg.data.val_fraction, seed, site_unlabelled(cfg.data, cfg.site, spec),
                         cfg.data.labelled_fraction)
    want_proxy = cfg.data.proxy is not None if need_proxy is None else need_proxy
    proxy = load_proxy(cfg.data, spec) if want_proxy else None
    log.info("site %s: %d train, %d validation images%s", cfg.site, len(site.train), len(site.val),
             f", {len(proxy)} proxy images" if proxy is not None else "")
    return LocalData(spec, site, proxy, content_hash(proxy.images) if proxy is not None else "")


def content_hash(images: torch.Tensor) -> str:
    """SHA-256 of the decoded proxy images (same images, same order → same hash at every site)."""
    h = hashlib.sha256()
    h.update(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()
