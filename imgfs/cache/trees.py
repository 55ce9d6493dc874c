"""The files of layers: layer trees and file contents.

Owns: building a layer's LayerTree from its tar-split, the memory LRU of trees (bounded by
member count), the persisted trees
(``<layer-id>-<tar-split identity>.tree`` in the index directory, next to the blob indexes), and
reading one member's content from the layer's files with the blob path's checks: the file must
be a regular file of the recorded size (``LayerFiles.open``), reads never return bytes past it,
and a file read whole in sequence is CRC-64-checked before the read that completes it returns.
Must not know: FUSE, the mounted tree's names and keys, image metadata beyond LayerSource.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

from fastcrc import crc64

from imgfs.cache import files as cachefiles
from imgfs.errors import IntegrityError, LayerUnavailable
from imgfs.layer.tarheader import REGULAR
from imgfs.layer.tarsplit import iter_entries
from imgfs.layer.tree import LayerTree, Member
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

    # -- contents ----------------------------------------------------------------------------

    def open_member(self, source: LayerSource, member: Member) -> MemberReader:
        """A reader of a regular member's content; the caller closes it."""
        what = f"{source.what}: file {member.data_name!r:.200}"
        if member.typeflag != REGULAR:
            raise LayerUnavailable(f"{what}: not a regular file (unresolved hardlink?)")
        if not member.size:
            return MemberReader(None, member, what)
        return MemberReader(source.open_file(member.data_name, member.size), member, what)


class MemberReader:
    """Reads of one member's content; CRC-checked while reads are sequential from offset 0.

    Same interface as ``LayerReader`` (``size``, ``read(offset, n)``, ``close()``). A failed
    check poisons the reader: every later read raises ``IntegrityError``.
    """

    def __init__(self, fd: int | None, member: Member, what: str) -> None:
        self._fd = fd
        self._size = member.size
        self._crc_expected = member.crc
        self._what = what
        self._lock = threading.Lock()
        self._seq_pos = 0
        self._crc: int | None = None
        self._verifying = True
        self._poison: str | None = None

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes from ``offset`` (fewer only at the recorded end of the file)."""
        with self._lock:
            if self._poison is not None:
                raise IntegrityError(self._poison)
            end = min(offset + max(n, 0), self._size)
            if self._fd is None or offset >= end:
                return b""
            try:
                data = self._pread(offset, end - offset)
                self._check(offset, data)
            except IntegrityError as exc:
                self._poison = str(exc)
                raise
            return data

    def _pread(self, offset: int, n: int) -> bytes:
        assert self._fd is not None
        data = os.pread(self._fd, n, offset)
        while len(data) < n:
            more = os.pread(self._fd, n - len(data), offset + len(data))
            if not more:
                raise IntegrityError(f"{self._what} is shorter than its recorded {self._size}")
            data += more
        return data

    def _check(self, offset: int, data: bytes) -> None:
        if not self._verifying:
            return
        if offset > self._seq_pos:
            self._verifying = False
            return
        new = memoryview(data)[self._seq_pos - offset :]
        if not new:
            return
        self._crc = crc64.go_iso(new, self._crc)
        self._seq_pos += len(new)
        if self._seq_pos == self._size and self._crc != self._crc_expected:
            raise IntegrityError(
                f"{self._what} fails its CRC-64 (got {self._crc:016x}, "
                f"tar-split records {self._crc_expected or 0:016x})"
            )

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
