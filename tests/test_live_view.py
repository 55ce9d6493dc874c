"""The mounted tree follows the store (commit, tag, rmi) without a remount (DESIGN §1: ~2 s)."""

from __future__ import annotations

import errno
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import smallstore
from tests.mounting import Mount, mounted

pytestmark = pytest.mark.usefixtures("fuse_required")

FOLLOW_SECONDS = 2.0  # the contract
SLACK_SECONDS = 3.0  # scheduling noise on a loaded 2-core CI machine


def _within(check: Callable[[], bool]) -> float:
    """Seconds until ``check()`` holds; fails past the contract plus slack."""
    start = time.monotonic()
    while not check():
        elapsed = time.monotonic() - start
        assert elapsed < FOLLOW_SECONDS + SLACK_SECONDS, "the tree did not follow the store"
        time.sleep(0.05)
    return time.monotonic() - start


def _pread(fd: int, size: int, offset: int) -> bytes | OSError:
    try:
        return os.pread(fd, size, offset)
    except OSError as exc:
        return exc


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[Path, Mount]]:
    base = tmp_path / "store"
    base.mkdir()
    smallstore.commit_image(base, "first", "first\n")
    with mounted(base / "root", base / "run", smallstore.DRIVER, tmp_path / "m") as m:
        yield base, m


def test_new_tagged_and_removed_images_show_up(live: tuple[Path, Mount]) -> None:
    base, m = live
    second = smallstore.commit_image(base, "second", "second\n")
    _within(lambda: second in os.listdir(m.path))
    link = m.path / "by-name" / "localhost" / "second:1"
    _within(lambda: link.is_symlink())
    assert (m.path / second / "blobs").is_dir()

    smallstore.buildah(base, "tag", "localhost/second:1", "localhost/again:2")
    _within(lambda: (m.path / "by-name" / "localhost" / "again:2").is_symlink())

    smallstore.buildah(base, "rmi", "-f", second)
    _within(lambda: second not in os.listdir(m.path))
    _within(lambda: not (m.path / second).exists())
    _within(lambda: not link.is_symlink())
    assert "first" in "".join(os.listdir(m.path / "by-name" / "localhost"))


def test_a_copy_in_flight_completes_or_fails_cleanly(live: tuple[Path, Mount]) -> None:
    base, m = live
    image = next(p for p in os.listdir(m.path) if len(p) == 64)
    blob = next(b for b in (m.path / image / "blobs").iterdir() if b.stat().st_size > 1024)
    fd = os.open(blob, os.O_RDONLY)
    try:
        head = os.pread(fd, 512, 0)
        smallstore.buildah(base, "rmi", "-f", image)
        _within(lambda: image not in os.listdir(m.path))
        rest = _pread(fd, 1 << 20, 512)
        if isinstance(rest, OSError):
            assert rest.errno == errno.EIO  # the only acceptable failure
        else:
            assert hashlib.sha256(head + rest).hexdigest() == blob.name.split(":")[1]
    finally:
        os.close(fd)
