"""What the mounted tree shows of one node, and who may open it.

Owns: ``Node`` (kind, size, times, link target, xattrs, and for ``layers/``/``rootfs/`` the
image's own mode and numeric owners) and ``Ownership``: imgfs's own modes (0500/0400 unless
``uid=``/``gid=``/``umask=`` widen them) and the access rule of the image views, the one place
that decides whether a caller may see into a ``layers/``/``rootfs/`` node.
Must not know: the store, how nodes are computed, inode numbers, FUSE.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import Literal

from imgfs.views.keys import Key

Kind = Literal["dir", "file", "link", "special"]


@dataclass(frozen=True)
class Ownership:
    """Owner and permission policy: 0500/0400 unless uid/gid/umask widen it."""

    uid: int
    gid: int
    umask: int | None = None
    shared: bool = False  # -o allow_other: other users reach the mount

    def mode(self, kind: Kind) -> int:
        if kind == "link":
            return stat.S_IFLNK | 0o777
        if kind == "dir":
            perms = 0o500 if self.umask is None else 0o555 & ~self.umask
            return stat.S_IFDIR | perms
        perms = 0o400 if self.umask is None else 0o444 & ~self.umask
        return stat.S_IFREG | perms

    def others_may_read(self) -> bool:
        """Whether imgfs's own files are readable by users other than their owner (only an
        explicit ``umask`` grants that)."""
        return bool(self.mode("file") & stat.S_IROTH)

    def may_open_view(self, caller_uid: int, image_mode: int) -> bool:
        """Whether ``caller_uid`` may open a ``layers/``/``rootfs/`` node whose image mode is
        ``image_mode``, on top of the kernel's check of that mode (default_permissions).

        The kernel matches image-internal owners against host users: a host user whose uid
        equals an image owner would get that owner's rights. So root and the mount's owner
        pass (the kernel enforces the image's modes for them); anyone else only if imgfs's own
        policy lets others read AND the image grants "other" read. Never by owner or group.
        """
        if caller_uid in (0, self.uid):
            return True
        return self.others_may_read() and bool(image_mode & stat.S_IROTH)

    def may_search(self, caller_uid: int, image_mode: int) -> bool:
        """Whether ``caller_uid`` may look up names in a ``layers/``/``rootfs/`` directory of
        image mode ``image_mode``: the rule of ``may_open_view`` with "other" search (x)."""
        if caller_uid in (0, self.uid):
            return True
        return self.others_may_read() and bool(image_mode & stat.S_IXOTH)


@dataclass(frozen=True)
class Node:
    key: Key
    kind: Kind
    size: int
    mtime_ns: int
    target: bytes = b""
    stable: bool = False  # content-addressed: the kernel may cache it for long
    xattrs: tuple[tuple[str, bytes], ...] = ()
    # layers/ and rootfs/ entries show the image's own attributes (None/0: the policy's)
    mode: int | None = None  # full st_mode
    uid: int | None = None
    gid: int | None = None
    nlink: int = 0
    rdev: int = 0
