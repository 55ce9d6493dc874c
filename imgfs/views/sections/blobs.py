"""``<image-id>/blobs/<digest>``: the config, the uncompressed layer tars, the manifests.

Layer blobs open through the content API's policy (a snapshot, or a verified reader with
``--direct``); every other blob is read whole. Must not know: pyfuse3, trio, inode numbers,
errno values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgfs.errors import NotFound
from imgfs.store.image import BlobInfo, Image
from imgfs.views import content as contents
from imgfs.views.content import Content, Inline
from imgfs.views.keys import BlobKey, SectionKey
from imgfs.views.node import Node
from imgfs.views.sections.base import Section, blob_xattrs, image_dir_node

if TYPE_CHECKING:
    from imgfs.views.tree import TreeView


class Blobs(Section):
    def node(self, view: TreeView, key: SectionKey | BlobKey) -> Node:
        if isinstance(key, SectionKey):
            return image_dir_node(view, key)
        image = view.image(key.image)
        mtime = view.image_mtime(image)
        info = self._info(view, image, key.digest)
        return Node(key, "file", info.size, mtime, stable=True, xattrs=blob_xattrs(info))

    def children(self, view: TreeView, key: SectionKey | BlobKey) -> list[tuple[bytes, Node]]:
        if not isinstance(key, SectionKey):
            return super().children(view, key)
        blobs = view.content(view.image(key.image)).blobs
        return [(d.encode(), self.node(view, BlobKey(key.image, d))) for d in sorted(blobs)]

    def lookup(self, view: TreeView, key: SectionKey | BlobKey, name: bytes) -> Node:
        if not isinstance(key, SectionKey):
            return super().lookup(view, key, name)
        return self.node(view, BlobKey(key.image, name.decode("ascii", "replace")))

    def open(self, view: TreeView, key: SectionKey | BlobKey) -> Content:
        if not isinstance(key, BlobKey):
            return super().open(view, key)
        image = view.image(key.image)
        return open_blob(view, image, self._info(view, image, key.digest))

    def _info(self, view: TreeView, image: Image, digest: str) -> BlobInfo:
        info = view.content(image).blobs.get(digest)
        if info is None:
            raise NotFound(f"{image.what} has no blob {digest!r:.80}")
        return info


def open_blob(view: TreeView, image: Image, info: BlobInfo) -> Content:
    """Any blob of ``image`` (shared with ``oci/``)."""
    if info.kind != "layer":
        return Inline(image.read_small_blob(info))
    for source in view.content(image).sources:
        if source.digest == info.digest:
            return contents.open_layer_blob(view.caches, view.verifiers, source)
    raise NotFound(f"{image.what} has no layer {info.digest}")


BLOBS = Blobs()
