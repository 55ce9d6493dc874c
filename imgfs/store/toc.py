"""zstd:chunked layer big data: the layer-data format and the TOC's name -> flat-object map.

Owns: reading a layer's ``zstd-chunked-layer-data`` (``{"format": 0|1}``; 1 = the composefs
"flat" layout) and, for a flat layer, its TOC (big data ``zstd-chunked-manifest``) into the map
c/storage itself builds when it stages such a layer (pkg/chunked ``makeEntriesFlat``): the
cleaned name of every ``reg`` entry -> ``<sha256[:2]>/<sha256[2:]>``, the object holding its
content. ``FlatNames`` applies that map in front of a layer's FileOpener: it renames, and the
FileOpener (``layerfiles``/``userns``) stays the only opener of layer files. Reads go through
``files`` (bounded, no symlinks); parsed maps are kept in a small LRU keyed by the TOC file's
identity. Must not know: tar-split parsing, assembly, caches of the mounted tree.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping

from imgfs.digest import is_digest
from imgfs.errors import LayerUnavailable, MalformedMetadata
from imgfs.layer.assemble import FileOpener
from imgfs.layer.tarsplit import clean_name
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
    try:
        doc = json.loads(toc)
    except (ValueError, RecursionError) as exc:
        raise MalformedMetadata(f"{what}: TOC is not JSON: {exc!s:.100}") from exc
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise MalformedMetadata(f"{what}: TOC has no entries")
    mapping: dict[bytes, bytes] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("type") != "reg":
            continue
        name, digest = entry.get("name"), entry.get("digest")
        if not isinstance(name, str):
            raise MalformedMetadata(f"{what}: TOC entry without a name")
        if not entry.get("size"):
            continue  # empty files have no object (and need none)
        if not is_digest(digest) or not isinstance(digest, str):
            raise MalformedMetadata(f"{what}: TOC entry {name!r:.200} has no sha256 digest")
        hex_ = digest.removeprefix("sha256:")
        mapping[clean_name(os.fsencode(name))] = f"{hex_[:2]}/{hex_[2:]}".encode()
    return mapping


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
