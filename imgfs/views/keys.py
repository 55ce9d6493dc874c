"""Typed keys of the mounted tree's nodes: one frozen type per kind of node, names as bytes.

Owns: what identifies a node (stable across store refreshes, so the adapter keeps inode numbers)
and each key's ``parent()`` — the directory ``..`` leads to. Files that share an inode
(hardlinks in ``layers/`` and ``rootfs/``) are named by an identity key of their own.
Must not know: the store, how nodes are computed, inode numbers, FUSE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Section = Literal["signatures", "blobs", "instances", "layers"]
ImageFile = Literal["manifest.json", "config.json"]


@dataclass(frozen=True, slots=True)
class RootKey:
    """The mount's root directory."""

    def parent(self) -> Key:
        return self


ROOT = RootKey()


@dataclass(frozen=True, slots=True)
class PrefixKey:
    """``<unique ID prefix>``: a link to the image directory (looked up, never listed)."""

    image: str

    def parent(self) -> Key:
        return ROOT


@dataclass(frozen=True, slots=True)
class ByNameKey:
    """``by-name/<parts…>``: a directory, or a link to an image directory."""

    parts: tuple[bytes, ...] = ()

    def parent(self) -> Key:
        return ByNameKey(self.parts[:-1]) if self.parts else ROOT


@dataclass(frozen=True, slots=True)
class ImageKey:
    """``<image-id>/``."""

    image: str

    def parent(self) -> Key:
        return ROOT


@dataclass(frozen=True, slots=True)
class ImageFileKey:
    """``<image-id>/manifest.json`` or ``config.json``."""

    image: str
    name: ImageFile

    def parent(self) -> Key:
        return ImageKey(self.image)


@dataclass(frozen=True, slots=True)
class SectionKey:
    """``<image-id>/signatures/``, ``blobs/``, ``instances/`` or ``layers/``."""

    image: str
    section: Section

    def parent(self) -> Key:
        return ImageKey(self.image)


@dataclass(frozen=True, slots=True)
class SignatureKey:
    """``signatures/signature-<number>`` (from 1)."""

    image: str
    number: int

    def parent(self) -> Key:
        return SectionKey(self.image, "signatures")


@dataclass(frozen=True, slots=True)
class BlobKey:
    """``blobs/<digest>``."""

    image: str
    digest: str

    def parent(self) -> Key:
        return SectionKey(self.image, "blobs")


@dataclass(frozen=True, slots=True)
class InstanceKey:
    """``instances/<digest>``: a link to the image directory holding that instance."""

    image: str
    digest: str

    def parent(self) -> Key:
        return SectionKey(self.image, "instances")


@dataclass(frozen=True, slots=True)
class LayerKey:
    """``layers/<number>-<hex>/<path>`` (``path`` empty: the layer's directory)."""

    image: str
    number: int
    path: bytes = b""

    def parent(self) -> Key:
        if not self.path:
            return SectionKey(self.image, "layers")
        return LayerKey(self.image, self.number, _dirname(self.path))


@dataclass(frozen=True, slots=True)
class LayerInodeKey:
    """A hardlinked member of layer ``number``: every path of it shows this one inode."""

    image: str
    number: int
    ref: int

    def parent(self) -> Key:
        return SectionKey(self.image, "layers")


@dataclass(frozen=True, slots=True)
class RootfsKey:
    """``rootfs/<path>`` (``path`` empty: ``rootfs/`` itself)."""

    image: str
    path: bytes = b""

    def parent(self) -> Key:
        if not self.path:
            return ImageKey(self.image)
        return RootfsKey(self.image, _dirname(self.path))


@dataclass(frozen=True, slots=True)
class RootfsInodeKey:
    """A hardlinked file of ``rootfs/``: member ``ref`` of layer ``layer``."""

    image: str
    layer: int
    ref: int

    def parent(self) -> Key:
        return RootfsKey(self.image)


@dataclass(frozen=True, slots=True)
class OciKey:
    """``oci/<parts…>`` (no parts: ``oci/`` itself)."""

    image: str
    parts: tuple[bytes, ...] = ()

    def parent(self) -> Key:
        return OciKey(self.image, self.parts[:-1]) if self.parts else ImageKey(self.image)


Key = (
    RootKey
    | PrefixKey
    | ByNameKey
    | ImageKey
    | ImageFileKey
    | SectionKey
    | SignatureKey
    | BlobKey
    | InstanceKey
    | LayerKey
    | LayerInodeKey
    | RootfsKey
    | RootfsInodeKey
    | OciKey
)


def child_path(path: bytes, name: bytes) -> bytes:
    return name if not path else path + b"/" + name


def _dirname(path: bytes) -> bytes:
    return path.rpartition(b"/")[0]


def child_key(parent: Key, name: bytes) -> Key | None:
    """The key of ``name`` in ``parent`` where it follows from the names alone (paths below a
    layer or ``rootfs/``), so a known node can be found without asking its section."""
    if isinstance(parent, LayerKey):
        return LayerKey(parent.image, parent.number, child_path(parent.path, name))
    if isinstance(parent, RootfsKey):
        return RootfsKey(parent.image, child_path(parent.path, name))
    return None


def listed_name(key: Key) -> bytes | None:
    """The name ``key`` is listed under in the listing of ``key.parent()``, where it follows
    from the key alone (not for a layer's directory, whose name holds its digest, a hardlink
    identity, or what is never listed: the root, a prefix link)."""
    if isinstance(key, LayerKey | RootfsKey):
        if key.path:
            return key.path.rpartition(b"/")[2]
        return b"rootfs" if isinstance(key, RootfsKey) else None
    if isinstance(key, OciKey | ByNameKey):
        return key.parts[-1] if key.parts else (b"oci" if isinstance(key, OciKey) else b"by-name")
    if isinstance(key, BlobKey | InstanceKey):
        return key.digest.encode()
    if isinstance(key, SignatureKey):
        return b"signature-%d" % key.number
    if isinstance(key, SectionKey):
        return key.section.encode()
    if isinstance(key, ImageFileKey):
        return key.name.encode()
    if isinstance(key, ImageKey):
        return key.image.encode()
    return None


def display(key: Key) -> str:
    """A path-like text for logs: ``/<id>/rootfs/etc/hostname``, ``/by-name/…`` (hardlink
    identities as ``…/rootfs#<layer>:<ref>``; non-UTF-8 bytes escaped)."""
    if isinstance(key, RootKey):
        return "/"
    if isinstance(key, PrefixKey | ImageKey):
        return f"/{key.image}"
    if isinstance(key, ByNameKey):
        return "/by-name" + "".join("/" + _text(p) for p in key.parts)
    base = f"/{key.image}"
    if isinstance(key, ImageFileKey):
        return f"{base}/{key.name}"
    if isinstance(key, SectionKey):
        return f"{base}/{key.section}"
    if isinstance(key, SignatureKey):
        return f"{base}/signatures/signature-{key.number}"
    if isinstance(key, BlobKey | InstanceKey):
        section = "blobs" if isinstance(key, BlobKey) else "instances"
        return f"{base}/{section}/{key.digest}"
    if isinstance(key, LayerKey):
        return f"{base}/layers/{key.number}-…" + ("/" + _text(key.path) if key.path else "")
    if isinstance(key, LayerInodeKey):
        return f"{base}/layers/{key.number}-…#{key.ref}"
    if isinstance(key, RootfsKey):
        return f"{base}/rootfs" + ("/" + _text(key.path) if key.path else "")
    if isinstance(key, RootfsInodeKey):
        return f"{base}/rootfs#{key.layer}:{key.ref}"
    return f"{base}/oci" + "".join("/" + _text(p) for p in key.parts)


def _text(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")
