"""``<image-id>/rootfs/…``: the merged filesystem of the image (``imgfs.views.rootfs``).

Hardlinked files share one inode (a ``RootfsInodeKey``) with the count of paths still showing
it. A directory shows ``st_nlink`` 1, as btrfs and many FUSE filesystems do ("subdirectories
not counted": GNU find and fts then skip their leaf optimisation): counting them would merge
every subdirectory of a directory being listed, and the image directory's ``rootfs/`` entry
would merge the image's root. Must not know: pyfuse3, trio, inode numbers, errno values.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from imgfs.errors import NotFound
from imgfs.views import content as contents
from imgfs.views.content import Content
from imgfs.views.keys import Key, RootfsInodeKey, RootfsKey, child_path
from imgfs.views.node import Node, Origin
from imgfs.views.rootfs import Entry, RootFS
from imgfs.views.sections.base import Section, member_node, origin, usable_name

if TYPE_CHECKING:
    from imgfs.views.tree import TreeView

RootfsKeys = RootfsKey | RootfsInodeKey


class Rootfs(Section):
    def node(self, view: TreeView, key: RootfsKeys) -> Node:
        fs = _rootfs(view, key.image)
        if isinstance(key, RootfsInodeKey):
            entry = _identity_entry(fs, key)
            where = origin(entry.layer, fs.layers[entry.layer], entry.ref)
            return member_node(key, fs.member(entry), fs.nlink(entry), 0, where)
        return _entry_node(view, fs, fs.entry(key.path), key)

    def children(self, view: TreeView, key: RootfsKeys) -> list[tuple[bytes, Node]]:
        if isinstance(key, RootfsInodeKey):
            return super().children(view, key)
        fs = _rootfs(view, key.image)
        entries = fs.children(key.path)
        members = fs.members(entries.values())
        sources = view.content(view.image(key.image)).sources
        trees = zip(sources, fs.layers, strict=True)
        layers = [(source.created_ns, weakref.ref(tree)) for source, tree in trees]
        prefix = key.path + b"/" if key.path else b""
        listing: list[tuple[bytes, Node]] = []
        remembered: list[tuple[Key, Node]] = []  # a hardlinked file's inode key (``peek``
        # finds a path's node in the listing, which the view keeps: TreeView.children)
        for (name, entry), member in zip(entries.items(), members, strict=True):
            path_key = RootfsKey(key.image, prefix + name)
            shown, nlink = _shown(fs, entry, path_key)
            created, tree = layers[entry.layer]
            where = Origin(entry.layer, tree, entry.ref)
            node = member_node(shown, member, nlink, created, where)
            listing.append((name, node))
            if shown is not path_key:
                remembered.append((shown, node))
        if remembered:
            view.remember_many(remembered)
        return listing

    def lookup(self, view: TreeView, key: RootfsKeys, name: bytes) -> Node:
        if isinstance(key, RootfsInodeKey):
            return super().lookup(view, key, name)
        return self.node(view, RootfsKey(key.image, child_path(key.path, usable_name(name))))

    def open(self, view: TreeView, key: RootfsKeys) -> Content:
        fs = _rootfs(view, key.image)
        entry = _identity_entry(fs, key) if isinstance(key, RootfsInodeKey) else fs.entry(key.path)
        source = view.content(view.image(key.image)).sources[entry.layer]
        return contents.open_member(view.verifiers, source, fs.member(entry))


def _rootfs(view: TreeView, image_id: str) -> RootFS:
    image = view.image(image_id)
    if not view.content(image).sources:
        raise NotFound(f"{image.what} has no rootfs/")
    return view.rootfs(image)


def _identity_entry(fs: RootFS, key: RootfsInodeKey) -> Entry:
    entry = Entry(key.layer, key.ref)
    if key.layer >= len(fs.layers) or not fs.hardlinked(entry):
        raise NotFound(f"{key!r:.100} is gone")
    return entry


def _entry_node(view: TreeView, fs: RootFS, entry: Entry, key: RootfsKey) -> Node:
    shown, nlink = _shown(fs, entry, key)
    tree = fs.layers[entry.layer]
    created = view.content(view.image(key.image)).sources[entry.layer].created_ns
    where = origin(entry.layer, tree, entry.ref)
    return view.remember(key, member_node(shown, fs.member(entry), nlink, created, where))


def _shown(fs: RootFS, entry: Entry, key: RootfsKey) -> tuple[Key, int]:
    """The key and link count ``entry`` shows at ``key``: a hardlinked file's own inode key,
    else the path's key with 1 (a directory too: its subdirectories are not counted)."""
    if fs.hardlinked(entry) and not fs.layers[entry.layer].is_dir(entry.ref):
        return RootfsInodeKey(key.image, entry.layer, entry.ref), fs.nlink(entry)
    return key, 1


ROOTFS = Rootfs()
