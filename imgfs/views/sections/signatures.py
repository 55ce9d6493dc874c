"""``<image-id>/signatures/signature-<n>``: the primary manifest's signatures, in stored order.

Must not know: pyfuse3, trio, inode numbers, errno values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgfs.errors import NotFound
from imgfs.views.content import Content, Inline
from imgfs.views.keys import SectionKey, SignatureKey
from imgfs.views.node import Node
from imgfs.views.sections.base import Section, image_dir_node

if TYPE_CHECKING:
    from imgfs.views.tree import TreeView

_PREFIX = b"signature-"


class Signatures(Section):
    def node(self, view: TreeView, key: SectionKey | SignatureKey) -> Node:
        if isinstance(key, SectionKey):
            return image_dir_node(view, key)
        image = view.image(key.image)
        mtime = view.image_mtime(image)
        signatures = view.signatures(image)
        if not 1 <= key.number <= len(signatures):
            raise NotFound(f"image {key.image[:12]} has no signature-{key.number}")
        return Node(key, "file", len(signatures[key.number - 1]), mtime)

    def children(self, view: TreeView, key: SectionKey | SignatureKey) -> list[tuple[bytes, Node]]:
        if not isinstance(key, SectionKey):
            return super().children(view, key)
        count = len(view.signatures(view.image(key.image)))
        return [
            (b"%s%d" % (_PREFIX, n), self.node(view, SignatureKey(key.image, n)))
            for n in range(1, count + 1)
        ]

    def lookup(self, view: TreeView, key: SectionKey | SignatureKey, name: bytes) -> Node:
        number = name.removeprefix(_PREFIX)
        if not isinstance(key, SectionKey) or number == name or not number.isdigit():
            raise NotFound(f"no {name!r:.100} here")
        if len(number) > 6 or number.startswith(b"0"):
            raise NotFound(f"no {name!r:.100} here")
        return self.node(view, SignatureKey(key.image, int(number)))

    def open(self, view: TreeView, key: SectionKey | SignatureKey) -> Content:
        if not isinstance(key, SignatureKey):
            return super().open(view, key)
        self.node(view, key)
        return Inline(view.signatures(view.image(key.image))[key.number - 1])


SIGNATURES = Signatures()
