"""A complete federation in one folder on this machine: CA, server certificate, site auth keys,
sealing keys (each party's private keys in its own folder under ``keys/sealing/``, every public key
in ``keys/public/``, as they would be after the onboarding exchange), ``federation.yaml`` and one
``site-X.yaml`` per site, on free loopback ports and the built-in synthetic data split across the
sites. Used by ``weckd demo``, the end-to-end tests and the federation parts of ``weckd bench perf``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml
from weckd.chain.certs import make_ca, make_server_cert, make_site_key
from weckd.chain.config import federated_part, merge_mappings
from weckd.chain.files import atomic_write, atomic_write_text
from weckd.chain.keys import generate_site_keys
from weckd.chain.peers import COORDINATOR
from weckd.chain.procs import free_ports

SYNTHETIC_CHAIN: dict[str, Any] = {
    # the settings of configs/chain-synthetic.yaml
    "seed": 0,
    "chain": {"order": ["A", "B", "C"], "cycles": 1, "mode": "weights"},
    "link": {"arch": "test_resnet", "epochs": 8, "lr": 0.05, "batch_size": 32, "optimizer": "sgd",
             "temperature": 4.0, "alpha": 0.9, "init": "predecessor"},
    "data": {"dataset": "synthetic", "classes": ["class_0", "class_1", "class_2", "class_3"], "image_size": 32,
             "channels": 1, "val_fraction": 0.2, "test_fraction": 0.25,
             "synthetic": {"samples": 1200, "noise": 1.8, "seed": 1234}},
}


@dataclass(frozen=True)
class Scaffold:
    root: Path
    federation: Path
    sites: dict[str, Path]
    chain: dict[str, Any]


def chain_settings(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The synthetic chain config, with nested ``overrides`` merged in."""
    return merge_mappings(SYNTHETIC_CHAIN, overrides or {})


def make_sealing_keys(root: Path, parties: Sequence[str]) -> None:
    """``keys/sealing/<party>/`` (private + public) and ``keys/public/`` (every party's public keys)."""
    public = root / "keys" / "public"
    public.mkdir(parents=True, exist_ok=True)
    for party in parties:
        files = generate_site_keys(party, root / "keys" / "sealing" / party, force=True)
        for pub in (files.x25519_pub, files.ed25519_pub):
            atomic_write(public / pub.name, pub.read_bytes(), 0o644)


def site_sealing(site: str, order: Sequence[str]) -> dict[str, Any]:
    """A scaffold site's ``sealing:`` section: its own keys, every other party pinned."""
    peers = [p for p in dict.fromkeys([*order, COORDINATOR]) if p != site]
    return {"keys": f"keys/sealing/{site}", "peers": {p: "keys/public" for p in peers}}


TEST_HEARTBEAT = 10.0  # the sites' SuperNode heartbeat (s): a killed site is noticed after ~20 s (Flower: >= 10)
SITE_HEARTBEAT = 30.0  # the site config's own default (configs/site-A.yaml), for federations measured as shipped


def make_scaffold(root: Path, chain: dict[str, Any], federation: dict[str, Any] | None = None,
                  threads: int = 1, sealed: bool = True, heartbeat: float = TEST_HEARTBEAT) -> Scaffold:
    """Write certs, keys, federation.yaml and site configs under ``root`` (ports picked free now); with
    ``sealed``, payloads are sealed end to end and the final model goes to the coordinator and site A."""
    root.mkdir(parents=True, exist_ok=True)
    certs, keys = root / "certs", root / "keys"
    make_ca(certs)
    make_server_cert(certs)
    order = list(chain["chain"]["order"])
    for site in order:
        make_site_key(site, keys)
    if sealed:
        make_sealing_keys(root, [*dict.fromkeys(order), COORDINATOR])
    fleet_port, control_port, metrics_port, *site_ports = free_ports(3 + 2 * len(dict.fromkeys(order)))
    fleet = f"127.0.0.1:{fleet_port}"
    fed = {"fleet_address": fleet, "control_port": control_port, "state_dir": "state/server",
           "output_dir": "out", "ca": "certs/ca.crt", "cert": "certs/server.pem", "key": "certs/server.key",
           "discovery_timeout": 60.0, "link_timeout": 600.0, "message_ttl": 900.0, "evaluate": "all",
           "shutdown_timeout": 5.0, "metrics_address": "127.0.0.1", "metrics_port": metrics_port,
           "sites": {s: {"auth_key": f"keys/site-{s}.pub"} for s in order}}
    if sealed:
        fed["sealing"] = {"deliver_to": [COORDINATOR, order[0]], "keys": f"keys/sealing/{COORDINATOR}",
                          "peers": {s: "keys/public" for s in dict.fromkeys(order)}}
    fed.update(federation or {})
    path = root / "federation.yaml"
    atomic_write_text(path, yaml.safe_dump({**federated_part(chain), "federation": fed}, sort_keys=False), 0o644)
    # each site agrees to the chain order, and seals the final model for the coordinator only where the
    # federation asks for it
    policy: dict[str, Any] = {"order": list(dict.fromkeys(order))}
    if COORDINATOR in fed.get("sealing", {}).get("deliver_to", []):
        policy["deliver_to"] = [COORDINATOR]
    sites = {s: write_site_config(root, s, chain, fleet, threads, sealing=site_sealing(s, order) if sealed else None,
                                  policy=policy, ports=(site_ports[2 * i], site_ports[2 * i + 1]),
                                  heartbeat=heartbeat)
             for i, s in enumerate(dict.fromkeys(order))}
    return Scaffold(root, path, sites, chain)


def write_site_config(root: Path, site: str, chain: dict[str, Any], superlink: str, threads: int,
                      data_overrides: dict[str, Any] | None = None, name: str | None = None,
                      auth_key: str | None = None, ca: str = "certs/ca.crt",
                      sealing: dict[str, Any] | None = None, policy: dict[str, Any] | None = None,
                      ports: tuple[int, int] | None = None, heartbeat: float = TEST_HEARTBEAT) -> Path:
    """``site-X.yaml``: this site's fraction of the synthetic dataset, as ``weckd chain`` splits it; ``ports``
    (ClientAppIo, metrics) are picked here where not given."""
    clientappio_port, metrics_port = ports or free_ports(2)
    data = {k: v for k, v in chain["data"].items() if k not in ("test",)}
    data = merge_mappings(data, data_overrides or {})
    order: Sequence[str] = chain["chain"]["order"]
    cfg = {"site": site, "superlink": superlink, "ca": ca, "auth_key": auth_key or f"keys/site-{site}",
           "data": data, "split": {"order": list(order), "part": site, "seed": chain.get("seed", 0)},
           "runtime": {"device": "cpu", "threads": threads}, "clientappio_port": clientappio_port,
           "metrics_address": "127.0.0.1", "metrics_port": metrics_port,
           "state_dir": f"state/site-{name or site}", "max_wait": 60.0, "heartbeat": heartbeat}
    if sealing is not None:
        cfg["sealing"] = sealing
    if policy:
        cfg["policy"] = policy
    path = root / f"site-{name or site}.yaml"
    atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False), 0o644)
    return path
