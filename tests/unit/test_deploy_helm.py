"""The Helm chart deploy/helm/weckd, for both roles (coordinator, site).

Rendering uses Helm's own engine (Helm 4's Go SDK) through the PyPI package ``helm-python-sdk`` (import
``helm_python``; in the ``test`` extra on linux x86_64; there is no ``helm`` binary on PyPI, npm or Debian).
With it, checked: ``helm lint --strict`` finds no warning; each role renders exactly its own objects
(coordinator: StatefulSet with a state PVC template, or with ``coordinator.kind: Job`` a Job and a state PVC,
Fleet Service, metrics Service; site: Deployment, metrics Service; both: ConfigMap, NetworkPolicy,
ServiceMonitor only when enabled); the StatefulSet holds a completed chain (``--hold``), the Job runs it to
completion (restartPolicy OnFailure, backoffLimit, its state on a PVC kept by ``helm uninstall``); the Services,
NetworkPolicy and ServiceMonitor select the coordinator pod of either kind; the container args are commands whose
flags exist in the CLIs' ``--help``; the rendered config loads with weckd's own loaders and names files that
are mounted read-only and a state dir on the writable volume; sealing keys laid out as the keys Secret holds them
(one flat folder) load with weckd's own key loader for both roles; ports agree across config, container, Services
and NetworkPolicy, and the Control API is in no Service; a site may egress only to the coordinator's Fleet
port and DNS; bad values (unknown keys, wrong role, bad ports or names, ``latest``, keys the chart owns) are
refused by values.schema.json (an unknown coordinator kind too) and clashing ports by the templates.
Without it (skipped with the reason), still checked: Chart.yaml, values.schema.json is draft-07 and declares
every key of values.yaml, and every template's actions and blocks are balanced.
Not checked: validation against a cluster's API schemas (no cluster; ``kubectl --dry-run=server`` needs one).
"""
from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import pytest
import yaml
from weckd.chain.keys import generate_site_keys
from weckd.chain.peers import COORDINATOR, load_party
from weckd.client.site import load_site_config
from weckd.server.settings import coordinator_sealing, load_federation

from .deploy_cli import check_command

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "weckd"
VERSION = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), flags=re.M).group(1)
SITE = {"role": "site", "site": {"name": "B", "data": {"existingClaim": "images-b"},
                                 "coordinator": {"to": [{"ipBlock": {"cidr": "203.0.113.10/32"}}]}}}
JOB = {"coordinator": {"kind": "Job"}}

def _helm() -> Any:
    return pytest.importorskip("helm_python", reason="helm-python-sdk (Helm's Go SDK) not installed: "
                               "it is in the test extra for linux x86_64 only")


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """``helm template`` of the chart: every rendered object."""
    h = _helm()
    with h.Chart.load(str(CHART)) as chart:
        files = chart.render(values, name="fed", namespace="weckd")
    docs = [d for path, text in files.items() if not path.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if d]
    return docs


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


def pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    workload = next(d for d in docs if d["kind"] in ("StatefulSet", "Job", "Deployment"))
    return workload["spec"]["template"]["spec"]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod(docs)["containers"]
    assert len(containers) == 1
    return containers[0]


def mounts(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container(docs)["volumeMounts"]}


def mount_of(docs: list[dict[str, Any]], path: str) -> dict[str, Any] | None:
    best = None
    for target, m in mounts(docs).items():
        if path == target or path.startswith(target.rstrip("/") + "/"):
            if best is None or len(target) > len(best["mountPath"]):
                best = m
    return best


def config_file(docs: list[dict[str, Any]], tmp_path: Path) -> tuple[str, Path]:
    """The ConfigMap's config file (its name, and a copy under ``tmp_path`` that the loaders can read)."""
    (name, text), = one(docs, "ConfigMap")["data"].items()
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return name, path


# ---- without Helm -------------------------------------------------------------------------------------------

def test_chart_yaml_has_the_required_fields_and_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "weckd" and chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"]) and chart["description"]
    assert chart["appVersion"] == VERSION


def _undeclared(values: Any, schema: dict[str, Any], where: str = "") -> Iterator[str]:
    if not isinstance(values, dict) or "properties" not in schema:
        return
    for key, value in values.items():
        sub = schema["properties"].get(key)
        if sub is None:
            if schema.get("additionalProperties", True) is False:
                yield f"{where}{key}"
            continue
        yield from _undeclared(value, sub, f"{where}{key}.")


def test_the_schema_is_draft_07_and_declares_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False and set(values) <= set(schema["properties"])
    assert list(_undeclared(values, schema)) == []
    assert schema["properties"]["role"]["enum"] == ["coordinator", "site"] and values["role"] in ("coordinator", "site")


def test_an_undeclared_value_would_be_caught() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert list(_undeclared({"coordinator": {"fleetPortt": 1}}, schema)) == ["coordinator.fleetPortt"]


BLOCK_OPEN = re.compile(r"^-?\s*(if|range|with|define|block)\b")
BLOCK_END = re.compile(r"^-?\s*end\s*-?$")


def actions(text: str) -> tuple[list[str], list[str]]:
    """The ``{{ … }}`` actions of a template (comments dropped), and unclosed ones (text may hold a stray ``}}``)."""
    text = re.sub(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", "", text, flags=re.S)
    found, problems, pos = [], [], 0
    while (start := text.find("{{", pos)) >= 0:
        end = text.find("}}", start + 2)
        if end < 0 or "{{" in text[start + 2:end]:
            line = text.count("\n", 0, start) + 1
            problems.append(f"line {line}: '{{{{' without '}}}}'")
            pos = start + 2
            continue
        found.append(text[start + 2:end].strip())
        pos = end + 2
    return found, problems


def balance(text: str) -> list[str]:
    """Problems with a template's structure: unclosed ``{{``, blocks without ``end`` and vice versa."""
    found, problems = actions(text)
    depth = 0
    for action in found:
        if BLOCK_OPEN.match(action):
            depth += 1
        elif BLOCK_END.match(action):
            depth -= 1
            if depth < 0:
                problems.append("'end' without a block")
                depth = 0
    if depth:
        problems.append(f"{depth} block(s) without 'end'")
    return problems


@pytest.mark.parametrize("template", sorted(p.name for p in (CHART / "templates").iterdir()))
def test_template_blocks_are_balanced(template: str) -> None:
    assert balance((CHART / "templates" / template).read_text()) == []


def test_an_unbalanced_template_would_be_caught() -> None:
    assert balance("{{- if .Values.x }}\na: {{ .b }\n") == ["line 2: '{{' without '}}'", "1 block(s) without 'end'"]
    assert balance("a: {{ .b {{ .c }}") == ["line 1: '{{' without '}}'"]
    assert balance("peers: [{a: {b: c}}]  # plain text") == []
    assert balance("{{ end }}") == ["'end' without a block"]


# ---- with Helm ----------------------------------------------------------------------------------------------

def test_helm_lint_strict_finds_no_problem() -> None:
    h = _helm()
    for values in (None, JOB, SITE):
        report = h.lint(str(CHART), values, strict=True)
        assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_the_coordinator_renders_its_objects_only() -> None:
    docs = render()
    assert kinds(docs) == ["ConfigMap", "NetworkPolicy", "Service", "Service", "StatefulSet"]
    assert kinds(render({"serviceMonitor": {"enabled": True}})).count("ServiceMonitor") == 1


def test_the_coordinator_as_a_job_renders_its_objects_only() -> None:
    docs = render(JOB)
    assert kinds(docs) == ["ConfigMap", "Job", "NetworkPolicy", "PersistentVolumeClaim", "Service", "Service"]
    assert kinds(render({**JOB, "serviceMonitor": {"enabled": True}})).count("ServiceMonitor") == 1


def test_a_site_renders_its_objects_only() -> None:
    docs = render(SITE)
    assert kinds(docs) == ["ConfigMap", "Deployment", "NetworkPolicy", "Service"]
    assert one(docs, "Deployment")["spec"]["strategy"]["type"] == "Recreate"  # one SuperNode per key at a time


@pytest.mark.parametrize("values", [{}, JOB, SITE], ids=["coordinator", "coordinator-job", "site"])
def test_container_args_are_cli_commands_with_existing_flags(values: dict[str, Any]) -> None:
    docs = render({**values, "extraArgs": ["--verbose"]})
    args = container(docs)["args"]
    assert PurePosixPath(args[0]).name == ("weckd-client" if values is SITE else "weckd-server")
    assert "--verbose" in args and check_command(args) == []


def test_a_flag_the_cli_lacks_would_be_caught() -> None:
    args = container(render({"extraArgs": ["--no-such-flag"]}))["args"]
    assert check_command(args) == [f"weckd-server: no flag '--no-such-flag' (has {sorted(_server_flags())})"]


def _server_flags() -> set[str]:
    from .deploy_cli import usage
    return set(usage("weckd-server").flags)


@pytest.mark.parametrize("values", [{}, JOB], ids=["statefulset", "job"])
def test_the_coordinator_config_loads_and_points_into_its_mounts(tmp_path: Path, values: dict[str, Any]) -> None:
    docs = render(values)
    name, path = config_file(docs, tmp_path)
    args = container(docs)["args"]
    assert args[args.index("-c") + 1] == f"/etc/weckd/config/{name}"
    fed = load_federation(path)
    assert set(fed.sites) == set(fed.chain.chain.order)
    sealing = fed.settings.sealing
    assert sealing is not None and sealing.deliver_to == ("coordinator",)
    for file in [fed.settings.ca, fed.settings.cert, fed.settings.key, *(s.auth_key for s in fed.sites.values()),
                 sealing.keys, *sealing.peers.values()]:
        m = mount_of(docs, file)
        assert m is not None and m.get("readOnly") is True, file
    for out in (fed.settings.state_dir, fed.settings.output_dir):
        assert mount_of(docs, out)["name"] == "state"
    ports = {p["name"]: p["containerPort"] for p in container(docs)["ports"]}
    assert ports == {"fleet": int(fed.settings.fleet_address.rsplit(":", 1)[1]), "metrics": fed.settings.metrics_port}


def test_a_site_config_loads_and_points_into_its_mounts(tmp_path: Path) -> None:
    docs = render(SITE)
    name, path = config_file(docs, tmp_path)
    args = container(docs)["args"]
    assert args[args.index("-c") + 1] == f"/etc/weckd/config/{name}"
    cfg = load_site_config(path, args[args.index("--site") + 1])
    assert cfg.site == "B" and cfg.data.sites == {"B": "/data"} and cfg.superlink == "coordinator.example.org:9092"
    assert cfg.sealing is not None and set(cfg.sealing.peers) == {"A", "C", "coordinator"}
    for file in (cfg.ca, cfg.auth_key, cfg.data.sites["B"], cfg.sealing.keys, *cfg.sealing.peers.values()):
        m = mount_of(docs, file)
        assert m is not None and m.get("readOnly") is True, file
    assert mount_of(docs, cfg.state_dir)["name"] == "state"
    assert {p["containerPort"] for p in container(docs)["ports"]} == {cfg.metrics_port}
    env = {e["name"]: e.get("value") for e in container(docs)["env"]}
    assert env["WECKD_METRICS_PORT"] == str(cfg.metrics_port)
    data = next(v for v in pod(docs)["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"] == {"claimName": "images-b", "readOnly": True}


def _with_keys_in(text: str, folder: Path) -> str:
    return text.replace("/etc/weckd/keys", str(folder))


def test_sealing_keys_load_from_the_flat_keys_secret(tmp_path: Path) -> None:
    keys = tmp_path / "keys"  # what the keys Secrets hold, all parties' files in one folder
    for party in ("A", "B", "C", COORDINATOR):
        generate_site_keys(party, keys)
    _, fed_path = config_file(render(), tmp_path / "coordinator")
    fed_path.write_text(_with_keys_in(fed_path.read_text(), keys))
    own = coordinator_sealing(load_federation(fed_path))
    assert set(load_party(COORDINATOR, own, str(fed_path)).peers) == {"A", "B", "C", COORDINATOR}
    _, site_path = config_file(render(SITE), tmp_path / "site")
    site_path.write_text(_with_keys_in(site_path.read_text(), keys))
    cfg = load_site_config(site_path, "B")
    assert set(load_party("B", cfg.sealing, str(site_path)).peers) == {"A", "B", "C", COORDINATOR}


def test_sealing_can_be_switched_off() -> None:
    docs = render({"role": "site", "site": {"name": "B", "sealing": {"enabled": False}}})
    (text,) = one(docs, "ConfigMap")["data"].values()
    assert "sealing" not in yaml.safe_load(text)


def test_the_coordinator_state_lives_on_a_persistent_volume() -> None:
    sts = one(render(), "StatefulSet")
    assert sts["spec"]["replicas"] == 1
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["state"]
    existing = one(render({"coordinator": {"persistence": {"existingClaim": "weckd-state"}}}), "StatefulSet")
    assert "volumeClaimTemplates" not in existing["spec"]
    state = next(v for v in existing["spec"]["template"]["spec"]["volumes"] if v["name"] == "state")
    assert state["persistentVolumeClaim"]["claimName"] == "weckd-state"


def test_the_statefulset_holds_a_completed_chain_instead_of_exiting() -> None:
    args = container(render())["args"]  # exiting 0 would restart the pod over and over
    assert "--hold" in args and check_command(args) == []


def test_the_job_runs_one_chain_to_completion_and_restarts_only_a_failed_run() -> None:
    docs = render({"coordinator": {"kind": "Job", "job": {"backoffLimit": 2}}})
    job = one(docs, "Job")["spec"]
    assert job["backoffLimit"] == 2 and job["template"]["spec"]["restartPolicy"] == "OnFailure"
    assert job.get("parallelism", 1) == 1 and job.get("completions", 1) == 1
    assert "--hold" not in container(docs)["args"]  # exit 0 ends the Job


def test_the_job_keeps_its_state_on_a_claim_it_renders() -> None:
    docs = render({"coordinator": {"kind": "Job", "persistence": {"size": "7Gi", "storageClass": "fast"}}})
    claim = one(docs, "PersistentVolumeClaim")
    state = next(v for v in pod(docs)["volumes"] if v["name"] == "state")
    assert state == {"name": "state", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
    assert claim["spec"]["resources"]["requests"]["storage"] == "7Gi" and claim["spec"]["storageClassName"] == "fast"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"  # outlives helm uninstall
    assert mount_of(docs, "/var/lib/weckd/state")["name"] == "state"


def test_the_job_uses_an_existing_claim_or_an_empty_dir_and_renders_no_claim() -> None:
    existing = render({"coordinator": {"kind": "Job", "persistence": {"existingClaim": "weckd-state"}}})
    off = render({"coordinator": {"kind": "Job", "persistence": {"enabled": False}}})
    for docs, volume in ((existing, {"persistentVolumeClaim": {"claimName": "weckd-state"}}), (off, {"emptyDir": {}})):
        assert "PersistentVolumeClaim" not in kinds(docs)
        assert next(v for v in pod(docs)["volumes"] if v["name"] == "state") == {"name": "state", **volume}


@pytest.mark.parametrize("values", [{}, JOB], ids=["statefulset", "job"])
def test_services_policy_and_monitor_select_the_coordinator_pod(values: dict[str, Any]) -> None:
    docs = render({**values, "serviceMonitor": {"enabled": True}})
    workload = next(d for d in docs if d["kind"] in ("StatefulSet", "Job"))
    labels = workload["spec"]["template"]["metadata"]["labels"].items()
    services = [d for d in docs if d["kind"] == "Service"]
    assert len(services) == 2 and all(s["spec"]["selector"].items() <= labels for s in services)
    assert one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"].items() <= labels
    monitor = one(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"].items()
    (metrics,) = [s for s in services if monitor <= s["metadata"]["labels"].items()]
    assert metrics["spec"]["selector"].items() <= labels
    # a coordinator holding a completed chain is not ready (Fleet API closed): its metrics stay in the Service
    assert metrics["spec"]["publishNotReadyAddresses"] is True


def test_services_expose_fleet_and_metrics_never_the_control_api() -> None:
    docs = render({"coordinator": {"service": {"type": "LoadBalancer"}}})
    services = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Service"}
    assert {n: [p["port"] for p in s["ports"]] for n, s in services.items()} == {
        "fed-coordinator": [9092], "fed-coordinator-metrics": [9464]}
    assert services["fed-coordinator"]["type"] == "LoadBalancer"
    assert services["fed-coordinator-metrics"]["type"] == "ClusterIP"
    assert 9093 not in {p["containerPort"] for p in container(docs)["ports"]}


def test_the_service_monitor_keeps_the_job_and_site_labels_of_the_dashboards() -> None:
    docs = render({**SITE, "serviceMonitor": {"enabled": True}})
    sm, svc = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "weckd-site"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["relabelings"] == [{"targetLabel": "site", "replacement": "B"}]


def test_a_site_may_egress_only_to_the_coordinator_fleet_port_and_dns() -> None:
    policy = one(render(SITE), "NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    rules = {tuple(sorted((p["port"], p["protocol"]) for p in r["ports"])): r.get("to") for r in policy["egress"]}
    assert rules == {((9092, "TCP"),): [{"ipBlock": {"cidr": "203.0.113.10/32"}}],
                     ((53, "TCP"), (53, "UDP")): [{"namespaceSelector": {},
                                                   "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]}
    assert [[p["port"] for p in r["ports"]] for r in policy["ingress"]] == [[9465]]


def test_the_coordinator_admits_fleet_and_metrics_only() -> None:
    policy = one(render(), "NetworkPolicy")["spec"]
    assert sorted(p["port"] for r in policy["ingress"] for p in r["ports"]) == [9092, 9464]
    assert {p["port"] for r in policy["egress"] for p in r["ports"]} == {53}


@pytest.mark.parametrize("values", [{}, JOB, SITE], ids=["coordinator", "coordinator-job", "site"])
def test_pods_run_non_root_with_keys_and_config_read_only(values: dict[str, Any]) -> None:
    docs = render(values)
    spec, c = pod(docs), container(docs)
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["image"] == f"weckd:{VERSION}"
    for path, m in mounts(docs).items():
        assert bool(m.get("readOnly")) is (path.startswith("/etc/weckd") or path == "/data"), path


BAD_VALUES = {
    "unknown role": {"role": "relay"},
    "unknown top-level key": {"replicas": 2},
    "misspelt nested key": {"coordinator": {"fleetPortt": 9092}},
    "port out of range": {"coordinator": {"fleetPort": 70000}},
    "site name with a space": {"role": "site", "site": {"name": "A B"}},
    "latest tag": {"image": {"tag": "latest"}},
    "key the chart sets": {"coordinator": {"config": {"federation": {"fleet_address": "0.0.0.0:1"}}}},
    "site key the chart sets": {"role": "site", "site": {"config": {"auth_key": "/tmp/k"}}},
    "two data sources": {"role": "site", "site": {"data": {"existingClaim": "a", "hostPath": "/b"}}},
    "empty chain": {"coordinator": {"config": {"chain": {"order": []}}}},
    "sealing in the config": {"role": "site", "site": {"config": {"sealing": {"keys": "/tmp"}}}},
    "final model for nobody": {"coordinator": {"sealing": {"enabled": True, "deliverTo": []}}},
    "unknown coordinator kind": {"coordinator": {"kind": "Deployment"}},
    "negative backoffLimit": {"coordinator": {"kind": "Job", "job": {"backoffLimit": -1}}},
}


@pytest.mark.parametrize("values", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_are_refused(values: dict[str, Any]) -> None:
    h = _helm()
    with h.Chart.load(str(CHART)) as chart:
        merged = chart.merge_values(values)
        with pytest.raises(h.HelmError):
            chart.validate_schema(merged)
        with pytest.raises(h.HelmError):
            chart.render(values, name="fed", namespace="weckd")


def test_the_default_values_pass_the_schema_for_both_roles() -> None:
    h = _helm()
    with h.Chart.load(str(CHART)) as chart:
        for values in ({}, JOB, SITE):
            chart.validate_schema(chart.merge_values(values))


def test_clashing_ports_are_refused() -> None:
    h = _helm()
    with pytest.raises(h.HelmError, match="must differ"):
        render({"coordinator": {"controlPort": 9092}})
