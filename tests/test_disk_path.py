"""The ``disk_path`` fixture (tests/fixtures/paths.py): tests that count bytes written get a
directory on a block device even when pytest's tmp_path is tmpfs (/tmp on Debian 13), and fail
under CI=true instead of skipping when there is none; and ``clean`` (tests/fixtures/diskio.py),
the SD-wear test's and bench/bench_outbox.py's stand-in for the kernel's flusher."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures import require
from tests.fixtures.diskio import clean, counts_writes, written
from tests.fixtures.paths import CHECKOUT, disk_backed


@pytest.fixture
def tmpfs_dir() -> Iterator[Path]:
    """A directory where writes are not counted: on /dev/shm, tmpfs on every Linux."""
    if not os.path.isdir("/dev/shm"):
        require.missing("needs /dev/shm (tmpfs)")
    d = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        if counts_writes(d):
            require.missing("/dev/shm is not tmpfs here")
        yield d
    finally:
        shutil.rmtree(d)


def test_the_fixture_gives_a_directory_where_writes_are_counted(disk_path: Path) -> None:
    (disk_path / "box").mkdir()
    before = written()
    (disk_path / "box" / "f").write_bytes(b"x" * 10_000)
    clean(disk_path / "box")
    assert written() - before >= 10_000, "three 4 KiB pages counted"


def test_tmpfs_tmp_path_falls_back_to_a_disk_and_the_directory_goes_afterwards(
        tmpfs_dir: Path, disk_path: Path) -> None:
    with pytest.raises(RuntimeError), disk_backed(tmpfs_dir, [tmpfs_dir, disk_path]) as d:
        assert d.parent == disk_path and not any(d.iterdir()), "a new, empty directory on the disk"
        (d / "left-behind").write_bytes(b"x")
        raise RuntimeError("the test failed")
    assert not d.exists(), "removed even after a failed test"
    assert list(disk_path.iterdir()) == []


def test_clean_writes_pages_back_so_the_next_write_to_them_counts_again(disk_path: Path) -> None:
    """What ``clean`` models: a minute later the kernel has written a page back, so a commit
    rewriting it costs a page again (while dirty, rewriting it costs nothing more)."""
    f = disk_path / "f"
    f.write_bytes(b"x" * 4096)
    clean(disk_path)
    before = written()
    for _ in range(2):
        with f.open("r+b") as fh:
            fh.write(b"y")
        clean(disk_path)
    assert written() - before >= 2 * 4096


@pytest.mark.parametrize("ci", [True, False])
def test_no_disk_backed_directory_fails_under_ci_and_skips_elsewhere(
        tmpfs_dir: Path, ci: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(require, "IN_CI", ci)
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception)) as got:
        with disk_backed(tmpfs_dir, [tmpfs_dir, tmpfs_dir / "missing", CHECKOUT / "tests"]):
            pass
    assert got.type is (pytest.fail.Exception if ci else pytest.skip.Exception)
    message = str(got.value)
    assert "no directory where /proc/self/io counts writes" in message
    assert f"{CHECKOUT / 'tests'} (in the checkout)" in message and "No such file" in message
    assert list(tmpfs_dir.iterdir()) == [] and not list((CHECKOUT / "tests").glob("device-agent-disk-*"))
