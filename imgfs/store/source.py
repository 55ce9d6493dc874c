"""A layer as the store holds it, and the opens of its files.

Owns: ``LayerSource`` (everything needed to rebuild one layer blob, resolved from the records)
and every open of a layer's tar-split and content files, each taken under the store's
``layers.lock`` (held only for the opens, never for the reads that follow). Other modules never
open layer files themselves: they ask a LayerSource. A flat-layout (composefs) layer's names go
through its TOC's name map (``toc.FlatNames``) in front of the same opener; a layer the records
already show to be unreproducible (``refused``) fails before anything is opened.
Must not know: caches, the mounted tree, FUSE.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, cast

from imgfs.errors import IntegrityError, LayerUnavailable
from imgfs.layer.assemble import BlobFile, FileOpener, LayerReader
from imgfs.layer.index import LayerIndex
from imgfs.layer.tarsplit import iter_entries
from imgfs.store.files import open_regular
from imgfs.store.locks import read_locked
from imgfs.store.toc import FlatNames, flat_map
from imgfs.store.userns import open_layer_files


@dataclass(frozen=True)
class LayerSource:
    """Everything needed to rebuild one layer blob, resolved under the layers lock."""

    layer_id: str
    digest: str
    size: int
    tarsplit_path: str
    content_dirs: tuple[str, ...]
    what: str
    created_ns: int = 0  # the layer record's creation time (0: unknown)
    toc_names: bool = False  # zstd:chunked big data: find files through a flat layout's TOC
    refused: str | None = None  # why the layer cannot be reproduced (checked before any open)

    @property
    def lock_path(self) -> str:
        return os.path.join(os.path.dirname(self.tarsplit_path), "layers.lock")

    def open_tarsplit(self) -> int:
        """The layer's tar-split file, opened under the layers lock (never a symlink or FIFO)."""
        with read_locked([self.lock_path]):
            return self._open_tarsplit_locked()

    def open_file(self, name: bytes, size: int) -> int:
        """One content file of the layer (a regular file of ``size`` bytes), under the lock."""
        with read_locked([self.lock_path]):
            files = self._named(open_layer_files(self.content_dirs, self.what, self.lock_path))
        try:
            return files.open(name, size)
        finally:
            files.close()

    @contextlib.contextmanager
    def opened(self, keep_files: bool = False) -> Iterator[tuple[BinaryIO, FileOpener, int]]:
        """The tar-split (as a file object), the content dirs and the tar-split's fd, all
        opened under the layers lock; yields after unlocking. ``keep_files``: the caller
        closes the files (a reader that outlives the block)."""
        with read_locked([self.lock_path]):
            fd = self._open_tarsplit_locked()
            try:
                files = self._named(open_layer_files(self.content_dirs, self.what, self.lock_path))
            except BaseException:
                os.close(fd)
                raise
        gz = os.fdopen(fd, "rb")
        try:
            yield gz, files, fd
        except BaseException:
            if keep_files:
                files.close()
            raise
        finally:
            gz.close()
            if not keep_files:
                files.close()

    def _named(self, files: FileOpener) -> FileOpener:
        """``files``, behind the TOC's name map when the layer is in the flat layout."""
        if not self.toc_names:
            return files
        try:
            mapping = flat_map(os.path.dirname(self.tarsplit_path), self.layer_id, self.what)
        except BaseException:
            files.close()
            raise
        return files if mapping is None else FlatNames(files, mapping)

    def _open_tarsplit_locked(self) -> int:
        if self.refused is not None:
            raise LayerUnavailable(f"{self.what}: {self.refused}")
        try:
            return open_regular(self.tarsplit_path, f"{self.what}: tar-split")
        except FileNotFoundError as exc:
            raise LayerUnavailable(
                f"{self.what}: no tar-split metadata, so the layer cannot be reproduced exactly"
            ) from exc
        except OSError as exc:
            raise LayerUnavailable(f"{self.what}: tar-split: {exc.strerror}") from exc


def build_index(source: LayerSource, gz: BinaryIO) -> LayerIndex:
    """Parse the tar-split into an offset index, cross-checked against ``diff-size``."""
    index = LayerIndex.build(iter_entries(gz, source.what), source.what, source.size)
    check_index_size(source, index)
    return index


def check_index_size(source: LayerSource, index: LayerIndex) -> None:
    if index.size != source.size:
        raise IntegrityError(
            f"{source.what}: tar-split describes {index.size} bytes, diff-size is {source.size}"
        )


def open_layer_blob(source: LayerSource) -> BinaryIO:
    """A verified, seekable file object over a layer blob (the library's ``open_blob``)."""
    with source.opened(keep_files=True) as (gz, files, _fd):
        index = build_index(source, gz)
    reader = LayerReader(index, files, source.digest, source.what, close_files=True)
    return cast(BinaryIO, BlobFile(reader))
