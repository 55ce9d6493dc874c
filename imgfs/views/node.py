"""What the mounted tree shows of one node, and who may open it.

Owns: ``Node`` (kind, size, times, link target, xattrs, and for ``layers/``/``rootfs/`` the
image's own mode and numeric owners, and for a regular file its ``Origin``: where its bytes
are) and ``Ownership``: imgfs's own modes (0500/0400 unless
``uid=``/``gid=``/``umask=`` widen them) and the access rule of the image views, the one place
that decides whether a caller may see into a ``layers/``/``rootfs/`` node -- on top of the
kernel's check (``default_permissions``), or, for a rootless store mounted by its owner, as the
whole check (``Ownership.allows``: the mount's owner is the image's root there).
Must not know: the store, how nodes are computed, inode numbers, FUSE.
"""

from __future__ import annotations

import os
import stat
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal

from imgfs.layer.tree import LayerTree
from imgfs.views.keys import Key

Kind = Literal["dir", "file", "link", "special"]


@dataclass(frozen=True)
class Ownership:
    """Owner and permission policy: 0500/0400 unless uid/gid/umask widen it."""

    uid: int
    gid: int
    umask: int | None = None
    shared: bool = False  # -o allow_other: other users reach the mount
    # A rootless store mounted by its owner: this host uid (whom rootless podman maps to the
    # container's root) is the image's root in layers/ and rootfs/. Such a mount has no
    # default_permissions (the kernel would check the image's owners against host users and
    # deny the owner), so every request is checked by ``allows`` alone.
    image_root: int | None = None

    @property
    def self_checked(self) -> bool:
        """Whether imgfs checks every request itself (no ``default_permissions``)."""
        return self.image_root is not None

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

    def allows(
        self,
        node: Node,
        want: int,
        uid: int,
        gid: int,
        groups: Callable[[], Collection[int]] = tuple,
    ) -> bool:
        """Whether a caller (``uid``, ``gid``, supplementary ``groups`` asked only if they
        matter) may ``want`` (``os.R_OK``/``os.X_OK`` bits as access(2) takes them) on
        ``node``, when imgfs checks every request itself (``self_checked``).

        - Never write (the mount is read-only). Symlinks carry no permissions.
        - imgfs's own nodes: POSIX rules on the modes and owners they show (0500/0400, ``-o
          uid=,gid=,umask=``); root reads and searches everything, executes what has an x bit.
        - ``layers/``/``rootfs/`` nodes: root and ``image_root`` are the image's root: they
          list and search every directory and read every file whatever its mode and owner;
          executing needs an x bit, as for root. Anyone else (only with ``-o allow_other``)
          only what "other" may, and only if imgfs's own policy lets others read
          (``may_open_view``): never by matching an image owner or group.
        """
        if want & os.W_OK:
            return False
        if node.kind == "link":
            return True
        if node.mode is None:
            owner = self.uid if node.uid is None else node.uid
            group = self.gid if node.gid is None else node.gid
            return _posix_allows(self.mode(node.kind), owner, group, want, uid, gid, groups)
        if uid in (0, self.image_root):
            return _root_allows(node.mode, want)
        return self.others_may_read() and node.mode & want == want  # R_OK, X_OK == S_I?OTH


def _root_allows(mode: int, want: int) -> bool:
    """Root's DAC override: everything but executing a file without any x bit."""
    return not (want & os.X_OK) or stat.S_ISDIR(mode) or bool(mode & 0o111)


def _posix_allows(
    mode: int,
    owner: int,
    group: int,
    want: int,
    uid: int,
    gid: int,
    groups: Callable[[], Collection[int]],
) -> bool:
    """The kernel's ``generic_permission`` on shown attributes (owner, else group, else
    other; never a fall-through to a wider class)."""
    if uid == 0:
        return _root_allows(mode, want)
    if uid == owner:
        bits = mode >> 6
    elif gid == group or ((mode >> 3) & want != mode & want and group in groups()):
        bits = mode >> 3
    else:
        bits = mode
    return bits & want == want


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a ``layers/``/``rootfs/`` regular file's bytes come from: member ``ref`` of the
    image's layer ``layer`` (its place in the chain), whose tree is held weakly (a node never
    keeps a tree that the tree caches dropped)."""

    layer: int
    tree: weakref.ReferenceType[LayerTree]
    ref: int


@dataclass(frozen=True, slots=True)
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
    origin: Origin | None = None  # a layers/ or rootfs/ regular file: what opens it
    # listed before its attributes were computed (an image directory's rootfs/ entry: they
    # need the layer trees): only its key and kind are true, the kernel must not keep the
    # rest (timeouts 0) and a lookup or getattr computes the real node
    provisional: bool = False
