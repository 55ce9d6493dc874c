"""``<image-id>/``: the image directory, ``manifest.json`` and ``config.json``.

A file view (``layers/``, ``rootfs/``, ``oci/``) that cannot be built lists as a plain directory
and fails when entered, so one broken layer never hides the image's manifest, config,
signatures and other blobs. Must not know: pyfuse3, trio, inode numbers, errno values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from imgfs.errors import ImgfsError, NotFound
from imgfs.views.content import Content, Inline
from imgfs.views.keys import ImageFileKey, ImageKey, Key, OciKey, RootfsKey, SectionKey
from imgfs.views.node import Node
from imgfs.views.sections.base import Section, blob_xattrs

if TYPE_CHECKING:
    from imgfs.views.tree import TreeView

log = logging.getLogger(__name__)

_OCI_DIRS = ((), (b"blobs",), (b"blobs", b"sha256"))
_DESIGN_FILES = (b"manifest.json", b"config.json", b"signatures", b"blobs")


_CHILD_KEYS: dict[bytes, Callable[[str], Key]] = {
    b"manifest.json": lambda image: ImageFileKey(image, "manifest.json"),
    b"config.json": lambda image: ImageFileKey(image, "config.json"),
    b"signatures": lambda image: SectionKey(image, "signatures"),
    b"blobs": lambda image: SectionKey(image, "blobs"),
    b"instances": lambda image: SectionKey(image, "instances"),
    b"layers": lambda image: SectionKey(image, "layers"),
    b"rootfs": lambda image: RootfsKey(image),
    b"oci": lambda image: OciKey(image),
}


def _child_key(image_id: str, name: bytes) -> Key | None:
    make = _CHILD_KEYS.get(name)
    return None if make is None else make(image_id)


class ImageDir(Section):
    def node(self, view: TreeView, key: ImageKey) -> Node:
        image = view.image(key.image)
        return Node(key, "dir", 0, view.image_mtime(image))

    def children(self, view: TreeView, key: ImageKey) -> list[tuple[bytes, Node]]:
        listing = [(n, self._entry(view, key, n)) for n in self._names(view, key)]
        _build_small_listings(view, key, listing)
        return listing

    def lookup(self, view: TreeView, key: ImageKey, name: bytes) -> Node:
        child = _child_key(key.image, name)
        if child is not None and name in _DESIGN_FILES:
            return view.node(child)  # never builds the file views
        if child is None or name not in self._names(view, key):
            raise NotFound(f"no {name!r:.100} in image {key.image[:12]}")
        return self._listed_node(view, key, name)

    def _names(self, view: TreeView, key: ImageKey) -> list[bytes]:
        content = view.content(view.image(key.image))
        names = [b"manifest.json", b"signatures", b"blobs"]
        if content.config_size is not None:
            names.insert(1, b"config.json")
        if content.instances:
            names.append(b"instances")
        if content.sources:
            names += [b"layers", b"rootfs"]
        if content.has_layout:
            names.append(b"oci")
        return names

    def _entry(self, view: TreeView, key: ImageKey, name: bytes) -> Node:
        """The listing's node of ``name``: ``rootfs/``'s is provisional unless this view has
        merged the image's root already (its attributes need every layer's tree; an ``ls -lR``
        that leaves ``rootfs/`` out then parses none, and a ``stat`` of it asks the kernel
        for the real node)."""
        if name == b"rootfs":
            child = RootfsKey(key.image)
            known = view.peek(child)
            if known is not None:
                return known
            return Node(child, "dir", 0, view.image_mtime(view.image(key.image)), provisional=True)
        return self._listed_node(view, key, name)

    def _listed_node(self, view: TreeView, key: ImageKey, name: bytes) -> Node:
        child = _child_key(key.image, name)
        assert child is not None
        try:
            return view.listed_node(child)
        except ImgfsError as exc:
            if name not in (b"rootfs", b"layers", b"oci"):
                raise
            log.debug("image %s: %s/ is unavailable: %s", key.image[:12], name.decode(), exc)
            return Node(child, "dir", 0, view.image_mtime(view.image(key.image)))


def _build_small_listings(view: TreeView, key: ImageKey, listing: list[tuple[bytes, Node]]) -> None:
    """Build, in this listing's thread hop, the listings of the image's own directories below
    it (``signatures/``, ``blobs/``, ``instances/``, ``oci/`` and its ``blobs/sha256/``): they
    need only the image's record and manifest, which this listing has read, so an ``ls -R``
    opens each of them without a hop of its own. One that fails is left to be built (and to
    fail) when it is opened; ``layers/`` and ``rootfs/`` are built only when opened."""
    subdirs: list[Key] = []
    for name, node in listing:
        if name in (b"signatures", b"blobs", b"instances"):
            subdirs.append(node.key)
        elif name == b"oci":
            subdirs += [OciKey(key.image, parts) for parts in _OCI_DIRS]
    for subdir in subdirs:
        try:
            view.children(subdir)
        except ImgfsError as exc:
            log.debug("image %s: %s is unavailable: %s", key.image[:12], subdir, exc)


class ImageFile(Section):
    def node(self, view: TreeView, key: ImageFileKey) -> Node:
        image = view.image(key.image)
        mtime = view.image_mtime(image)
        if key.name == "manifest.json":
            return Node(key, "file", view.content(image).manifest_size, mtime)
        info = view.config_blob(image)
        return Node(key, "file", info.size, mtime, stable=True, xattrs=blob_xattrs(info))

    def open(self, view: TreeView, key: ImageFileKey) -> Content:
        image = view.image(key.image)
        if key.name == "manifest.json":
            return Inline(image.manifest())
        return Inline(image.read_small_blob(view.config_blob(image)))


IMAGE = ImageDir()
IMAGE_FILE = ImageFile()
