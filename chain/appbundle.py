"""weckd's Flower app bundle: config only, built the same way by the coordinator and checked by every site.

Flower ships an app bundle (FAB, a zip) with every run, and a stock SuperNode imports whatever
``clientapp`` module it names. A weckd site never does: it runs only its own installed ClientApp,
and accepts a run only if the bundle is exactly the one :func:`app_pyproject` describes for the
site's own weckd version (``pyproject.toml`` plus Flower's ``.info/CONTENT`` manifest, no code).
The ``serverapp`` entry is not compared: it names code on the coordinator's host, which runs
whatever its owner installs there whatever the bundle says.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from typing import Any

import tomli_w
import tomllib

from . import __version__
from .protocol import Reason, Refused

APP_NAME = "weckd-chain"
PUBLISHER = "weckd"
SERVERAPP = "weckd.server.app:app"
CLIENTAPP = "weckd.client.app:app"
RUN_CONFIG_KEYS = ("federation-config", "config-dir", "output-dir", "state-dir", "progress-file",
                   "wire-log", "superlink-database")
MAX_BUNDLE_BYTES = 64 * 1024
FILES = {"pyproject.toml", ".info/CONTENT"}


def app_pyproject(version: str = __version__) -> str:
    """The ``pyproject.toml`` of weckd's config-only app for ``version``."""
    return tomli_w.dumps({
        "project": {"name": APP_NAME, "version": version},
        "tool": {"flwr": {"app": {"publisher": PUBLISHER,
                                  "components": {"serverapp": SERVERAPP, "clientapp": CLIENTAPP},
                                  "config": {k: "" for k in RUN_CONFIG_KEYS}}}},
    })


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    components = dict(config.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}))
    components.pop("serverapp", None)
    app = {**config.get("tool", {}).get("flwr", {}).get("app", {}), "components": components}
    return {**config, "tool": {**config.get("tool", {}), "flwr": {**config.get("tool", {}).get("flwr", {}),
                                                                  "app": app}}}


def check_bundle(fab: bytes, fab_id: str, fab_version: str, where: str) -> None:
    """Refuse (``foreign-app``) any bundle but weckd's own config-only app for this installed version."""
    def refuse(why: str) -> Refused:
        return Refused(Reason.FOREIGN_APP, f"{where}: the run's app bundle {why}; this site runs only weckd "
                       f"{__version__}'s own ClientApp (install the same weckd version at the coordinator)")

    if fab_id != f"{PUBLISHER}/{APP_NAME}":
        raise refuse(f"is {fab_id[:80]!r} {fab_version[:20]!r}, not {PUBLISHER}/{APP_NAME} {__version__}")
    if fab_version != __version__:  # every message carries its run's bundle version: checked each time
        raise Refused(Reason.VERSION_MISMATCH, f"{where}: the coordinator runs weckd {fab_version[:20]!r}, this "
                      f"site weckd {__version__}; install the same weckd version on both sides")
    if len(fab) > MAX_BUNDLE_BYTES:
        raise refuse(f"is {len(fab)} bytes; a config-only app is under {MAX_BUNDLE_BYTES}")
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as zf:
            infos = zf.infolist()
            names = {i.filename for i in infos}
            if names != FILES or len(infos) != len(FILES) or sum(i.file_size for i in infos) > MAX_BUNDLE_BYTES:
                raise refuse(f"holds {sorted(names)[:8]}, not exactly {sorted(FILES)}")
            pyproject, content = zf.read("pyproject.toml"), zf.read(".info/CONTENT")
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as err:
        raise refuse(f"is not a readable zip ({type(err).__name__})") from None
    digest = hashlib.sha256(pyproject).hexdigest()
    if content.decode("utf-8", "replace").split(",")[:2] != ["pyproject.toml", digest]:
        raise refuse("has a CONTENT manifest that does not match its pyproject.toml")
    try:
        got = tomllib.loads(pyproject.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        raise refuse("has an unreadable pyproject.toml") from None
    if _comparable(got) != _comparable(tomllib.loads(app_pyproject())):
        components = got.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
        raise refuse(f"differs from weckd's own app (clientapp {str(components.get('clientapp'))[:80]!r})")
