"""What every section of the tree shares: the default answers and small node helpers.

Must not know: pyfuse3, trio, inode numbers, errno values.
"""

from __future__ import annotations

import os
import stat
import weakref
from typing import TYPE_CHECKING, Any

from imgfs.errors import NotFound
from imgfs.layer.tarheader import BLOCKDEV, CHARDEV, DIRECTORY, FIFO, REGULAR, SYMLINK
from imgfs.layer.tree import LayerTree, Member
from imgfs.store.image import BlobInfo
from imgfs.views.content import Content
from imgfs.views.keys import Key, SectionKey
from imgfs.views.node import Kind, Node, Origin

if TYPE_CHECKING:
    from imgfs.views.tree import TreeView


class Section:
    """Defaults: not a directory, not a file, a lookup scans the listing."""

    def node(self, view: TreeView, key: Any) -> Node:
        raise NotFound(f"{key!r:.120} does not exist")

    def children(self, view: TreeView, key: Any) -> list[tuple[bytes, Node]]:
        raise NotFound(f"{key!r:.120} is not a directory")

    def lookup(self, view: TreeView, key: Any, name: bytes) -> Node:
        for child_name, child in self.children(view, key):
            if child_name == name:
                return child
        raise NotFound(f"no {name!r:.100} here")

    def open(self, view: TreeView, key: Any) -> Content:
        raise NotFound(f"{key!r:.120} is not a file")


def blob_xattrs(info: BlobInfo) -> tuple[tuple[str, bytes], ...]:
    attrs = []
    if info.media_type:
        attrs.append(("user.imgfs.media_type", info.media_type.encode()))
    if info.layer_id:
        attrs.append(("user.imgfs.layer_id", info.layer_id.encode()))
    return tuple(attrs)


def digest_hex(digest: str) -> str:
    return digest.split(":", 1)[1]


_SPECIAL_MODES = {CHARDEV: stat.S_IFCHR, BLOCKDEV: stat.S_IFBLK, FIFO: stat.S_IFIFO}
_MAX_ID = 0xFFFFFFFE
_MAX_TIME = (1 << 63) - 1


ROOT_MODE = 0o555  # a layer root the tar does not name, as ``podman image mount`` shows it


def origin(layer: int, tree: LayerTree, ref: int) -> Origin:
    """Member ``ref`` of ``tree``, the image's layer number ``layer``."""
    return Origin(layer, weakref.ref(tree), ref)


def member_node(
    key: Key, member: Member, nlink: int, created_ns: int = 0, source: Origin | None = None
) -> Node:
    """A ``layers/`` or ``rootfs/`` node with the image's own attributes (numeric owners).

    ``nlink``: the paths showing a file; for a directory 2 + its subdirectories (``layers/``)
    or 1 (``rootfs/``: not counted). A layer root that the tar does not name shows mode 0555
    and the layer's ``created_ns``.
    ``source``: where ``member`` is (kept for a regular file: ``TreeView.open_known``).
    """
    flag = member.typeflag
    if flag == REGULAR:  # most members: quickly (an implied member is a directory)
        return Node(
            key, "file", member.size, max(min(member.mtime_ns, _MAX_TIME), -_MAX_TIME), b"",
            True, member.xattrs, stat.S_IFREG | member.mode, min(member.uid, _MAX_ID),
            min(member.gid, _MAX_ID), nlink, 0, source,
        )  # fmt: skip
    kind: Kind = "file"
    file_type, size, target, rdev = stat.S_IFREG, member.size, b"", 0
    if flag == DIRECTORY:
        kind, file_type = "dir", stat.S_IFDIR
    elif flag == SYMLINK:
        kind, file_type, target = "link", stat.S_IFLNK, member.linkname
        size = len(target)
    elif flag in _SPECIAL_MODES:
        kind, file_type = "special", _SPECIAL_MODES[flag]
        if flag != FIFO:
            rdev = os.makedev(member.devmajor & 0xFFFFFFFF, member.devminor & 0xFFFFFFFF)
    mode = stat.S_IFLNK | 0o777 if kind == "link" else file_type | member.mode
    mtime = member.mtime_ns
    if member.implied and not member.path:
        mode, mtime = stat.S_IFDIR | ROOT_MODE, created_ns
    return Node(
        key, kind, size, max(min(mtime, _MAX_TIME), -_MAX_TIME), target=target,
        stable=True, xattrs=member.xattrs, mode=mode, uid=min(member.uid, _MAX_ID),
        gid=min(member.gid, _MAX_ID), nlink=nlink, rdev=rdev,
        origin=source if flag == REGULAR else None,
    )  # fmt: skip


def usable_name(name: bytes) -> bytes:
    """A name the kernel could have sent as one path component; NotFound otherwise."""
    if name in (b"", b".", b"..") or b"/" in name or b"\0" in name:
        raise NotFound(f"{name!r:.100} is not a usable name")
    return name


def image_dir_node(view: TreeView, key: SectionKey) -> Node:
    """A directory of an image's own (``signatures/``, ``blobs/``, ``instances/``)."""
    return Node(key, "dir", 0, view.image_mtime(view.image(key.image)))
