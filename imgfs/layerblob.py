"""Layer blobs: from a resolved LayerSource to generated or randomly-read bytes.

Owns: opening a layer's tar-split and content directories under the store's layers lock
(held only for those opens), building or loading its offset index (an in-memory LRU plus a
zstd file per large layer in the index directory, keyed by layer ID and tar-split identity),
the size cross-check of tar-split against ``diff-size``, and the three ways to serve a layer:
``produce`` (snapshot generation), ``open_reader`` (``--direct``), ``open_layer_blob`` (library).
Must not know: FUSE, the snapshot cache's internals, image metadata.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import BinaryIO, cast

from imgfs import cachefiles
from imgfs.assemble import BlobFile, LayerReader, Sink, generate
from imgfs.errors import IntegrityError, LayerUnavailable
from imgfs.layerfiles import LayerFiles
from imgfs.layerindex import LayerIndex
from imgfs.locks import read_locked
from imgfs.store import LayerSource
from imgfs.storefiles import open_regular
from imgfs.tarsplit import iter_entries

log = logging.getLogger(__name__)

PERSIST_MIN_FILES = 512  # smaller layers parse faster than a persisted index loads
MEMORY_INDEXES = 16


class LayerBlobs:
    """Serves layer blobs; thread-safe. ``index_dir`` None: no persisted indexes."""

    def __init__(self, index_dir: str | None = None) -> None:
        self.index_dir = index_dir
        self._indexes: OrderedDict[str, LayerIndex] = OrderedDict()
        self._lock = threading.Lock()
        if index_dir is not None:
            cachefiles.prepare_dir(index_dir)

    def produce(self, source: LayerSource, sink: Sink) -> None:
        """Generate the whole blob into ``sink`` (snapshot mode), verified as it goes."""
        with _opened(source) as (gz, files, _key):
            log.info("generating %s (%d bytes)", source.what, source.size)
            generate(
                iter_entries(gz, source.what), files, sink, source.digest, source.size, source.what
            )

    def open_reader(self, source: LayerSource) -> LayerReader:
        """A random-access reader (``--direct``); the caller closes it."""
        with _opened(source, keep_files=True) as (gz, files, key):
            try:
                index = self._index(source, gz, key)
            except BaseException:
                files.close()
                raise
        return LayerReader(index, files, source.digest, source.what, close_files=True)

    def _index(self, source: LayerSource, gz: BinaryIO, key: str) -> LayerIndex:
        with self._lock:
            index = self._indexes.get(key)
            if index is not None:
                self._indexes.move_to_end(key)
                return index
        index = self._load_persisted(key, source) or LayerIndex.build(
            iter_entries(gz, source.what), source.what, source.size
        )
        if index.size != source.size:
            raise IntegrityError(
                f"{source.what}: tar-split describes {index.size} bytes, diff-size is {source.size}"
            )
        self._persist(key, index)
        with self._lock:
            self._indexes[key] = index
            while len(self._indexes) > MEMORY_INDEXES:
                self._indexes.popitem(last=False)
        return index

    def _index_path(self, key: str) -> str | None:
        return None if self.index_dir is None else os.path.join(self.index_dir, f"{key}.idx.zst")

    def _load_persisted(self, key: str, source: LayerSource) -> LayerIndex | None:
        return cachefiles.load(
            self._index_path(key), lambda data: LayerIndex.from_bytes(data, source.what)
        )

    def _persist(self, key: str, index: LayerIndex) -> None:
        if index.file_count >= PERSIST_MIN_FILES:
            cachefiles.save(self._index_path(key), index.to_bytes)


def open_layer_blob(source: LayerSource) -> BinaryIO:
    """A verified, seekable file object over a layer blob (the library's ``open_blob``)."""
    reader = LayerBlobs().open_reader(source)
    return cast(BinaryIO, BlobFile(reader))


def open_tarsplit(source: LayerSource) -> int:
    """The layer's tar-split file, opened under the layers lock (never a symlink or FIFO)."""
    lock = os.path.join(os.path.dirname(source.tarsplit_path), "layers.lock")
    with read_locked([lock]):
        return _open_tarsplit_locked(source)


def _open_tarsplit_locked(source: LayerSource) -> int:
    try:
        return open_regular(source.tarsplit_path, f"{source.what}: tar-split")
    except FileNotFoundError as exc:
        raise LayerUnavailable(
            f"{source.what}: no tar-split metadata, so the layer cannot be reproduced exactly"
        ) from exc
    except OSError as exc:
        raise LayerUnavailable(f"{source.what}: tar-split: {exc.strerror}") from exc


@contextlib.contextmanager
def _opened(
    source: LayerSource, keep_files: bool = False
) -> Iterator[tuple[BinaryIO, LayerFiles, str]]:
    """Open the tar-split and the content dirs under the layers lock; yield after unlocking."""
    lock = os.path.join(os.path.dirname(source.tarsplit_path), "layers.lock")
    with read_locked([lock]):
        fd = _open_tarsplit_locked(source)
        try:
            files = LayerFiles(list(source.content_dirs), source.what)
        except BaseException:
            os.close(fd)
            raise
    key = cachefiles.key_for(source.layer_id, os.fstat(fd))
    gz = os.fdopen(fd, "rb")
    try:
        yield gz, files, key
    finally:
        gz.close()
        if not keep_files:
            files.close()
