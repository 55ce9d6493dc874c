"""``locks.read_locked(keep=True)``: a thread's lock file descriptors kept between calls (the
per-file opens of layer files), and the rules that make that safe: the lock is taken on each
call and never held between calls, a lock file that was replaced, deleted or moved away with
its directory is opened again (never locked through the old descriptor), a symlink put in its
place is refused as before, nested calls share the outer call's lock, and the kept
descriptors are bounded per thread and closed with it. A writer is another open file
description's write lock (OFD locks of two descriptions conflict, even in one process)."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgfs.errors import LockBusy, LockUnusable
from imgfs.store import locks
from imgfs.store.files import StoreFile, StoreRoot

REL = "overlay-layers/layers.lock"


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    locks.close_kept()
    yield
    locks.close_kept()


def _lock_file(root: Path, token: bytes, rel: str = REL) -> StoreFile:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(token.ljust(64, b"-"))
    return StoreFile(StoreRoot(str(root)), rel)


def _writer_can_lock(path: Path) -> bool:
    """Whether a writer could take ``path``'s write lock now (it is released again)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False
    finally:
        os.close(fd)
    return True


def _held_by_writer(path: Path) -> int:
    fd = os.open(path, os.O_RDWR)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
    return fd


def _kept_tokens(where: StoreFile) -> tuple[bytes, ...]:
    with locks.no_waiting(), locks.read_locked([where], keep=True) as tokens:
        return tokens


@pytest.fixture
def lock_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []
    real = locks._open_lock

    def counting(where: str | StoreFile) -> int | None:
        opened.append(str(where))
        return real(where)

    monkeypatch.setattr(locks, "_open_lock", counting)
    return opened


def test_the_descriptor_is_kept_and_the_token_read_under_the_lock_each_call(
    tmp_path: Path, lock_opens: list[str]
) -> None:
    where = _lock_file(tmp_path, b"a")
    assert _kept_tokens(where) == (b"a".ljust(64, b"-"),)
    (tmp_path / REL).write_bytes(b"b".ljust(64, b"-"))  # a writer rewrites the token in place
    assert _kept_tokens(where) == (b"b".ljust(64, b"-"),)
    assert lock_opens == [where.path]  # opened once
    # Without keep, each call opens the file (and keeps nothing).
    with locks.read_locked([where]):
        pass
    assert lock_opens == [where.path] * 2


def test_the_lock_is_taken_each_call_and_never_held_between_calls(tmp_path: Path) -> None:
    where = _lock_file(tmp_path, b"a")
    path = tmp_path / REL
    with locks.read_locked([where], keep=True):
        assert not _writer_can_lock(path)
    assert _writer_can_lock(path)  # released although the descriptor is kept
    writer = _held_by_writer(path)
    try:
        with pytest.raises(LockBusy):
            _kept_tokens(where)
    finally:
        os.close(writer)
    assert _kept_tokens(where) == (b"a".ljust(64, b"-"),)


def test_nested_calls_share_the_outer_lock_until_it_ends(tmp_path: Path) -> None:
    where = _lock_file(tmp_path, b"a")
    path = tmp_path / REL
    with locks.read_locked([where], keep=True):
        assert _kept_tokens(where) == (b"a".ljust(64, b"-"),)
        assert not _writer_can_lock(path)  # the inner call's end kept the outer's lock
    assert _writer_can_lock(path)


@pytest.mark.parametrize("how", ["renamed over", "deleted and made again", "directory moved"])
def test_a_replaced_lock_file_is_opened_again_and_locked_there(
    tmp_path: Path, lock_opens: list[str], how: str
) -> None:
    where = _lock_file(tmp_path, b"old")
    path = tmp_path / REL
    assert _kept_tokens(where) == (b"old".ljust(64, b"-"),)
    if how == "renamed over":
        new = tmp_path / "new.lock"
        new.write_bytes(b"new".ljust(64, b"-"))
        os.rename(new, path)
    elif how == "deleted and made again":
        path.unlink()
        _lock_file(tmp_path, b"new")
    else:
        path.parent.rename(tmp_path / "moved-away")
        _lock_file(tmp_path, b"new")
    assert _kept_tokens(where) == (b"new".ljust(64, b"-"),)
    assert len(lock_opens) == 2
    writer = _held_by_writer(path)  # the new file's writer excludes us: we lock the new file
    try:
        with pytest.raises(LockBusy):
            _kept_tokens(where)
    finally:
        os.close(writer)


def test_a_symlink_put_in_place_of_the_lock_file_or_its_directory_is_refused(
    tmp_path: Path,
) -> None:
    where = _lock_file(tmp_path, b"a")
    _kept_tokens(where)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "layers.lock").write_bytes(b"x" * 64)
    (tmp_path / REL).unlink()
    os.symlink(elsewhere / "layers.lock", tmp_path / REL)
    with pytest.raises(LockUnusable, match="symlink"):
        _kept_tokens(where)
    (tmp_path / REL).unlink()
    (tmp_path / REL).parent.rmdir()
    os.symlink(elsewhere, tmp_path / "overlay-layers")
    with pytest.raises(LockUnusable, match="symlink"):
        _kept_tokens(where)


def test_a_missing_lock_file_keeps_nothing_and_is_used_once_it_exists(tmp_path: Path) -> None:
    where = StoreFile(StoreRoot(str(tmp_path)), REL)
    assert _kept_tokens(where) == (b"",)
    _lock_file(tmp_path, b"now")
    assert _kept_tokens(where) == (b"now".ljust(64, b"-"),)


def _fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def test_kept_descriptors_are_bounded_per_thread_and_closed_with_it(tmp_path: Path) -> None:
    wheres = [_lock_file(tmp_path, b"t", f"d{i}/layers.lock") for i in range(20)]
    before = _fds()
    for where in wheres:
        _kept_tokens(where)
    assert len(_fds() - before) == locks.KEPT_PER_THREAD
    locks.close_kept()
    assert _fds() == before

    def in_thread() -> None:
        for where in wheres[:3]:
            _kept_tokens(where)
        assert len(_fds() - before) == 3

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert _fds() == before  # the thread's kept descriptors went with it
