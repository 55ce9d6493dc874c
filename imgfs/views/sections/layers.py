"""``<image-id>/layers/<n>-<diff-id hex>/…``: each layer's files exactly as its tar has them.

Hardlinked members share one inode (a ``LayerInodeKey``); whiteouts appear as the tar has them.
Must not know: pyfuse3, trio, inode numbers, errno values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgfs.errors import NotFound
from imgfs.layer.tarheader import HARDLINK
from imgfs.layer.tree import LayerTree
from imgfs.store.image import Image
from imgfs.views import content as contents
from imgfs.views.content import Content
from imgfs.views.keys import Key, LayerInodeKey, LayerKey, SectionKey, child_path
from imgfs.views.node import Node
from imgfs.views.sections.base import Section, digest_hex, member_node, origin, usable_name

if TYPE_CHECKING:
    from imgfs.views.tree import TreeView

LayersKey = SectionKey | LayerKey | LayerInodeKey


class Layers(Section):
    def node(self, view: TreeView, key: LayersKey) -> Node:
        image = view.image(key.image)
        if isinstance(key, SectionKey):
            if not view.content(image).sources:
                raise NotFound(f"{image.what} has no layers/")
            return Node(key, "dir", 0, view.image_mtime(image), stable=True)
        tree = _tree(view, image, key.number)
        if isinstance(key, LayerInodeKey):
            if key.ref >= tree.member_count:
                raise NotFound(f"{key!r:.100} is gone")
            where = origin(key.number, tree, key.ref)
            return member_node(key, tree.member(key.ref), tree.link_count(key.ref), 0, where)
        if not key.path:
            created = view.content(image).sources[key.number].created_ns
            return member_node(key, tree.root(), _dir_links(tree, b""), created)
        return _path_node(view, tree, tree.ref(key.path), key)

    def children(self, view: TreeView, key: LayersKey) -> list[tuple[bytes, Node]]:
        image = view.image(key.image)
        if isinstance(key, SectionKey):
            sources = view.content(image).sources
            if not sources:
                raise NotFound(f"{image.what} has no layers/")
            return [
                (_dir_name(n, s.digest), self.node(view, LayerKey(key.image, n)))
                for n, s in enumerate(sources)
            ]
        if isinstance(key, LayerInodeKey):
            return super().children(view, key)
        tree = _tree(view, image, key.number)
        refs = tree.child_refs(key.path)
        tree.members(refs.values())  # parsed in tar order, for _path_node's member()
        return [
            (name, _path_node(view, tree, ref, LayerKey(key.image, key.number, child)))
            for name, ref in sorted(refs.items())
            for child in (child_path(key.path, name),)
        ]

    def lookup(self, view: TreeView, key: LayersKey, name: bytes) -> Node:
        if isinstance(key, SectionKey):
            return self.node(view, LayerKey(key.image, _number(view, key.image, name)))
        if isinstance(key, LayerInodeKey):
            return super().lookup(view, key, name)
        child = LayerKey(key.image, key.number, child_path(key.path, usable_name(name)))
        return self.node(view, child)

    def open(self, view: TreeView, key: LayersKey) -> Content:
        if isinstance(key, SectionKey):
            return super().open(view, key)
        image = view.image(key.image)
        tree = _tree(view, image, key.number)
        ref = key.ref if isinstance(key, LayerInodeKey) else _inode(tree, tree.ref(key.path))
        if ref >= tree.member_count:
            raise NotFound(f"{key!r:.100} is gone")
        source = view.content(image).sources[key.number]
        return contents.open_member(view.verifiers, source, tree.member(ref))


def _dir_name(number: int, digest: str) -> bytes:
    return f"{number}-{digest_hex(digest)}".encode()


def _number(view: TreeView, image_id: str, name: bytes) -> int:
    """The layer number of a ``layers/`` entry name ``<n>-<hex>``; NotFound if it is none."""
    text, _, _ = name.partition(b"-")
    sources = view.content(view.image(image_id)).sources
    if text.isdigit() and len(text) < 6:
        number = int(text)
        if number < len(sources) and _dir_name(number, sources[number].digest) == name:
            return number
    raise NotFound(f"no layer {name!r:.100}")


def _tree(view: TreeView, image: Image, number: int) -> LayerTree:
    sources = view.content(image).sources
    if not 0 <= number < len(sources):
        raise NotFound(f"{image.what} has no layer {number}")
    return view.layer_tree(sources[number])


def _inode(tree: LayerTree, ref: int) -> int:
    """The member whose inode a layer path shows (a hardlink's target when it resolves)."""
    if tree.typeflag(ref) == HARDLINK:
        target = tree.link_target(ref)
        if target is not None:
            return target
    return ref


def _dir_links(tree: LayerTree, path: bytes) -> int:
    """2 + the subdirectories of directory ``path`` (its ``st_nlink``)."""
    return 2 + sum(1 for ref in tree.child_refs(path).values() if tree.is_dir(ref))


def _path_node(view: TreeView, tree: LayerTree, ref: int, key: LayerKey) -> Node:
    ref = _inode(tree, ref)
    count = _dir_links(tree, key.path) if tree.is_dir(ref) else tree.link_count(ref)
    shown: Key = key
    if count > 1 and not tree.is_dir(ref):
        shown = LayerInodeKey(key.image, key.number, ref)
    where = origin(key.number, tree, ref)
    return view.remember(key, member_node(shown, tree.member(ref), count, 0, where))


LAYERS = Layers()
