"""The coordinator's config: a chain config plus a ``federation:`` section.

``federation.yaml`` holds the chain the sites run (seed, chain, link, links, and the data settings every
site shares: a :class:`weckd.chain.config.FederatedChain`; a key that does nothing here, such as ``runtime``
or ``data.dataset``, is refused with one line) and the federation's own settings: where the Fleet API
listens, the TLS files, each site's registered auth public key, timeouts and TTLs. Relative paths resolve
against the YAML's folder. Only the chain settings travel to the sites; paths and keys stay with the
coordinator.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from weckd.chain.config import FederatedChain, apply_override, federated_chain_from_mapping, read_yaml
from weckd.chain.errors import ConfigError
from weckd.chain.files import atomic_write_text
from weckd.chain.peers import COORDINATOR, SealingSettings
from weckd.chain.procs import check_distinct_ports
from weckd.chain.schema import Origin, build


def _m(**meta: Any) -> Any:
    return meta


@dataclass(frozen=True)
class SiteAuth:
    """A site the coordinator admits: its SuperNode auth public key (OpenSSH, EC P-384)."""

    auth_key: str = field(metadata=_m(path=True))


@dataclass(frozen=True)
class FederationSealing:
    """End-to-end sealing (every site's config has a ``sealing:`` section too, see ``weckd.chain.peers``).

    ``deliver_to`` names who receives the final model: sites by name, and ``coordinator`` only if the
    coordinator itself should be able to read it (then ``keys`` holds its own sealing keys, made with
    ``weckd keys --site coordinator``, and ``peers`` the sites' public keys, to check who signed it).
    """

    deliver_to: tuple[str, ...] = ("coordinator",)
    keys: str = field(default="", metadata=_m(path=True))
    peers: dict[str, str] = field(default_factory=dict, metadata=_m(path=True))


@dataclass(frozen=True)
class MlflowSettings:
    """Experiment tracking in MLflow (``pip install 'weckd[mlflow]'``): every completed chain and baseline is
    logged (``weckd.server.tracking``)."""

    tracking_uri: str = ""  # empty: a local store in the output dir (sqlite:///<output_dir>/mlflow.db)
    experiment: str = "weckd"


@dataclass(frozen=True)
class FederationSettings:
    """How the coordinator runs the federation (never sent to the sites)."""

    fleet_address: str = "127.0.0.1:9092"
    control_port: int = field(default=9093, metadata=_m(min=1, max=65535))
    state_dir: str = field(default="state", metadata=_m(path=True))
    output_dir: str = field(default="runs/federation", metadata=_m(path=True))
    ca: str = field(default="certs/ca.crt", metadata=_m(path=True))
    cert: str = field(default="certs/server.pem", metadata=_m(path=True))
    key: str = field(default="certs/server.key", metadata=_m(path=True))
    discovery_timeout: float = field(default=120.0, metadata=_m(gt=0.0, max=86_400.0))
    link_timeout: float = field(default=3600.0, metadata=_m(gt=0.0, max=7 * 86_400.0))
    message_ttl: float = field(default=3600.0, metadata=_m(gt=0.0, max=7 * 86_400.0))
    poll_interval: float = field(default=0.1, metadata=_m(gt=0.0, max=10.0))
    evaluate: str = field(default="all", metadata=_m(choices=("all", "next", "none")))
    shutdown_timeout: float = field(default=10.0, metadata=_m(gt=0.0, max=600.0))
    retries: int = field(default=2, metadata=_m(min=0, max=100))  # per link, for a site offline, gone or too slow
    retry_wait: float = field(default=120.0, metadata=_m(min=0.0, max=86_400.0))  # wait for it to come back online
    on_site_failure: str = field(default="fail", metadata=_m(choices=("fail", "skip")))
    sealing: FederationSealing | None = None  # None: payloads are not end-to-end sealed (a WARNING says so)
    metrics: bool = True  # Prometheus /metrics (weckd.server.metrics); false or metrics_port 0: off
    metrics_address: str = "127.0.0.1"  # loopback unless the config opens it (docs/ports.md)
    metrics_port: int = field(default=9464, metadata=_m(min=0, max=65535))
    metrics_linger: float = field(default=0.0, metadata=_m(min=0.0, max=3600.0))  # serve the final state longer
    mlflow: MlflowSettings | None = None  # None: no experiment tracking
    # chain: the WeCKD chain; fedavg: FedAvg rounds across the same sites (weckd.chain.rounds), the baseline
    # a job of kind fedavg runs (weckd submit --kind fedavg)
    algorithm: str = field(default="chain", metadata=_m(choices=("chain", "fedavg")))


@dataclass(frozen=True)
class Federation:
    """The whole coordinator config: the chain, the federation settings and the admitted sites."""

    chain: FederatedChain
    settings: FederationSettings
    sites: dict[str, SiteAuth]
    source: str
    effective: dict[str, Any] = field(default_factory=dict, compare=False)  # the YAML mapping after --set
    base_dir: str = field(default=".", compare=False)  # relative paths resolve against this folder


def load_federation(path: str | Path, overrides: tuple[str, ...] = (), base_dir: str | Path | None = None
                    ) -> Federation:
    """Load and validate ``federation.yaml``; every problem is one ConfigError line. ``base_dir``: resolve
    relative paths against this folder instead of the file's (the effective config, see below)."""
    raw, origin = read_yaml(path)
    if base_dir is not None:
        origin = Origin(origin.source, Path(base_dir))
    for item in overrides:
        apply_override(raw, item)
    return federation_from_mapping(raw, origin)


def federation_from_mapping(raw: dict[str, Any], origin: Origin) -> Federation:
    """Validate a federation mapping (as read from YAML); relative paths resolve against ``origin.base_dir``."""
    raw = copy.deepcopy(raw)
    effective = copy.deepcopy(raw)
    fed_raw = raw.pop("federation", None)
    if fed_raw is None:
        raise ConfigError(f"{origin.source}: federation: missing section; add fleet_address, sites, ca, cert, key")
    if not isinstance(fed_raw, dict):
        raise ConfigError(f"{origin.source}: federation: expected a mapping")
    fed_raw = dict(fed_raw)
    sites_raw = fed_raw.pop("sites", None)
    settings = build(FederationSettings, fed_raw, "federation", origin)
    chain = federated_chain_from_mapping(raw, origin)  # the coordinator reads no images and trains nothing
    sites = _sites(sites_raw, chain, origin)
    _check_address(settings.fleet_address, origin)
    fleet_host, _, fleet_port = settings.fleet_address.rpartition(":")
    local = fleet_host in ("0.0.0.0", "127.0.0.1", "localhost", "[::]", "::")  # where control and metrics listen
    check_distinct_ports({"federation.control_port": settings.control_port,
                          "federation.metrics_port": settings.metrics_port if settings.metrics else 0,
                          "federation.fleet_address": int(fleet_port) if local else 0}, origin.source)
    _check_mlflow(settings.mlflow, origin)
    _check_sealing(settings.sealing, chain, origin)
    if settings.algorithm == "fedavg":
        _check_fedavg(settings, chain, origin)
    elif chain.chain.deliver == "best" and settings.evaluate != "all":
        raise ConfigError(f"{origin.source}: chain.deliver: best needs federation.evaluate: all (every site scores "
                          f"every link); it is {settings.evaluate!r}")
    return Federation(chain, settings, sites, origin.source, effective, str(origin.base_dir))


EFFECTIVE_FILE = "federation.effective.yaml"
RESULTS_FILE = "results.json"  # in the output folder: what weckd-server and weckd demo read back


def write_effective(fed: Federation, state_dir: Path) -> tuple[Path, str]:
    """The config after ``--set``, as validated, into ``state_dir`` (0600): the ServerApp reads exactly
    this file (with ``fed.base_dir`` for relative paths), so an override changes what the run does.
    Returns the path and its SHA-256."""
    text = (f"# weckd-server's effective config: {fed.source} with its --set overrides; relative paths resolve "
            f"against {fed.base_dir}\n" + yaml.safe_dump(fed.effective, sort_keys=False))
    path = Path(state_dir) / EFFECTIVE_FILE
    atomic_write_text(path, text)
    return path, hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_mlflow(mlflow: MlflowSettings | None, origin: Origin) -> None:
    if mlflow is None:
        return
    uri = mlflow.tracking_uri
    if uri and not re.fullmatch(r"[a-z][a-z0-9+.-]*:.+", uri):
        raise ConfigError(f"{origin.source}: federation.mlflow.tracking_uri: {uri!r} is not a URI, e.g. "
                          "http://127.0.0.1:5000 or sqlite:////var/lib/weckd/mlflow.db (empty: a local store)")
    if not mlflow.experiment.strip():
        raise ConfigError(f"{origin.source}: federation.mlflow.experiment: give the experiment a name")
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(f"{origin.source}: federation.mlflow: MLflow is not installed here; install the extra "
                          "(pip install 'weckd[mlflow]') or remove the section")


def _check_fedavg(settings: FederationSettings, chain: FederatedChain, origin: Origin) -> None:
    """FedAvg averages one architecture's weights, and in a sealed federation the coordinator opens every
    update and signs every average: it needs its own keys and the sites' public keys."""
    where = f"{origin.source}: federation.algorithm: fedavg"
    if chain.chain.mode != "weights":
        raise ConfigError(f"{where} averages weights; set chain.mode: weights")
    archs = sorted({chain.link_settings(k).arch for k in range(chain.n_links)})
    if len(archs) > 1:
        raise ConfigError(f"{where} trains one model at every site; the links name {', '.join(archs)}")
    sealing = settings.sealing
    if sealing is not None and COORDINATOR not in sealing.deliver_to:
        raise ConfigError(f"{where}: the coordinator reads every update and makes every model, so a sealed "
                          f"federation must list {COORDINATOR!r} in federation.sealing.deliver_to (with its keys)")


def _check_sealing(sealing: FederationSealing | None, chain: FederatedChain, origin: Origin) -> None:
    if sealing is None:
        return
    allowed = [*dict.fromkeys(chain.chain.order), COORDINATOR]
    for name in sealing.deliver_to:
        if name not in allowed:
            raise ConfigError(f"{origin.source}: federation.sealing.deliver_to: {name!r} is neither a site of "
                              f"chain.order nor {COORDINATOR!r}; allowed: {', '.join(allowed)}")
    if COORDINATOR in sealing.deliver_to:
        if not sealing.keys:
            raise ConfigError(f"{origin.source}: federation.sealing.keys: the final model is delivered to the "
                              "coordinator, so give the folder of its keys (weckd keys --site coordinator)")
        missing = [s for s in dict.fromkeys(chain.chain.order) if s not in sealing.peers]
        if missing:
            raise ConfigError(f"{origin.source}: federation.sealing.peers: pin the public keys of site(s) "
                              f"{', '.join(missing)} (they sign the final model the coordinator opens)")


def coordinator_sealing(fed: Federation) -> SealingSettings | None:
    """The coordinator's own sealing settings, when the final model is delivered to it."""
    s = fed.settings.sealing
    if s is None or COORDINATOR not in s.deliver_to:
        return None
    return SealingSettings(keys=s.keys, peers=dict(s.peers))


def _sites(raw: Any, chain: FederatedChain, origin: Origin) -> dict[str, SiteAuth]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{origin.source}: federation.sites: list every site of chain.order with its auth_key, "
                          "e.g. sites: {{A: {{auth_key: keys/site-A.pub}}}}")
    sites = {str(name): build(SiteAuth, value, f"federation.sites.{name}", origin) for name, value in raw.items()}
    missing = [s for s in chain.chain.order if s not in sites]
    if missing:
        raise ConfigError(f"{origin.source}: federation.sites: no auth_key for site(s) {', '.join(missing)} "
                          "of chain.order; add them (weckd certs site --site NAME)")
    extra = [s for s in sites if s not in chain.chain.order]
    if extra:
        raise ConfigError(f"{origin.source}: federation.sites: {', '.join(extra)} not in chain.order "
                          f"{list(chain.chain.order)}; remove them or add them to the chain")
    return sites


def _check_address(address: str, origin: Origin) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{origin.source}: federation.fleet_address: {address!r} is not HOST:PORT, "
                          "e.g. 0.0.0.0:9092")


def check_files(fed: Federation) -> None:
    """Every TLS file and site key the coordinator needs exists (checked before starting anything)."""
    s = fed.settings
    needed = [("federation.ca", s.ca), ("federation.cert", s.cert), ("federation.key", s.key)]
    needed += [(f"federation.sites.{n}.auth_key", a.auth_key) for n, a in fed.sites.items()]
    for key, path in needed:
        if not Path(path).is_file():
            raise ConfigError(f"{fed.source}: {key}: {path}: file not found; create it with 'weckd certs'")


def with_settings(fed: Federation, **changes: Any) -> Federation:
    """A copy with some federation settings replaced (command-line overrides)."""
    return dataclasses.replace(fed, settings=dataclasses.replace(fed.settings, **changes))

