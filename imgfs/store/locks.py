"""Shared read locks on the store's lock files, and their write tokens.

Owns: how imgfs takes the c/storage locks (open descriptor-scoped ``F_OFD_SETLKW`` read locks,
which conflict with the writers' POSIX ``fcntl`` locks and survive other threads closing
descriptors), the order they are taken in, and the 64-byte write token read under them.
Must not know: what the locked files contain.

imgfs never creates or writes a lock file: a missing lock file means nobody writes there (a
read-only store); a lock file we may not open is read without a lock (logged once).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
from collections.abc import Iterator, Sequence

log = logging.getLogger(__name__)

_TOKEN_BYTES = 64
_warned: set[str] = set()


def _lock_shared(fd: int) -> None:
    request = struct.pack("hhqqi", fcntl.F_RDLCK, 0, 0, 0, 0)
    while True:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, request)
            return
        except InterruptedError:
            continue


def _open_lock(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.ELOOP) and path not in _warned:
            _warned.add(path)
            log.warning("reading %s without its lock: %s", path, exc.strerror)
        return None


@contextlib.contextmanager
def read_locked(paths: Sequence[str]) -> Iterator[tuple[bytes, ...]]:
    """Hold shared locks on ``paths`` (in the given order) and yield their write tokens.

    The caller passes the writers' lock order (layers before images). Locks are released in
    reverse order when the block ends. The token of an absent or unlockable file is ``b""``.
    """
    fds: list[int] = []
    tokens: list[bytes] = []
    try:
        for path in paths:
            fd = _open_lock(path)
            if fd is None:
                tokens.append(b"")
                continue
            fds.append(fd)
            _lock_shared(fd)
            tokens.append(os.pread(fd, _TOKEN_BYTES, 0))
        yield tuple(tokens)
    finally:
        for fd in reversed(fds):
            os.close(fd)
