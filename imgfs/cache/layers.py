"""Layer blobs: from a resolved LayerSource to generated or randomly-read bytes.

Owns: the offset indexes of layer blobs (an in-memory LRU bounded in bytes by
``LayerIndex.nbytes``, plus a zstd file per large layer in the index directory, keyed by layer
ID and tar-split identity) and the two ways the mount serves a layer: ``produce`` (snapshot
generation) and ``open_reader`` (``--direct``).
Must not know: FUSE, the snapshot cache's internals, image metadata; it opens nothing itself
(the LayerSource does).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable
from typing import BinaryIO

from imgfs.budget import Budget
from imgfs.cache import files as cachefiles
from imgfs.layer.assemble import LayerReader, Sink, generate
from imgfs.layer.index import LayerIndex
from imgfs.layer.tarsplit import iter_entries
from imgfs.layer.verify import Verifiers, blob_verifier
from imgfs.lru import LRU
from imgfs.store.source import LayerSource, build_index, check_index_size

log = logging.getLogger(__name__)

PERSIST_MIN_FILES = 512  # smaller layers parse faster than a persisted index loads


class LayerBlobs:
    """Serves layer blobs; thread-safe. ``index_dir`` None: no persisted indexes."""

    def __init__(self, index_dir: str | None = None, max_bytes: int = Budget().indexes) -> None:
        self.index_dir = index_dir
        self._indexes: LRU[str, LayerIndex] = LRU(max_bytes, cost=lambda i: i.nbytes)
        if index_dir is not None:
            cachefiles.prepare_dir(index_dir)

    def produce(self, source: LayerSource, sink: Sink) -> None:
        """Generate the whole blob into ``sink`` (snapshot mode), verified as it goes."""
        with source.opened() as (gz, files, _fd):
            log.info("generating %s (%d bytes)", source.what, source.size)
            generate(
                iter_entries(gz, source.what), files, sink, source.digest, source.size, source.what
            )

    def open_reader(
        self, source: LayerSource, verifiers: Verifiers, identity: Hashable
    ) -> LayerReader:
        """A random-access reader (``--direct``) checked by the blob's verifier, found in
        ``verifiers`` under ``identity``; the caller closes it."""
        with source.opened(keep_files=True) as (gz, files, fd):
            try:
                index = self._index(source, gz, cachefiles.key_for(source.layer_id, os.fstat(fd)))
            except BaseException:
                files.close()
                raise
        hex_digest = source.digest.removeprefix("sha256:")
        verifier = verifiers.get(identity, lambda: blob_verifier(index, hex_digest, source.what))
        return LayerReader(
            index, files, source.digest, source.what, verifier=verifier, close_files=True
        )

    def _index(self, source: LayerSource, gz: BinaryIO, key: str) -> LayerIndex:
        index = self._indexes.get(key)
        if index is not None:
            return index
        index = self._load_persisted(key, source)
        if index is None:
            index = build_index(source, gz)
        else:
            check_index_size(source, index)
        self._persist(key, index)
        self._indexes.put(key, index)
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
