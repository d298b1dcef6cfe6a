"""The Docker Compose files in deploy/compose: the demo, and the coordinator/site split for separate hosts.

Checked, by parsing them (``${VAR:-default}`` resolved to its default): every file is YAML with the expected
services; weckd services run the image built by deploy/docker (tagged with the package version) and
third-party images are pinned; config, certificates, keys and data are mounted read-only; only the Fleet
(9092), metrics (9464/9465), Prometheus (9090) and Grafana (3000) ports are published, never the Control API;
every weckd command and flag exists in the CLIs' own ``--help``; the config each command names is really
mounted there, loads with weckd's own loaders, is for the same site as ``--site``, points its certificates and
keys into read-only mounts and its state into the writable volume, and uses the published ports; the demo's
network aliases match the targets of the shipped deploy/prometheus/prometheus.yml and Grafana finds the dashboards
where its provisioning says.
Not checked (no Docker engine on CI): ``docker compose config`` and bringing the stack up.
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from weckd.client.site import load_site_config
from weckd.server.settings import load_federation

from .deploy_cli import PROGRAMS, check_command, shell_commands

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "deploy" / "compose"
FILES = {
    "demo.yaml": {"pki", "coordinator", "site-a", "site-b", "site-c", "prometheus", "grafana"},
    "coordinator.yaml": {"coordinator", "prometheus"},
    "site.yaml": {"site"},
}
ALLOWED_PORTS = {
    "demo.yaml": {9092, 9464, 9465, 9090, 3000},
    "coordinator.yaml": {9092, 9464, 9090},
    "site.yaml": {9465},
}
READ_ONLY_ROOTS = ("/etc/", "/data")
VERSION = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), flags=re.M).group(1)


def interpolate(value: Any) -> Any:
    """Compose's variable substitution with an empty environment: ``${X:-d}`` and ``${X-d}`` give d."""
    if isinstance(value, str):
        value = re.sub(r"\$\{(\w+)(:?-([^}]*))?\}", lambda m: m.group(3) or "", value)
        return re.sub(r"\$(\w+)", "", value.replace("$$", "\0")).replace("\0", "$")
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def load(name: str) -> dict[str, Any]:
    return interpolate(yaml.safe_load((COMPOSE / name).read_text()))


def services(name: str) -> dict[str, dict[str, Any]]:
    return load(name)["services"]


def weckd_services(name: str) -> dict[str, dict[str, Any]]:
    return {s: svc for s, svc in services(name).items() if _commands(svc)}


def _commands(svc: dict[str, Any]) -> list[list[str]]:
    """The weckd command lines a service runs: its command, or weckd lines of a shell script."""
    entry, cmd = svc.get("entrypoint") or [], svc.get("command") or []
    entry = entry.split() if isinstance(entry, str) else entry
    cmd = cmd.split() if isinstance(cmd, str) else cmd
    if entry and PurePosixPath(entry[0]).name in ("sh", "bash"):
        return [c for script in cmd for c in shell_commands(script)]
    argv = [*entry, *cmd]
    return [argv] if argv and PurePosixPath(argv[0]).name in PROGRAMS else []


def mounts(svc: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of every volume, short or long syntax."""
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, dict):
            out.append((str(v.get("source", "")), v["target"], bool(v.get("read_only"))))
        else:
            parts = v.split(":")
            out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def published(svc: dict[str, Any]) -> list[tuple[int, int]]:
    """(host port, container port) of every published port."""
    out = []
    for p in svc.get("ports", []):
        if isinstance(p, dict):
            out.append((int(p.get("published", p["target"])), int(p["target"])))
        else:
            parts = str(p).split("/")[0].split(":")
            out.append((int(parts[-2]) if len(parts) > 1 else int(parts[-1]), int(parts[-1])))
    return out


def mounted_file(name: str, svc: dict[str, Any], target: str) -> Path | None:
    """The file on the host that a container path comes from (bind mounts only), if it is in the repo."""
    for source, mount, _ in mounts(svc):
        if not source.startswith(("./", "../")):
            continue
        if target == mount:
            return (COMPOSE / source).resolve()
        if target.startswith(mount.rstrip("/") + "/"):
            return (COMPOSE / source / target[len(mount.rstrip("/")) + 1:]).resolve()
    return None


def covering_mount(svc: dict[str, Any], path: str) -> tuple[str, str, bool] | None:
    best = None
    for m in mounts(svc):
        if path == m[1] or path.startswith(m[1].rstrip("/") + "/"):
            if best is None or len(m[1]) > len(best[1]):
                best = m
    return best


def _flag(argv: list[str], *names: str) -> str:
    for i, token in enumerate(argv):
        if token in names:
            return argv[i + 1]
        for n in names:
            if token.startswith(n + "="):
                return token.split("=", 1)[1]
    raise AssertionError(f"{argv}: none of {names}")


def configs() -> list[tuple[str, str, dict[str, Any], list[str]]]:
    """(file, service, service, weckd-server/-client argv) for every long-running weckd service."""
    out = []
    for name in FILES:
        for s, svc in weckd_services(name).items():
            for argv in _commands(svc):
                if PurePosixPath(argv[0]).name in ("weckd-server", "weckd-client"):
                    out.append((name, s, svc, argv))
    return out


@pytest.mark.parametrize("name", FILES)
def test_compose_file_parses_with_the_expected_services(name: str) -> None:
    doc = load(name)
    assert isinstance(doc, dict) and doc.get("name", "").startswith("weckd")
    assert set(doc["services"]) == FILES[name]


@pytest.mark.parametrize("name", FILES)
def test_weckd_services_run_the_weckd_image_of_this_version(name: str) -> None:
    found = weckd_services(name)
    assert found
    for s, svc in found.items():
        assert svc["image"] == f"weckd:{VERSION}", (s, svc["image"])
        assert str(svc.get("user", "")).split(":")[0] not in ("", "0", "root"), s
        assert svc.get("read_only") is True and "ALL" in svc.get("cap_drop", []), s


@pytest.mark.parametrize("name", FILES)
def test_other_images_are_pinned(name: str) -> None:
    for s, svc in services(name).items():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), (s, image)


@pytest.mark.parametrize("name", FILES)
def test_config_keys_and_data_are_mounted_read_only(name: str) -> None:
    for s, svc in services(name).items():
        for source, target, ro in mounts(svc):
            if target.startswith(READ_ONLY_ROOTS) or re.search(r"(^|/)(certs|keys|pki)(/|$)", target):
                assert ro, f"{name}: {s}: {source}:{target} must be read-only (:ro)"


@pytest.mark.parametrize("name", FILES)
def test_only_fleet_metrics_and_dashboards_are_published(name: str) -> None:
    for s, svc in services(name).items():
        for host, container in published(svc):
            assert container in ALLOWED_PORTS[name] and host in ALLOWED_PORTS[name], (name, s, host, container)
            assert 9093 not in (host, container), f"{name}: {s} publishes Flower's Control API"


@pytest.mark.parametrize("name", FILES)
def test_every_weckd_command_and_flag_exists_in_the_clis(name: str) -> None:
    commands = [argv for svc in weckd_services(name).values() for argv in _commands(svc)]
    assert commands
    problems = [p for argv in commands for p in check_command(argv)]
    assert problems == []


def test_the_demo_creates_its_pki_with_weckd_certs() -> None:
    lines = _commands(services("demo.yaml")["pki"])
    assert [a[:3] for a in lines].count(["weckd", "certs", "site"]) == 3
    assert ["weckd", "certs", "ca"] in [a[:3] for a in lines] and ["weckd", "certs", "server"] in [a[:3] for a in lines]


@pytest.mark.parametrize("name,service,svc,argv", configs(), ids=lambda v: v if isinstance(v, str) else "")
def test_the_config_a_command_names_is_mounted_and_loads(name: str, service: str, svc: dict[str, Any],
                                                         argv: list[str]) -> None:
    target = _flag(argv, "-c", "--config")
    host = mounted_file(name, svc, target)
    assert host is not None and host.is_file(), f"{name}: {service}: {target} is not mounted from a file in the repo"
    assert covering_mount(svc, target)[2], f"{name}: {service}: {target} is writable"
    if PurePosixPath(argv[0]).name == "weckd-server":
        fed = load_federation(host)
        paths = [fed.settings.ca, fed.settings.cert, fed.settings.key, *(a.auth_key for a in fed.sites.values())]
        sealing = fed.settings.sealing
        assert sealing is not None, f"{name}: {service}: payloads not sealed end to end"
        paths += [p for p in (sealing.keys, *sealing.peers.values()) if p]
        writable = [fed.settings.state_dir, fed.settings.output_dir]
        ports = {int(fed.settings.fleet_address.rsplit(":", 1)[1]), fed.settings.metrics_port}
    else:
        cfg = load_site_config(host, _flag(argv, "--site"))
        assert cfg.sealing is not None, f"{name}: {service}: payloads not sealed end to end"
        paths = [cfg.ca, cfg.auth_key, cfg.sealing.keys, *cfg.sealing.peers.values()]
        writable, ports = [cfg.state_dir], {cfg.metrics_port}
        assert str(cfg.metrics_port) == svc["environment"]["WECKD_METRICS_PORT"], "healthcheck port != metrics port"
    for path in paths:
        m = covering_mount(svc, str(PurePosixPath(path)))
        assert m is not None and m[2], f"{name}: {service}: {path} is not under a read-only mount"
    for path in writable:
        m = covering_mount(svc, path)
        assert m is not None and not m[2] and not m[0].startswith((".", "/")), f"{service}: {path} not in a volume"
    container_ports = {c for _, c in published(svc)}
    assert container_ports <= ports, f"{name}: {service} publishes {container_ports}, its config serves {ports}"


def test_the_demo_pki_makes_sealing_keys_for_every_pinned_party() -> None:
    made = {a[a.index("--site") + 1] for a in _commands(services("demo.yaml")["pki"]) if a[:2] == ["weckd", "keys"]}
    fed = load_federation(COMPOSE / "demo" / "federation.yaml")
    parties = set(fed.settings.sealing.deliver_to) | set(fed.settings.sealing.peers)
    for site in fed.chain.chain.order:
        cfg = load_site_config(COMPOSE / "demo" / f"site-{site}.yaml", site)
        assert set(cfg.sealing.peers) == (set(fed.chain.chain.order) | {"coordinator"}) - {site}
        parties |= set(cfg.sealing.peers) | {site}
    assert made == parties


def test_the_demo_aliases_match_the_shipped_prometheus_targets() -> None:
    prom = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    svcs = services("demo.yaml")
    aliases = {a: s for s, svc in svcs.items() if isinstance(svc.get("networks"), dict)
               for a in svc["networks"]["federation"].get("aliases", [])}
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets
    for target in targets:
        host, port = target.rsplit(":", 1)
        assert host in aliases, f"prometheus target {target}: no demo service has the alias {host}"
        svc = svcs[aliases[host]]
        assert svc["environment"]["WECKD_METRICS_PORT"] == port, target


def test_the_demo_prometheus_and_grafana_mount_the_shipped_files() -> None:
    svcs = services("demo.yaml")
    prom = {t: s for s, t, _ in mounts(svcs["prometheus"])}
    assert (COMPOSE / prom["/etc/prometheus/prometheus.yml"]).resolve() == REPO / "deploy/prometheus/prometheus.yml"
    assert (COMPOSE / prom["/etc/prometheus/alerts.yml"]).resolve() == REPO / "deploy/prometheus/alerts.yml"
    graf = {t: s for s, t, _ in mounts(svcs["grafana"])}
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/weckd.yml").read_text())["providers"][0]
    assert (COMPOSE / graf[provider["options"]["path"]]).resolve() == REPO / "deploy/grafana/dashboards"
    assert (COMPOSE / graf["/etc/grafana/provisioning"]).resolve() == REPO / "deploy/grafana/provisioning"


def test_interpolation_takes_defaults_and_unescapes_dollars() -> None:
    assert interpolate("${WECKD_SITE:-A} $$s ${NOPE}x") == "A $s x"


def test_a_writable_key_mount_would_be_caught() -> None:
    svc = {"volumes": ["./keys:/etc/weckd/keys", "state:/var/lib/weckd"]}
    assert [m for m in mounts(svc) if m[1].startswith(READ_ONLY_ROOTS) and not m[2]] == [
        ("./keys", "/etc/weckd/keys", False)]
