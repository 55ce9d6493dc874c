"""The root: one directory per image, ``by-name/``, and unique ID prefixes as links.

Must not know: pyfuse3, trio, inode numbers, errno values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgfs.digest import is_hex
from imgfs.errors import NotFound
from imgfs.views.keys import ROOT as ROOT_KEY
from imgfs.views.keys import ByNameKey, ImageKey, PrefixKey, RootKey
from imgfs.views.node import Node
from imgfs.views.sections.base import Section

if TYPE_CHECKING:
    from imgfs.views.tree import TreeView

BY_NAME = b"by-name"


class Root(Section):
    def node(self, view: TreeView, key: RootKey) -> Node:
        return Node(ROOT_KEY, "dir", 0, view.mtime_ns)

    def children(self, view: TreeView, key: RootKey) -> list[tuple[bytes, Node]]:
        entries = [
            (image_id.encode(), view.node(ImageKey(image_id))) for image_id in sorted(view.images)
        ]
        return [*entries, (BY_NAME, view.node(ByNameKey()))]

    def lookup(self, view: TreeView, key: RootKey, name: bytes) -> Node:
        if name == BY_NAME:
            return view.node(ByNameKey())
        text = name.decode("ascii", "replace")
        if text in view.images:
            return view.node(ImageKey(text))  # O(1) with thousands of images
        if name and len(name) < 64 and is_hex(text):
            matches = [i for i in view.images if i.startswith(text)]
            if len(matches) == 1:
                return view.node(PrefixKey(matches[0]))
        raise NotFound(f"no {name!r:.100} here")


class Prefix(Section):
    """A unique ID prefix: a link to the full-ID directory (resolved, never listed)."""

    def node(self, view: TreeView, key: PrefixKey) -> Node:
        view.image(key.image)
        return Node(key, "link", len(key.image), view.mtime_ns, target=key.image.encode())


ROOT = Root()
PREFIX = Prefix()
