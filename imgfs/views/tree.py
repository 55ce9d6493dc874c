"""The mounted tree of DESIGN.md §1 over one store snapshot, without FUSE.

Owns: one view of the store (its images, computed per image on first use), the dispatch of
every request by the type of its key to the section that owns that part of the tree
(``imgfs.views.sections``), and what sections share: an image's blob list and layer chain, its
signatures and OCI manifest (computed apart, so bad signature metadata fails only
``signatures/`` and a manifest that cannot be rewritten only ``oci/``), the nodes and
directory listings already built (each listing once per view), and the verifiers of the files
being read.
Must not know: pyfuse3, trio, inode numbers, errno values.

A view is immutable; per-image content raises the core's errors for a broken image, which
affect that image's nodes only.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from imgfs.budget import LISTING_ENTRY_BYTES, NODE_BYTES
from imgfs.errors import ImgfsError, NotFound
from imgfs.layer.tree import LayerTree
from imgfs.layer.verify import Verifiers
from imgfs.lru import LRU
from imgfs.store import locks
from imgfs.store.image import BlobInfo, Image
from imgfs.store.source import LayerSource
from imgfs.views import content as contents
from imgfs.views import oci as ocilayout
from imgfs.views.content import Caches, Content
from imgfs.views.keys import (
    ROOT,
    ImageKey,
    Key,
    LayerInodeKey,
    LayerKey,
    RootfsInodeKey,
    RootfsKey,
    child_key,
    listed_name,
)
from imgfs.views.node import Node
from imgfs.views.readahead import Hold, Warm
from imgfs.views.rootfs import RootFS
from imgfs.views.sections import section_of
from imgfs.views.sections.base import digest_hex
from imgfs.views.sections.byname import NameTree

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)
_MEMBER_KEYS = (LayerKey, LayerInodeKey, RootfsKey, RootfsInodeKey)


Listing = list[tuple[bytes, Node]]
_Listed = tuple[Listing, dict[bytes, Node]]  # a listing and its nodes by name


def _node_bytes(_node: Node) -> int:
    return NODE_BYTES


def _listing_bytes(listing: Listing) -> int:
    return (len(listing) + 1) * LISTING_ENTRY_BYTES


def _listed_bytes(listed: _Listed) -> int:
    return _listing_bytes(listed[0])


@dataclass(frozen=True)
class Layout:
    """An image's ``oci/`` layout, computed once per view."""

    manifest: bytes  # the layout's own manifest (blobs/sha256/<digest>)
    digest: str  # its sha256, hex
    index: bytes  # index.json
    blobs: dict[bytes, BlobInfo | None]  # blobs/sha256/<hex> -> the blob (None: the manifest)


@dataclass
class ImageContent:
    """What an image's directory offers, computed once per view."""

    blobs: dict[str, BlobInfo] = field(default_factory=dict)
    config_size: int | None = None
    manifest_size: int = 0
    instances: list[tuple[str, str | None]] = field(default_factory=list)
    sources: list[LayerSource] = field(default_factory=list)  # the layer chain, base first
    has_layout: bool = False  # offers oci/


class TreeView:
    """The tree of one store snapshot. Thread-safe; per-image content computed lazily."""

    def __init__(self, images: list[Image], mtime_ns: int, caches: Caches | None = None) -> None:
        self.images = {image.id: image for image in images}
        self.mtime_ns = mtime_ns
        self.caches = caches if caches is not None else Caches.build()
        self.verifiers = Verifiers()  # per view: a failed file stays failed until the store changes
        self._content: dict[str, ImageContent] = {}
        self._layouts: dict[str, Layout] = {}
        self._trees: dict[str, weakref.ReferenceType[LayerTree]] = {}  # by layer ID
        self._tree_locks: dict[str, threading.Lock] = {}
        self._order: dict[str, int] | None = None  # image ID -> place in the root listing
        self._ordered: list[str] = []
        self._ahead: dict[ImageKey, threading.Event] = {}  # listings being built ahead
        self._signatures: dict[str, list[bytes]] = {}
        self._warmers: dict[str, tuple[Warm, Hold]] = {}  # the read-ahead's, by image ID
        # every node computed, by key; bounded by the budget's share (NODE_BYTES each)
        self._nodes: LRU[Key, Node] = LRU(self.caches.budget.nodes, cost=_node_bytes)
        # every directory listing built, by key (a view never changes: built once, not per
        # opendir); bounded by the budget's share, a listing over it alone is not kept
        self._listings: LRU[Key, _Listed] = LRU(self.caches.budget.listings, cost=_listed_bytes)
        self._lock = threading.Lock()
        self.names = NameTree(images)

    # -- requests ----------------------------------------------------------------------------

    def node(self, key: Key) -> Node:
        """The node for ``key``; NotFound when it no longer exists. A view never changes, so
        every node it computes is remembered (bounded) for ``peek``."""
        found = self._nodes.get(key)
        if found is None:
            found = section_of(key).node(self, key)
            self._nodes.put(key, found)
        return found

    def listed_node(self, key: Key) -> Node:
        """The node of ``key`` for its directory's listing, computed by its section and not
        remembered apart (``peek`` finds it in the listing)."""
        return section_of(key).node(self, key)

    def peek(self, key: Key) -> Node | None:
        """The node of ``key`` if this view computed it already (no I/O, no parse): remembered,
        or in its directory's listing (where a listing's nodes are kept: they are not
        remembered one by one), unless only provisional there."""
        found = self._nodes.get(key)
        if found is not None:
            return found
        name = listed_name(key)
        if name is None:
            return None
        listed = self._listings.get(key.parent())
        found = None if listed is None else listed[1].get(name)
        return None if found is None or found.provisional else found

    def peek_child(self, parent: Key, name: bytes) -> Node | None:
        """``peek`` of the child ``name`` of ``parent``: known by its key, or listed in
        ``parent``'s listing (a section's lookup of a listed name is that listing's node,
        unless that node is only provisional)."""
        child = child_key(parent, name)
        if child is not None:
            return self.peek(child)
        listed = self._listings.get(parent)
        found = None if listed is None else listed[1].get(name)
        if found is not None and found.provisional:  # only what the view has computed
            return self._nodes.get(found.key)
        return found

    def lookup(self, parent: Key, name: bytes) -> Node:
        """The child ``name`` of directory ``parent`` (``.`` and ``..`` included)."""
        if name == b".":
            return self.node(parent)
        if name == b"..":
            return self.node(parent.parent())
        found = section_of(parent).lookup(self, parent, name)
        self._nodes.put(found.key, found)
        return found

    def children(self, key: Key) -> Listing:
        """The listing of directory ``key``, in readdir order, built once per view (bounded:
        a listing larger than the whole share is built again each time). Callers must not
        change it. An image directory's listing also starts building the next ones
        (``_list_ahead``); one being built ahead is waited for, not built twice."""
        listed = self._listings.get(key)
        if listed is None and isinstance(key, ImageKey):
            self._list_ahead(key)
            with self._lock:
                building = self._ahead.get(key)
            if building is not None:
                building.wait()
                listed = self._listings.get(key)
        return listed[0] if listed is not None else self._build_listing(key)

    def peek_children(self, key: Key) -> Listing | None:
        """The listing of ``key`` if this view built it already (no I/O, no merge)."""
        listed = self._listings.get(key)
        if listed is not None and isinstance(key, ImageKey):
            self._list_ahead(key)
        return None if listed is None else listed[0]

    def _build_listing(self, key: Key) -> Listing:
        found = section_of(key).children(self, key)
        if _listing_bytes(found) <= self._listings.max_cost:
            self._listings.put(key, (found, dict(found)))
        return found

    def _list_ahead(self, key: ImageKey) -> None:
        """Start building the listings of the ``LIST_AHEAD`` image directories after ``key``
        in the root's order (an ``ls -R`` or ``find`` enters them next), each in a background
        thread: their record and manifest reads and layer-tree parse then overlap the
        requests before them instead of waiting for the walk (cold disks). Bounded: a few
        listings, built at most once each; one that fails is built (and fails) again when
        asked for."""
        with self._lock:
            if self._order is None:
                self._order = {image_id: i for i, image_id in enumerate(sorted(self.images))}
                self._ordered = sorted(self.images)
            start = self._order.get(key.image, len(self._ordered)) + 1
            todo = []
            for image_id in self._ordered[start : start + LIST_AHEAD]:
                ahead = ImageKey(image_id)
                if ahead not in self._ahead and ahead not in self._listings:
                    self._ahead[ahead] = threading.Event()
                    todo.append(ahead)
        for ahead in todo:
            _ahead_pool().submit(self._build_ahead, ahead)

    def _build_ahead(self, key: ImageKey) -> None:
        try:
            self._build_listing(key)
        except Exception as exc:  # asked for again, it fails in the request that asks
            log.debug("listing %s ahead failed: %s", key.image[:12], exc)
        finally:
            with self._lock:
                done = self._ahead.pop(key)
            done.set()

    def open(self, key: Key) -> Content:
        """The content of file ``key`` (the caller gives it back with ``release``)."""
        return section_of(key).open(self, key)

    def open_known(self, key: Key, node: Node | None = None) -> Content | None:
        """``open(key)`` without I/O, if this view knows the node of ``key`` (a ``layers/`` or
        ``rootfs/`` regular file: its ``Origin``) and its layer's tree is in memory; the file
        is opened at its first read. None: ask ``open``. ``node``: the node of ``key`` this
        view gave the caller (``peek``/``node``), not looked up again."""
        if node is None:
            node = self.peek(key)
        where = None if node is None else node.origin
        if where is None or not isinstance(key, _MEMBER_KEYS):
            return None
        tree = where.tree()
        with self._lock:
            content = self._content.get(key.image)
        if tree is None or content is None:
            return None
        source = content.sources[where.layer]
        if source.toc_tree:  # its sha256 is looked up in the TOC: under layers.lock (I/O)
            return None
        file = tree.file(where.ref)  # before the read-ahead may hand over an fd
        on_miss, fd = None, None
        if isinstance(key, LayerKey | RootfsKey):
            parent = key.parent()
            listing = self.peek_children(parent)
            if listing is not None:  # the next files of the listing, into the page cache
                name = key.path.rpartition(b"/")[2]
                warm = self._warmers.get(key.image)
                if warm is None:
                    warm = self._warmers.setdefault(
                        key.image,
                        (
                            functools.partial(self._warm, key.image),
                            functools.partial(self._hold, key.image),
                        ),
                    )
                on_miss, fd = self.caches.read_ahead.opened(parent, name, listing, *warm)
        return contents.open_member(self.verifiers, source, file, lazy=True, on_miss=on_miss, fd=fd)

    def _warm(self, image_id: str, nodes: Sequence[Node], length: int) -> list[int | None]:
        """``readahead.Warm``: the regular files ``nodes`` of image ``image_id`` opened as
        ``open_known`` would open them, the first ``length`` bytes of each asked into the
        page cache, one ``LayerSource.warm_files`` call per layer they are in; their fds, None
        for a file ``open_known`` would not open or that was not opened (a layer that fails
        them all is logged: the others are warmed all the same). Never waits for a store
        lock."""
        with self._lock:
            content = self._content.get(image_id)
        fds: list[int | None] = [None] * len(nodes)
        if content is None:
            return fds
        by_layer: dict[int, list[tuple[int, bytes, int]]] = {}
        for at, node in enumerate(nodes):
            where = node.origin
            tree = None if where is None else where.tree()
            if where is None or tree is None:
                continue
            source = content.sources[where.layer]
            if source.toc_tree or source.refused is not None:
                continue
            file = tree.file(where.ref)
            by_layer.setdefault(where.layer, []).append((at, file.data_name, file.size))
        try:
            with locks.no_waiting():
                for layer, files in by_layer.items():
                    source = content.sources[layer]
                    try:
                        got = source.warm_files([f[1:] for f in files], length)
                    except (ImgfsError, OSError) as exc:
                        log.debug("read-ahead in %s: %s", source.what, exc)
                        continue
                    for (at, _, _), fd in zip(files, got, strict=True):
                        fds[at] = fd
        except BaseException:
            for fd in fds:
                if fd is not None:
                    os.close(fd)
            raise
        return fds

    def _hold(self, image_id: str) -> contextlib.AbstractContextManager[object]:
        """``readahead.Hold``: the store locks of image ``image_id``'s top layer held across a
        ``_warm`` of a batch (its opens take them again without a syscall)."""
        with self._lock:
            content = self._content.get(image_id)
        if content is None or not content.sources:
            return contextlib.nullcontext()
        return content.sources[-1].holding_opens()

    def resolve(self, path: bytes) -> Node:
        """The node at ``path`` below the root (lookups one name at a time; links not followed)."""
        node = self.node(ROOT)
        for name in filter(None, path.split(b"/")):
            node = self.lookup(node.key, name)
        return node

    # -- what sections share -----------------------------------------------------------------

    def image(self, image_id: str) -> Image:
        image = self.images.get(image_id)
        if image is None:
            raise NotFound(f"image {image_id[:12]} is gone")
        return image

    def image_mtime(self, image: Image) -> int:
        created = image.created
        return int(created.timestamp() * 1e9) if created is not None else self.mtime_ns

    def content(self, image: Image) -> ImageContent:
        with self._lock:
            cached = self._content.get(image.id)
        if cached is not None:
            return cached
        content = ImageContent()
        man = image.parsed_manifest()
        content.manifest_size = len(image.manifest())
        content.blobs = {b.digest: b for b in image.blobs()}
        if man.config is not None and man.config.digest in content.blobs:
            content.config_size = content.blobs[man.config.digest].size
        if man.is_list:
            content.instances = image.instances()
        else:
            content.sources = image.layer_sources()
            content.has_layout = man.media_type in ocilayout.LAYOUT_TYPES
        with self._lock:
            self._content[image.id] = content
        return content

    def config_blob(self, image: Image) -> BlobInfo:
        config = image.parsed_manifest().config
        if config is None or config.digest not in self.content(image).blobs:
            raise NotFound(f"{image.what} has no config")
        return self.content(image).blobs[config.digest]

    def signatures(self, image: Image) -> list[bytes]:
        """The image's signatures, computed once per view apart from its other content."""
        with self._lock:
            cached = self._signatures.get(image.id)
        if cached is None:
            cached = image.signatures()
            with self._lock:
                self._signatures[image.id] = cached
        return cached

    def layout(self, image: Image) -> Layout:
        """The image's ``oci/`` layout (see ``imgfs.views.oci``), computed once per view: its
        manifest, that manifest's digest, ``index.json`` and the blobs it names (a failure is
        not kept: it fails ``oci/``'s files each time, nothing else)."""
        with self._lock:
            cached = self._layouts.get(image.id)
        if cached is None:
            layers = image.layer_infos()
            manifest = ocilayout.layout_manifest(
                image.manifest(), [(info.digest, info.size) for info in layers], image.what
            )
            digest = hashlib.sha256(manifest).hexdigest()
            blobs: dict[bytes, BlobInfo | None] = {}
            content = self.content(image)
            config = image.parsed_manifest().config
            if config is not None and config.digest in content.blobs:
                blobs[digest_hex(config.digest).encode()] = content.blobs[config.digest]
            for info in layers:
                blobs[digest_hex(info.digest).encode()] = info
            blobs[digest.encode()] = None
            index = ocilayout.index_json(f"sha256:{digest}", len(manifest))
            cached = Layout(manifest, digest, index, blobs)
            with self._lock:
                self._layouts[image.id] = cached
        return cached

    def rootfs(self, image: Image) -> RootFS:
        sources = self.content(image).sources
        key = (image.id, *(s.layer_id for s in sources))
        return self.caches.rootfs.get(
            key, f"image {image.id[:12]}", lambda: [self.layer_tree(s) for s in sources]
        )

    def remember_many(self, pairs: list[tuple[Key, Node]]) -> None:
        """``remember`` of a listing's nodes: (key, node) pairs, each under every key that
        ``remember`` would keep it under."""
        self._nodes.put_many(pairs)

    def layer_tree(self, source: LayerSource) -> LayerTree:
        """The tree of ``source``'s layer (``FileViews.layer_tree``), looked up once per view:
        a layer shared by many images (a base) is not opened again for each of them while the
        tree caches keep its tree (held weakly here)."""
        layer = source.layer_id
        with self._lock:
            ref = self._trees.get(layer)
            building = self._tree_locks.setdefault(layer, threading.Lock())
        tree = None if ref is None else ref()
        if tree is None:
            with building:  # a layer being looked up by another thread is waited for
                with self._lock:
                    ref = self._trees.get(layer)
                tree = None if ref is None else ref()
                if tree is None:
                    tree = self.caches.trees.layer_tree(source)
                    with self._lock:
                        self._trees[layer] = weakref.ref(tree)
        return tree

    def remember(self, path_key: Key, node: Node) -> Node:
        """Keep a ``layers/``/``rootfs/`` node for ``peek`` under its path and its own key."""
        self._nodes.put(path_key, node)
        if node.key != path_key:
            self._nodes.put(node.key, node)
        return node


LIST_AHEAD = 4  # image directory listings built ahead of an ls -R, in the root's order
_AHEAD_THREADS = 2
_ahead_lock = threading.Lock()
_ahead_executor: ThreadPoolExecutor | None = None


def _ahead_pool() -> ThreadPoolExecutor:
    """The threads that build listings ahead (started at first use: never before the daemon
    forks)."""
    global _ahead_executor
    from concurrent.futures import ThreadPoolExecutor  # not on the way to a mount

    with _ahead_lock:
        if _ahead_executor is None:
            _ahead_executor = ThreadPoolExecutor(_AHEAD_THREADS, "imgfs-list-ahead")
        return _ahead_executor


def build_view(
    images: Callable[[], list[Image]], mtime_ns: int, caches: Caches | None = None
) -> TreeView:
    """A view of the store's current images (logs and shows nothing if listing fails)."""
    try:
        listed = images()
    except ImgfsError as exc:
        log.error("cannot list the store's images: %s", exc)
        listed = []
    return TreeView(listed, mtime_ns, caches)
