"""A site runs a run only if its bundle is weckd's own config-only app for the installed version."""
from __future__ import annotations

import io
import zipfile

import pytest
from flwr.cli.build import build_fab_from_files
from weckd.chain import __version__
from weckd.chain.appbundle import app_pyproject, check_bundle
from weckd.chain.protocol import Reason, Refused

FAB_ID = "weckd/weckd-chain"


def _fab(pyproject: str, **extra: bytes) -> bytes:
    return build_fab_from_files({"pyproject.toml": pyproject.encode(), **extra})[0]


def _refused(fab: bytes, fab_id: str = FAB_ID, version: str = __version__,
             reason: Reason = Reason.FOREIGN_APP) -> Refused:
    with pytest.raises(Refused) as err:
        check_bundle(fab, fab_id, version, "test")
    assert err.value.reason is reason
    return err.value


def test_the_bundle_weckd_server_submits_is_accepted() -> None:
    check_bundle(_fab(app_pyproject()), FAB_ID, __version__, "test")


def test_another_serverapp_is_accepted_since_it_runs_on_the_coordinator_host() -> None:
    check_bundle(_fab(app_pyproject().replace("weckd.server.app:app", "elsewhere:app")), FAB_ID, __version__, "t")


def test_a_bundle_naming_another_clientapp_is_refused() -> None:
    _refused(_fab(app_pyproject().replace("weckd.client.app:app", "evil:app")))


def test_a_bundle_carrying_code_is_refused() -> None:
    _refused(_fab(app_pyproject(), **{"evil.py": b"open('/tmp/pwned', 'w')\n"}))


def test_a_coordinator_of_another_weckd_version_is_refused_naming_both_versions() -> None:
    err = _refused(_fab(app_pyproject("9.9.9")), version="9.9.9", reason=Reason.VERSION_MISMATCH)
    assert f"the coordinator runs weckd '9.9.9', this site weckd {__version__}" in str(err)


def test_another_publishers_bundle_is_foreign_whatever_its_version() -> None:
    _refused(_fab(app_pyproject()), fab_id="evil/weckd-chain")


def test_a_bundle_whose_id_is_not_weckds_is_refused() -> None:
    _refused(_fab(app_pyproject()), fab_id="mallory/weckd-chain")


def test_bytes_that_are_not_a_zip_are_refused() -> None:
    _refused(b"PK\x03\x04 not really a zip")


def test_a_manifest_that_does_not_match_the_pyproject_is_refused() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("pyproject.toml", app_pyproject())
        zf.writestr(".info/CONTENT", "pyproject.toml,0000,8")
    _refused(buf.getvalue())
