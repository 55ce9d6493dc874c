"""Layer trees: each layer's file tree, built once and cached.

Owns: building a layer's LayerTree from its tar-split (opened by its LayerSource), the memory
LRU of trees (bounded in bytes: ``LayerTree.nbytes``; one tree larger than the bound fails with
OverBudget while it is read) and the persisted trees
(``<layer-id>-<tar-split identity>.tree`` in the index directory, next to the blob indexes);
the tree of a layer known only by its TOC from the TOC's entries (``store.toc``), in memory.
Must not know: FUSE, the mounted tree's names and keys, image metadata beyond LayerSource.
"""

from __future__ import annotations

import logging
import os
import threading

from imgfs.budget import Budget
from imgfs.cache import files as cachefiles
from imgfs.layer.tree import LayerTree
from imgfs.lru import LRU
from imgfs.store.source import LayerSource
from imgfs.store.toc import toc_tar_entries

log = logging.getLogger(__name__)

PERSIST_MIN_MEMBERS = 512


class FileViews:
    """Layer trees, cached; thread-safe. ``index_dir`` None: no files."""

    def __init__(self, index_dir: str | None = None, max_bytes: int = Budget().trees) -> None:
        self.index_dir = index_dir
        self.max_bytes = max_bytes
        self._trees: LRU[str, LayerTree] = LRU(max_bytes, cost=lambda t: t.nbytes)
        self._building: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        if index_dir is not None:
            cachefiles.prepare_dir(index_dir)

    # -- trees -------------------------------------------------------------------------------

    def layer_tree(self, source: LayerSource) -> LayerTree:
        """The tree of one layer: from memory, the persisted file, or a tar-split parse (or,
        for a layer known only by its TOC, the TOC's entries)."""
        if source.toc_tree:
            return self._toc_tree(source)
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

    def _toc_tree(self, source: LayerSource) -> LayerTree:
        """The tree the TOC describes (memory only: the TOC is kept by the store anyway)."""
        key = f"{source.layer_id}-toc-{hash(source.toc_identity()):x}"
        with self._build_lock(key):
            tree = self._cached(key)
            if tree is None:
                log.info("reading the file tree of %s from its TOC", source.what)
                entries = toc_tar_entries(source.read_toc(), source.what)
                tree = LayerTree.build(entries, source.what, None, self.max_bytes)
                self._remember(key, tree)
        return tree

    def _build_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._building.setdefault(key, threading.Lock())

    def _cached(self, key: str) -> LayerTree | None:
        return self._trees.get(key)

    def _remember(self, key: str, tree: LayerTree) -> None:
        self._trees.put(key, tree)
        with self._lock:  # build locks of trees no longer cached (amortized: not per tree)
            if len(self._building) <= 2 * len(self._trees) + 64:
                return
            for old_key in [k for k in self._building if k not in self._trees and k != key]:
                lock = self._building[old_key]
                if not lock.locked():
                    del self._building[old_key]

    def _parse(self, fd: int, source: LayerSource) -> LayerTree:
        log.info("reading the file tree of %s", source.what)
        gz = os.fdopen(os.dup(fd), "rb")
        with gz:
            return LayerTree.from_tarsplit(gz, source.what, source.size, self.max_bytes)

    def _path(self, key: str) -> str | None:
        return None if self.index_dir is None else os.path.join(self.index_dir, f"{key}.tree")

    def _load(self, key: str, source: LayerSource) -> LayerTree | None:
        return cachefiles.load(
            self._path(key), lambda data: LayerTree.from_bytes(data, source.what, self.max_bytes)
        )

    def _persist(self, key: str, tree: LayerTree) -> None:
        if tree.member_count >= PERSIST_MIN_MEMBERS:
            cachefiles.save(self._path(key), tree.to_bytes)
