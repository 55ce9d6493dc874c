"""``<image-id>/instances/<digest>`` (manifest lists): links to the images holding them.

Must not know: pyfuse3, trio, inode numbers, errno values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgfs.errors import NotFound
from imgfs.views.keys import InstanceKey, SectionKey
from imgfs.views.node import Node
from imgfs.views.sections.base import Section, image_dir_node

if TYPE_CHECKING:
    from imgfs.views.tree import TreeView


class Instances(Section):
    def node(self, view: TreeView, key: SectionKey | InstanceKey) -> Node:
        if isinstance(key, SectionKey):
            return image_dir_node(view, key)
        image = view.image(key.image)
        mtime = view.image_mtime(image)
        for digest, holder in view.content(image).instances:
            if digest == key.digest and holder is not None:
                target = f"../../{holder}".encode()
                return Node(key, "link", len(target), mtime, target=target)
        raise NotFound(f"{image.what} has no instance {key.digest!r:.80}")

    def children(self, view: TreeView, key: SectionKey | InstanceKey) -> list[tuple[bytes, Node]]:
        if not isinstance(key, SectionKey):
            return super().children(view, key)
        instances = view.content(view.image(key.image)).instances
        return [
            (d.encode(), self.node(view, InstanceKey(key.image, d)))
            for d, holder in instances
            if holder is not None
        ]

    def lookup(self, view: TreeView, key: SectionKey | InstanceKey, name: bytes) -> Node:
        if not isinstance(key, SectionKey):
            return super().lookup(view, key, name)
        return self.node(view, InstanceKey(key.image, name.decode("ascii", "replace")))


INSTANCES = Instances()
