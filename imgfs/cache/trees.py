"""Layer trees: each layer's file tree, built once and cached.

Owns: building a layer's LayerTree from its tar-split (opened by its LayerSource), the memory
LRU of trees (bounded by member count) and the persisted trees
(``<layer-id>-<tar-split identity>.tree`` in the index directory, next to the blob indexes).
Must not know: FUSE, the mounted tree's names and keys, image metadata beyond LayerSource.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

from imgfs.cache import files as cachefiles
from imgfs.layer.tarsplit import iter_entries
from imgfs.layer.tree import LayerTree
from imgfs.store.source import LayerSource

log = logging.getLogger(__name__)

MAX_CACHED_MEMBERS = 2_000_000
PERSIST_MIN_MEMBERS = 512


class FileViews:
    """Layer trees, cached; thread-safe. ``index_dir`` None: no files."""

    def __init__(self, index_dir: str | None = None) -> None:
        self.index_dir = index_dir
        self._trees: OrderedDict[str, LayerTree] = OrderedDict()
        self._building: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        if index_dir is not None:
            cachefiles.prepare_dir(index_dir)

    # -- trees -------------------------------------------------------------------------------

    def layer_tree(self, source: LayerSource) -> LayerTree:
        """The tree of one layer: from memory, the persisted file, or a tar-split parse."""
        fd = source.open_tarsplit()
        try:
            key = cachefiles.key_for(source.layer_id, os.fstat(fd))
            with self._build_lock(key):
                tree = self._cached(key)
                if tree is None:
                    tree = self._load(key, source) or self._parse(fd, source)
                    self._persist(key, tree)
                    self._remember(key, tree)
            return tree
        finally:
            os.close(fd)

    def _build_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._building.setdefault(key, threading.Lock())

    def _cached(self, key: str) -> LayerTree | None:
        with self._lock:
            tree = self._trees.get(key)
            if tree is not None:
                self._trees.move_to_end(key)
            return tree

    def _remember(self, key: str, tree: LayerTree) -> None:
        with self._lock:
            self._trees[key] = tree
            total = sum(t.member_count for t in self._trees.values())
            while total > MAX_CACHED_MEMBERS and len(self._trees) > 1:
                old_key, old = self._trees.popitem(last=False)
                self._building.pop(old_key, None)
                total -= old.member_count

    def _parse(self, fd: int, source: LayerSource) -> LayerTree:
        log.info("reading the file tree of %s", source.what)
        gz = os.fdopen(os.dup(fd), "rb")
        with gz:
            return LayerTree.build(iter_entries(gz, source.what), source.what, source.size)

    def _path(self, key: str) -> str | None:
        return None if self.index_dir is None else os.path.join(self.index_dir, f"{key}.tree")

    def _load(self, key: str, source: LayerSource) -> LayerTree | None:
        return cachefiles.load(
            self._path(key), lambda data: LayerTree.from_bytes(data, source.what)
        )

    def _persist(self, key: str, tree: LayerTree) -> None:
        if tree.member_count >= PERSIST_MIN_MEMBERS:
            cachefiles.save(self._path(key), tree.to_bytes)
