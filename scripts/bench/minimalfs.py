"""A minimal pyfuse3 filesystem: the ceiling of the library, for the benchmark only.

Usage (foreground; unmount with ``fusermount3 -u MOUNTPOINT``)::

    python3 scripts/bench/minimalfs.py [--tree DIR] [--file PATH] [--file-cache] MOUNTPOINT

Serves ``MOUNTPOINT/rootfs/`` (a tree built in memory, before mounting, from the real directory
``DIR``: names, ``lstat`` results, symlink targets; file contents read with ``pread`` from the
real files at each read) and ``MOUNTPOINT/blob`` (the one big file ``PATH``, e.g. a completed
snapshot through ``/proc/PID/fd/N``). Every handler runs inline on the trio loop: no thread
hops, no locks, no verification. It uses the FUSE options and cache policy of imgfs
(``imgfs/fuse/mounting.py``, ``imgfs/fuse/ops.py``): ``ro,default_permissions,nosuid,nodev``,
readdirplus (pyfuse3's readdir), 86400 s entry and attribute timeouts (imgfs's timeout for
content-addressed nodes), ``st_blksize`` 1 MiB, ``keep_cache`` for tree files, ``direct_io``
for the big file (``--file-cache``: ``keep_cache`` instead), and ``getxattr`` answering
ENOTSUP for ``security.``/``system.`` names (ENODATA for others), as imgfs does, so that
``ls -l`` stops asking, and ``flush`` answering ENOSYS, as imgfs does, so that the kernel stops
sending FLUSH at every close. Nothing is written anywhere.

Owns: nothing of imgfs (it imports none of it). Must not know: stores, images, tar.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio

TIMEOUT = 86400.0
BLOCK_SIZE = 1 << 20
ROOT = pyfuse3.ROOT_INODE
_QUIET = (b"security.", b"system.")


@dataclass
class _Entry:
    attrs: Any  # pyfuse3.EntryAttributes
    path: bytes = b""  # real file (files only)
    target: bytes = b""  # symlinks
    names: dict[bytes, int] = field(default_factory=dict)  # directories
    listing: list[tuple[bytes, int]] = field(default_factory=list)


class MinimalFs(pyfuse3.Operations):
    """A read-only tree of prebuilt entries; every handler inline."""

    def __init__(self, tree: bytes | None, big: bytes | None, big_cache: bool) -> None:
        super().__init__()
        self.entries: dict[int, _Entry] = {}
        self.big_cache = big_cache
        self.big_ino = 0
        self.fds: dict[int, int] = {}
        root = self._add(_Entry(self._attrs(os.stat("/"), ROOT)), ROOT)
        root.attrs.st_mode = stat.S_IFDIR | 0o755
        if tree is not None:
            self._link(root, b"rootfs", self._walk(tree))
        if big is not None:
            ino = self._new_ino()
            self.big_ino = ino
            entry = self._add(_Entry(self._attrs(os.stat(big), ino), path=big), ino)
            entry.attrs.st_mode = stat.S_IFREG | 0o444
            self._link(root, b"blob", ino)
        for entry in self.entries.values():
            entry.listing = list(entry.names.items())

    # -- building ----------------------------------------------------------------------------

    def _new_ino(self) -> int:
        return ROOT + len(self.entries)

    def _add(self, entry: _Entry, ino: int) -> _Entry:
        self.entries[ino] = entry
        return entry

    def _link(self, parent: _Entry, name: bytes, ino: int) -> None:
        parent.names[name] = ino

    def _attrs(self, st: os.stat_result, ino: int) -> Any:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = ino
        attrs.generation = 0
        attrs.entry_timeout = attrs.attr_timeout = TIMEOUT
        attrs.st_mode = st.st_mode
        attrs.st_nlink = st.st_nlink
        attrs.st_uid = st.st_uid
        attrs.st_gid = st.st_gid
        attrs.st_rdev = st.st_rdev
        attrs.st_size = st.st_size
        attrs.st_blksize = BLOCK_SIZE
        attrs.st_blocks = (st.st_size + 511) // 512
        attrs.st_atime_ns = st.st_atime_ns
        attrs.st_mtime_ns = st.st_mtime_ns
        attrs.st_ctime_ns = st.st_ctime_ns
        return attrs

    def _walk(self, path: bytes) -> int:
        """Add ``path`` (lstat'ed) and, for a directory, everything below it; its inode."""
        st = os.lstat(path)
        ino = self._new_ino()
        entry = self._add(_Entry(self._attrs(st, ino)), ino)
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(path)):
                self._link(entry, name, self._walk(os.path.join(path, name)))
        elif stat.S_ISLNK(st.st_mode):
            entry.target = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            entry.path = path
        return ino

    # -- handlers ----------------------------------------------------------------------------

    def _entry(self, ino: int) -> _Entry:
        entry = self.entries.get(ino)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        ino = self._entry(parent_inode).names.get(name)
        if ino is None:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = 1.0  # imgfs's NAME_TIMEOUT for negative answers
            return negative
        return self.entries[ino].attrs

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._entry(inode).attrs

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return self._entry(inode).target

    async def opendir(self, inode: int, ctx: Any) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        listing = self.entries[fh].listing
        for index in range(start_id, len(listing)):
            name, ino = listing[index]
            if not pyfuse3.readdir_reply(token, name, self.entries[ino].attrs, index + 1):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None  # the tree is static: nothing to free

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        self._entry(inode)
        if name.startswith(_QUIET):
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return []

    async def statfs(self, ctx: Any) -> Any:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = BLOCK_SIZE
        data.f_namemax = 255
        return data

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        entry = self._entry(inode)
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        if not entry.path:
            raise pyfuse3.FUSEError(errno.EISDIR)
        fd = os.open(entry.path, os.O_RDONLY)
        self.fds[fd] = fd
        if inode == self.big_ino and not self.big_cache:
            return pyfuse3.FileInfo(fh=fd, keep_cache=False, direct_io=True)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    async def flush(self, fh: int) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)  # as imgfs: the kernel sends no FLUSH again

    async def release(self, fh: int) -> None:
        os.close(self.fds.pop(fh))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=os.fsencode, help="serve this directory as rootfs/")
    parser.add_argument("--file", type=os.fsencode, help="serve this file as blob")
    parser.add_argument(
        "--file-cache", action="store_true", help="blob with keep_cache, not direct_io"
    )
    parser.add_argument("mountpoint")
    args = parser.parse_args(argv)
    ops = MinimalFs(args.tree, args.file, args.file_cache)
    options = {"fsname=minimalfs", "subtype=minimalfs", "ro", "default_permissions"}
    options |= {"nosuid", "nodev"}
    pyfuse3.init(ops, args.mountpoint, options)
    signal.signal(signal.SIGTERM, lambda *_: pyfuse3.terminate())
    signal.signal(signal.SIGINT, lambda *_: pyfuse3.terminate())
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
