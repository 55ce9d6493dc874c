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

``read_locked(keep=True)`` (the per-file opens of layer files and the big-data reads: one lock
per file read) keeps each thread's descriptor of a ``StoreFile`` lock file open between calls
(at most ``KEPT_PER_THREAD`` per thread, closed when the thread ends or by ``close_kept``),
and takes and releases its lock on that descriptor (``F_UNLCK``) instead of opening and closing
the file each time: the open below the store root, its ``fstat`` and the close were most of the cost
(measured 13 us -> 4 us a call). Each call first checks (one ``lstat`` of its path) that the
path still names the file the descriptor holds, so a lock file that was deleted, replaced, or
moved away with its directory (a store removed and made again at the same place) is opened
again through the one opener, never locked through the old descriptor; c/storage itself
never replaces a lock file (it opens it with ``O_CREAT`` and rewrites only the token). A call
nested in one of the same thread's that holds the lock already reuses the held lock and the
token read under it (no writer can have changed it since); the lock is released when the
outermost call ends. The lock is never held between calls.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterator, Sequence

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


class no_waiting:  # a function to its callers: ``with no_waiting():``
    """In this thread, a lock a writer holds raises LockBusy instead of being waited for.
    (A class, not a generator: every inline read of a layer file enters it.)"""

    __slots__ = ("_before",)

    def __enter__(self) -> None:
        self._before = getattr(_mode, "no_wait", False)
        _mode.no_wait = True

    def __exit__(self, *exc: object) -> None:
        _mode.no_wait = self._before


def _lock_shared(fd: int, path: str | StoreFile) -> None:
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
            raise _error(str(path), exc, "cannot lock") from exc


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
def read_locked(
    paths: Sequence[str | StoreFile], keep: bool = False
) -> Iterator[tuple[bytes, ...]]:
    """Hold shared locks on ``paths`` (in the given order) and yield their write tokens.

    The caller passes the writers' lock order (layers before images). Locks are released in
    reverse order when the block ends. The token of an absent lock file is ``b""``.
    ``keep``: the descriptors of ``StoreFile`` lock files are kept for this thread's next
    calls (the module docstring has the rules).
    """
    undo: list[Callable[[], None]] = []
    tokens: list[bytes] = []
    try:
        for where in paths:
            if keep and isinstance(where, StoreFile):
                kept = _take_kept(where)
                if kept is None:
                    tokens.append(b"")
                    continue
                undo.append(kept.give_back)
                tokens.append(kept.token)
                continue
            fd = _open_lock(where)
            if fd is None:
                tokens.append(b"")
                continue
            undo.append(functools.partial(os.close, fd))
            _lock_shared(fd, where)
            tokens.append(_token(fd, where))
        yield tuple(tokens)
    finally:
        for release in reversed(undo):
            release()


KEPT_PER_THREAD = 8
_UNLOCK = struct.pack("hhqqi", fcntl.F_UNLCK, 0, 0, 0, 0)
_kept = threading.local()  # .files: dict[StoreFile, _Kept] of this thread


class _Kept:
    """One lock file this thread keeps open: its descriptor, the (device, inode) it was opened
    as, how deep this thread's calls hold its lock now, and the token read under the lock."""

    __slots__ = ("depth", "fd", "ident", "path", "token")

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path
        st = os.fstat(fd)
        self.ident = (st.st_dev, st.st_ino)
        self.depth = 0
        self.token = b""

    def still_there(self) -> bool:
        """Whether the path names the file the descriptor holds (no symlink is followed at
        its end; nothing is opened: a path that changed is opened again by the opener)."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.ident

    def give_back(self) -> None:
        self.depth -= 1
        if self.depth or self.fd < 0:
            return
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _UNLOCK)
        except OSError:
            self.close()  # closing the descriptor releases the lock too

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:  # the thread ended (its thread-local dict is dropped)
        self.close()


def _kept_files() -> dict[StoreFile, _Kept]:
    files: dict[StoreFile, _Kept] | None = getattr(_kept, "files", None)
    if files is None:
        files = _kept.files = {}
    return files


def _take_kept(where: StoreFile) -> _Kept | None:
    """This thread's kept descriptor of lock file ``where``, locked shared and its token read
    (depth counted); None when there is no lock file."""
    files = _kept_files()
    kept = files.get(where)
    if kept is not None and kept.depth and kept.fd >= 0:
        kept.depth += 1  # a nested call: this thread holds the lock already
        return kept
    if kept is not None and (kept.fd < 0 or not kept.still_there()):
        del files[where]
        kept.close()
        kept = None
    if kept is None:
        fd = _open_lock(where)
        if fd is None:
            return None
        try:
            kept = _Kept(fd, where.path)
        except OSError as exc:
            os.close(fd)
            raise _error(str(where), exc, "cannot stat") from exc
        _drop_kept(files, KEPT_PER_THREAD - 1)
        files[where] = kept
    try:
        _lock_shared(kept.fd, where)
    except LockBusy:
        raise  # a writer holds it: the descriptor stays kept, unlocked
    except BaseException:
        del files[where]  # an unusable descriptor is not kept
        kept.close()
        raise
    kept.depth = 1
    try:
        kept.token = _token(kept.fd, where)
    except BaseException:
        kept.give_back()
        raise
    return kept


def _drop_kept(files: dict[StoreFile, _Kept], keep: int) -> None:
    """Close this thread's kept descriptors not in use until at most ``keep`` remain."""
    for where in [w for w, k in files.items() if not k.depth][: max(0, len(files) - keep)]:
        files.pop(where).close()


def close_kept() -> None:
    """Close the lock files this thread keeps (``read_locked(keep=True)``) that it does not
    hold now."""
    _drop_kept(_kept_files(), 0)


def _token(fd: int, path: str | StoreFile) -> bytes:
    try:
        return os.pread(fd, _TOKEN_BYTES, 0)
    except OSError as exc:
        raise _error(str(path), exc, "cannot read the write token") from exc
