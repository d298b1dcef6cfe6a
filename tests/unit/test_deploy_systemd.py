"""The systemd units in deploy/systemd: weckd-server.service and weckd-client@.service.

Checked: ``systemd-analyze verify`` accepts both units with no warning (on copies whose ExecStart points at
this environment's console scripts instead of /opt/weckd/venv/bin, which verify requires to exist; a copy with
a misspelt key shows the check is live); by parsing the units: the hardening settings, read-only config and
data, a state directory, restart on failure but not after success, a config error or a stop, the whole control
group killed, a stop timeout that covers the CLIs' own shutdown, and an ExecStart whose flags exist in the
CLI's ``--help`` (the site unit for an instance, e.g. ``weckd-client@A``).
Not checked: starting the units (CI runs in a container without systemd as PID 1).
"""
from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from weckd.server.settings import FederationSettings
from weckd.server.superlink import CLI_TIMEOUT
from weckd.server.tracking import STOP_WAIT_S

from .deploy_cli import check_command

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "deploy" / "systemd"
SERVER = UNITS / "weckd-server.service"
COORDINATOR = UNITS / "weckd-coordinator.service"  # weckd-server --service
CLIENT = UNITS / "weckd-client@.service"
VENV_BIN = "/opt/weckd/venv/bin/"
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictSUIDSGID": "yes",
    "KillMode": "control-group",
    "Restart": "on-failure",
    "User": "weckd",
    "Group": "weckd",
}
SITE_STOP_S = 2 * 10.0  # weckd-client stops the executor, then the SuperNode: 10 s each before SIGKILL

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed (Debian package systemd)")


def service(path: Path) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string(path.read_text())
    return parser["Service"]


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    for suffix in sorted(units, key=len, reverse=True):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * units[suffix]
    return float(value)


def exec_start(path: Path, instance: str = "A") -> list[str]:
    return shlex.split(service(path)["ExecStart"].replace("%i", instance))


def verify(tmp_path: Path, text: str, name: str, instance: str | None = None) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` on a copy of a unit, ExecStart pointing at this venv's console scripts."""
    unit = tmp_path / name
    unit.write_text(text.replace(VENV_BIN, str(Path(sys.executable).parent) + "/"))
    target = unit if instance is None else tmp_path / name.replace("@.", f"@{instance}.")
    return subprocess.run(["systemd-analyze", "verify", "--man=no", "--generators=no", str(target)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


@needs_analyze
@pytest.mark.parametrize("unit", [SERVER, COORDINATOR], ids=lambda p: p.name)
def test_systemd_analyze_accepts_the_server_unit(tmp_path: Path, unit: Path) -> None:
    res = verify(tmp_path, unit.read_text(), unit.name)
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr


@needs_analyze
def test_systemd_analyze_accepts_a_site_instance(tmp_path: Path) -> None:
    res = verify(tmp_path, CLIENT.read_text(), CLIENT.name, instance="A")
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr


@needs_analyze
def test_systemd_analyze_reports_a_misspelt_key(tmp_path: Path) -> None:
    text = SERVER.read_text().replace("ProtectSystem=", "ProtectSytem=")
    res = verify(tmp_path, text, SERVER.name)
    assert "ProtectSytem" in res.stdout + res.stderr


@pytest.mark.parametrize("unit", [SERVER, COORDINATOR, CLIENT], ids=lambda p: p.name)
def test_units_are_hardened(unit: Path) -> None:
    svc = service(unit)
    assert {k: svc.get(k) for k in HARDENING} == HARDENING
    assert svc.get("CapabilityBoundingSet", None) == ""


@pytest.mark.parametrize("unit", [SERVER, COORDINATOR, CLIENT], ids=lambda p: p.name)
def test_config_and_keys_are_read_only_and_state_is_a_state_directory(unit: Path) -> None:
    svc = service(unit)
    read_only = [p.lstrip("-") for p in svc["ReadOnlyPaths"].split()]
    assert "/etc/weckd" in read_only
    assert svc["StateDirectory"].startswith("weckd")
    assert svc["WorkingDirectory"] == "/var/lib/" + svc["StateDirectory"]


def test_the_site_unit_reads_its_data_read_only() -> None:
    assert "/data" in [p.lstrip("-") for p in service(CLIENT)["ReadOnlyPaths"].split()]


@pytest.mark.parametrize("unit", [SERVER, COORDINATOR, CLIENT], ids=lambda p: p.name)
def test_no_restart_after_a_config_error_or_a_stop(unit: Path) -> None:
    svc = service(unit)
    assert "2" in svc["RestartPreventExitStatus"].split()  # ConfigError: restarting cannot help
    assert "130" in svc["SuccessExitStatus"].split()  # SIGTERM handled: a clean stop


def test_server_stop_timeout_covers_its_shutdown() -> None:
    needed = CLI_TIMEOUT + FederationSettings().shutdown_timeout  # flwr stop, then the SuperLink's group
    assert seconds(service(SERVER)["TimeoutStopSec"]) > needed
    assert seconds(service(COORDINATOR)["TimeoutStopSec"]) > needed + STOP_WAIT_S  # and pending MLflow logging
    assert exec_start(COORDINATOR)[-1] == "--service"


def test_site_stop_timeout_covers_its_shutdown() -> None:
    assert seconds(service(CLIENT)["TimeoutStopSec"]) > SITE_STOP_S


@pytest.mark.parametrize("unit", [SERVER, COORDINATOR, CLIENT], ids=lambda p: p.name)
def test_exec_start_runs_the_venv_cli_with_existing_flags(unit: Path) -> None:
    argv = exec_start(unit)
    assert argv[0].startswith(VENV_BIN)
    assert check_command(argv) == []


def test_the_site_instance_names_the_site_and_its_config() -> None:
    argv = exec_start(CLIENT, "B")
    assert argv[argv.index("--site") + 1] == "B"
    assert argv[argv.index("-c") + 1] == "/etc/weckd/site-B.yaml"
    assert "%i" in service(CLIENT)["StateDirectory"]


def test_seconds_parses_systemd_time_spans() -> None:
    assert (seconds("150s"), seconds("2min"), seconds("45")) == (150.0, 120.0, 45.0)
