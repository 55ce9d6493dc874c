"""The one content API between the views and the FUSE adapter, and the caches behind it.

Owns: ``Content`` — what an open file is served from: ``Inline`` bytes (manifests, configs,
signatures, layout files), a ``Snapshotted`` layer blob (the snapshot cache), or a ``Streamed``
reader (a ``--direct`` layer blob, a ``layers/``/``rootfs/`` file) checked by the file's shared
verifier — and the policy that picks one (snapshots unless the caches were built for
``--direct``); the open layer member (``MemberFile``: opened at once or at its first read) and
the inline attempt of its reads (``read_nowait``: never waits for the disk or a store lock).
Also owns ``Caches``, built once by the CLI's wiring and shared by every view (with the
cross-file read-ahead, ``readahead.ReadAhead``).
Must not know: pyfuse3, trio, inode numbers, errno values, the tree's names.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol

from imgfs.budget import Budget
from imgfs.cache.layers import LayerBlobs
from imgfs.cache.snapshots import Sink, Snapshot, SnapshotCache
from imgfs.cache.trees import FileViews
from imgfs.errors import IntegrityError, LayerUnavailable, LockBusy
from imgfs.layer.tarheader import REGULAR
from imgfs.layer.tree import FileData, Member
from imgfs.layer.verify import VerifiedReader, Verifier, Verifiers, member_verifier, read_exact
from imgfs.store import locks
from imgfs.store.source import LayerSource
from imgfs.views.readahead import ReadAhead
from imgfs.views.rootfs import RootFSCache

log = logging.getLogger(__name__)


class Reader(Protocol):
    """A streamed file: ``read(offset, n)`` returns up to ``n`` verified-by-rule bytes."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, n: int) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Inline:
    """A small file, read whole at open."""

    data: bytes


@dataclass(frozen=True)
class Snapshotted:
    """A layer blob served from its (shared, streaming) snapshot."""

    snapshot: Snapshot


@dataclass(frozen=True)
class Streamed:
    """A file read through a reader. ``identity``: the file's in the ``Verifiers`` (every name
    of one layer file, in ``layers/`` and ``rootfs/`` of each image with the layer, has the
    same). ``page_cache``: the kernel may keep its pages (a member of a layer) or must not (a
    ``--direct`` layer blob, read with direct I/O)."""

    reader: Reader
    identity: Hashable
    page_cache: bool


Content = Inline | Snapshotted | Streamed


@dataclass(frozen=True)
class Caches:
    """Everything the views share across store refreshes. ``snapshots`` None: ``--direct``."""

    trees: FileViews
    blobs: LayerBlobs
    rootfs: RootFSCache
    snapshots: SnapshotCache | None = None
    budget: Budget = field(default_factory=Budget)
    read_ahead: ReadAhead = field(default_factory=ReadAhead)  # of files opened in order

    @classmethod
    def build(
        cls,
        cache_dir: str | None = None,
        cache_size: int | None = None,
        direct: bool = True,
        budget: Budget | None = None,
    ) -> Caches:
        """The caches of a mount (``cache_dir`` None: memory only, and always ``--direct``),
        each bounded by its share of ``budget`` (``imgfs.budget``: the one split)."""
        budget = budget if budget is not None else Budget()
        index_dir = None if cache_dir is None else os.path.join(cache_dir, "index")
        trees = FileViews(index_dir=index_dir, max_bytes=budget.trees)
        blobs = LayerBlobs(index_dir=index_dir, max_bytes=budget.indexes)
        snapshots = None
        if cache_dir is not None and not direct:
            snapshots = SnapshotCache(cache_dir, cache_size, log=log)
        return cls(trees, blobs, RootFSCache(budget), snapshots, budget)

    def close(self) -> None:
        self.read_ahead.close()
        if self.snapshots is not None:
            self.snapshots.close()


def open_layer_blob(caches: Caches, verifiers: Verifiers, source: LayerSource) -> Content:
    """A layer blob: its snapshot, or (``--direct``, or a blob that does not fit the snapshot
    cache's budget beside the snapshots in use) a reader checked by the blob's verifier. The
    cache never exceeds ``--cache-size``."""
    identity = ("blob", source.digest, source.layer_id)
    if source.refused is not None:  # known before any open (e.g. a TOC-only layer)
        raise LayerUnavailable(f"{source.what}: {source.refused}")
    failure = verifiers.failure(identity)
    if failure is not None:
        raise IntegrityError(failure)
    if caches.snapshots is not None:
        produce = functools.partial(_produce, caches.blobs, verifiers, identity, source)
        # The snapshot key names the blob (and its layer when the layer ID is not the digest's
        # hex, as for the base layers c/storage names by their diff ID): logs show it.
        same = source.layer_id == source.digest.removeprefix("sha256:")
        key = source.digest if same else f"{source.digest} (layer {source.layer_id})"
        snap = caches.snapshots.acquire_if_fits(key, source.size, produce)
        if snap is not None:
            return Snapshotted(snap)
        log.info(
            "%s: %d bytes do not fit the snapshot cache (%d bytes): served without a snapshot "
            "(as --direct)",
            source.what,
            source.size,
            caches.snapshots.max_bytes,
        )
    reader = caches.blobs.open_reader(source, verifiers, identity)
    return Streamed(reader, identity, page_cache=False)


def _produce(
    blobs: LayerBlobs, verifiers: Verifiers, identity: tuple[str, ...], source: LayerSource,
    sink: Sink,
) -> None:  # fmt: skip
    try:
        blobs.produce(source, sink)
    except IntegrityError as exc:
        verifiers.fail(identity, str(exc))
        raise


def open_member(
    verifiers: Verifiers,
    source: LayerSource,
    member: Member | FileData,
    lazy: bool = False,
    on_miss: Callable[[], None] | None = None,
    fd: int | None = None,
) -> Content:
    """A regular file of ``layers/`` or ``rootfs/``, checked by the member's verifier.
    ``member``: its parsed member (LayerUnavailable unless a regular file) or, for a node
    made from one (``Origin``), its ``LayerTree.file`` (no header parse at each open).
    ``lazy``: the layer file is opened at the first read (none at all when the kernel serves
    every read from its page cache), else now. ``on_miss``: called when an inline read
    (``read_nowait``) finds the bytes not in the page cache (the read-ahead's cue). ``fd``:
    the member's layer file, opened already by its ``LayerSource`` (the read-ahead's), given
    to the open file (closed here if the open fails)."""
    try:
        return _open_member(verifiers, source, member, lazy, on_miss, fd)
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


def _open_member(
    verifiers: Verifiers,
    source: LayerSource,
    member: Member | FileData,
    lazy: bool,
    on_miss: Callable[[], None] | None,
    fd: int | None,
) -> Content:
    # The file's name in messages is built only for a message (an error, a new verifier):
    # most opens need none.
    if isinstance(member, Member) and member.typeflag != REGULAR:
        raise LayerUnavailable(
            f"{_what(source, member.data_name)}: not a regular file (unresolved hardlink?)"
        )
    identity = ("member", source.layer_id, member.data_name)
    digest = None
    if source.toc_tree and member.size:
        digest = source.toc_digest(member.data_name)
        if digest is None:
            raise LayerUnavailable(
                f"{_what(source, member.data_name)}: the TOC records no digest for it"
            )
    failure = verifiers.failure(identity)  # its verifier is found at the first read
    if failure is not None:
        raise IntegrityError(failure)
    file = MemberFile(source, member.data_name, member.size, on_miss, fd)
    if not lazy and member.size:
        file.open()

    def make() -> Verifier:
        return member_verifier(member.size, member.crc, _what(source, member.data_name), digest)

    return Streamed(VerifiedReader(file, verifiers, identity, make), identity, page_cache=True)


def _what(source: LayerSource, name: bytes) -> str:
    """A layer file as messages name it."""
    return f"{source.what}: file {name!r:.200}"


# Reads of layer files up to this size may be tried inline (``read_nowait``): larger ones may
# make the verifier check a long prefix first, which is no work for the requests' thread.
INLINE_READ_MAX = 1 << 20
# Only root opens layer files inline: another user's store may be rootless, whose files are
# opened by a helper process (a round trip the requests' thread must not wait for).
_INLINE_OPEN = os.geteuid() == 0
_nowait = threading.local()  # .on: this thread's reads must not block (read_nowait)


class MemberFile:
    """One open handle's view of a layer member's file (a ``verify.RangeSource``): opened
    through its ``LayerSource`` at ``open`` or the first read, size-checked reads, and in
    ``read_nowait`` reads that raise ``BlockingIOError`` instead of waiting for the disk."""

    __slots__ = ("_closed", "_fd", "_name", "_on_miss", "_source", "size")

    def __init__(
        self,
        source: LayerSource,
        name: bytes,
        size: int,
        on_miss: Callable[[], None] | None = None,
        fd: int | None = None,
    ) -> None:
        self._source = source
        self._name = name
        self.size = size
        self._on_miss = on_miss
        self._fd = fd
        self._closed = False

    @property
    def _what(self) -> str:  # for messages only: built when one is
        return _what(self._source, self._name)

    def open(self) -> int:
        if self._closed:
            raise ValueError(f"{self._what}: read after close")
        if self._fd is None:
            if getattr(_nowait, "on", False) and not _INLINE_OPEN:
                raise BlockingIOError("opened by a worker thread")  # (caught: no message)
            self._fd = self._source.open_file(self._name, self.size)
        return self._fd

    def read_raw(self, offset: int, n: int) -> bytes:
        fd = self.open()
        if not getattr(_nowait, "on", False):
            return read_exact(fd, n, offset, self._what)
        buf = bytearray(n)
        try:
            got = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
        except OSError as exc:  # EAGAIN (not cached), or a file system without RWF_NOWAIT
            self._missed()
            raise BlockingIOError(exc.errno, "not in the page cache") from None  # (caught)
        if got != n:  # partly cached, or short: a worker thread's read_exact tells which
            self._missed()
            raise BlockingIOError(errno.EAGAIN, "partly in the page cache")  # (caught)
        return bytes(buf)

    def _missed(self) -> None:
        if self._on_miss is not None:
            on_miss, self._on_miss = self._on_miss, None  # once per open
            on_miss()

    def close(self) -> None:
        fd, self._fd, self._closed = self._fd, None, True
        if fd is not None:
            os.close(fd)


def read_nowait(content: Streamed, offset: int, n: int) -> bytes | None:
    """``content.reader.read(offset, n)`` of a layer member if that needs no wait — the file
    open (or opened without a store lock a writer holds), no other reader holding its check
    (``wait=False``), its pages in the page cache, at most
    ``INLINE_READ_MAX`` bytes — so that the requests' thread serves it; else None (read it in a
    worker thread). A failed check raises as ``read`` does."""
    if not isinstance(content.reader, VerifiedReader) or content.reader.size > INLINE_READ_MAX:
        return None
    _nowait.on = True
    try:
        with locks.no_waiting():
            return content.reader.read(offset, n, wait=False)  # no wait for another reader
    except (BlockingIOError, LockBusy):
        return None
    finally:
        _nowait.on = False


def release(caches: Caches, content: Content) -> None:
    """Give back what an open took (a snapshot hold, a reader's fds)."""
    if isinstance(content, Snapshotted):
        assert caches.snapshots is not None
        caches.snapshots.release(content.snapshot)
    elif isinstance(content, Streamed):
        content.reader.close()
