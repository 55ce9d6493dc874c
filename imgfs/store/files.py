"""Paths inside one store root, and bounded, symlink-free reads of its metadata files.

Owns: the on-disk layout of a graph-root-like tree for one driver (``<drv>-images``,
``<drv>-layers``, big-data file names, layer content directories), reading small files
without following symlinks, ``O_NOATIME`` for every open that reads store bytes (``noatime``:
reading the store never changes its atimes where the kernel allows it, i.e. for the files'
owner), and the process's descriptor budget (``raise_fd_limit``). Must not know: what the files
mean.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import re
import resource
import stat
from collections.abc import Callable
from dataclasses import dataclass

from imgfs.errors import MalformedMetadata, OutOfResources, StorePermissionError, UnsafePath

log = logging.getLogger(__name__)

_VERBATIM_KEY = re.compile(r"[.0-9a-z]+")
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_FD_LIMIT_CAP = 1 << 20  # enough for any reader load; far below nr_open ceilings
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


@dataclass(frozen=True)
class RootLayout:
    """One graph-root-like tree (primary, image store or additional image store)."""

    root: str
    driver: str

    @property
    def images_dir(self) -> str:
        return os.path.join(self.root, f"{self.driver}-images")

    @property
    def layers_dir(self) -> str:
        return os.path.join(self.root, f"{self.driver}-layers")

    def content_dir(self, layer_id: str) -> str:
        """Where the driver keeps the files of ``layer_id`` (an already validated ID)."""
        if self.driver == "overlay":
            return os.path.join(self.root, "overlay", layer_id, "diff")
        if self.driver == "vfs":
            return os.path.join(self.root, "vfs", "dir", layer_id)
        return os.path.join(self.root, "btrfs", "subvolumes", layer_id)

    def tarsplit_path(self, layer_id: str) -> str:
        return os.path.join(self.layers_dir, f"{layer_id}.tar-split.gz")


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
    """Open a regular file read-only without following a final symlink or blocking on a FIFO."""
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
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafePath(f"{what}: is a {file_kind(st.st_mode)}, not a regular file")
    return fd


def read_bounded(fd: int, limit: int, what: str) -> bytes:
    """Read a whole file from ``fd`` (at most ``limit`` bytes, else MalformedMetadata)."""
    size = os.fstat(fd).st_size
    if size > limit:
        raise MalformedMetadata(f"{what}: {size} bytes, more than the limit of {limit}")
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, max(size - offset, 0) + 1, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        if offset > limit:
            raise MalformedMetadata(f"{what}: grew beyond the limit of {limit} bytes")
    return b"".join(chunks)


def read_file(path: str, limit: int, what: str) -> bytes | None:
    """The bytes of a regular file, or None when it does not exist."""
    try:
        fd = open_regular(path, what)
    except FileNotFoundError:
        return None
    try:
        return read_bounded(fd, limit, what)
    finally:
        os.close(fd)


def file_state(path: str) -> tuple[int, int, int] | None:
    """(inode, size, mtime_ns) of a file, to notice replacement; None if absent."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
