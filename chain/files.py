"""Writing files safely: one atomic writer, private folders, paths kept inside their folder, plain run ids.

Every file weckd writes goes through :func:`atomic_write`: a temp file with a random name beside the
target, created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` (never an existing file, never through a link) and
the mode asked for (exactly, whatever the umask), flushed and fsync'd, renamed over the target, then
the folder fsync'd. A crash leaves the old file or the new one, never half of one. A target or folder
that is a symbolic link is refused (:class:`SecurityError`) and left untouched: a link planted in a
state or key folder must not redirect a write. Folders weckd owns are made 0700 by :func:`private_dir`;
:func:`staged_dir` replaces a whole folder at once.

Names that arrive from elsewhere (a run id from the coordinator) are checked with :func:`check_run_id`
before they become part of a path, and :func:`inside` joins and refuses anything that escapes its base.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import IO, BinaryIO, Callable, Iterator

from .errors import ConfigError, SecurityError, WeckdError
from .protocol import Reason, Refused

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def refuse_symlink(path: Path) -> None:
    """SecurityError if ``path`` itself is a symbolic link (dangling or not)."""
    if Path(path).is_symlink():
        raise SecurityError(f"{path}: is a symbolic link; weckd does not write through links. Remove the link "
                            "and give the real path instead")


def atomic_write(path: Path, data: bytes | memoryview, mode: int = 0o600, *, replace: bool = True) -> None:
    """Write ``data`` to ``path`` all at once, with permission bits ``mode``.

    With ``replace=False`` an existing ``path`` is not overwritten (ConfigError naming ``--force``).
    The folder must exist (see :func:`private_dir`).
    """
    _write_atomically(path, mode, replace, lambda fh, _: fh.write(data))


def atomic_write_by(path: Path, writer: Callable[[Path], None], mode: int = 0o600, *, replace: bool = True) -> None:
    """:func:`atomic_write` of a file that ``writer`` writes by its name (a library that writes its format straight
    to disk, never holding the whole file in memory): the temp file is created as for :func:`atomic_write`, in
    the same folder, and handed to ``writer``; then made ``mode``, fsync'd and renamed over ``path``."""
    _write_atomically(path, mode, replace, lambda _, tmp: writer(tmp))


def _write_atomically(path: Path, mode: int, replace: bool, fill: Callable[[BinaryIO, Path], object]) -> None:
    path = Path(path)
    refuse_symlink(path.parent)
    refuse_symlink(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)
    except FileNotFoundError:
        raise ConfigError(f"{path.parent}: folder does not exist; create it or fix the path") from None
    except OSError as err:
        raise WeckdError(f"{path}: cannot write ({err.strerror}); check the folder's owner and permissions") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fill(fh, tmp)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        _move_into_place(tmp, path, replace)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _move_into_place(tmp: Path, path: Path, replace: bool) -> None:
    if replace:
        os.replace(tmp, path)  # rename never follows a link at the target: it replaces the name
        return
    try:
        os.link(tmp, path, follow_symlinks=False)  # fails if anything (a link included) holds the name
    except FileExistsError:
        raise ConfigError(f"{path}: already exists; pass --force to overwrite it") from None


def atomic_write_text(path: Path, text: str, mode: int = 0o600, *, replace: bool = True) -> None:
    """:func:`atomic_write` of ``text`` as UTF-8."""
    atomic_write(path, text.encode("utf-8"), mode, replace=replace)


def open_append(path: Path, mode: int = 0o600) -> BinaryIO:
    """``path`` opened for appending (created with ``mode``), never through a symbolic link."""
    path = Path(path)
    refuse_symlink(path.parent)
    refuse_symlink(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC, mode)
    except OSError as err:
        raise WeckdError(f"{path}: cannot open for appending ({err.strerror}); check the path, its owner and "
                         "permissions (a symbolic link is refused)") from None
    return os.fdopen(fd, "ab")


def append_text(path: Path, text: str, mode: int = 0o600) -> None:
    """Append ``text`` (UTF-8) to ``path`` with :func:`open_append` (logs of one JSON line per event)."""
    with open_append(path, mode) as fh:
        fh.write(text.encode("utf-8"))


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dir(path: Path) -> Path:
    """``path`` as a folder, created 0700 if missing (parents as the umask says); never a symbolic link."""
    path = Path(path)
    refuse_symlink(path)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{path}: exists and is not a folder; move it aside or choose another path") from None
    except OSError as err:
        raise WeckdError(f"{path}: cannot create the folder ({err.strerror}); check its owner and permissions"
                         ) from None
    refuse_symlink(path)  # created by someone else in between
    return path


SECRET_FILE = "superexec.secret"  # Flower's SuperExec HMAC secret, shared by a Runtime API and its task runner


def write_superexec_secret(folder: Path) -> Path:
    """A fresh random secret in ``folder/superexec.secret`` (0600, folder 0700) for a Flower component's
    ``--superexec-auth-secret-file`` and the process that takes its tasks (a site's SuperNode and executor, the
    coordinator's SuperLink, whose ServerApp host signs with it); a previous start's secret is replaced."""
    path = private_dir(folder) / SECRET_FILE
    atomic_write(path, secrets.token_bytes(32), 0o600)
    return path


def inside(base: Path, *parts: str) -> Path:
    """``base`` joined with ``parts``; SecurityError if the result, resolved, is not strictly under ``base``."""
    joined = Path(base).joinpath(*parts)
    root = Path(base).resolve()
    real = joined.resolve()
    if real == root or not real.is_relative_to(root):
        raise SecurityError(f"{joined}: leaves the folder {base}; a name from outside must be a plain file name")
    return joined


def check_run_id(run_id: str) -> str:
    """``run_id`` if it is a plain name (letters, digits, '.', '_', '-'; first a letter or digit; ≤ 64)."""
    if not isinstance(run_id, str) or run_id in (".", "..") or not RUN_ID.fullmatch(run_id):
        shown = repr(run_id)[:80]
        raise Refused(Reason.BAD_RUN_ID, f"run id {shown}: not a plain name (letters, digits, '.', '_', '-', "
                                         "starting with a letter or digit, at most 64); refused before any file "
                                         "is written. Start runs with weckd-server, which makes such ids")
    return run_id


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield an empty private staging folder beside ``target``; on success it replaces ``target`` whole.

    On any failure the staging folder is removed and ``target`` is left as it was. ``target`` and its
    parent must not be symbolic links.
    """
    target = Path(target).absolute()
    refuse_symlink(target)
    parent = private_dir(target.parent) if not target.parent.exists() else target.parent
    refuse_symlink(parent)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=parent))  # 0700, random name
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    for f in stage.rglob("*"):
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = target.with_name(f".{target.name}.old-{secrets.token_hex(8)}")
    refuse_symlink(target)
    if target.exists():
        os.replace(target, old)
    os.replace(stage, target)
    fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


@functools.lru_cache(maxsize=32)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: Path, where: str) -> str:
    """The SHA-256 of a file (hashed again whenever its size or modification time changes)."""
    try:
        info = os.stat(path)
        return _sha256_of(str(path), info.st_size, info.st_mtime_ns)
    except OSError as err:
        raise ConfigError(f"{where}: {path}: cannot read the file ({err.strerror})") from None


def process_lock(path: Path, who: str) -> IO[str]:
    """Hold an exclusive lock on ``path`` (0600, its holder's pid inside) for the life of the process (the OS
    releases it if the process dies): one ``who`` per state dir. WeckdError naming the holder if it is held."""
    refuse_symlink(path)
    fh = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), "r+", encoding="utf-8")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise WeckdError(f"{path.parent}: another {who} (pid {holder}) runs on this state dir; stop it first") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def lock_held(path: Path) -> bool:
    """Whether a process holds the lock on ``path`` (tried without waiting, then released)."""
    if not path.is_file() or path.is_symlink():
        return False
    with path.open("r") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False
