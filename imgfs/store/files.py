"""Paths inside one store root, THE opener of every store path below it, and bounded reads.

Owns: the on-disk layout of a graph-root-like tree for one driver (``<drv>-images``,
``<drv>-layers``, big-data file names, layer content directories, as paths relative to the
root); ``StoreRoot``: the root the user (or storage.conf) named, resolved once, and every open
below it — relative to the root's directory fd with ``openat2(RESOLVE_BENEATH|
RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS)`` (or one ``O_NOFOLLOW`` component at a time where
openat2 is missing), each open checked to be the directory or regular file expected (nothing
below the graph root is followed through a symlink); ``StoreFile`` (one file below a root, as
lock files and tar-splits are named); reading small files; ``O_NOATIME`` for every open that
reads store bytes (``noatime``: reading the store never changes its atimes where the kernel
allows it, i.e. for the files' owner), and the process's descriptor budget
(``raise_fd_limit``). Must not know: what the files mean.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import logging
import os
import re
import resource
import stat
from collections.abc import Callable
from dataclasses import dataclass

from imgfs.errors import (
    ImgfsError,
    MalformedMetadata,
    OutOfResources,
    StorePermissionError,
    UnsafePath,
)

log = logging.getLogger(__name__)

_VERBATIM_KEY = re.compile(r"[.0-9a-z]+")
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SYS_OPENAT2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE_STORE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_RETRIES = 8
_FD_LIMIT_CAP = 1 << 20  # enough for any reader load; far below nr_open ceilings
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
# syscall(2) through a prototype of its own (prebuilt argtypes: no ctypes wrapper objects per
# call; the shared ``_libc.syscall`` stays untouched), and one ``open_how`` per (flags, resolve),
# built once and never written again (so threads share it): the per-file open is the hot loop
# of generating a many-file layer blob.
_syscall = ctypes.CFUNCTYPE(
    ctypes.c_long,
    ctypes.c_long,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    use_errno=True,
)(("syscall", _libc))
_HOW_SIZE = ctypes.sizeof(_OpenHow)
_hows: dict[tuple[int, int], tuple[_OpenHow, int]] = {}
_openat2_works: bool | None = None


def _how(flags: int, resolve: int) -> int:
    """The address of the shared, read-only ``open_how`` for (flags, resolve)."""
    got = _hows.get((flags, resolve))
    if got is None:  # a few distinct combinations per process; a race builds one twice
        how = _OpenHow(flags, 0, resolve)
        got = _hows.setdefault((flags, resolve), (how, ctypes.addressof(how)))
    return got[1]


def openat2(dirfd: int, path: bytes, flags: int, resolve: int) -> int:
    """openat2(2); raises OSError. Retries EINTR and EAGAIN (concurrent rename)."""
    how = _how(flags, resolve)
    err = errno.EAGAIN
    for _ in range(_RETRIES):
        fd: int = _syscall(_SYS_OPENAT2, dirfd, path, how, _HOW_SIZE)
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err not in (errno.EINTR, errno.EAGAIN):
            break
    raise OSError(err, os.strerror(err), path)


def openat2_available(dirfd: int) -> bool:
    """Whether openat2 works here (probed once per process on a directory fd)."""
    global _openat2_works
    if _openat2_works is None:
        try:
            os.close(openat2(dirfd, b".", os.O_PATH | os.O_CLOEXEC, RESOLVE_BENEATH))
            _openat2_works = True
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EPERM):
                raise
            _openat2_works = False
    return _openat2_works


def walk_parents(dirfd: int, parents: list[bytes], dev: int | None = None) -> int:
    """Without openat2: the directory ``parents`` names below ``dirfd``, one ``O_NOFOLLOW``
    component at a time (``dev``: refuse to cross a mount). Returns a new fd (a dup when
    ``parents`` is empty); the caller closes it."""
    cur = os.dup(dirfd)
    try:
        for part in parents:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=cur)
            os.close(cur)
            cur = nxt
            if dev is not None and os.fstat(cur).st_dev != dev:
                raise OSError(errno.EXDEV, "crosses a mount", part)
    except BaseException:
        os.close(cur)
        raise
    return cur


def _walk(dirfd: int, rel: bytes, flags: int) -> int:
    """Without openat2: one component at a time, never following a symlink."""
    *parents, last = rel.split(b"/")
    cur = walk_parents(dirfd, parents)
    try:
        if flags & os.O_PATH:
            return os.open(last, flags | os.O_NOFOLLOW, dir_fd=cur)
        return noatime(lambda f: os.open(last, f | os.O_NOFOLLOW, dir_fd=cur), flags)
    finally:
        os.close(cur)


@dataclass(frozen=True)
class StoreRoot:
    """A graph-root-like directory (graph root, image store, additional image store, run root)
    and every open below it. ``path`` is what the user or storage.conf named, resolved once
    (symlinks in it are the user's choice); nothing below it is followed through a symlink."""

    path: str

    @classmethod
    def resolved(cls, path: str) -> StoreRoot:
        return cls(os.path.realpath(path))

    def show(self, rel: str) -> str:
        return os.path.join(self.path, rel)

    def _rel(self, rel: str) -> bytes:
        parts = rel.split("/")
        if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise UnsafePath(f"{self.show(rel)}: not a plain path below the store root")
        return os.fsencode(rel)

    def open_at(self, rel: str, flags: int, what: str) -> int:
        """``rel`` opened beneath the root; OSError (ENOENT, ...) passes through, except that
        a symlink, or a non-directory where a directory is needed, is UnsafePath."""
        name = self._rel(rel)
        try:
            root = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except PermissionError as exc:
            raise StorePermissionError(f"store {self.path}: permission denied") from exc
        try:
            if openat2_available(root):
                if flags & os.O_PATH:  # openat2 refuses O_NOATIME with O_PATH
                    return openat2(root, name, flags, _RESOLVE_STORE)
                return noatime(lambda f: openat2(root, name, f, _RESOLVE_STORE), flags)
            return _walk(root, name, flags)
        except PermissionError as exc:
            raise StorePermissionError(f"{what}: permission denied") from exc
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EXDEV):  # a symlink (or magic link) on the way
                raise UnsafePath(
                    f"{what}: {self.show(rel)} is a symlink (or goes through one); "
                    "nothing below the store root is followed"
                ) from exc
            if exc.errno == errno.ENOTDIR:
                raise UnsafePath(f"{what}: {self.show(rel)}: not a directory on the way") from exc
            if exc.errno in EXHAUSTED:
                raise OutOfResources(f"{what}: cannot open: {exc.strerror}") from exc
            raise
        finally:
            os.close(root)

    def open_dir(self, rel: str, what: str) -> int:
        """An ``O_PATH`` fd of the directory ``rel`` (FileNotFoundError when absent)."""
        return self.open_at(rel, _DIR_FLAGS, what)

    def open_file(self, rel: str, what: str, flags: int = _OPEN_FLAGS) -> int:
        """A regular file below the root, read-only, non-blocking (a FIFO never hangs)."""
        return self._open_sized(rel, what, flags)[0]

    def _open_sized(self, rel: str, what: str, flags: int = _OPEN_FLAGS) -> tuple[int, int]:
        """``open_file``, and the file's size from the ``fstat`` that checked it."""
        fd = self.open_at(rel, flags, what)
        return fd, _check_regular(fd, what)

    def read(
        self, rel: str, limit: int, what: str, check: Callable[[int], None] | None = None
    ) -> bytes | None:
        """The bytes of a regular file below the root (at most ``limit``), None if absent.
        ``check``: called with the file's size before it is read (it may raise)."""
        return _read_whole(lambda: self._open_sized(rel, what), limit, what, check)

    def is_dir(self, rel: str) -> bool:
        """Whether ``rel`` is a real directory (not a symlink to one) below the root."""
        try:
            os.close(self.open_dir(rel, rel))
        except (OSError, ImgfsError):
            return False
        return True

    def state(self, rel: str) -> tuple[int, int, int] | None:
        """(inode, size, mtime_ns) of a file below the root, to notice replacement; None if
        absent or not reachable without a symlink."""
        parent, _, leaf = rel.rpartition("/")
        try:
            fd = self.open_dir(parent, rel) if parent else os.open(self.path, _DIR_FLAGS)
        except (OSError, ImgfsError):
            return None
        try:
            st = os.stat(leaf, dir_fd=fd, follow_symlinks=False)
        except OSError:
            return None
        finally:
            os.close(fd)
        return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class StoreFile:
    """One file below a store root (a lock file, a tar-split, a JSON record file)."""

    root: StoreRoot
    rel: str

    @property
    def path(self) -> str:
        """For messages and for helpers that take paths."""
        return self.root.show(self.rel)

    def open(self, what: str, flags: int = _OPEN_FLAGS) -> int:
        return self.root.open_file(self.rel, what, flags)

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True)
class RootLayout:
    """One graph-root-like tree (primary, image store or additional image store); every path
    it names is relative to its ``StoreRoot``."""

    store_root: StoreRoot
    driver: str

    @classmethod
    def at(cls, path: str, driver: str) -> RootLayout:
        return cls(StoreRoot.resolved(path), driver)

    @property
    def root(self) -> str:
        return self.store_root.path

    @property
    def images_rel(self) -> str:
        return f"{self.driver}-images"

    @property
    def layers_rel(self) -> str:
        return f"{self.driver}-layers"

    @property
    def layers_dir(self) -> str:
        """The ``<driver>-layers`` path, as layer records name where they came from."""
        return self.store_root.show(self.layers_rel)

    def file(self, rel: str) -> StoreFile:
        return StoreFile(self.store_root, rel)

    def images_file(self, name: str) -> StoreFile:
        return self.file(f"{self.images_rel}/{name}")

    def layers_file(self, name: str) -> StoreFile:
        return self.file(f"{self.layers_rel}/{name}")

    def image_dir(self, image_id: str) -> str:
        """The big-data directory of an (already validated) image ID, relative."""
        return f"{self.images_rel}/{image_id}"

    def content_dir(self, layer_id: str) -> str:
        """Where the driver keeps the files of ``layer_id`` (an already validated ID), relative
        to the root."""
        if self.driver == "overlay":
            return f"overlay/{layer_id}/diff"
        if self.driver == "vfs":
            return f"vfs/dir/{layer_id}"
        return f"btrfs/subvolumes/{layer_id}"


def big_data_file_name(key: str) -> str:
    """c/storage's file name for a big-data key: verbatim or ``=`` + base64 of the key."""
    if key and _VERBATIM_KEY.fullmatch(key) and key not in (".", ".."):
        return key
    return "=" + base64.b64encode(key.encode("utf-8")).decode("ascii")


def noatime(open_: Callable[[int], int], flags: int) -> int:
    """``open_(flags | O_NOATIME)``; again without O_NOATIME where the kernel refuses it (EPERM:
    we neither own the file nor have CAP_FOWNER). The one way store bytes are opened."""
    try:
        return open_(flags | os.O_NOATIME)
    except PermissionError as exc:
        if exc.errno != errno.EPERM:
            raise
    return open_(flags)


def open_noatime(path: str | bytes, flags: int, dir_fd: int | None = None) -> int:
    """``os.open`` of a store file through ``noatime``."""
    return noatime(lambda f: os.open(path, f, dir_fd=dir_fd), flags)


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (capped at 2**20); returns the soft limit.

    A daemon serving many readers must not run out of descriptors (a lock or metadata file that
    cannot be opened fails requests). Only this process's limit changes; failure is logged.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _FD_LIMIT_CAP if hard == resource.RLIM_INFINITY else min(hard, _FD_LIMIT_CAP)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages."""
    for test, kind in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISLNK, "symlink"),
    ):
        if test(mode):
            return kind
    return "special file"


def open_regular(path: str, what: str, dir_fd: int | None = None) -> int:
    """Open a regular file read-only without following a final symlink or blocking on a FIFO
    (``path`` one component when ``dir_fd`` is a StoreRoot directory; else a path the caller
    trusts up to its last component)."""
    return _open_regular_sized(path, what, dir_fd)[0]


def _open_regular_sized(path: str, what: str, dir_fd: int | None = None) -> tuple[int, int]:
    """``open_regular``, and the file's size from the ``fstat`` that checked it."""
    try:
        fd = open_noatime(path, _OPEN_FLAGS, dir_fd=dir_fd)
    except PermissionError as exc:
        raise StorePermissionError(f"{what}: permission denied") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise UnsafePath(f"{what}: is a symlink, not a regular file") from exc
        if exc.errno in EXHAUSTED:
            raise OutOfResources(f"{what}: cannot open: {exc.strerror}") from exc
        raise
    return fd, _check_regular(fd, what)


def _check_regular(fd: int, what: str) -> int:
    """The size of the regular file ``fd`` (closed, and UnsafePath, if it is not one)."""
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafePath(f"{what}: is a {file_kind(st.st_mode)}, not a regular file")
    return st.st_size


_GROWN_READ = 64 << 10  # what one read asks for past the size a file had


def read_bounded(fd: int, limit: int, what: str, size: int | None = None) -> bytes:
    """Read a whole file from ``fd`` (at most ``limit`` bytes, else MalformedMetadata).
    ``size``: its ``st_size``, if the caller has just asked ``fstat``. A read asks for a byte
    more than the size (past it, for up to ``_GROWN_READ`` more): one that comes back short
    there ends at the end of the file (one ``pread`` for a file that does not change); one
    short of the size (a file that shrank) goes on to a read that returns nothing."""
    if size is None:
        size = os.fstat(fd).st_size
    if size > limit:
        raise MalformedMetadata(f"{what}: {size} bytes, more than the limit of {limit}")
    chunks = []
    offset = 0
    while True:
        want = size - offset + 1 if offset < size else min(_GROWN_READ, limit - offset + 1)
        chunk = os.pread(fd, want, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        if offset > limit:
            raise MalformedMetadata(f"{what}: grew beyond the limit of {limit} bytes")
        if len(chunk) < want and offset >= size:
            break
    return b"".join(chunks)


def read_file(path: str, limit: int, what: str) -> bytes | None:
    """The bytes of a regular file, or None when it does not exist."""
    return _read_whole(lambda: _open_regular_sized(path, what), limit, what)


def _read_whole(
    open_: Callable[[], tuple[int, int]],
    limit: int,
    what: str,
    check: Callable[[int], None] | None = None,
) -> bytes | None:
    try:
        fd, size = open_()
    except FileNotFoundError:
        return None
    try:
        if check is not None:
            check(size)
        return read_bounded(fd, limit, what, size)
    finally:
        os.close(fd)
