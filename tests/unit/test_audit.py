"""The hash-chained audit log: appends, tamper detection by line, concurrency, the CLI and the coordinator's lines."""
from __future__ import annotations

import json
import multiprocessing
import os
import stat
from pathlib import Path

import pytest
from weckd.chain.audit import AuditLog, head_path, verify
from weckd.chain.cli import main
from weckd.chain.errors import SecurityError

from .fake_grid import FakeSites, federation


def _log(tmp_path: Path, n: int = 5) -> Path:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    for k in range(n):
        log.append("train", run="r1", link=k, decision="accepted" if k % 2 else "refused",
                   reason="" if k % 2 else "arch-not-allowed", sender="A", payload_sha256=f"{k:064x}")
    return path


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _first_problem(path: Path) -> str:
    summary = verify(path)
    assert not summary.ok
    return summary.problems[0]


def test_a_valid_chain_verifies_with_counts(tmp_path: Path) -> None:
    summary = verify(_log(tmp_path))
    assert summary.ok and summary.problems == []
    assert summary.lines == 5
    assert summary.events == {"train": 5}
    assert summary.decisions == {"accepted": 2, "refused": 3}
    assert summary.reasons == {"arch-not-allowed": 3}
    assert summary.first_time <= summary.last_time and summary.first_time.endswith("Z")


def test_lines_are_canonical_and_chained(tmp_path: Path) -> None:
    lines = [json.loads(b) for b in _lines(_log(tmp_path, 2))]
    assert [x["seq"] for x in lines] == [0, 1]
    assert lines[0]["prev"] == "0" * 64 and len(lines[1]["prev"]) == 64
    assert _lines(tmp_path / "audit.log")[0] == json.dumps(lines[0], sort_keys=True, separators=(",", ":")
                                                           ).encode() + b"\n"


def test_the_log_and_its_head_are_mode_0600(tmp_path: Path) -> None:
    path = _log(tmp_path, 1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(head_path(path).stat().st_mode) == 0o600


def test_an_edited_field_is_detected_at_its_line(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = _lines(path)
    lines[2] = lines[2].replace(b'"refused"', b'"accepted"')
    path.write_bytes(b"".join(lines))
    assert _first_problem(path).startswith("line 3: edited")


def test_a_rehashed_edit_is_detected_by_the_next_line(tmp_path: Path) -> None:
    from weckd.chain.audit import canonical, sha256_hex

    path = _log(tmp_path)
    lines = _lines(path)
    body = json.loads(lines[2])
    body["decision"] = "accepted"
    del body["hash"]
    body["hash"] = sha256_hex(canonical(body))
    lines[2] = canonical(body) + b"\n"
    path.write_bytes(b"".join(lines))
    assert _first_problem(path).startswith("line 4: edited")


def test_a_deleted_middle_line_is_detected(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = _lines(path)
    del lines[2]
    path.write_bytes(b"".join(lines))
    assert _first_problem(path) == "line 3: removed: seq 2 missing before it"


def test_swapped_lines_are_detected_as_reordered(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_bytes(b"".join(lines))
    assert _first_problem(path).startswith("line 2: reordered")


def test_a_removed_last_line_is_detected_as_truncated_by_the_head(tmp_path: Path) -> None:
    path = _log(tmp_path)
    path.write_bytes(b"".join(_lines(path)[:-1]))
    assert _first_problem(path) == "line 5: truncated: the log ends at seq 3 but its head records seq 4"


def test_appending_to_a_truncated_log_is_refused(tmp_path: Path) -> None:
    path = _log(tmp_path)
    path.write_bytes(b"".join(_lines(path)[:-1]))
    with pytest.raises(SecurityError, match="truncated"):
        AuditLog(path).append("train", decision="info")


def test_a_torn_last_line_is_detected(tmp_path: Path) -> None:
    path = _log(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    assert _first_problem(path).startswith("line 5: torn")


def test_a_non_json_line_is_detected(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = _lines(path)
    lines[1] = b"hello\n"
    path.write_bytes(b"".join(lines))
    assert _first_problem(path).startswith("line 2: not JSON")


def test_a_missing_head_is_reported(tmp_path: Path) -> None:
    path = _log(tmp_path)
    head_path(path).unlink()
    assert "missing" in _first_problem(path)


def test_a_head_one_line_behind_is_a_crash_not_tampering(tmp_path: Path) -> None:
    path = _log(tmp_path, 2)
    head = head_path(path).read_bytes()
    AuditLog(path).append("train", decision="info")
    head_path(path).write_bytes(head)
    assert verify(path).ok
    AuditLog(path).append("train", decision="info")  # and appending continues
    assert verify(path).ok


def test_a_symlinked_log_is_refused(tmp_path: Path) -> None:
    target = _log(tmp_path / "real", 1)
    link = tmp_path / "audit.log"
    link.symlink_to(target)
    with pytest.raises(SecurityError, match="symlink"):
        AuditLog(link).append("train", decision="info")


def test_nested_or_reserved_fields_are_rejected(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    with pytest.raises(ValueError, match="reserved"):
        log.append("train", decision="info", seq=3)
    with pytest.raises(ValueError, match="scalar"):
        log.append("train", decision="info", blobs={"a": {"b": 1}})
    with pytest.raises(ValueError, match="decision"):
        log.append("train", decision="maybe")


def _append_many(path: str, who: str) -> None:
    log = AuditLog(path)
    for i in range(20):
        log.append("train", run="r1", decision="info", who=who, i=i)


def test_concurrent_appends_from_two_processes_keep_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    # fork where there is one: two real processes appending at once, without re-importing the test module in each
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), who)) for who in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    summary = verify(path)
    assert summary.ok, summary.problems
    assert summary.lines == 40


def test_cli_verify_exits_0_on_a_good_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(_log(tmp_path))]) == 0
    assert "chain ok" in capsys.readouterr().out


def test_cli_verify_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(_log(tmp_path)), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["ok"] is True and body["lines"] == 5 and body["reasons"] == {"arch-not-allowed": 3}


def test_cli_verify_exits_1_naming_the_first_bad_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _log(tmp_path)
    lines = _lines(path)
    del lines[1]
    path.write_bytes(b"".join(lines))
    assert main(["audit", "verify", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 2: removed" in err[0]


def test_cli_verify_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(tmp_path / "nope.log")]) == 2
    assert "no such audit log" in capsys.readouterr().err


def test_cli_without_action_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        main(["audit"])
    assert info.value.code == 2


def test_the_coordinator_logs_each_decision_of_a_chain(tmp_path: Path) -> None:
    from weckd.server.schedule import ChainRun
    from weckd.server.state import new_state

    fed = federation(tmp_path, ["A", "B"])
    log = AuditLog(tmp_path / "coordinator-audit.log")
    ChainRun(FakeSites(["A", "B"]), fed, {}, lambda e: None, new_state(fed), tmp_path / "state", log).run()
    summary = verify(log.path)
    assert summary.ok, summary.problems
    lines = [json.loads(b) for b in _lines(log.path)]
    kinds = [(x["event"], x["decision"], x["link"]) for x in lines]
    assert kinds[:2] == [("train", "sent", 0), ("train", "accepted", 0)]
    assert ("train", "sent", 1) in kinds and kinds[-1] == ("deliver", "sent", 1)
    sent_b = next(x for x in lines if x["event"] == "train" and x["decision"] == "sent" and x["to"] == "B")
    accepted_a = next(x for x in lines if x["event"] == "train" and x["decision"] == "accepted" and x["site"] == "A")
    assert sent_b["teacher_sha256"] == accepted_a["blobs"]["weights"]  # what was relayed is what came back
    assert summary.events["evaluate"] >= 2
    assert not os.path.exists(tmp_path / "state" / "audit.log")  # the log given is the one used
