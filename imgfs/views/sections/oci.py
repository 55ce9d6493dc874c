"""``<image-id>/oci/``: an OCI image layout over the image's blobs (``imgfs.views.oci``).

``oci-layout``, ``index.json`` and ``blobs/sha256/<hex>``: the config, the layers (shared with
``blobs/``) and the layout's own manifest. Must not know: pyfuse3, trio, inode numbers, errno
values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgfs.errors import NotFound
from imgfs.store.image import BlobInfo, Image
from imgfs.views import oci as ocilayout
from imgfs.views.content import Content, Inline
from imgfs.views.keys import OciKey
from imgfs.views.node import Node
from imgfs.views.sections.base import Section, blob_xattrs
from imgfs.views.sections.blobs import open_blob

if TYPE_CHECKING:
    from imgfs.views.tree import TreeView

_DIRS: dict[tuple[bytes, ...], list[bytes] | None] = {
    (): [b"blobs", b"index.json", b"oci-layout"],
    (b"blobs",): [b"sha256"],
    (b"blobs", b"sha256"): None,  # the blobs, listed per image
}
_FILES = ((b"oci-layout",), (b"index.json",))


class Oci(Section):
    def node(self, view: TreeView, key: OciKey) -> Node:
        image = _image(view, key)
        return _node(view, image, view.image_mtime(image), key)

    def children(self, view: TreeView, key: OciKey) -> list[tuple[bytes, Node]]:
        image = _image(view, key)
        if key.parts not in _DIRS:
            return super().children(view, key)
        names = _DIRS[key.parts]
        if names is None:
            names = sorted(view.layout(image).blobs)
        mtime = view.image_mtime(image)
        return [(n, _node(view, image, mtime, OciKey(key.image, (*key.parts, n)))) for n in names]

    def lookup(self, view: TreeView, key: OciKey, name: bytes) -> Node:
        return self.node(view, OciKey(key.image, (*key.parts, name)))

    def open(self, view: TreeView, key: OciKey) -> Content:
        image = _image(view, key)
        if key.parts in _FILES:
            return Inline(_small_file(view, image, key.parts))
        info = _blob(view, image, key)
        if info is None:
            return Inline(view.layout(image).manifest)
        return open_blob(view, image, info)


def _node(view: TreeView, image: Image, mtime: int, key: OciKey) -> Node:
    """The node of ``key`` in ``image``'s ``oci/`` (``mtime``: the image's)."""
    if key.parts in _DIRS:
        return Node(key, "dir", 0, mtime, stable=True)
    if key.parts in _FILES:
        return Node(key, "file", len(_small_file(view, image, key.parts)), mtime, stable=True)
    info = _blob(view, image, key)
    if info is None:
        return Node(key, "file", len(view.layout(image).manifest), mtime, stable=True)
    return Node(key, "file", info.size, mtime, stable=True, xattrs=blob_xattrs(info))


def _image(view: TreeView, key: OciKey) -> Image:
    image = view.image(key.image)
    if not view.content(image).has_layout:
        raise NotFound(f"{image.what} has no oci/")
    return image


def _small_file(view: TreeView, image: Image, parts: tuple[bytes, ...]) -> bytes:
    if parts == (b"oci-layout",):
        return ocilayout.OCI_LAYOUT
    return view.layout(image).index


def _blob(view: TreeView, image: Image, key: OciKey) -> BlobInfo | None:
    if len(key.parts) == 3 and key.parts[:2] == (b"blobs", b"sha256"):
        blobs = view.layout(image).blobs
        if key.parts[2] in blobs:
            return blobs[key.parts[2]]
    raise NotFound(f"oci/{b'/'.join(key.parts)!r:.100} does not exist")


OCI = Oci()
