"""weckd-server's --set overrides reach the ServerApp: it reads the effective config, not the file."""
from __future__ import annotations

from pathlib import Path

from weckd.server.scaffold import chain_settings, make_scaffold
from weckd.server.settings import EFFECTIVE_FILE, load_federation, write_effective
from weckd.server.state import config_hash


def test_an_override_is_what_the_serverapp_loads(tmp_path: Path) -> None:
    scaffold = make_scaffold(tmp_path / "fed", chain_settings())
    fed = load_federation(scaffold.federation, ("link.epochs=5", "federation.on_site_failure=skip"))
    path, digest = write_effective(fed, tmp_path)
    served = load_federation(path, base_dir=fed.base_dir)  # as server/app.py reads it
    assert served.chain.link.epochs == 5 != load_federation(scaffold.federation).chain.link.epochs
    assert served.settings.on_site_failure == "skip"
    assert config_hash(served) == config_hash(fed)
    assert len(digest) == 64 and path == tmp_path / EFFECTIVE_FILE


def test_relative_paths_of_the_effective_config_resolve_against_the_original_folder(tmp_path: Path) -> None:
    scaffold = make_scaffold(tmp_path / "fed", chain_settings())
    fed = load_federation(scaffold.federation)
    served = load_federation(write_effective(fed, tmp_path)[0], base_dir=fed.base_dir)
    assert (served.settings.ca, served.settings.state_dir) == (fed.settings.ca, fed.settings.state_dir)
    assert Path(served.settings.ca).is_file()


def test_the_effective_config_is_private(tmp_path: Path) -> None:
    scaffold = make_scaffold(tmp_path / "fed", chain_settings())
    path, _ = write_effective(load_federation(scaffold.federation), tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
