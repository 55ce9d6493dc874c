"""Safe opening of the files of one layer.

Owns: resolving a tar-split member name inside a layer's directories (its own content dir,
then overlay lower dirs nearest parent first) without ever following a symlink or crossing a
mount, opened with O_NOATIME where allowed, and checking that what is opened is a regular file
of the recorded size
(peers-and-practice.md (e) items 3 and 6). Must not know: tar-split parsing, blob offsets,
digests, drivers, the store layout (callers pass the directories).

Resolution uses ``openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS|
RESOLVE_NO_XDEV)`` through ``syscall(437)``; where openat2 is missing (ENOSYS, or EPERM from a
seccomp filter) it walks the name one component at a time with ``O_PATH|O_NOFOLLOW``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
from types import TracebackType

from imgfs.errors import IntegrityError, LayerUnavailable
from imgfs.layer.tarsplit import clean_name
from imgfs.store.files import file_kind, noatime, open_noatime

_SYS_OPENAT2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# "Not in this directory": try the next one.
_MISSING = frozenset({errno.ENOENT, errno.ELOOP, errno.EXDEV, errno.ENOTDIR})
_RETRIES = 8
_LAYER_ID = re.compile(r"[0-9a-f]{64}")


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_openat2_works: bool | None = None


def _openat2(dirfd: int, path: bytes, flags: int, resolve: int) -> int:
    """openat2(2); raises OSError. Retries EINTR and EAGAIN (concurrent rename)."""
    how = _OpenHow(flags, 0, resolve)
    for _ in range(_RETRIES):
        fd = _syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(dirfd),
            ctypes.c_char_p(path),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err not in (errno.EINTR, errno.EAGAIN):
            break
    raise OSError(err, os.strerror(err), path)


def openat2_available(dirfd: int) -> bool:
    """Whether openat2 works here (probed once per process on a directory fd)."""
    global _openat2_works
    if _openat2_works is None:
        try:
            os.close(_openat2(dirfd, b".", _PATH_FLAGS, RESOLVE_BENEATH))
            _openat2_works = True
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EPERM):
                raise
            _openat2_works = False
    return _openat2_works


class LayerFiles:
    """Directory fds of one layer, searched in order, for opening its files safely.

    Thread-safe: it holds only directory fds; ``open`` keeps no state.
    """

    def __init__(self, dirs: list[str], what: str, *, use_openat2: bool | None = None) -> None:
        self.what = what
        self._fds: list[int] = []
        try:
            for path in dirs:
                self._fds.append(self._open_dir(path))
            if not self._fds:
                raise LayerUnavailable(f"{what}: no layer directory given")
            self._openat2 = use_openat2
            if use_openat2 is None:
                self._openat2 = openat2_available(self._fds[0])
            self._devs = [os.fstat(fd).st_dev for fd in self._fds]
        except BaseException:
            self.close()
            raise

    def _open_dir(self, path: str) -> int:
        try:
            return _open_layer_dir(path)
        except OSError as exc:
            raise LayerUnavailable(
                f"{self.what}: layer directory {path!r}: {exc.strerror}"
            ) from exc

    def close(self) -> None:
        """Close the directory fds (idempotent)."""
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> LayerFiles:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self, name: bytes, size: int) -> int:
        """Open member ``name`` read-only; the caller owns (and closes) the returned fd.

        The file must be regular and exactly ``size`` bytes long, else ``IntegrityError``; a name
        that would leave the layer raises ``UnsafePath``; not found in any directory (or reached
        only through a symlink or a mount) raises ``LayerUnavailable``.
        """
        cleaned = clean_name(name)
        if not self._fds:
            raise LayerUnavailable(f"{self.what}: layer files already closed")
        for dirfd, dev in zip(self._fds, self._devs, strict=True):
            try:
                fd = self._open_in(dirfd, dev, cleaned)
            except OSError as exc:
                if exc.errno in _MISSING:
                    continue
                raise LayerUnavailable(f"{self.what}: file {name!r:.200}: {exc.strerror}") from exc
            self._check(fd, name, size)
            return fd
        raise LayerUnavailable(f"{self.what}: file {name!r:.200} not found")

    def _open_in(self, dirfd: int, dev: int, cleaned: bytes) -> int:
        if self._openat2:
            return _open_beneath(dirfd, cleaned)
        return _open_walk(dirfd, dev, cleaned)

    def _check(self, fd: int, name: bytes, size: int) -> None:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = file_kind(st.st_mode)
                raise IntegrityError(f"{self.what}: {name!r:.200} is a {kind}, not a regular file")
            if st.st_size != size:
                raise IntegrityError(
                    f"{self.what}: file {name!r:.200} has {st.st_size} bytes, "
                    f"tar-split records {size}"
                )
        except BaseException:
            os.close(fd)
            raise


def _open_layer_dir(path: str) -> int:
    """Open a layer directory without following a symlink from its layer ID down.

    The part above the 64-hex layer ID (graph root, driver home) is configuration and opened
    normally; ``<id>`` and below (``diff``) belong to the store, whose writer could replace
    them with symlinks to host directories, so they are resolved beneath the driver home.
    """
    parts = path.rstrip("/").split("/")
    at = next((i for i in range(len(parts) - 1, 0, -1) if _LAYER_ID.fullmatch(parts[i])), None)
    if at is None:
        return os.open(path, _DIR_FLAGS)
    home = os.open("/".join(parts[:at]) or "/", _DIR_FLAGS)
    try:
        rel = "/".join(parts[at:]).encode()
        if openat2_available(home):
            return _openat2(home, rel, _DIR_FLAGS, _RESOLVE & ~RESOLVE_NO_XDEV)
        cur = os.dup(home)
        try:
            for part in rel.split(b"/"):
                nxt = os.open(part, _DIR_FLAGS, dir_fd=cur)
                os.close(cur)
                cur = nxt
        except BaseException:
            os.close(cur)
            raise
        return cur
    finally:
        os.close(home)


def _open_beneath(dirfd: int, cleaned: bytes) -> int:
    """O_PATH first so a device node is never opened for reading, then the real open."""
    probe = _openat2(dirfd, cleaned, _PATH_FLAGS, _RESOLVE)
    try:
        first = os.fstat(probe)
    finally:
        os.close(probe)
    if stat.S_ISLNK(first.st_mode):  # O_PATH|O_NOFOLLOW yields the link itself
        raise OSError(errno.ELOOP, "is a symlink", cleaned)
    if not stat.S_ISREG(first.st_mode):
        return _openat2(dirfd, cleaned, _PATH_FLAGS, _RESOLVE)  # reported by _check
    fd = noatime(lambda flags: _openat2(dirfd, cleaned, flags, _RESOLVE), _READ_FLAGS)
    return _same_or_path(fd, first)


def _same_or_path(fd: int, first: os.stat_result) -> int:
    """Guard against a swap between the probe and the open (the caller re-checks the type)."""
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (first.st_dev, first.st_ino):
        os.close(fd)
        raise OSError(errno.EAGAIN, "file replaced while opening")
    return fd


def _open_walk(dirfd: int, dev: int, cleaned: bytes) -> int:
    """Fallback without openat2: one component at a time, never following symlinks."""
    *parents, last = cleaned.split(b"/")
    cur = dirfd
    try:
        for part in parents:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=cur)
            if cur != dirfd:
                os.close(cur)
            cur = nxt
            if os.fstat(cur).st_dev != dev:
                raise OSError(errno.EXDEV, "crosses a mount", part)
        probe = os.open(last, _PATH_FLAGS, dir_fd=cur)
        try:
            first = os.fstat(probe)
        finally:
            os.close(probe)
        if stat.S_ISLNK(first.st_mode):
            raise OSError(errno.ELOOP, "is a symlink", last)
        if first.st_dev != dev:
            raise OSError(errno.EXDEV, "crosses a mount", last)
        if not stat.S_ISREG(first.st_mode):
            return os.open(last, _PATH_FLAGS, dir_fd=cur)  # reported by _check
        return _same_or_path(open_noatime(last, _READ_FLAGS, dir_fd=cur), first)
    finally:
        if cur != dirfd:
            os.close(cur)
