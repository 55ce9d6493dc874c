"""``<image-id>/rootfs/…``: the merged filesystem of the image (``imgfs.views.rootfs``).

Hardlinked files share one inode (a ``RootfsInodeKey``) with the count of paths still showing
it. A directory shows ``st_nlink`` 1, as btrfs and many FUSE filesystems do ("subdirectories
not counted": GNU find and fts then skip their leaf optimisation): counting them would merge
every subdirectory of a directory being listed, and the image directory's ``rootfs/`` entry
would merge the image's root. Must not know: pyfuse3, trio, inode numbers, errno values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgfs.errors import NotFound
from imgfs.views import content as contents
from imgfs.views.content import Content
from imgfs.views.keys import Key, RootfsInodeKey, RootfsKey, child_path
from imgfs.views.node import Node
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
        fs.prefetch(entries.values())
        return [
            (name, _entry_node(view, fs, entry, RootfsKey(key.image, child_path(key.path, name))))
            for name, entry in entries.items()
        ]

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
    shown: Key = key
    nlink = 1  # a directory too: its subdirectories are not counted (see the module's text)
    tree = fs.layers[entry.layer]
    if not tree.is_dir(entry.ref) and fs.hardlinked(entry):
        shown, nlink = RootfsInodeKey(key.image, entry.layer, entry.ref), fs.nlink(entry)
    created = view.content(view.image(key.image)).sources[entry.layer].created_ns
    where = origin(entry.layer, tree, entry.ref)
    return view.remember(key, member_node(shown, fs.member(entry), nlink, created, where))


ROOTFS = Rootfs()
