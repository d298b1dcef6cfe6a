"""An append-only, hash-chained audit log of one party's decisions, and its verifier.

Every site and the coordinator append one line per decision: a train request sent or refused, a
payload accepted, an evaluation, a delivery. Each line is canonical JSON (sorted keys, no spaces)::

    {"decision":"refused","event":"train","hash":"…","link":2,"prev":"…","reason":"arch-not-allowed",
     "run":"r1","seq":7,"time":"2025-01-01T12:00:00.000000Z", …}

``seq`` counts from 0; ``prev`` is the SHA-256 of the previous line's bytes (64 zeros for the first);
``hash`` is the SHA-256 of the line's canonical JSON without ``hash``. An edited, removed or
reordered line breaks the chain at that line. Removing lines from the end keeps the chain intact, so
a sidecar ``<log>.head`` (rewritten atomically after each append) records the last line's ``seq``
and the SHA-256 of its bytes: a log that ends before its head is reported as truncated, and
appending to it is refused.

Appends are safe across processes (``flock`` on the log, ``O_APPEND``), fsync'd, mode 0600; a
symlinked log path or folder is refused. Lines hold counts, hashes, names and reason codes, never
patient-level data (no paths, images, labels or per-sample values).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import SecurityError
from .files import atomic_write, private_dir

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.log"  # the conventional name in a party's state dir
HEAD_SUFFIX = ".head"
GENESIS = "0" * 64
DECISIONS = ("accepted", "refused", "sent", "failed", "info")
RESERVED = ("seq", "time", "prev", "hash", "event", "run", "link", "decision", "reason")
_SCALARS = (str, int, float, bool, type(None))


def canonical(obj: dict[str, Any]) -> bytes:
    """The one byte form of a line: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def head_path(path: Path) -> Path:
    return path.with_name(path.name + HEAD_SUFFIX)


class AuditLog:
    """One party's audit log at ``path`` (created on the first append, with its parent folder)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, event: str, *, run: str = "", link: int | None = None, decision: str = "info", reason: str = "",
               **fields: Any) -> dict[str, Any]:
        """Append one decision and return the line as written (with its ``seq``, ``prev`` and ``hash``)."""
        body = _body(event, run, link, decision, reason, fields)
        private_dir(self.path.parent)
        fd = _open_log(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            last = _last_line(fd, self.path)
            seq, prev = _continue_from(last, self.path)
            line = {**body, "seq": seq, "time": _now(), "prev": prev}
            line["hash"] = sha256_hex(canonical(line))
            data = canonical(line)
            _write_all(fd, data + b"\n")
            os.fsync(fd)
            _write_head(self.path, seq, sha256_hex(data))
        finally:
            os.close(fd)  # releases the lock
        return line


def _body(event: str, run: str, link: int | None, decision: str, reason: str, fields: dict[str, Any]
          ) -> dict[str, Any]:
    if not event or not isinstance(event, str):
        raise ValueError("audit: event must be a non-empty string")
    if decision not in DECISIONS:
        raise ValueError(f"audit: decision {decision!r} is not one of {', '.join(DECISIONS)}")
    clash = sorted(set(fields) & set(RESERVED))
    if clash:
        raise ValueError(f"audit: field(s) {', '.join(clash)} are reserved")
    for key, value in fields.items():
        _check_value(key, value)
    body: dict[str, Any] = {"event": event, "run": str(run), "decision": decision, "reason": str(reason), **fields}
    if link is not None:
        body["link"] = int(link)
    return body


def _check_value(key: str, value: Any) -> None:
    """Scalars, lists of scalars and dicts of scalars: one level, so a line stays a flat record."""
    if isinstance(value, _SCALARS):
        return
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else None
    if items is None or not all(isinstance(v, _SCALARS) for v in items):
        raise ValueError(f"audit: field {key!r} must be a scalar, or a list or dict of scalars")
    if isinstance(value, dict) and not all(isinstance(k, str) for k in value):
        raise ValueError(f"audit: field {key!r}: dict keys must be strings")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _open_log(path: Path) -> int:
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise SecurityError(f"audit log {path} is a symlink; point the state dir at the real file") from err
        raise
    mode = os.fstat(fd).st_mode & 0o777
    if mode & 0o077:
        log.warning("audit log %s had mode %o; setting 0600", path, mode)
        os.fchmod(fd, 0o600)
    return fd


def _last_line(fd: int, path: Path) -> bytes | None:
    """The log's last line without its newline; None for an empty log; SecurityError for a torn one."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    if os.pread(fd, 1, size - 1) != b"\n":
        raise SecurityError(f"audit log {path} ends in a torn line; run 'weckd audit verify {path}', then move the "
                            "log and its .head aside to start a new one")
    end, start, chunk = size - 1, size - 1, 4096
    while start > 0:
        lo = max(0, start - chunk)
        block = os.pread(fd, start - lo, lo)
        cut = block.rfind(b"\n")
        if cut >= 0:
            return os.pread(fd, end - (lo + cut + 1), lo + cut + 1)
        start = lo
    return os.pread(fd, end, 0)


def _continue_from(last: bytes | None, path: Path) -> tuple[int, str]:
    """The next ``seq`` and ``prev``, after checking the log still ends where its head says."""
    head = _read_head(path)
    if last is None:
        if head is not None:
            raise SecurityError(f"audit log {path} is empty but its head records seq {head[0]}: it was truncated; "
                                "keep it as evidence and start a new log elsewhere")
        return 0, GENESIS
    try:
        body = json.loads(last)
        seq = int(body["seq"])
    except (ValueError, KeyError, TypeError) as err:
        raise SecurityError(f"audit log {path}: its last line is not an audit line; run 'weckd audit verify "
                            f"{path}'") from err
    digest = sha256_hex(last)
    lagging = head is not None and head == (seq - 1, body.get("prev"))  # a crash before the head write
    if head is not None and head != (seq, digest) and not lagging:
        raise SecurityError(f"audit log {path} ends at seq {seq} but its head records seq {head[0]}: it was "
                            "truncated or replaced; keep it as evidence and start a new log elsewhere")
    return seq + 1, digest


def _read_head(path: Path) -> tuple[int, str] | None:
    hp = head_path(path)
    try:
        body = json.loads(hp.read_bytes())
        return int(body["seq"]), str(body["sha256"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as err:
        raise SecurityError(f"audit head {hp} is unreadable; run 'weckd audit verify {path}'") from err


def _write_head(path: Path, seq: int, digest: str) -> None:
    atomic_write(head_path(path), canonical({"seq": seq, "sha256": digest}) + b"\n", 0o600)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# -- verification ----------------------------------------------------------------------------------------

@dataclass
class AuditSummary:
    """What ``verify`` found: counts, the time span, and every problem naming its line (1-based)."""

    path: str
    lines: int = 0
    first_time: str = ""
    last_time: str = ""
    events: dict[str, int] = field(default_factory=dict)
    decisions: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "lines": self.lines, "first_time": self.first_time,
                "last_time": self.last_time, "events": self.events, "decisions": self.decisions,
                "reasons": self.reasons, "problems": self.problems}


def verify(path: str | Path) -> AuditSummary:
    """Check the chain line by line and the log's end against its head; FileNotFoundError if absent."""
    path = Path(path)
    raw = path.read_bytes()
    summary = AuditSummary(str(path))
    parts = raw.split(b"\n")
    torn = parts.pop() if parts else b""  # after the last newline: b"" unless the last line is torn
    parsed = [_parse(line) for line in parts]
    seqs = [p.get("seq") for p in parsed if p is not None]
    expected, prev, digests = 0, GENESIS, [GENESIS]
    counts: dict[str, Counter[str]] = {"event": Counter(), "decision": Counter(), "reason": Counter()}
    for i, (line, body) in enumerate(zip(parts, parsed), start=1):
        problem = _check_line(line, body, expected, prev, seqs)
        if problem:
            summary.problems.append(f"line {i}: {problem}")
        if body is not None:
            for key, counter in counts.items():
                if body.get(key):
                    counter[str(body[key])] += 1
            summary.first_time = summary.first_time or str(body.get("time", ""))
            summary.last_time = str(body.get("time", summary.last_time))
        expected = body["seq"] + 1 if body is not None and isinstance(body.get("seq"), int) else expected + 1
        prev = sha256_hex(line)
        digests.append(prev)
    summary.lines = len(parts)
    if torn:
        summary.problems.append(f"line {len(parts) + 1}: torn: the last line is incomplete (a crash mid-write or a "
                                "truncation)")
    summary.problems.extend(_check_head(path, len(parts), expected - 1, digests[-2:]))
    summary.events, summary.decisions, summary.reasons = (dict(sorted(counts[k].items())) for k in
                                                          ("event", "decision", "reason"))
    return summary


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(line)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _check_line(line: bytes, body: dict[str, Any] | None, expected: int, prev: str, seqs: list[Any]) -> str:
    """Why this line breaks the chain, or "" when it holds."""
    if body is None:
        return "not JSON: not an audit line"
    missing = [k for k in ("seq", "time", "prev", "hash", "event") if k not in body]
    if missing or not isinstance(body["seq"], int):
        return f"not an audit line (missing {', '.join(missing) or 'an integer seq'})"
    claimed = body.pop("hash")
    try:
        recomputed = canonical(body)
    except ValueError:
        return "not JSON: holds NaN or infinity"
    finally:
        body["hash"] = claimed
    if sha256_hex(recomputed) != claimed or canonical(body) != line:
        return "edited: its hash does not match its content"
    seq = body["seq"]
    if seq < expected or (seq > expected and expected in seqs):
        return f"reordered: seq {seq} where seq {expected} was expected"
    if seq > expected:
        gap = f"seq {expected}" if seq == expected + 1 else f"seq {expected}..{seq - 1}"
        return f"removed: {gap} missing before it"
    if body["prev"] != prev:
        return "edited: its prev hash does not match the line before it (that line was replaced)"
    return ""


def _check_head(path: Path, n_lines: int, last_seq: int, tail: list[str]) -> list[str]:
    """The end of the log against ``<log>.head``: fewer lines than the head recorded means truncation.
    ``tail`` holds the SHA-256 of the last two lines (GENESIS standing in before the first)."""
    try:
        head = _read_head(path)
    except SecurityError as err:
        return [f"line {n_lines + 1}: head unreadable: {err}"]
    if head is None:
        if n_lines == 0:
            return []
        return [f"line {n_lines + 1}: truncated?: {head_path(path).name} is missing, so a removed tail cannot be "
                "ruled out; keep the head file next to its log"]
    seq, digest = head
    if n_lines == 0 or seq > last_seq:
        return [f"line {n_lines + 1}: truncated: the log ends at seq {last_seq} but its head records seq {seq}"]
    if seq == last_seq and digest != tail[-1]:
        return [f"line {n_lines}: edited: the last line does not match the hash its head records"]
    if seq < last_seq and not (seq == last_seq - 1 and digest == tail[0]):  # one behind: a crash before its write
        return [f"line {n_lines}: head lags: its head records seq {seq}, the log ends at seq {last_seq}"]
    return []
