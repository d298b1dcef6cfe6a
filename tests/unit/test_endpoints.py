"""What each party listens on (docs/ports.md): metrics on loopback by default, no plaintext mode in
weckd-client, Flower's local APIs on 127.0.0.1 whatever the inherited environment says, and the site's
Runtime (ClientAppIo) API handing out tasks only to the holder of the site's SuperExec secret."""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import uvicorn
import yaml
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode
from flwr.supernode.main import create_app
from flwr.supernode.nodestate import NodeStateFactory
from weckd.chain.files import write_superexec_secret
from weckd.chain.flower import SUPEREXEC_METHODS, runtime_client
from weckd.chain.procs import flower_env, free_port
from weckd.client import cli as client_cli
from weckd.client.site import SiteConfig
from weckd.server.scaffold import chain_settings, write_site_config
from weckd.server.settings import Federation, FederationSettings
from weckd.server.superlink import Paths, superlink_cmd

REPO = Path(__file__).resolve().parents[2]
HOSTILE = {
    "FLWR_INTERNAL_GRPC_CONTROL_API": "1",  # Flower: start the gRPC Control API (default 0.0.0.0:9093)
    "FLWR_OIDC_ENABLED": "1",
    "FLWR_HOME": "/tmp/somewhere-else",
    "FLWR_MODEL_API_ENDPOINT": "https://attacker.example/v1",
    "HTTP_PROXY": "http://proxy.example:3128",
    "NO_PROXY": "intranet.example",
}


@pytest.fixture
def hostile_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in HOSTILE.items():
        monkeypatch.setenv(key, value)


# -- metrics ------------------------------------------------------------------------------------------------

def test_metrics_default_to_loopback_in_code() -> None:
    assert SiteConfig(site="A").metrics_address == "127.0.0.1"
    assert FederationSettings().metrics_address == "127.0.0.1"


def _values(node: Any, key: str) -> list[Any]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [x for v in node.values() for x in _values(v, key)]
    if isinstance(node, list):
        return [x for v in node for x in _values(v, key)]
    return []


@pytest.mark.parametrize("name", ["federation.yaml", "site-A.yaml"])
def test_example_configs_keep_metrics_on_loopback(name: str) -> None:
    assert _values(yaml.safe_load((REPO / "configs" / name).read_text()), "metrics_address") == ["127.0.0.1"]


# -- weckd-client: TLS and the auth key always -----------------------------------------------------------

@pytest.fixture
def site_config(tmp_path: Path) -> Path:
    chain = chain_settings({"data": {"synthetic": {"samples": 80}}})
    return write_site_config(tmp_path, "A", chain, "127.0.0.1:9", 1)


def test_client_insecure_flag_exits_2(site_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        client_cli.main(["--site", "A", "-c", str(site_config), "--insecure", "--check"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --insecure" in capsys.readouterr().err


def test_check_without_ca_exits_2_naming_the_file(site_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (site_config.parent / "keys").mkdir()
    (site_config.parent / "keys" / "site-A").write_text("an auth key\n")
    assert client_cli.main(["--site", "A", "-c", str(site_config), "--check"]) == 2
    err = capsys.readouterr().err
    assert "ca:" in err and str(site_config.parent / "certs" / "ca.crt") in err and "file not found" in err


def test_check_without_auth_key_exits_2_naming_the_file(site_config: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    (site_config.parent / "certs").mkdir()
    (site_config.parent / "certs" / "ca.crt").write_text("a CA certificate\n")
    assert client_cli.main(["--site", "A", "-c", str(site_config), "--check"]) == 2
    err = capsys.readouterr().err
    assert "auth_key:" in err and str(site_config.parent / "keys" / "site-A") in err and "file not found" in err


# -- Flower's processes: explicit loopback, nothing of Flower's from the environment -------------------------

def test_flower_env_drops_inherited_flwr_variables(hostile_env: None, tmp_path: Path) -> None:
    env = flower_env(tmp_path / "home", {"FLWR_LOG_LEVEL": "DEBUG"})
    flwr = {k: v for k, v in env.items() if k.startswith("FLWR_")}
    assert flwr == {"FLWR_HOME": str(tmp_path / "home"), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE": "1048576",
                    "FLWR_LOG_LEVEL": "DEBUG"}


def test_flower_env_keeps_loopback_off_the_proxy(hostile_env: None, tmp_path: Path) -> None:
    env = flower_env(tmp_path / "home")
    assert env["HTTP_PROXY"] == HOSTILE["HTTP_PROXY"]  # the Fleet connection may need it; loopback never does
    for name in ("NO_PROXY", "no_proxy"):
        hosts = env[name].split(",")
        assert {"127.0.0.1", "localhost", "::1"} <= set(hosts)
    assert "intranet.example" in env["NO_PROXY"].split(",")


def test_flower_helpers_come_from_this_installation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Flower starts flower-superexec and flwr-serverapp by name: from this interpreter's bin/, first on PATH,
    even where it is not on the caller's PATH (a systemd unit, weckd-server started by its full path)."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = flower_env(tmp_path / "home")
    scripts = str(Path(sys.executable).parent)
    assert env["PATH"].split(os.pathsep) == [scripts, "/usr/bin", "/bin"]
    assert (Path(scripts) / "flower-superexec").is_file()


def test_superlink_binds_loopback_except_fleet(hostile_env: None, tmp_path: Path) -> None:
    settings = FederationSettings(fleet_address="0.0.0.0:9092", control_port=9093)
    fed = Federation(chain=None, settings=settings, sites={}, source="federation.yaml")  # type: ignore[arg-type]
    cmd = superlink_cmd(fed, Paths.under(tmp_path))
    assert cmd[:3] == [sys.executable, "-m", "weckd.server.flower_superlink"]  # its SQLite memory bounded
    args = _parse_args_run_superlink().parse_args(cmd[3:])
    assert (args.host, args.port) == ("127.0.0.1", 9093)  # Control + Runtime (ServerAppIo) HTTP API
    assert args.control_api_address == "127.0.0.1:9093"  # the gRPC Control API, if it were ever enabled
    assert args.health_server_address is None
    assert args.fleet_api_address == "0.0.0.0:9092"  # the one port that faces the sites
    assert not args.insecure and args.enable_supernode_auth
    assert args.isolation == "process"  # no SuperExec: the ServerApp runs in the SuperLink (flower.ServerAppHost)
    assert args.superexec_auth_secret_file == str(Paths.under(tmp_path).secret)


def test_the_superlinks_serverapp_host_reaches_the_runtime_api_on_loopback_with_tls_and_the_secret(
        hostile_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No SuperExec process: the SuperLink's own ServerApp host asks for runs, with what weckd-server passed it."""
    from weckd.chain.flower import RUN_SIGNAL_ENV
    from weckd.server import flower_superlink

    settings = FederationSettings(fleet_address="0.0.0.0:9092", control_port=9093, ca="certs/ca.crt")
    fed = Federation(chain=None, settings=settings, sites={}, source="federation.yaml")  # type: ignore[arg-type]
    paths = Paths.under(tmp_path)
    write_superexec_secret(paths.secret.parent)
    monkeypatch.setenv(RUN_SIGNAL_ENV, str(paths.run_signal))
    host = flower_superlink._host(superlink_cmd(fed, paths)[3:])
    assert host.address == "127.0.0.1:9093" and host.ca_file == "certs/ca.crt"
    assert host.secret == paths.secret.read_bytes() and host.run_signal == paths.run_signal
    assert host.ended == paths.ended  # where weckd-server looks for each run's end


def test_a_superlink_without_its_run_signal_is_one_clear_line(hostile_env: None, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from weckd.chain.errors import ConfigError
    from weckd.chain.flower import RUN_SIGNAL_ENV
    from weckd.server import flower_superlink

    settings = FederationSettings(fleet_address="0.0.0.0:9092", control_port=9093)
    fed = Federation(chain=None, settings=settings, sites={}, source="federation.yaml")  # type: ignore[arg-type]
    paths = Paths.under(tmp_path)
    write_superexec_secret(paths.secret.parent)
    monkeypatch.delenv(RUN_SIGNAL_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"{RUN_SIGNAL_ENV} not set"):
        flower_superlink._host(superlink_cmd(fed, paths)[3:])


def test_supernode_binds_loopback_with_tls_auth_and_superexec_secret(hostile_env: None, tmp_path: Path) -> None:
    cfg = SiteConfig(site="A", superlink="coordinator.example:9092", clientappio_port=9094,
                     source=str(tmp_path / "site-A.yaml"))
    secret = tmp_path / "superexec.secret"
    args = _parse_args_run_supernode().parse_args(client_cli.supernode_cmd(cfg, secret)[3:])
    assert (args.host, args.port) == ("127.0.0.1", 9094)  # Runtime (ClientAppIo) HTTP API
    assert args.health_server_address is None
    assert not args.insecure and args.root_certificates == cfg.ca and args.auth_supernode_private_key == cfg.auth_key
    assert args.isolation == "process" and args.superexec_auth_secret_file == str(secret)
    executor = client_cli.executor_cmd(cfg, secret)
    assert executor[executor.index("--superexec-auth-secret-file") + 1] == str(secret)
    assert executor[executor.index("--clientappio") + 1] == "127.0.0.1:9094"


def test_superexec_secret_is_private_and_new_each_start(tmp_path: Path) -> None:
    first = write_superexec_secret(tmp_path / "flwr-supernode").read_bytes()
    path = write_superexec_secret(tmp_path / "flwr-supernode")
    assert len(path.read_bytes()) == 32 and path.read_bytes() != first
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700


# -- the site's Runtime (ClientAppIo) API: tasks only for the SuperExec secret --------------------------------

SECRET = b"k" * 32


@pytest.fixture(scope="module")
def runtime_api() -> Iterator[str]:
    """Flower's own SuperNode Runtime API app, with the SuperExec secret set (as --superexec-auth-secret-file does)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(NodeStateFactory(ObjectStoreFactory()), SECRET),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    yield f"127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _acquire(client: RuntimeHttpClient) -> Any:
    return client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))


def test_executor_with_the_secret_may_acquire_tasks(runtime_api: str) -> None:
    assert not _acquire(runtime_client(runtime_api, None, SECRET)).HasField("task")  # answered: no task pending


@pytest.mark.parametrize("secret", [None, b"not the secret"])
def test_caller_without_the_secret_is_refused(runtime_api: str, secret: bytes | None) -> None:
    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=SUPEREXEC_METHODS))
    client = RuntimeHttpClient.from_server_address(server_address=runtime_api, insecure=True, root_certificates=None,
                                                   interceptors=interceptors)  # no retry: Flower's would SIGINT us
    with pytest.raises(httpx.HTTPStatusError) as err:
        _acquire(client)
    assert err.value.response.status_code == 401
