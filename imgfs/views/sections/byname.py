"""``by-name/``: the images' names as relative links to their directories.

Owns: the name tree (``<registry>/<path>/<repo>:<tag>`` and ``…@sha256:<hex>``; a name that
would nest under another image's link, or that is not usable as a path, is skipped with a log
line) and the colon-free twin of every name: each ``:`` read as ``=`` (``localhost/app=v2``,
``…@sha256=<hex>``), looked up but never listed, for tools that read ``:`` as their own
separator (``skopeo copy oci:MNT/by-name/localhost/app=v2/oci …``).
Must not know: pyfuse3, trio, inode numbers, errno values.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from imgfs.errors import NotFound
from imgfs.store.image import Image
from imgfs.views.keys import ByNameKey
from imgfs.views.node import Node
from imgfs.views.sections.base import Section

if TYPE_CHECKING:
    from imgfs.views.tree import TreeView

log = logging.getLogger(__name__)

Parts = tuple[bytes, ...]


class NameTree:
    """Directories and links of ``by-name/``, keyed by their path components."""

    def __init__(self, images: list[Image]) -> None:
        self.dirs: dict[Parts, set[bytes]] = {(): set()}
        self.links: dict[Parts, str] = {}
        for image in sorted(images, key=lambda i: i.id):
            for name in image.names:
                self._add(name, image.id)

    def _add(self, name: str, image_id: str) -> None:
        try:
            parts = tuple(p.encode() for p in name.split("/"))
        except UnicodeEncodeError:
            parts = (b"",)
        if any(p in (b"", b".", b"..") or b"\0" in p or b"=" in p or len(p) > 255 for p in parts):
            log.warning("by-name: skipping unusable name %r of image %s", name, image_id[:12])
            return
        for depth in range(1, len(parts)):
            if parts[:depth] in self.links:
                return
        if parts in self.dirs or parts in self.links:
            return
        for depth in range(len(parts)):
            self.dirs.setdefault(parts[:depth], set()).add(parts[depth])
        self.links[parts] = image_id

    def canonical(self, parts: Parts) -> Parts:
        """The listed path a (possibly colon-free) path stands for."""
        if parts in self.links or parts in self.dirs:
            return parts
        return tuple(p.replace(b"=", b":") for p in parts)


class ByName(Section):
    def node(self, view: TreeView, key: ByNameKey) -> Node:
        names = view.names
        parts = names.canonical(key.parts)
        if parts in names.links:
            target = b"../" * len(parts) + names.links[parts].encode()
            return Node(key, "link", len(target), view.mtime_ns, target=target)
        if parts in names.dirs:
            return Node(key, "dir", 0, view.mtime_ns)
        raise NotFound(f"by-name/{b'/'.join(key.parts)!r:.100} does not exist")

    def children(self, view: TreeView, key: ByNameKey) -> list[tuple[bytes, Node]]:
        names = view.names
        parts = names.canonical(key.parts)
        if parts not in names.dirs:
            raise NotFound(f"by-name/{b'/'.join(key.parts)!r:.100} is not a directory")
        return [(n, self.node(view, ByNameKey((*key.parts, n)))) for n in sorted(names.dirs[parts])]

    def lookup(self, view: TreeView, key: ByNameKey, name: bytes) -> Node:
        return self.node(view, ByNameKey((*key.parts, name)))


BY_NAME = ByName()
