"""weckd.chain.files: atomic private writes, no writes through links, paths kept inside, plain run ids."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from weckd.chain import files
from weckd.chain.errors import ConfigError, SecurityError
from weckd.chain.files import atomic_write, check_run_id, inside, private_dir, staged_dir
from weckd.chain.protocol import Reason, Refused

pytestmark = pytest.mark.usefixtures("umask_022")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_atomic_write_makes_a_0600_file_under_umask_022(tmp_path: Path) -> None:
    atomic_write(tmp_path / "f", b"data")
    assert (tmp_path / "f").read_bytes() == b"data" and _mode(tmp_path / "f") == 0o600


def test_atomic_write_sets_the_mode_asked_for_on_an_existing_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"old")
    os.chmod(tmp_path / "f", 0o666)
    atomic_write(tmp_path / "f", b"new", 0o644)
    assert (tmp_path / "f").read_bytes() == b"new" and _mode(tmp_path / "f") == 0o644


def test_atomic_write_leaves_no_temp_file(tmp_path: Path) -> None:
    atomic_write(tmp_path / "f", b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_atomic_write_refuses_a_symlink_and_leaves_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(SecurityError, match="symbolic link"):
        atomic_write(tmp_path / "link", b"evil")
    assert target.read_bytes() == b"precious" and (tmp_path / "link").is_symlink()


def test_atomic_write_refuses_a_dangling_symlink_and_creates_nothing(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(SecurityError, match="symbolic link"):
        atomic_write(tmp_path / "link", b"evil")
    assert not (tmp_path / "nowhere").exists()


def test_atomic_write_refuses_a_symlinked_folder(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "dir").symlink_to(tmp_path / "real")
    with pytest.raises(SecurityError, match="symbolic link"):
        atomic_write(tmp_path / "dir" / "f", b"data")
    assert list((tmp_path / "real").iterdir()) == []


def test_atomic_write_opens_a_random_temp_name_exclusively_without_following_links(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[tuple[str, int]] = []
    real_open = os.open

    def spy(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        opened.append((str(path), flags))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(files.os, "open", spy)
    atomic_write(tmp_path / "f", b"1")
    atomic_write(tmp_path / "f", b"2")
    temps = [(p, fl) for p, fl in opened if Path(p).name.startswith(".f.")]
    assert len(temps) == 2 and temps[0][0] != temps[1][0]
    want = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    assert all(fl & want == want and Path(p).parent == tmp_path for p, fl in temps)


def test_atomic_write_without_replace_keeps_an_existing_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"old")
    with pytest.raises(ConfigError, match="already exists; pass --force"):
        atomic_write(tmp_path / "f", b"new", replace=False)
    assert (tmp_path / "f").read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_atomic_write_into_a_missing_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="folder does not exist"):
        atomic_write(tmp_path / "missing" / "f", b"data")


def test_private_dir_is_0700_under_umask_022(tmp_path: Path) -> None:
    assert _mode(private_dir(tmp_path / "a" / "b")) == 0o700


def test_private_dir_refuses_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(SecurityError, match="symbolic link"):
        private_dir(tmp_path / "link")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", ".", ""])
def test_inside_refuses_a_name_that_leaves_the_folder(tmp_path: Path, name: str) -> None:
    with pytest.raises(SecurityError, match="leaves the folder"):
        inside(tmp_path / "base", name)


def test_inside_refuses_a_symlink_that_points_out(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "out").symlink_to(tmp_path)
    with pytest.raises(SecurityError, match="leaves the folder"):
        inside(tmp_path / "base", "out", "secret")


def test_inside_joins_a_plain_name(tmp_path: Path) -> None:
    assert inside(tmp_path, "a", "b.bin") == tmp_path / "a" / "b.bin"


@pytest.mark.parametrize("run_id", ["../../..", "/abs", "", "a" * 65, ".", "..", "a/b", "-a", "a\n", "a b"])
def test_run_id_that_is_not_a_plain_name_is_refused_as_bad_run_id(run_id: str) -> None:
    with pytest.raises(Refused) as info:
        check_run_id(run_id)
    assert info.value.reason is Reason.BAD_RUN_ID and "\n" not in str(info.value)


@pytest.mark.parametrize("run_id", ["20250101T120000Z-0123456789ab", "a" * 64, "run-1.b_c"])
def test_plain_run_id_is_accepted(run_id: str) -> None:
    assert check_run_id(run_id) == run_id


def test_staged_dir_replaces_the_folder_whole_as_0700(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("x")
    with staged_dir(tmp_path / "out") as stage:
        atomic_write(stage / "new", b"y")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new"] and _mode(tmp_path / "out") == 0o700
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_staged_dir_refuses_a_symlinked_target_and_leaves_it(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "real")
    with pytest.raises(SecurityError, match="symbolic link"):
        with staged_dir(tmp_path / "out"):
            pass
    assert (tmp_path / "out").is_symlink() and list((tmp_path / "real").iterdir()) == []


def test_atomic_write_by_hands_the_writer_a_private_temp_file_and_renames_it(tmp_path: Path) -> None:
    seen: list[Path] = []

    def writer(tmp: Path) -> None:
        seen.append(tmp)
        assert tmp.parent == tmp_path and tmp.name.startswith(".f.") and _mode(tmp) & ~0o640 == 0  # never wider
        tmp.write_bytes(b"written by name")

    files.atomic_write_by(tmp_path / "f", writer, 0o640)
    assert (tmp_path / "f").read_bytes() == b"written by name" and _mode(tmp_path / "f") == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["f"] and not seen[0].exists()


def test_a_writer_that_fails_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"old")

    def writer(tmp: Path) -> None:
        tmp.write_bytes(b"half of it")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_by(tmp_path / "f", writer)
    assert (tmp_path / "f").read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f"]
