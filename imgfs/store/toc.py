"""zstd:chunked layer big data: the layer-data format and the TOC's name -> flat-object map.

Owns: reading a layer's ``zstd-chunked-layer-data`` (``{"format": 0|1}``; 1 = the composefs
"flat" layout) and, for a flat layer, its TOC (big data ``zstd-chunked-manifest``) into the map
c/storage itself builds when it stages such a layer (pkg/chunked ``makeEntriesFlat``): the
cleaned name of every ``reg`` entry -> ``<sha256[:2]>/<sha256[2:]>``, the object holding its
content. ``FlatNames`` applies that map in front of a layer's FileOpener: it renames, and the
FileOpener (``layerfiles``/``userns``) stays the only opener of layer files. Reads go through
``files`` (bounded, no symlinks); parsed maps are kept in a small LRU keyed by the TOC file's
identity. For a layer known only by its TOC (no tar-split): ``toc_tar_entries`` turns the TOC's
entries into the tar headers they describe (names, types, modes, owners, times, link targets,
devices, xattrs), so that the one tree builder (``layer.tree``) makes its tree, and
``toc_digests`` gives each regular file's sha256, which the one verifier checks its content
against. Must not know: tar-split parsing, assembly, caches of the mounted tree.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tarfile
import threading
from collections.abc import Iterator, Mapping
from datetime import datetime

from imgfs.digest import is_digest
from imgfs.errors import LayerUnavailable, MalformedMetadata
from imgfs.layer.assemble import FileOpener
from imgfs.layer.tarsplit import FileEntry, Segment, clean_name
from imgfs.lru import LRU
from imgfs.store.files import RootLayout, big_data_file_name

TOC_KEY = "zstd-chunked-manifest"
LAYER_DATA_KEY = "zstd-chunked-layer-data"
FORMAT_FLAT = 1
MAX_TOC_BYTES = 256 << 20
MAX_LAYER_DATA_BYTES = 4096
_CACHE_BYTES = 64 << 20

_lock = threading.Lock()
_maps: LRU[tuple[object, ...], dict[bytes, bytes]] = LRU(
    _CACHE_BYTES, lambda m: 64 + sum(len(k) + 120 for k in m)
)
_TAR_TYPES = {
    "reg": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE, "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}  # fmt: skip
CHUNK_TYPE = "chunk"  # the further chunks of the "reg" entry before it


def big_data_rel(home: RootLayout, layer_id: str, key: str) -> str:
    """Where c/storage keeps layer big data ``key``: ``<driver>-layers/<id>/<encoded key>``,
    relative to the store root."""
    return f"{home.layers_rel}/{layer_id}/{big_data_file_name(key)}"


def flat_map(home: RootLayout, layer_id: str, what: str) -> Mapping[bytes, bytes] | None:
    """The name -> flat-object map of a flat layer; None when the layer is not flat.

    Call under the layers lock. Read below the store root without following symlinks. A flat
    layer whose TOC is missing or unusable raises ``MalformedMetadata`` (its files cannot be
    found without it).
    """
    root = home.store_root
    data = root.read(big_data_rel(home, layer_id, LAYER_DATA_KEY), MAX_LAYER_DATA_BYTES, what)
    if data is None or _format(data, what) != FORMAT_FLAT:
        return None
    rel = big_data_rel(home, layer_id, TOC_KEY)
    key = (root.show(rel), root.state(rel))
    with _lock:
        cached = _maps.get(key)
    if cached is not None:
        return cached
    toc = root.read(rel, MAX_TOC_BYTES, f"{what}: TOC")
    if toc is None:
        raise MalformedMetadata(f"{what}: flat (composefs) layout but no TOC ({TOC_KEY})")
    mapping = parse_flat_map(toc, what)
    with _lock:
        _maps.put(key, mapping)
    return mapping


def _format(data: bytes, what: str) -> int:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise MalformedMetadata(f"{what}: {LAYER_DATA_KEY} is not JSON: {exc!s:.100}") from exc
    value = doc.get("format", 0) if isinstance(doc, dict) else None
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedMetadata(f"{what}: {LAYER_DATA_KEY} has no integer format")
    return value


def parse_flat_map(toc: bytes, what: str) -> dict[bytes, bytes]:
    """The map of a TOC document (bounded by its size; every digest checked before it names a
    path)."""
    return {
        name: f"{hex_[:2]}/{hex_[2:]}".encode() for name, hex_ in _file_digests(toc, what).items()
    }


def _entries(toc: bytes, what: str) -> list[object]:
    try:
        doc = json.loads(toc)
    except (ValueError, RecursionError) as exc:
        raise MalformedMetadata(f"{what}: TOC is not JSON: {exc!s:.100}") from exc
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise MalformedMetadata(f"{what}: TOC has no entries")
    return entries


def _file_digests(toc: bytes, what: str) -> dict[bytes, str]:
    """Cleaned name -> sha256 hex of every non-empty ``reg`` entry (empty files have no
    object and need no check)."""
    digests: dict[bytes, str] = {}
    for entry in _entries(toc, what):
        if not isinstance(entry, dict) or entry.get("type") != "reg":
            continue
        name, digest = entry.get("name"), entry.get("digest")
        if not isinstance(name, str):
            raise MalformedMetadata(f"{what}: TOC entry without a name")
        if not entry.get("size"):
            continue
        if not is_digest(digest) or not isinstance(digest, str):
            raise MalformedMetadata(f"{what}: TOC entry {name!r:.200} has no sha256 digest")
        digests[clean_name(os.fsencode(name))] = digest.removeprefix("sha256:")
    return digests


def toc_identity(home: RootLayout, layer_id: str) -> object:
    """The identity of the layer's TOC file (changes when the file does)."""
    rel = big_data_rel(home, layer_id, TOC_KEY)
    return (home.store_root.show(rel), home.store_root.state(rel))


def read_toc(home: RootLayout, layer_id: str, what: str) -> bytes:
    """The layer's TOC document (call under the layers lock)."""
    toc = home.store_root.read(big_data_rel(home, layer_id, TOC_KEY), MAX_TOC_BYTES, f"{what}: TOC")
    if toc is None:
        raise LayerUnavailable(f"{what}: no tar-split and no TOC ({TOC_KEY})")
    return toc


def toc_digest(home: RootLayout, layer_id: str, name: bytes, what: str) -> str | None:
    """The sha256 hex the TOC of a layer known only by its TOC records for the regular file
    ``name`` (None: an empty file). Call under the layers lock; the TOC is parsed once per
    file identity, into the same LRU as the flat maps."""
    key = ("digests", toc_identity(home, layer_id))
    with _lock:
        digests = _maps.get(key)
    if digests is None:
        toc = read_toc(home, layer_id, what)
        digests = {k: v.encode() for k, v in _file_digests(toc, what).items()}
        with _lock:
            _maps.put(key, digests)
    found = digests.get(clean_name(name))
    return None if found is None else found.decode()


def toc_tar_entries(toc: bytes, what: str) -> Iterator[Segment | FileEntry]:
    """The tar headers the TOC's entries describe, as the tree builder takes a tar-split's:
    each member's header blocks, then its name and size (no CRC: ``toc_digest`` gives each
    file's sha256). ``chunk`` entries continue the file before them and add no member."""
    for entry in _entries(toc, what):
        if not isinstance(entry, dict):
            raise MalformedMetadata(f"{what}: TOC entry is not an object")
        kind = entry.get("type")
        if kind == CHUNK_TYPE:
            continue
        name = entry.get("name")
        if not isinstance(name, str) or kind not in _TAR_TYPES:
            raise MalformedMetadata(f"{what}: TOC entry {name!r:.200} of type {kind!r:.20}")
        info = _tar_info(entry, name, str(kind), what)
        try:
            header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        except (ValueError, UnicodeError) as exc:
            raise MalformedMetadata(f"{what}: TOC entry {name!r:.200}: {exc}") from exc
        if info.type == tarfile.DIRTYPE and not name.endswith("/"):
            name += "/"  # as the header names it
        yield Segment(header)
        yield FileEntry(os.fsencode(name), info.size, None)


def _tar_info(entry: dict[str, object], name: str, kind: str, what: str) -> tarfile.TarInfo:
    def number(key: str) -> int:
        value = entry.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise MalformedMetadata(f"{what}: TOC entry {name!r:.200}: {key} {value!r:.40}")
        return value

    def text(key: str) -> str:
        value = entry.get(key, "")
        if not isinstance(value, str):
            raise MalformedMetadata(f"{what}: TOC entry {name!r:.200}: {key} {value!r:.40}")
        return value

    info = tarfile.TarInfo(name)
    info.type = _TAR_TYPES[kind]
    info.mode = number("mode") & 0o7777
    info.uid, info.gid = number("uid"), number("gid")
    info.uname, info.gname = text("userName"), text("groupName")
    info.size = number("size") if kind == "reg" else 0
    info.linkname = text("linkName")
    info.devmajor, info.devminor = number("devMajor"), number("devMinor")
    info.mtime, exact = _mtime(text("modtime"), name, what)
    pax: dict[str, str] = {} if exact is None else {"mtime": exact}
    xattrs = entry.get("xattrs") or {}
    if not isinstance(xattrs, dict):
        raise MalformedMetadata(f"{what}: TOC entry {name!r:.200}: xattrs {xattrs!r:.40}")
    for key, value in sorted(xattrs.items()):
        if not key or "=" in key or "\0" in key:  # a PAX record would name another xattr
            raise MalformedMetadata(f"{what}: TOC entry {name!r:.200}: xattr name {key!r:.80}")
        try:
            raw = base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MalformedMetadata(f"{what}: TOC entry {name!r:.200}: xattr {key!r:.80}") from exc
        pax[f"SCHILY.xattr.{key}"] = raw.decode("utf-8", "surrogateescape")
    info.pax_headers = pax
    return info


def _mtime(value: str, name: str, what: str) -> tuple[int, str | None]:
    """RFC 3339 (Go's time.Time as JSON) -> whole seconds since the epoch, and the exact PAX
    ``mtime`` text when there is a fraction."""
    if not value:
        return 0, None
    head, frac, zone = value[:19], "", value[19:]
    if zone.startswith("."):
        digits = len(zone) - len(zone[1:].lstrip("0123456789")) - 1
        frac, zone = zone[1 : 1 + digits], zone[1 + digits :]
    try:
        when = datetime.fromisoformat(head + (zone.replace("Z", "+00:00") or "+00:00"))
    except ValueError as exc:
        raise MalformedMetadata(f"{what}: TOC entry {name!r:.200}: modtime {value!r:.40}") from exc
    seconds = int(when.timestamp())
    frac = frac.rstrip("0")
    return seconds, (f"{seconds}.{frac}" if frac and seconds >= 0 else None)


class FlatNames:
    """A FileOpener that opens a flat layer's files by their TOC object names."""

    def __init__(self, files: FileOpener, mapping: Mapping[bytes, bytes]) -> None:
        self._files = files
        self._mapping = mapping

    def open(self, name: bytes, size: int) -> int:
        flat = self._mapping.get(clean_name(name))
        if flat is None:
            return self._files.open(name, size)
        try:
            return self._files.open(flat, size)
        except LayerUnavailable as exc:
            raise LayerUnavailable(f"{exc} (the flat layout's object of {name!r:.200})") from exc

    def close(self) -> None:
        self._files.close()
