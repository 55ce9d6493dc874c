"""A layer as the store holds it, and the opens of its files.

Owns: ``LayerSource`` (everything needed to rebuild one layer blob, resolved from the records)
and every open of a layer's tar-split and content files, each taken under the store's
``layers.lock`` files (both the graph root's and the image store's for a store with an
``imagestore``, as c/storage's layer store takes them; held only for the opens, never for the
reads that follow), every path opened
below its store root without following symlinks (``files.StoreRoot``; the files inside a
layer directory by ``layerfiles``). ``LayerChain``: an image's chain of layer IDs, shared by the
chain's sources, so that describing a chain of depth N costs O(N), and a layer's overlay lower
directories are found (and opened) only when a file is not in its own. ``LayerDirsCache``:
the directory fds of recently used layers, kept (bounded in fds) while the store's write
tokens stay, closed by their last user once dropped. Other modules never
open layer files themselves: they ask a LayerSource. A flat-layout (composefs) layer's names go
through its TOC's name map (``toc.FlatNames``) in front of the same opener; a layer the records
already show to be unreproducible (``refused``) fails before anything is opened; one known
only by its TOC (``toc_tree``) still gives its TOC, for its file tree and file digests.
Must not know: caches, the mounted tree, FUSE.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, TypeVar, cast

from imgfs.errors import ImgfsError, IntegrityError, LayerUnavailable
from imgfs.layer.assemble import (
    BlobFile,
    FileOpener,
    LayerReader,
    out_of_descriptors,
    will_need,
)
from imgfs.layer.index import LayerIndex
from imgfs.layer.tarsplit import iter_entries
from imgfs.lru import LRU
from imgfs.store.files import RootLayout, StoreFile
from imgfs.store.layerfiles import LayerFiles
from imgfs.store.locks import no_waiting, read_locked
from imgfs.store.toc import FlatNames, flat_map, read_toc, toc_digest, toc_identity
from imgfs.store.userns import is_rootless_store, open_layer_files

log = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass(frozen=True)
class LayerChain:
    """One image's layer IDs, base first, and the roots that may hold their directories (in
    the store's order). ``lowers``: a layer's files may be in its parents' directories (the
    overlay driver)."""

    roots: tuple[RootLayout, ...]
    ids: tuple[str, ...]
    lowers: bool

    def content_dir(self, layer_id: str, what: str) -> tuple[RootLayout, int]:
        """The layer's content directory in the first root that has it (an O_PATH fd)."""
        for root in self.roots:
            rel = root.content_dir(layer_id)
            try:
                return root, root.store_root.open_dir(rel, f"{what}: layer directory")
            except FileNotFoundError:
                continue
        path = self.roots[0].store_root.show(self.roots[0].content_dir(layer_id))
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)


class _ChainDirs:
    """``layerfiles.LayerDirs`` of the layer at ``depth``: its own directory, then (overlay)
    its parents', nearest first, each opened below its store root only when reached."""

    def __init__(self, chain: LayerChain, depth: int, what: str) -> None:
        self._chain = chain
        self._depth = depth
        self._what = what

    def __len__(self) -> int:
        return self._depth + 1 if self._chain.lowers else 1

    def _id(self, i: int) -> str:
        return self._chain.ids[self._depth - i]

    def name(self, i: int) -> str:
        root = self._chain.roots[0]
        return root.store_root.show(root.content_dir(self._id(i)))

    def open(self, i: int) -> int:
        return self._chain.content_dir(self._id(i), self._what)[1]

    def paths(self) -> list[str]:
        """Absolute paths (for the user-namespace opener, which opens by path); the layer's
        own directory is checked to be reachable without a symlink first."""
        os.close(self.open(0))
        out = []
        for i in range(len(self)):
            try:
                root, fd = self._chain.content_dir(self._id(i), self._what)
            except FileNotFoundError:
                out.append(self.name(i))
                continue
            os.close(fd)
            out.append(root.store_root.show(root.content_dir(self._id(i))))
        return out


@dataclass(frozen=True)
class LayerSource:
    """Everything needed to rebuild one layer blob, resolved under the layers lock."""

    layer_id: str
    digest: str
    size: int
    home: RootLayout  # the root whose <driver>-layers holds the layer's record and tar-split
    locks: tuple[StoreFile, ...]  # the layers.lock files c/storage holds reading it, in order
    chain: LayerChain = field(repr=False, compare=False)
    depth: int  # the layer's place in ``chain.ids``
    what: str
    created_ns: int = 0  # the layer record's creation time (0: unknown)
    toc_names: bool = False  # zstd:chunked big data: find files through a flat layout's TOC
    refused: str | None = None  # why the layer cannot be reproduced (checked before any open)
    toc_tree: bool = False  # refused, known only by its TOC: the tree and digests come from it

    @functools.cached_property
    def rootless(self) -> bool:
        """Whether the layer's files are opened by the user-namespace helper (our own store,
        and we are not root): asked once per source, not per file (a stat for a non-root user
        reading a store it does not own)."""
        return is_rootless_store(self.home.layers_dir)

    @property
    def tarsplit(self) -> StoreFile:
        return self.home.layers_file(f"{self.layer_id}.tar-split.gz")

    @property
    def tarsplit_path(self) -> str:
        return self.tarsplit.path

    def open_tarsplit(self) -> int:
        """The layer's tar-split file, opened under the layers lock (never a symlink or FIFO)."""
        with read_locked(self.locks):
            return self._open_tarsplit_locked()

    def toc_identity(self) -> object:
        """The identity of the TOC file of a layer known only by it (``toc_tree``)."""
        with read_locked(self.locks):
            return toc_identity(self.home, self.layer_id)

    def read_toc(self) -> bytes:
        """The TOC of a layer known only by it (``toc_tree``)."""
        with read_locked(self.locks):
            return read_toc(self.home, self.layer_id, self.what)

    def toc_digest(self, name: bytes) -> str | None:
        """The sha256 hex the TOC records for regular file ``name`` (``toc_tree`` layers)."""
        with read_locked(self.locks):
            return toc_digest(self.home, self.layer_id, name, self.what)

    def open_file(self, name: bytes, size: int) -> int:
        """One content file of the layer (a regular file of ``size`` bytes), under the lock.
        The layer's directory fds are kept (``LAYER_DIRS``) while the store's write tokens
        stay the same."""
        return self._with_files(lambda files: files.open(name, size))

    def holding_opens(self) -> contextlib.AbstractContextManager[object]:
        """This thread holds the layer's store locks (``read_locked(keep=True)``, never waiting
        for a writer: ``LockBusy``) until the block ends, so that the ``open_file`` and
        ``warm_files`` calls inside take them again without a syscall (nested: the lock and
        the token read under it are the block's). Nothing for a store whose files are opened
        without ``LAYER_DIRS`` (rootless, or the flat layout's name map)."""
        if self.toc_names or self.rootless:
            return contextlib.nullcontext()
        return _holding(self.locks)

    def warm_files(self, items: Sequence[tuple[bytes, int]], length: int) -> list[int | None]:
        """Content files ``(name, size)`` opened as ``open_file`` opens them, the first
        ``length`` bytes of each asked into the kernel's page cache (``posix_fadvise``
        WILLNEED: queued, not waited for), those of the layer's own directory all in one
        compiled call (``LayerFiles.open_many``, the GIL released once for them all); the
        caller owns the fds. None for a file not opened: one that fails (logged; the reader's
        own open reports it), every one after the descriptors ran out, and all of a rootless
        store (its files are opened by the user-namespace helper: a round trip per file would
        cost more than the read it saves). Raises what fails them all (the layer's directories
        cannot be opened, a writer holds the lock)."""
        if self.rootless or not items:
            return [None] * len(items)
        return self._with_files(lambda files: _open_advised(files, items, length))

    def _with_files(self, use: Callable[[FileOpener], _T]) -> _T:
        """``use(files)`` with the layer's content files (``files``), taken under the lock:
        the kept directories of ``LAYER_DIRS`` (one lock per call: kept fds), or for a store
        whose files are opened without them (rootless, the flat layout's name map) ones opened
        for this call."""
        if self.toc_names or self.rootless:
            with read_locked(self.locks):
                files = self._layer_files()
            try:
                return use(files)
            finally:
                files.close()
        with read_locked(self.locks, keep=True) as tokens:
            held = LAYER_DIRS.hold(self._dirs_key(), tokens, self._own_files)
        try:
            return use(held.files)
        finally:
            LAYER_DIRS.let_go(held)

    def _dirs_key(self) -> tuple[object, ...]:
        chain = self.chain
        return (chain.roots, chain.ids[: self.depth + 1], chain.lowers, self.what)

    def _own_files(self) -> tuple[LayerFiles, int]:
        dirs = _ChainDirs(self.chain, self.depth, self.what)
        return LayerFiles(dirs, self.what), len(dirs)

    def _layer_files(self) -> FileOpener:
        dirs = _ChainDirs(self.chain, self.depth, self.what)
        if self.rootless:
            paths = [lock.path for lock in self.locks]
            return self._named(open_layer_files(dirs.paths(), self.what, paths))
        return self._named(LayerFiles(dirs, self.what))

    @contextlib.contextmanager
    def opened(self, keep_files: bool = False) -> Iterator[tuple[BinaryIO, FileOpener, int]]:
        """The tar-split (as a file object), the content dirs and the tar-split's fd, all
        opened under the layers lock; yields after unlocking. ``keep_files``: the caller
        closes the files (a reader that outlives the block)."""
        with read_locked(self.locks):
            fd = self._open_tarsplit_locked()
            try:
                files = self._layer_files()
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
            mapping = flat_map(self.home, self.layer_id, self.what)
        except BaseException:
            files.close()
            raise
        return files if mapping is None else FlatNames(files, mapping)

    def _open_tarsplit_locked(self) -> int:
        if self.refused is not None:
            raise LayerUnavailable(f"{self.what}: {self.refused}")
        try:
            return self.tarsplit.open(f"{self.what}: tar-split")
        except FileNotFoundError as exc:
            raise LayerUnavailable(
                f"{self.what}: no tar-split metadata, so the layer cannot be reproduced exactly"
            ) from exc
        except OSError as exc:
            raise LayerUnavailable(f"{self.what}: tar-split: {exc.strerror}") from exc


def _open_advised(
    files: FileOpener, items: Sequence[tuple[bytes, int]], advise: int
) -> list[int | None]:
    """``files.open(name, size)`` of each item, its first ``advise`` bytes asked into the page
    cache (``will_need``: a hint). The store's ``LayerFiles`` does both for the files of its
    first directory in one compiled call (``open_many``: the same probe, openat2 rules and
    checks, with the GIL released); what that call leaves (a file of a lower directory, an odd
    name, an error) is opened by ``open``, which says why. An item that fails is None (its
    error logged); once the descriptors ran out every later one is None too."""
    got: Sequence[int | Exception | None] = [None] * len(items)
    if isinstance(files, LayerFiles):
        got = files.open_many(items, advise)
    fds: list[int | None] = []
    exhausted = False
    try:
        for (name, size), fd in zip(items, got, strict=True):
            if isinstance(fd, Exception):  # out of descriptors (open_many gives None after it)
                exhausted, fd = True, None
            elif fd is None and not exhausted:
                try:
                    fd = files.open(name, size)
                except (OSError, ImgfsError) as exc:
                    log.debug("file %r not opened ahead: %s", name[-120:], exc)
                    exhausted = out_of_descriptors(exc)
                else:
                    if advise:
                        will_need(fd, 0, advise)
            fds.append(fd)
    except BaseException:
        for opened in [*fds, *got[len(fds) :]]:  # (the item that failed holds no fd)
            if isinstance(opened, int):
                os.close(opened)
        raise
    return fds


@contextlib.contextmanager
def _holding(paths: tuple[StoreFile, ...]) -> Iterator[None]:
    with no_waiting(), read_locked(paths, keep=True):
        yield


class _Held:
    """One kept ``LayerFiles``: the write tokens it was opened under, who uses it right now,
    and whether it left the cache (closed once nobody uses it: never under a reader)."""

    __slots__ = ("fds", "files", "refs", "retired", "tokens")

    def __init__(self, files: LayerFiles, tokens: tuple[bytes, ...], fds: int) -> None:
        self.files, self.tokens, self.fds = files, tokens, fds
        self.refs = 1
        self.retired = False


class LayerDirsCache:
    """The directory fds of recently opened layers (a ``LayerFiles`` per layer and image),
    so that a small file's open is one ``openat2`` and not also the opens of its layer's
    directories below the store root (measured ~42 us a file). Bounded in fds (each entry
    counts its whole chain of directories, opened or not). An entry is used only while the
    store's write tokens (the ``layers.lock`` files the open is made under) are the ones it
    was opened under: a store change (a layer removed, re-pulled) opens the directories again,
    and a store without tokens (no lock file) gets no kept directories at all."""

    def __init__(self, max_fds: int) -> None:
        self._lru: LRU[tuple[object, ...], _Held] = LRU(max_fds, lambda held: held.fds)
        self._lock = threading.Lock()

    def hold(
        self,
        key: tuple[object, ...],
        tokens: tuple[bytes, ...],
        make: Callable[[], tuple[LayerFiles, int]],
    ) -> _Held:
        """The kept entry for ``key`` if its tokens are ``tokens``, else a new one (kept when
        every token is known); ``let_go`` it after use."""
        with self._lock:
            held = self._lru.get(key)
            if held is not None and held.tokens == tokens:
                held.refs += 1
                return held
            stale = [] if held is None else [self._lru.pop(key)]
        self._retire(stale)
        files, fds = make()
        held = _Held(files, tokens, fds)
        if not tokens or not all(tokens):
            held.retired = True  # nothing tells a change: used once
            return held
        with self._lock:
            gone = [self._lru.pop(key)]
            gone += self._lru.put(key, held)
        self._retire(gone)
        return held

    def let_go(self, held: _Held) -> None:
        with self._lock:
            held.refs -= 1
            done = held.retired and held.refs == 0
        if done:
            held.files.close()

    def close(self) -> None:
        """Drop every entry (each closed now, or by its last user)."""
        with self._lock:
            gone = self._lru.clear()
        self._retire(gone)

    def _retire(self, held: Sequence[_Held | None]) -> None:
        to_close = []
        with self._lock:
            for one in held:
                if one is None or one.retired:
                    continue
                one.retired = True
                if one.refs == 0:
                    to_close.append(one.files)
        for files in to_close:
            files.close()


LAYER_DIRS_MAX_FDS = 256
LAYER_DIRS = LayerDirsCache(LAYER_DIRS_MAX_FDS)


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
