"""A real weckd site against a coordinator under an attacker's control.

Whoever controls the coordinator host (or any account on it: Flower's Control API on 127.0.0.1 has
no login) submits runs with any bundle and any ServerApp, and holds the federation's TLS key, the
coordinator's sealing keys and the registered site auth keys. Here: a real SuperLink started as
weckd-server starts it (no weckd-server), real ``weckd-client`` sites B and C (B's policy allows 2
evaluations per run, C's requires DP), and the attacker's ServerApp (``attacker/weckd_attacker.py``,
on the SuperLink's PYTHONPATH) sending crafted requests (``attacker/crafted.py``), all in two runs:
one whose bundle names a foreign ClientApp, one with weckd's own bundle for everything else.

Every refused request must reach the coordinator as ``weckd-refused:<reason> <fixed text>`` (no local
path), be in the site's audit log and its /metrics by reason, and cause no work at the site.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import pytest
import yaml
from weckd.chain.protocol import ERROR_PREFIX
from weckd.server.demo import LocalFederation
from weckd.server.scaffold import Scaffold, chain_settings, make_scaffold, site_sealing, write_site_config
from weckd.server.settings import load_federation
from weckd.server.superlink import (
    Paths,
    register_sites,
    run_status,
    start_superlink,
    submit,
    write_app_dir,
    write_cli_config,
)

pytestmark = pytest.mark.slow

ATTACKER = Path(__file__).with_name("attacker")
SERVERAPP = 'serverapp = "weckd.server.app:app"'
CLIENTAPP = 'clientapp = "weckd.client.app:app"'
RUN_TIMEOUT = 300.0  # today some requests are trained instead of refused
ESCAPE = "../../../escape"
POLICIES = {"B": {"max_evaluations_per_run": 2}, "C": {"require_dp": True}}

# the scenarios of the main run, in order (see attacker/crafted.py); "join" is B's legitimate entry
# into a newer run, which the stale-run scenario needs
MAIN = ["join", "stale-run", "coordinator-teacher", "coordinator-model", "seal-for-coordinator",
        "missing-teacher", "run-id-relative", "run-id-absolute", "weights-from-wire", "garbage-teacher",
        "truncated-teacher", "nested-header", "huge-dims", "batch-over-limit", "evaluations-over-limit",
        "dp-required", "deliver-untrained", "deliver-outsider", "arch-not-allowed", "epochs-over-limit"]


@dataclass(frozen=True)
class Case:
    scenario: str
    reasons: tuple[str, ...]  # any of these
    site: str = "B"
    step: int = 0  # the request of the scenario that must be refused

    def __str__(self) -> str:
        return self.scenario


CASES = [
    Case("foreign-app", ("foreign-app",)),
    Case("coordinator-teacher", ("coordinator-sender",)),
    Case("coordinator-model", ("coordinator-sender",)),
    Case("stale-run", ("stale-run", "replay")),
    Case("seal-for-coordinator", ("recipient-not-allowed",)),
    Case("missing-teacher", ("missing-teacher",)),
    Case("dp-required", ("dp-required",), site="C"),
    Case("run-id-relative", ("bad-run-id",)),
    Case("run-id-absolute", ("bad-run-id",)),
    Case("weights-from-wire", ("weights-from-wire",)),
    Case("arch-not-allowed", ("arch-not-allowed",)),
    Case("epochs-over-limit", ("epochs-over-limit",)),
    Case("batch-over-limit", ("batch-over-limit",)),
    Case("evaluations-over-limit", ("evaluations-over-limit",), step=2),
    Case("garbage-teacher", ("malformed", "malformed-payload")),
    Case("truncated-teacher", ("malformed", "malformed-payload")),
    Case("nested-header", ("malformed-payload",)),
    Case("huge-dims", ("malformed-payload", "too-large")),
    Case("deliver-untrained", ("bad-request",)),
    Case("deliver-outsider", ("recipient-not-allowed",)),
]


@dataclass
class Attack:
    """What the two attack runs left behind, read while the sites still ran."""

    root: Path
    state: dict[str, Path]  # site -> its state dir
    runs: dict[str, tuple[str, str]]  # "evil" / "main" -> (status, details)
    steps: list[dict[str, Any]]
    errors: dict[str, str | None]  # the attacker ServerApp's own failure, per run
    metrics: dict[str, str]
    audit: dict[str, list[dict[str, Any]]]
    listening: list[str]  # addresses B's metrics port is bound to
    marker: Path
    escape_targets: list[Path]

    def step(self, case: Case) -> dict[str, Any]:
        found = [s for s in self.steps if s["scenario"] == case.scenario and s["index"] == case.step]
        assert found, (f"{case.scenario}: the attacker never sent it (runs {self.runs}; ServerApp error "
                       f"{self.errors}); logs in {self.root / 'logs'}")
        return found[0]


# -- the harness ---------------------------------------------------------------------------------------

def _site_configs(scaffold: Scaffold) -> None:
    """B: metrics address left to its default; policies as in POLICIES."""
    for site, policy in POLICIES.items():
        path = scaffold.sites[site]
        cfg = yaml.safe_load(path.read_text())
        cfg["policy"] = policy
        if site == "B":
            cfg.pop("metrics_address")
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def _bundle(folder: Path, paths: Paths, clientapp: str = "") -> Path:
    """weckd's own config-only bundle with the attacker's ServerApp (and, given, another ClientApp)."""
    write_app_dir(dataclasses.replace(paths, app_dir=folder))
    text = (folder / "pyproject.toml").read_text()
    assert SERVERAPP in text and CLIENTAPP in text, text
    text = text.replace(SERVERAPP, 'serverapp = "weckd_attacker:app"')
    if clientapp:
        text = text.replace(CLIENTAPP, f'clientapp = "{clientapp}"')
    (folder / "pyproject.toml").write_text(text)
    return folder


EVIL = '''"""Code shipped in a run bundle: it must never run at a site."""
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

Path({marker!r}).write_text("code from the run bundle ran at the site\\n")

app = ClientApp()


@app.query()
def query(msg, context):
    return Message(RecordDict({{"evil": ConfigRecord({{"ran": True}})}}), reply_to=msg)
'''


def _submit(paths: Paths, app_dir: Path, plan: dict[str, Any], plan_file: Path) -> int:
    plan_file.write_text(json.dumps(plan, indent=1))
    return submit(dataclasses.replace(paths, app_dir=app_dir), {"federation-config": str(plan_file)})


def _wait(paths: Paths, run_id: int, out: Path, deadline: float) -> tuple[str, str]:
    """The run's final status: asked once the ServerApp has written ``done`` (or every 15 s: each
    ``flwr ls`` costs a second of CPU)."""
    asked = time.monotonic()
    while time.monotonic() < deadline:
        done = out.is_file() and json.loads(out.read_text()).get("done")
        if done or time.monotonic() - asked > 15.0:
            status, details = run_status(paths, run_id)
            if status.startswith("finished"):
                return status, details
            asked = time.monotonic()
        time.sleep(0.5)
    return "timeout", f"run {run_id} still going after {RUN_TIMEOUT:.0f}s"


def _read_steps(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    if not path.is_file():
        return [], f"{path} not written (the attacker ServerApp never started?)"
    data = json.loads(path.read_text())
    return data["steps"], data.get("error")


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError as err:
        return f"# scrape failed: {err}"


def _audit(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _listening(port: int) -> list[str]:
    """Local addresses of the listening TCP sockets on ``port`` (/proc/net/tcp, tcp6)."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.partition(":")
            if state == "0A" and int(hexport, 16) == port:
                out.append(_ip(addr))
    return out


def _ip(hexaddr: str) -> str:
    raw = bytes.fromhex(hexaddr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is little-endian
    if len(words) == 4:
        return ".".join(str(b) for b in words)
    return ":".join(words[i:i + 2].hex() for i in range(0, 16, 2))


def _escape_targets(state: Path, absolute: Path) -> list[Path]:
    """Where the bad run ids would land if joined under the site's folders (state/<x>/<y>/<id>)."""
    bases = [state, state / "x", state / "x" / "y", state / "x" / "y" / "z"]
    return sorted({Path(os.path.normpath(b / ESCAPE)) for b in bases} | {absolute})


@pytest.fixture(scope="module")
def attack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attack]:
    root = tmp_path_factory.mktemp("attack").resolve()
    scaffold = make_scaffold(root, chain_settings({"link": {"epochs": 1}}), sealed=True)
    _site_configs(scaffold)
    fed = load_federation(str(scaffold.federation))
    paths = Paths.under(root / "state" / "server")
    paths.state.mkdir(parents=True, exist_ok=True)
    cfgs = {s: yaml.safe_load(scaffold.sites[s].read_text()) for s in ("B", "C")}
    state = {s: root / cfgs[s]["state_dir"] for s in cfgs}
    sites = {s: {"state_dir": str(state[s]), "metrics_port": cfgs[s]["metrics_port"]} for s in cfgs}
    marker, absolute = root / "evil-ran", root / "abs-escape"
    plan = {"federation": str(scaffold.federation), "keys": str(root / "keys"), "scratch": str(root / "attacker"),
            "escape_abs": str(absolute), "sites": sites}
    (root / "attacker").mkdir()
    evil = _bundle(root / "bundle-evil", paths, clientapp="evil:app")
    (evil / "evil.py").write_text(EVIL.format(marker=str(marker)))
    main = _bundle(root / "bundle", paths)
    local = LocalFederation(scaffold, stop_timeout=5.0)
    try:
        # the attacker's module is importable on the coordinator host (SuperLink, flwr CLI), not at the sites
        pythonpath = os.pathsep.join(filter(None, [str(ATTACKER), os.environ.get("PYTHONPATH", "")]))
        attacker_host = mock.patch.dict(os.environ, {"PYTHONPATH": pythonpath})
        with attacker_host:
            start_superlink(fed, local.group, paths)
        write_cli_config(fed, paths)
        register_sites(fed, paths)
        for site in cfgs:
            local.start_site(site)
        # one run after the other: each scenario's before/after snapshot of the site sees only its own requests
        deadline = time.monotonic() + RUN_TIMEOUT
        runs = {}
        for name, scenarios, bundle in (("evil", ["foreign-app"], evil), ("main", MAIN, main)):
            # the flwr CLI checks the app's module; its ServerApp runs in the SuperLink's process (started above
            # with the attacker's module importable too)
            with attacker_host:
                run_id = _submit(paths, bundle, {**plan, "scenarios": scenarios, "out": str(root / f"{name}.json")},
                                 root / f"plan-{name}.json")
            runs[name] = _wait(paths, run_id, root / f"{name}.json", deadline)
        evil_steps, evil_error = _read_steps(root / "evil.json")
        main_steps, main_error = _read_steps(root / "main.json")
        yield Attack(root, state, runs, evil_steps + main_steps, {"evil": evil_error, "main": main_error},
                     {s: _scrape(int(c["metrics_port"])) for s, c in cfgs.items()},
                     {s: _audit(state[s] / "audit.log") for s in cfgs},
                     _listening(int(cfgs["B"]["metrics_port"])), marker, _escape_targets(state["B"], absolute))
    finally:
        local.stop()


# -- the harness works -------------------------------------------------------------------------------

def test_attack_runs_reach_the_site(attack: Attack) -> None:
    assert all(status == "finished:completed" for status, _ in attack.runs.values()), (attack.runs, attack.errors)
    assert attack.errors == {"evil": None, "main": None}
    assert [s["scenario"] for s in attack.steps if s["index"] == 0] == ["foreign-app", *MAIN]


def test_legitimate_requests_are_served(attack: Attack) -> None:
    """B joins a newer run (link 0, trained) and evaluates two models in a run: the refusals are not blanket."""
    served = [s for s in attack.steps if s["scenario"] == "join"
              or (s["scenario"] == "evaluations-over-limit" and s["index"] < 2)]
    assert len(served) == 3
    for s in served:
        assert s["error"] is None and not s.get("timeout"), s
        assert "metrics" in s["content"]["metrics"], s
    join = served[0]
    assert join["after"]["counters"]["weckd_site_links_trained_total"] == \
        join["before"]["counters"]["weckd_site_links_trained_total"] + 1


# -- every refusal -------------------------------------------------------------------------------------

def _local_paths(text: str, attack: Attack) -> list[str]:
    found = re.findall(r"(?<![\w.])/(?:[\w.-]+/)+[\w.-]*", text)
    return found + [p for p in (str(attack.root), "/etc", *map(str, attack.state.values())) if p in text]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_refusal_reaches_coordinator_as_reason_code(attack: Attack, case: Case) -> None:
    step = attack.step(case)
    assert not step.get("timeout"), f"no reply within {step['seconds']}s: the site is working on it"
    assert step["error"] is not None, f"the site served it: {step.get('content')}"
    text = step["error"]["reason"]
    assert any(text.startswith(f"{ERROR_PREFIX}{r} ") for r in case.reasons), text
    assert not _local_paths(text, attack), text


def _expected(case: Case) -> int:
    """How many refusals for ``case.reasons`` at ``case.site`` the cases add up to."""
    return sum(1 for c in CASES if c.site == case.site and c.reasons == case.reasons)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_refusal_is_in_site_audit_log(attack: Attack, case: Case) -> None:
    lines = [x for x in attack.audit[case.site] if x.get("decision") == "refused" and x.get("reason") in case.reasons]
    assert len(lines) >= _expected(case), f"{len(lines)} refused {case.reasons} line(s) in {case.site}'s audit log"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_refusal_is_counted_in_site_metrics(attack: Attack, case: Case) -> None:
    total = 0.0
    for reason in case.reasons:
        m = re.search(rf'^weckd_site_requests_refused_total{{[^}}]*reason="{reason}"[^}}]*}} ([0-9.e+-]+)$',
                      attack.metrics[case.site], re.M)
        total += float(m.group(1)) if m else 0.0
    assert total >= _expected(case), f"weckd_site_requests_refused_total{{reason in {case.reasons}}} = {total}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_refused_request_does_no_work(attack: Attack, case: Case) -> None:
    step = attack.step(case)
    assert not step.get("timeout"), f"no reply within {step['seconds']}s: the site is working on it"
    assert step["before"] == step["after"], f"the site trained or evaluated: {step['before']} -> {step['after']}"


# -- findings with a check of their own -----------------------------------------------------------------

def test_code_in_the_bundle_never_runs_at_the_site(attack: Attack) -> None:
    assert not attack.marker.exists(), "evil.py from the run bundle ran in the site's executor"


def test_bad_run_ids_write_nothing_outside_the_site(attack: Attack) -> None:
    written = [p for p in attack.escape_targets if p.exists()]
    assert not written, f"written through a run id: {written}"


def test_site_metrics_listen_on_loopback_by_default(attack: Attack) -> None:
    assert attack.listening, "B's metrics port is not listening"
    assert all(a.startswith("127.") or a == "0000:0000:0000:0000:0000:0000:0000:0001" for a in attack.listening), \
        attack.listening


def test_insecure_flag_exits_2(attack: Attack) -> None:
    root = attack.root
    fleet = yaml.safe_load((root / "federation.yaml").read_text())["federation"]["fleet_address"]
    chain = chain_settings({"link": {"epochs": 1}})
    cfg = write_site_config(root, "B", chain, fleet, 1, name="B-insecure", sealing=site_sealing("B", ["A", "B", "C"]))
    raw = yaml.safe_load(cfg.read_text())
    cfg.write_text(yaml.safe_dump({**raw, "max_wait": 2.0}, sort_keys=False))
    exe = str(Path(sys.executable).with_name("weckd-client"))
    r = subprocess.run([exe, "--site", "B", "-c", str(cfg), "--insecure"], capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL, start_new_session=True)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
