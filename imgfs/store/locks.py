"""Shared read locks on the store's lock files, and their write tokens.

Owns: how imgfs takes the c/storage locks (open descriptor-scoped ``F_OFD_SETLKW`` read locks,
which conflict with the writers' POSIX ``fcntl`` locks and survive other threads closing
descriptors), the order they are taken in, and the 64-byte write token read under them.
Must not know: what the locked files contain.

imgfs never creates or writes a lock file: a missing lock file means nobody writes there (a
read-only store). Any other failure to open or lock one (no permission, a symlink, a FIFO, a
directory or a socket where the lock file should be, no descriptors left) raises an
``ImgfsError`` naming the path: reading without the lock could serve a half-written store.
Inside ``no_waiting()`` a lock held by a writer raises ``LockBusy`` at once instead of waiting
(the FUSE adapter retries such a request where waiting starves no other request).
Lock files are opened non-blocking (a FIFO never hangs the open) and with O_NOATIME; a lock
file named as a ``StoreFile`` is opened below its store root without following any symlink
(``files.StoreRoot``), one named by a path only without following its last component.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import threading
from collections.abc import Iterator, Sequence

from imgfs.errors import (
    ImgfsError,
    LockBusy,
    LockUnusable,
    OutOfResources,
    StorePermissionError,
    UnsafePath,
)
from imgfs.store.files import EXHAUSTED, StoreFile, file_kind, open_noatime

_TOKEN_BYTES = 64
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


_mode = threading.local()


@contextlib.contextmanager
def no_waiting() -> Iterator[None]:
    """In this thread, a lock a writer holds raises LockBusy instead of being waited for."""
    before = getattr(_mode, "no_wait", False)
    _mode.no_wait = True
    try:
        yield
    finally:
        _mode.no_wait = before


def _lock_shared(fd: int, path: str) -> None:
    request = struct.pack("hhqqi", fcntl.F_RDLCK, 0, 0, 0, 0)
    wait = not getattr(_mode, "no_wait", False)
    while True:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, request)
            return
        except InterruptedError:
            continue
        except OSError as exc:
            if not wait and exc.errno in (errno.EAGAIN, errno.EACCES):
                raise LockBusy(f"lock file {path}: held by a writer") from exc
            raise _error(path, exc, "cannot lock") from exc


def _open_lock(where: str | StoreFile) -> int | None:
    """The lock file opened read-only, or None when it does not exist."""
    path = str(where)
    try:
        if isinstance(where, StoreFile):
            fd = where.root.open_at(where.rel, _OPEN_FLAGS, f"lock file {path}")
        else:
            fd = open_noatime(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except UnsafePath as exc:
        raise LockUnusable(str(exc)) from exc
    except OSError as exc:
        raise _error(path, exc, "cannot open") from exc
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise _error(path, exc, "cannot stat") from exc
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise LockUnusable(f"lock file {path}: is a {file_kind(mode)}, not a regular file")
    return fd


def _error(path: str, exc: OSError, doing: str) -> ImgfsError:
    reason = f"lock file {path}: {doing}: {exc.strerror}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StorePermissionError(reason)
    if exc.errno in EXHAUSTED:
        return OutOfResources(reason)
    if exc.errno == errno.ELOOP:
        return LockUnusable(f"lock file {path}: is a symlink, not a regular file")
    if exc.errno == errno.ENXIO:  # open(2) of a socket
        return LockUnusable(f"lock file {path}: is a socket, not a regular file")
    return LockUnusable(reason)


@contextlib.contextmanager
def read_locked(paths: Sequence[str | StoreFile]) -> Iterator[tuple[bytes, ...]]:
    """Hold shared locks on ``paths`` (in the given order) and yield their write tokens.

    The caller passes the writers' lock order (layers before images). Locks are released in
    reverse order when the block ends. The token of an absent lock file is ``b""``.
    """
    fds: list[int] = []
    tokens: list[bytes] = []
    try:
        for where in paths:
            fd = _open_lock(where)
            if fd is None:
                tokens.append(b"")
                continue
            fds.append(fd)
            _lock_shared(fd, str(where))
            tokens.append(_token(fd, str(where)))
        yield tuple(tokens)
    finally:
        for fd in reversed(fds):
            os.close(fd)


def _token(fd: int, path: str) -> bytes:
    try:
        return os.pread(fd, _TOKEN_BYTES, 0)
    except OSError as exc:
        raise _error(path, exc, "cannot read the write token") from exc
