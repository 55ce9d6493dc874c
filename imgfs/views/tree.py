"""The mounted tree of DESIGN.md §1 over one store snapshot, without FUSE.

Owns: names, kinds, sizes, modes, owners, times, symlink targets and xattrs of every node:
``<image-id>/{manifest.json, config.json, signatures/, blobs/, instances/, layers/, rootfs/,
oci/}``, ``by-name/…`` links and unique-ID-prefix links. Nodes are addressed by stable keys
(tuples of strings), so the adapter can keep inode numbers across store refreshes; files that
share an inode (hardlinks in ``layers/`` and ``rootfs/``) share one identity key.
Must not know: pyfuse3, trio, inode numbers, errno values.

A view is immutable; per-image content (manifest, blob list) is computed on first use and
raises the core's errors for a broken image, which affect that image's nodes only. Signatures
and the ``oci/`` manifest are computed apart from it, so bad signature metadata fails only
``signatures/`` and a manifest that cannot be rewritten fails only ``oci/``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from imgfs.cache.trees import FileViews, MemberReader
from imgfs.errors import ImgfsError, NotFound
from imgfs.layer.tarheader import BLOCKDEV, CHARDEV, DIRECTORY, FIFO, HARDLINK, SYMLINK
from imgfs.layer.tree import LayerTree, Member
from imgfs.store.image import BlobInfo, Image
from imgfs.store.source import LayerSource
from imgfs.views import oci as ocilayout
from imgfs.views.rootfs import Entry, RootFS

log = logging.getLogger(__name__)

NodeKey = tuple[str, ...]
Kind = Literal["dir", "file", "link", "special"]
ROOT: NodeKey = ("root",)
BY_NAME = "by-name"
_DESIGN_FILES = frozenset({"manifest.json", "config.json", "signatures", "blobs"})
_HEX = frozenset("0123456789abcdef")
_FILE_VIEWS = ("layers", "rootfs")
_IDENTITY_KEYS = ("layer-ino", "rootfs-ino")
_SPECIAL_MODES = {CHARDEV: stat.S_IFCHR, BLOCKDEV: stat.S_IFBLK, FIFO: stat.S_IFIFO}
_MAX_ID = 0xFFFFFFFE
_MAX_TIME = (1 << 63) - 1
MAX_CACHED_NODES = 500_000
MAX_CACHED_ROOTFS = 8


@dataclass(frozen=True)
class Ownership:
    """Owner and permission policy: 0500/0400 unless uid/gid/umask widen it."""

    uid: int
    gid: int
    umask: int | None = None

    def mode(self, kind: Kind) -> int:
        if kind == "link":
            return stat.S_IFLNK | 0o777
        if kind == "dir":
            perms = 0o500 if self.umask is None else 0o555 & ~self.umask
            return stat.S_IFDIR | perms
        perms = 0o400 if self.umask is None else 0o444 & ~self.umask
        return stat.S_IFREG | perms

    def others_may_read(self) -> bool:
        """Whether imgfs's own files are readable by users other than their owner (only an
        explicit ``umask`` grants that)."""
        return bool(self.mode("file") & stat.S_IROTH)

    def may_open_view(self, caller_uid: int, image_mode: int) -> bool:
        """Whether ``caller_uid`` may open a ``layers/``/``rootfs/`` node whose image mode is
        ``image_mode``, on top of the kernel's check of that mode (default_permissions).

        The kernel matches image-internal owners against host users: a host user whose uid
        equals an image owner would get that owner's rights. So root and the mount's owner
        pass (the kernel enforces the image's modes for them); anyone else only if imgfs's own
        policy lets others read AND the image grants "other" read. Never by owner or group.
        """
        if caller_uid in (0, self.uid):
            return True
        return self.others_may_read() and bool(image_mode & stat.S_IROTH)


@dataclass(frozen=True)
class Node:
    key: NodeKey
    kind: Kind
    size: int
    mtime_ns: int
    target: bytes = b""
    stable: bool = False  # content-addressed: the kernel may cache it for long
    xattrs: tuple[tuple[str, bytes], ...] = ()
    # layers/ and rootfs/ entries show the image's own attributes (None/0: the policy's)
    mode: int | None = None  # full st_mode
    uid: int | None = None
    gid: int | None = None
    nlink: int = 0
    rdev: int = 0


@dataclass
class _ImageContent:
    blobs: dict[str, BlobInfo] = field(default_factory=dict)
    config_size: int | None = None
    manifest_size: int = 0
    instances: list[tuple[str, str | None]] = field(default_factory=list)
    sources: list[LayerSource] = field(default_factory=list)  # the layer chain, base first
    has_layout: bool = False  # offers oci/


class TreeView:
    """The tree of one store snapshot. Thread-safe; per-image content computed lazily."""

    def __init__(
        self,
        images: list[Image],
        mtime_ns: int,
        files: FileViews | None = None,
        rootfs: RootFSCache | None = None,
    ) -> None:
        self.images = {image.id: image for image in images}
        self.mtime_ns = mtime_ns
        self.files = files if files is not None else FileViews()
        self.rootfs_cache = rootfs if rootfs is not None else RootFSCache(self.files.layer_tree)
        self._content: dict[str, _ImageContent] = {}
        self._layouts: dict[str, bytes] = {}
        self._signatures: dict[str, list[bytes]] = {}
        self._nodes: dict[NodeKey, Node] = {}  # layers/ and rootfs/ nodes, by path and identity
        self._lock = threading.Lock()
        self._names = _NameTree(images)

    # -- navigation --------------------------------------------------------------------------

    def node(self, key: NodeKey) -> Node:
        """The node for ``key``; NotFound when it no longer exists."""
        kind = key[0]
        if key == ROOT:
            return Node(ROOT, "dir", 0, self.mtime_ns)
        if kind == "byname":
            return self._names.node(key, self.mtime_ns)
        if kind == "prefix":
            return Node(key, "link", len(key[1]), self.mtime_ns, target=key[1].encode())
        return self._image_node(key)

    def peek(self, key: NodeKey) -> Node | None:
        """The node of a ``layers/`` or ``rootfs/`` key if already known (no I/O, no parse)."""
        return self._nodes.get(key)

    def lookup(self, parent: NodeKey, name: str) -> Node:
        if parent[0] == "image" and len(parent) >= 3 and parent[2] in _FILE_VIEWS:
            return self._file_node((*parent, name))
        if parent[0] == "image" and len(parent) == 2 and name in _DESIGN_FILES:
            return self._image_node((*parent, name))  # never builds the file views
        if parent == ROOT and name in self.images:
            return self._image_node(("image", name))  # O(1) with thousands of images
        if parent[0] == "byname":
            return self._names.node((*parent, name), self.mtime_ns)
        for child_name, child in self.children(parent):
            if child_name == name:
                return child
        if parent == ROOT and name and len(name) < 64 and set(name) <= _HEX:
            matches = [i for i in self.images if i.startswith(name)]
            if len(matches) == 1:
                return Node(
                    ("prefix", matches[0]), "link", 64, self.mtime_ns, target=matches[0].encode()
                )
        raise NotFound(f"no {name!r:.100} here")

    def children(self, key: NodeKey) -> list[tuple[str, Node]]:
        if key == ROOT:
            entries = [
                (image_id, self._image_node(("image", image_id)))
                for image_id in sorted(self.images)
            ]
            return [*entries, (BY_NAME, self._names.node(("byname",), self.mtime_ns))]
        if key[0] == "byname":
            return self._names.children(key, self.mtime_ns)
        if key[0] != "image" or (len(key) == 2 and key[1] not in self.images):
            raise NotFound(f"{key!r:.100} is not a directory")
        return self._image_children(key)

    # -- content -----------------------------------------------------------------------------

    def blob(self, key: NodeKey) -> tuple[Image, BlobInfo]:
        """The image and blob behind a ``blobs/`` file (or ``config.json``)."""
        image = self._image(key[1])
        content = self._image_content(image)
        if key[2] == "config.json":
            config = image.parsed_manifest().config
            assert config is not None
            return image, content.blobs[config.digest]
        if key[2] == "oci":
            return image, content.blobs["sha256:" + key[5]]
        return image, content.blobs[key[3]]

    def is_image_file(self, key: NodeKey) -> bool:
        """Whether ``key`` is a file of ``layers/`` or ``rootfs/`` (read with open_member)."""
        return key[0] == "image" and len(key) > 3 and key[2] in (*_FILE_VIEWS, *_IDENTITY_KEYS)

    def open_member(self, key: NodeKey) -> MemberReader:
        """A reader of the content of a ``layers/`` or ``rootfs/`` regular file."""
        source, member = self._resolve_member(key)
        return self.files.open_member(source, member)

    def small_file(self, key: NodeKey) -> bytes | None:
        """Bytes of a small file (manifest, config, signature, non-layer blob); None for layers."""
        image = self._image(key[1])
        if key[2] == "oci":
            return self._layout_small_file(image, key)
        if key[2] == "manifest.json":
            return image.manifest()
        if key[2] == "signatures":
            return self._signature_list(image)[int(key[3]) - 1]
        _, info = self.blob(key)
        return None if info.kind == "layer" else image.read_small_blob(info)

    # -- internals ---------------------------------------------------------------------------

    def _image(self, image_id: str) -> Image:
        image = self.images.get(image_id)
        if image is None:
            raise NotFound(f"image {image_id[:12]} is gone")
        return image

    def _image_content(self, image: Image) -> _ImageContent:
        with self._lock:
            cached = self._content.get(image.id)
        if cached is not None:
            return cached
        content = _ImageContent()
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

    def _signature_list(self, image: Image) -> list[bytes]:
        """The image's signatures, computed once per view apart from its other content."""
        with self._lock:
            cached = self._signatures.get(image.id)
        if cached is None:
            cached = image.signatures()
            with self._lock:
                self._signatures[image.id] = cached
        return cached

    def _mtime(self, image: Image) -> int:
        created = image.created
        return int(created.timestamp() * 1e9) if created is not None else self.mtime_ns

    def _image_node(self, key: NodeKey) -> Node:
        image = self._image(key[1])
        mtime = self._mtime(image)
        if len(key) == 2:
            return Node(key, "dir", 0, mtime)
        section = key[2]
        if section in ("signatures", "blobs", "instances") and len(key) == 3:
            return Node(key, "dir", 0, mtime)
        content = self._image_content(image)
        if section == "layers" and len(key) == 3 and content.sources:
            return Node(key, "dir", 0, mtime, stable=True)
        if section in _FILE_VIEWS and content.sources:
            return self._file_node(key)
        if section in _IDENTITY_KEYS and len(key) == 5:
            return self._identity_node(key)
        if section == "oci" and content.has_layout:
            return self._layout_node(image, content, key, mtime)
        if section == "manifest.json" and len(key) == 3:
            return Node(key, "file", content.manifest_size, mtime)
        if section == "config.json" and len(key) == 3 and content.config_size is not None:
            _, info = self.blob(key)
            return Node(key, "file", info.size, mtime, stable=True, xattrs=_xattrs(info))
        if section == "signatures" and len(key) == 4 and key[3].isdigit():
            signatures = self._signature_list(image)
            index = int(key[3]) - 1
            if 0 <= index < len(signatures):
                return Node(key, "file", len(signatures[index]), mtime)
        if section == "blobs" and len(key) == 4 and key[3] in content.blobs:
            info = content.blobs[key[3]]
            return Node(key, "file", info.size, mtime, stable=True, xattrs=_xattrs(info))
        if section == "instances" and len(key) == 4:
            for digest, holder in content.instances:
                if digest == key[3] and holder is not None:
                    target = f"../../{holder}".encode()
                    return Node(key, "link", len(target), mtime, target=target)
        raise NotFound(f"{'/'.join(key[1:])!r:.100} does not exist")

    def _listed_node(self, key: NodeKey) -> Node:
        """A child of an image directory. A file view (``rootfs/``, ``layers/``, ``oci/``) that
        cannot be built lists as a plain directory and fails when entered, so one broken layer
        never hides the image's manifest, config, signatures and other blobs."""
        try:
            return self._image_node(key)
        except ImgfsError as exc:
            if key[2] not in ("rootfs", "layers", "oci"):
                raise
            log.debug("image %s: %s/ is unavailable: %s", key[1][:12], key[2], exc)
            return Node(key, "dir", 0, self._mtime(self._image(key[1])))

    def _image_children(self, key: NodeKey) -> list[tuple[str, Node]]:
        image = self._image(key[1])
        image_id = image.id
        if len(key) == 2:
            names = ["manifest.json", "signatures", "blobs"]
            content = self._image_content(image)
            if content.config_size is not None:
                names.insert(1, "config.json")
            if content.instances:
                names.append("instances")
            if content.sources:
                names += ["layers", "rootfs"]
            if content.has_layout:
                names.append("oci")
            return [(n, self._listed_node((*key, n))) for n in names]
        content = self._image_content(image)
        section = key[2]
        if section == "layers" and len(key) == 3 and content.sources:
            names = [_layer_dir_name(n, s) for n, s in enumerate(content.sources)]
            return [(n, self._file_node((*key, n))) for n in names]
        if section in _FILE_VIEWS and content.sources:
            return self._file_children(key)
        if section == "oci" and content.has_layout:
            return self._layout_children(image, content, key)
        if section == "signatures":
            names = [f"signature-{i}" for i in range(1, len(self._signature_list(image)) + 1)]
            return [(n, self._image_node((*key, n.split("-")[1]))) for n in names]
        if section == "blobs":
            return [
                (d, self._image_node(("image", image_id, "blobs", d)))
                for d in sorted(content.blobs)
            ]
        if section == "instances":
            return [
                (d, self._image_node(("image", image_id, "instances", d)))
                for d, holder in content.instances
                if holder is not None
            ]
        raise NotFound(f"{'/'.join(key[1:])!r:.100} is not a directory")

    # -- layers/ and rootfs/ ---------------------------------------------------------------------

    def _file_node(self, key: NodeKey) -> Node:
        """The node of a ``layers/<n>-<hex>/…`` or ``rootfs/…`` path."""
        image = self._image(key[1])
        content = self._image_content(image)
        if key[2] == "rootfs":
            fs = self._rootfs(image, content)
            return self._rootfs_node(fs, fs.entry(_path(key[3:])), key)
        n, tree = self._layer(content, key[3])
        path = _path(key[4:])
        if not path:
            return _member_node(key, tree.root(), 1)
        return self._layer_node(n, tree, tree.ref(path), key)

    def _file_children(self, key: NodeKey) -> list[tuple[str, Node]]:
        image = self._image(key[1])
        content = self._image_content(image)
        if key[2] == "rootfs":
            fs = self._rootfs(image, content)
            entries = fs.children(_path(key[3:]))
            return [
                (name, self._rootfs_node(fs, entry, (*key, name)))
                for name, entry in ((os.fsdecode(raw), e) for raw, e in entries.items())
            ]
        n, tree = self._layer(content, key[3])
        refs = tree.child_refs(_path(key[4:]))
        tree.prefetch(refs.values())
        return [
            (name, self._layer_node(n, tree, ref, (*key, name)))
            for name, ref in sorted((os.fsdecode(raw), r) for raw, r in refs.items())
        ]

    def _rootfs_node(self, fs: RootFS, entry: Entry, key: NodeKey) -> Node:
        if fs.hardlinked(entry):
            identity = ("image", key[1], "rootfs-ino", str(entry.layer), str(entry.ref))
            node = _member_node(identity, fs.member(entry), fs.nlink(entry))
        else:
            node = _member_node(key, fs.member(entry), 1)
        return self._remember(key, node)

    def _layer_node(self, n: int, tree: LayerTree, ref: int, key: NodeKey) -> Node:
        ref = _layer_inode(tree, ref)
        count = 1 if tree.is_dir(ref) else tree.link_count(ref)
        if count > 1:
            identity = ("image", key[1], "layer-ino", str(n), str(ref))
            return self._remember(key, _member_node(identity, tree.member(ref), count))
        return self._remember(key, _member_node(key, tree.member(ref), count))

    def _remember(self, key: NodeKey, node: Node) -> Node:
        """Keep the node for ``peek`` under its path and its own (identity) key."""
        nodes = self._nodes
        if len(nodes) >= MAX_CACHED_NODES:
            nodes.clear()  # simple bound: a rebuild costs one parse per node
        nodes[key] = node
        nodes[node.key] = node
        return node

    def _identity_node(self, key: NodeKey) -> Node:
        source, member = self._resolve_member(key)
        del source
        image = self._image(key[1])
        content = self._image_content(image)
        layer, ref = int(key[3]), int(key[4])
        if key[2] == "rootfs-ino":
            fs = self._rootfs(image, content)
            return _member_node(key, member, fs.nlink(Entry(layer, ref)))
        return _member_node(key, member, self._layer(content, None, layer)[1].link_count(ref))

    def _resolve_member(self, key: NodeKey) -> tuple[LayerSource, Member]:
        """The layer and the member whose attributes and content a file node shows."""
        image = self._image(key[1])
        content = self._image_content(image)
        if key[2] in _IDENTITY_KEYS:
            if len(key) != 5 or not (key[3].isdigit() and key[4].isdigit()):
                raise NotFound(f"{key!r:.100} is not a file")
            layer, ref = int(key[3]), int(key[4])
            if key[2] == "rootfs-ino":
                fs = self._rootfs(image, content)
                entry = Entry(layer, ref)
                if layer >= len(fs.layers) or not fs.hardlinked(entry):
                    raise NotFound(f"{key!r:.100} is gone")
                return content.sources[layer], fs.member(entry)
            _, tree = self._layer(content, None, layer)
            if ref >= tree.member_count:
                raise NotFound(f"{key!r:.100} is gone")
            return content.sources[layer], tree.member(ref)
        if key[2] == "rootfs":
            fs = self._rootfs(image, content)
            entry = fs.entry(_path(key[3:]))
            return content.sources[entry.layer], fs.member(entry)
        n, tree = self._layer(content, key[3])
        ref = _layer_inode(tree, tree.ref(_path(key[4:])))
        return content.sources[n], tree.member(ref)

    def _rootfs(self, image: Image, content: _ImageContent) -> RootFS:
        return self.rootfs_cache.get(image.id, content.sources)

    def _layer(
        self, content: _ImageContent, name: str | None, number: int | None = None
    ) -> tuple[int, LayerTree]:
        """Layer ``<n>-<hex>`` (or number ``number``) of the chain and its tree."""
        if name is not None:
            text, _, _ = name.partition("-")
            number = int(text) if text.isdigit() and len(text) < 6 else None
            if number is not None and not _is_layer(content.sources, number, name):
                number = None
        if number is None or not 0 <= number < len(content.sources):
            raise NotFound(f"no layer {name!r:.100}")
        return number, self.files.layer_tree(content.sources[number])

    # -- oci/ ----------------------------------------------------------------------------------

    def layout_manifest(self, image: Image) -> bytes:
        """The manifest of ``oci/`` (see ocilayout), computed once per view."""
        with self._lock:
            cached = self._layouts.get(image.id)
        if cached is None:
            layers = [(info.digest, info.size) for info in image.layer_infos()]
            cached = ocilayout.layout_manifest(image.manifest(), layers, image.what)
            with self._lock:
                self._layouts[image.id] = cached
        return cached

    def _layout_blobs(self, image: Image, content: _ImageContent) -> dict[str, BlobInfo | None]:
        """``oci/blobs/sha256/<hex>`` → the blob (None: the layout's own manifest)."""
        blobs: dict[str, BlobInfo | None] = {}
        config = image.parsed_manifest().config
        if config is not None and config.digest in content.blobs:
            blobs[_hex(config.digest)] = content.blobs[config.digest]
        for info in image.layer_infos():
            blobs[_hex(info.digest)] = info
        blobs[hashlib.sha256(self.layout_manifest(image)).hexdigest()] = None
        return blobs

    def _layout_node(self, image: Image, content: _ImageContent, key: NodeKey, mtime: int) -> Node:
        if len(key) == 3 or key[3:] in (("blobs",), ("blobs", "sha256")):
            return Node(key, "dir", 0, mtime, stable=True)
        if len(key) == 4 and key[3] in ("oci-layout", "index.json"):
            data = self._layout_small_file(image, key)
            assert data is not None
            return Node(key, "file", len(data), mtime, stable=True)
        if len(key) == 6 and key[3:5] == ("blobs", "sha256"):
            blobs = self._layout_blobs(image, content)
            if key[5] in blobs:
                info = blobs[key[5]]
                if info is None:
                    size = len(self.layout_manifest(image))
                    return Node(key, "file", size, mtime, stable=True)
                return Node(key, "file", info.size, mtime, stable=True, xattrs=_xattrs(info))
        raise NotFound(f"{'/'.join(key[1:])!r:.100} does not exist")

    def _layout_children(
        self, image: Image, content: _ImageContent, key: NodeKey
    ) -> list[tuple[str, Node]]:
        if len(key) == 3:
            names = ["blobs", "index.json", "oci-layout"]
        elif key[3:] == ("blobs",):
            names = ["sha256"]
        elif key[3:] == ("blobs", "sha256"):
            names = sorted(self._layout_blobs(image, content))
        else:
            raise NotFound(f"{'/'.join(key[1:])!r:.100} is not a directory")
        return [(n, self._image_node((*key, n))) for n in names]

    def _layout_small_file(self, image: Image, key: NodeKey) -> bytes | None:
        if key[3:] == ("oci-layout",):
            return ocilayout.OCI_LAYOUT
        manifest = self.layout_manifest(image)
        digest = hashlib.sha256(manifest).hexdigest()
        if key[3:] == ("index.json",):
            return ocilayout.index_json(f"sha256:{digest}", len(manifest))
        if len(key) == 6 and key[5] == digest:
            return manifest
        _, info = self.blob(key)
        return None if info.kind == "layer" else image.read_small_blob(info)


def _xattrs(info: BlobInfo) -> tuple[tuple[str, bytes], ...]:
    attrs = []
    if info.media_type:
        attrs.append(("user.imgfs.media_type", info.media_type.encode()))
    if info.layer_id:
        attrs.append(("user.imgfs.layer_id", info.layer_id.encode()))
    return tuple(attrs)


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def _layer_dir_name(number: int, source: LayerSource) -> str:
    return f"{number}-{_hex(source.digest)}"


def _is_layer(sources: list[LayerSource], number: int, name: str) -> bool:
    return number < len(sources) and _layer_dir_name(number, sources[number]) == name


def _path(parts: tuple[str, ...]) -> bytes:
    """A cleaned path below a layer or rootfs root from key components."""
    if any(p in ("", ".", "..") or "/" in p or "\0" in p for p in parts):
        raise NotFound(f"{'/'.join(parts)!r:.100} is not a usable path")
    return b"/".join(os.fsencode(p) for p in parts)


def _layer_inode(tree: LayerTree, ref: int) -> int:
    """The member whose inode a layer path shows (a hardlink's target when it resolves)."""
    if tree.typeflag(ref) == HARDLINK:
        target = tree.link_target(ref)
        if target is not None:
            return target
    return ref


def _member_node(key: NodeKey, member: Member, nlink: int) -> Node:
    """A ``layers/`` or ``rootfs/`` node with the image's own attributes (numeric owners)."""
    flag = member.typeflag
    kind: Kind = "file"
    file_type, size, target, rdev = stat.S_IFREG, member.size, b"", 0
    if flag == DIRECTORY:
        kind, file_type = "dir", stat.S_IFDIR
    elif flag == SYMLINK:
        kind, file_type, target = "link", stat.S_IFLNK, member.linkname
        size = len(target)
    elif flag in _SPECIAL_MODES:
        kind, file_type = "special", _SPECIAL_MODES[flag]
        if flag != FIFO:
            rdev = os.makedev(member.devmajor & 0xFFFFFFFF, member.devminor & 0xFFFFFFFF)
    mode = stat.S_IFLNK | 0o777 if kind == "link" else file_type | member.mode
    return Node(
        key, kind, size, max(min(member.mtime_ns, _MAX_TIME), -_MAX_TIME), target=target,
        stable=True, xattrs=member.xattrs, mode=mode, uid=min(member.uid, _MAX_ID),
        gid=min(member.gid, _MAX_ID), nlink=1 if kind == "dir" else nlink, rdev=rdev,
    )  # fmt: skip


class _NameTree:
    """``by-name/<registry>/<path>/<repo>:<tag>`` → relative links to image directories."""

    def __init__(self, images: list[Image]) -> None:
        self.dirs: dict[tuple[str, ...], set[str]] = {(): set()}
        self.links: dict[tuple[str, ...], str] = {}
        for image in sorted(images, key=lambda i: i.id):
            for name in image.names:
                self._add(name, image.id)

    def _add(self, name: str, image_id: str) -> None:
        parts = tuple(name.split("/"))
        if any(p in ("", ".", "..") or "\0" in p or len(p.encode()) > 255 for p in parts):
            log.warning("by-name: skipping unusable name %r of image %s", name, image_id[:12])
            return
        for depth in range(1, len(parts)):
            if parts[:depth] in self.links:
                return
        if parts in self.dirs or parts in self.links:
            return
        for depth in range(len(parts)):
            self.dirs.setdefault(parts[:depth], set()).add(parts[depth])
        self.links[parts] = image_id

    def node(self, key: NodeKey, mtime_ns: int) -> Node:
        parts = key[1:]
        if parts in self.links:
            target = ("../" * len(parts) + self.links[parts]).encode()
            return Node(key, "link", len(target), mtime_ns, target=target)
        if parts in self.dirs:
            return Node(key, "dir", 0, mtime_ns)
        raise NotFound(f"by-name/{'/'.join(parts)!r:.100} does not exist")

    def children(self, key: NodeKey, mtime_ns: int) -> list[tuple[str, Node]]:
        parts = key[1:]
        if parts not in self.dirs:
            raise NotFound(f"by-name/{'/'.join(parts)!r:.100} is not a directory")
        return [(n, self.node((*key, n), mtime_ns)) for n in sorted(self.dirs[parts])]


class RootFSCache:
    """The merged trees of the most recently used images (``MAX_CACHED_ROOTFS``); thread-safe."""

    def __init__(self, trees: Callable[[LayerSource], LayerTree]) -> None:
        self._trees = trees
        self._cache: OrderedDict[tuple[str, ...], RootFS] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, image_id: str, sources: Sequence[LayerSource]) -> RootFS:
        """The merged tree of an image's layers (``sources`` base first)."""
        key = (image_id, *(s.layer_id for s in sources))
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                return found
        found = RootFS([self._trees(source) for source in sources], f"image {image_id[:12]}")
        with self._lock:
            self._cache[key] = found
            while len(self._cache) > MAX_CACHED_ROOTFS:
                self._cache.popitem(last=False)
        return found


def build_view(
    images: Callable[[], list[Image]],
    mtime_ns: int,
    files: FileViews | None = None,
    rootfs: RootFSCache | None = None,
) -> TreeView:
    """A view of the store's current images (logs and shows nothing if listing fails)."""
    try:
        listed = images()
    except ImgfsError as exc:
        log.error("cannot list the store's images: %s", exc)
        listed = []
    return TreeView(listed, mtime_ns, files, rootfs)
