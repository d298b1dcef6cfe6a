"""One typed view of the settings per role: the in-process chain, the coordinator and the site. A key that does
nothing in a role is refused there with one line saying where it belongs, and every role resolves relative
paths with the same function."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from weckd.chain.config import ChainConfig, FederatedChain, SharedData, config_from_mapping, federated_part, load_config
from weckd.chain.errors import ConfigError
from weckd.chain.schema import Origin
from weckd.client.site import load_site_config
from weckd.server.settings import load_federation

from .helpers import TINY_CHAIN, deep_merge, write_yaml

REPO = Path(__file__).resolve().parents[2]
FED = {"fleet_address": "127.0.0.1:9092", "sites": {"A": {"auth_key": "keys/a.pub"}, "B": {"auth_key": "keys/b.pub"}}}
COORDINATOR_CHAIN = {"seed": 3, "chain": {"order": ["A", "B"]}, "link": {"arch": "test_resnet", "epochs": 1},
                     "data": {"classes": ["c0", "c1"], "image_size": 32, "channels": 1, "augment": False}}


def _federation(tmp_path: Path, extra: dict) -> Path:
    return write_yaml(tmp_path / "federation.yaml", deep_merge({**COORDINATOR_CHAIN, "federation": FED}, extra))


def _site(tmp_path: Path, extra: dict) -> Path:
    base = {"site": "A", "data": {"dataset": "synthetic", "classes": ["c0", "c1"]},
            "split": {"order": ["A", "B"], "part": "A"}}
    return write_yaml(tmp_path / "site-A.yaml", deep_merge(base, extra))


def test_the_coordinator_reads_its_own_typed_view(tmp_path: Path) -> None:
    fed = load_federation(_federation(tmp_path, {}))
    assert isinstance(fed.chain, FederatedChain) and not isinstance(fed.chain, ChainConfig)
    assert fed.chain.data == SharedData(("c0", "c1"), 32, 1, False)
    assert not hasattr(fed.chain, "runtime") and not hasattr(fed.chain, "baselines")
    assert fed.chain.n_links == 2 and fed.chain.site_of(1) == "B"


@pytest.mark.parametrize("extra, line", [
    ({"runtime": {"threads": 2}}, "runtime: does nothing at the coordinator: the coordinator trains nothing"),
    ({"baselines": {"pooled": False}}, "baselines: does nothing at the coordinator: baselines across the sites are "
                                       "jobs of their own"),
    ({"data": {"dataset": "synthetic"}}, "data.dataset: does nothing at the coordinator: the coordinator reads no "
                                         "images; each site names its own data in its config (data.dataset)"),
    ({"data": {"sites": {"A": "/data"}}}, "data.sites: does nothing at the coordinator"),
    ({"data": {"test": "/data/test"}}, "data.test: does nothing at the coordinator"),
    ({"data": {"val_fraction": 0.3}}, "data.val_fraction: does nothing at the coordinator"),
    ({"data": {"proxy": "/data/proxy"}}, "data.proxy: does nothing at the coordinator"),
    ({"link": {"weights": "w.safetensors"}}, "link.weights: does nothing at the coordinator: it names a file on the "
                                             "coordinator"),
    ({"links": [{}, {"weights": "w.pth"}]}, "links[1].weights: does nothing at the coordinator"),
])
def test_a_key_that_does_nothing_at_the_coordinator_is_refused_in_one_line(tmp_path: Path, extra: dict,
                                                                          line: str) -> None:
    path = _federation(tmp_path, extra)
    with pytest.raises(ConfigError, match=f"^{re.escape(f'{path}: {line}')}") as err:
        load_federation(path)
    assert "\n" not in str(err.value)


def test_a_job_is_refused_the_same_keys_naming_the_job_file(tmp_path: Path) -> None:
    from weckd.server.service import read_job_file

    job = write_yaml(tmp_path / "job.yaml", {"data": {"dataset": "synthetic"}})
    with pytest.raises(ConfigError, match=f"^{job}: data.dataset: does nothing in a federated job: the coordinator "
                                          "reads no images"):
        read_job_file(job)


@pytest.mark.parametrize("extra, line", [
    ({"data": {"augment": False}}, "data.augment: does nothing at a site: the coordinator sends it with every link"),
    ({"data": {"dataset": None, "sites": {"A": "a", "B": "b"}}}, "data.sites.B: does nothing at a site: site A reads "
                                                                 "only its own data (data.sites.A)"),
    ({"data": {"unlabelled": {"C": "u"}}}, "data.unlabelled.C: does nothing at a site"),
])
def test_a_key_that_does_nothing_at_a_site_is_refused_in_one_line(tmp_path: Path, extra: dict, line: str) -> None:
    path = _site(tmp_path, extra)
    with pytest.raises(ConfigError, match=f"^{re.escape(f'{path}: {line}')}"):
        load_site_config(path)


def test_the_in_process_chain_still_takes_every_key(tmp_path: Path) -> None:
    cfg = load_config(write_yaml(tmp_path / "c.yaml", deep_merge(TINY_CHAIN, {"data": {"augment": False}})))
    assert isinstance(cfg, ChainConfig) and cfg.runtime.device == "cpu" and cfg.data.dataset == "synthetic"


def test_the_federated_part_of_a_chain_config_is_what_the_coordinator_accepts(tmp_path: Path) -> None:
    """A ``weckd chain`` config becomes the chain of a federation.yaml without its site-side keys, and both
    views agree on everything that travels."""
    chain = deep_merge(TINY_CHAIN, {"links": [{"weights": "w.pth", "epochs": 2}], "data": {"val_fraction": 0.3}})
    fed = load_federation(write_yaml(tmp_path / "federation.yaml", {**federated_part(chain), "federation": FED}))
    local = config_from_mapping({**chain, "links": [{"epochs": 2}]}, Origin("c.yaml", tmp_path))
    assert (fed.chain.seed, fed.chain.chain, fed.chain.links) == (local.seed, local.chain, local.links)
    assert fed.chain.data == SharedData(local.data.classes, local.data.image_size, local.data.channels,
                                        local.data.augment)
    assert chain["data"]["val_fraction"] == 0.3 and chain["links"][0]["weights"] == "w.pth"  # the input is not changed


def test_relative_paths_resolve_against_the_config_folder_in_every_role(tmp_path: Path) -> None:
    chain = load_config(write_yaml(tmp_path / "c.yaml", deep_merge(TINY_CHAIN, {
        "data": {"dataset": None, "sites": {"A": "a", "B": "~/b"}, "test": "t", "unlabelled": {"A": "u"}}})))
    assert chain.data.sites == {"A": str(tmp_path / "a"), "B": str(Path("~/b").expanduser())}
    assert (chain.data.test, chain.data.unlabelled) == (str(tmp_path / "t"), {"A": str(tmp_path / "u")})
    own = {"dataset": None, "sites": {"A": "imgs"}, "unlabelled": {"A": "u"}}
    site = load_site_config(_site(tmp_path, {"data": own, "pretrained": {"0" * 64: "w/x.pth"}, "ca": "ca.crt"}))
    assert (site.data.sites, site.data.unlabelled) == ({"A": str(tmp_path / "imgs")}, {"A": str(tmp_path / "u")})
    assert site.pretrained == {"0" * 64: str(tmp_path / "w" / "x.pth")} and site.ca == str(tmp_path / "ca.crt")
    fed = load_federation(_federation(tmp_path, {}))
    assert fed.sites["A"].auth_key == str(tmp_path / "keys" / "a.pub")


def test_one_function_resolves_relative_paths() -> None:
    """Only ``chain.schema.resolve_path`` joins a config's folder with a relative path."""
    found = []
    for folder in ("chain", "client", "server"):
        for path in sorted((REPO / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Attribute) and node.attr == "is_absolute":
                    found.append(f"{folder}/{path.name}:{node.lineno}")
    assert [f.split(":")[0] for f in found] == ["chain/schema.py"], found


@pytest.mark.parametrize("extra, line", [
    ({"control_port": 9464}, "federation.metrics_port: port 9464 is also federation.control_port"),
    ({"control_port": 9092}, "federation.fleet_address: port 9092 is also federation.control_port"),
    ({"metrics_port": 9092}, "federation.fleet_address: port 9092 is also federation.metrics_port"),
])
def test_two_coordinator_settings_on_one_port_are_one_line(tmp_path: Path, extra: dict, line: str) -> None:
    path = _federation(tmp_path, {"federation": extra})
    with pytest.raises(ConfigError, match=f"^{re.escape(f'{path}: {line}')}; give each its own port$"):
        load_federation(path)


def test_ports_apart_on_another_interface_or_with_metrics_off_are_accepted(tmp_path: Path) -> None:
    assert load_federation(_federation(tmp_path, {"federation": {"control_port": 9464, "metrics": False}}))
    assert load_federation(_federation(tmp_path, {"federation": {"fleet_address": "10.0.0.5:9093"}}))


def test_a_site_with_its_clientappio_and_metrics_on_one_port_is_one_line(tmp_path: Path) -> None:
    path = _site(tmp_path, {"clientappio_port": 9465})
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: metrics_port: port 9465 is also clientappio_port"):
        load_site_config(path)


def test_ports_picked_for_a_local_federation_never_repeat() -> None:
    from weckd.chain.procs import free_ports

    for _ in range(20):
        ports = free_ports(12)
        assert len(set(ports)) == 12
