"""The mounted tree of DESIGN.md §1 over one store snapshot, without FUSE.

Owns: names, kinds, sizes, modes, owners, times, symlink targets and xattrs of every node:
``<image-id>/{manifest.json, config.json, signatures/, blobs/, instances/}``, ``by-name/…``
links and unique-ID-prefix links. Nodes are addressed by stable keys (tuples of strings), so
the adapter can keep inode numbers across store refreshes.
Must not know: pyfuse3, trio, inode numbers, errno values.

A view is immutable; per-image content (manifest, blob list, signatures) is computed on first
use and raises the core's errors for a broken image, which affect that image's nodes only.
"""

from __future__ import annotations

import logging
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from imgfs.errors import ImgfsError, NotFound
from imgfs.store import BlobInfo, Image

log = logging.getLogger(__name__)

NodeKey = tuple[str, ...]
Kind = Literal["dir", "file", "link"]
ROOT: NodeKey = ("root",)
BY_NAME = "by-name"
_HEX = frozenset("0123456789abcdef")


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


@dataclass(frozen=True)
class Node:
    key: NodeKey
    kind: Kind
    size: int
    mtime_ns: int
    target: bytes = b""
    stable: bool = False  # content-addressed: the kernel may cache it for long
    xattrs: tuple[tuple[str, bytes], ...] = ()


@dataclass
class _ImageContent:
    blobs: dict[str, BlobInfo] = field(default_factory=dict)
    signatures: list[bytes] = field(default_factory=list)
    config_size: int | None = None
    manifest_size: int = 0
    instances: list[tuple[str, str | None]] = field(default_factory=list)


class TreeView:
    """The tree of one store snapshot. Thread-safe; per-image content computed lazily."""

    def __init__(self, images: list[Image], mtime_ns: int) -> None:
        self.images = {image.id: image for image in images}
        self.mtime_ns = mtime_ns
        self._content: dict[str, _ImageContent] = {}
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

    def lookup(self, parent: NodeKey, name: str) -> Node:
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
        return image, content.blobs[key[3]]

    def small_file(self, key: NodeKey) -> bytes | None:
        """Bytes of a small file (manifest, config, signature, non-layer blob); None for layers."""
        image = self._image(key[1])
        if key[2] == "manifest.json":
            return image.manifest()
        if key[2] == "signatures":
            return self._image_content(image).signatures[int(key[3]) - 1]
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
        content.signatures = image.signatures()
        if man.is_list:
            content.instances = image.instances()
        with self._lock:
            self._content[image.id] = content
        return content

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
        if section == "manifest.json" and len(key) == 3:
            return Node(key, "file", content.manifest_size, mtime)
        if section == "config.json" and len(key) == 3 and content.config_size is not None:
            _, info = self.blob(key)
            return Node(key, "file", info.size, mtime, stable=True, xattrs=_xattrs(info))
        if section == "signatures" and len(key) == 4 and key[3].isdigit():
            index = int(key[3]) - 1
            if 0 <= index < len(content.signatures):
                return Node(key, "file", len(content.signatures[index]), mtime)
        if section == "blobs" and len(key) == 4 and key[3] in content.blobs:
            info = content.blobs[key[3]]
            return Node(key, "file", info.size, mtime, stable=True, xattrs=_xattrs(info))
        if section == "instances" and len(key) == 4:
            for digest, holder in content.instances:
                if digest == key[3] and holder is not None:
                    target = f"../../{holder}".encode()
                    return Node(key, "link", len(target), mtime, target=target)
        raise NotFound(f"{'/'.join(key[1:])!r:.100} does not exist")

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
            return [(n, self._image_node((*key, n))) for n in names]
        content = self._image_content(image)
        section = key[2]
        if section == "signatures":
            names = [f"signature-{i}" for i in range(1, len(content.signatures) + 1)]
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


def _xattrs(info: BlobInfo) -> tuple[tuple[str, bytes], ...]:
    attrs = []
    if info.media_type:
        attrs.append(("user.imgfs.media_type", info.media_type.encode()))
    if info.layer_id:
        attrs.append(("user.imgfs.layer_id", info.layer_id.encode()))
    return tuple(attrs)


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


def build_view(images: Callable[[], list[Image]], mtime_ns: int) -> TreeView:
    """A view of the store's current images (logs and shows nothing if listing fails)."""
    try:
        listed = images()
    except ImgfsError as exc:
        log.error("cannot list the store's images: %s", exc)
        listed = []
    return TreeView(listed, mtime_ns)
