"""The one content API between the views and the FUSE adapter, and the caches behind it.

Owns: ``Content`` — what an open file is served from: ``Inline`` bytes (manifests, configs,
signatures, layout files), a ``Snapshotted`` layer blob (the snapshot cache), or a ``Streamed``
reader (a ``--direct`` layer blob, a ``layers/``/``rootfs/`` file) checked by the file's shared
verifier — and the policy that picks one (snapshots unless the caches were built for
``--direct``). Also owns ``Caches``, built once by the CLI's wiring and shared by every view.
Must not know: pyfuse3, trio, inode numbers, errno values, the tree's names.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Protocol

from imgfs.budget import Budget
from imgfs.cache.layers import LayerBlobs
from imgfs.cache.snapshots import Sink, Snapshot, SnapshotCache
from imgfs.cache.trees import FileViews
from imgfs.errors import IntegrityError, LayerUnavailable
from imgfs.layer.tarheader import REGULAR
from imgfs.layer.tree import Member
from imgfs.layer.verify import FdRange, VerifiedReader, Verifiers, member_verifier
from imgfs.store.source import LayerSource
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
    """A file read through a reader. ``page_cache``: the kernel may keep its pages (a member
    of a layer) or must not (a ``--direct`` layer blob, read with direct I/O)."""

    reader: Reader
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
    return Streamed(caches.blobs.open_reader(source, verifiers, identity), page_cache=False)


def _produce(
    blobs: LayerBlobs, verifiers: Verifiers, identity: tuple[str, ...], source: LayerSource,
    sink: Sink,
) -> None:  # fmt: skip
    try:
        blobs.produce(source, sink)
    except IntegrityError as exc:
        verifiers.fail(identity, str(exc))
        raise


def open_member(verifiers: Verifiers, source: LayerSource, member: Member) -> Content:
    """A regular file of ``layers/`` or ``rootfs/``, checked by the member's verifier."""
    what = f"{source.what}: file {member.data_name!r:.200}"
    if member.typeflag != REGULAR:
        raise LayerUnavailable(f"{what}: not a regular file (unresolved hardlink?)")
    identity = ("member", source.layer_id, member.data_name)
    digest = source.toc_digest(member.data_name) if source.toc_tree and member.size else None
    if source.toc_tree and member.size and digest is None:
        raise LayerUnavailable(f"{what}: the TOC records no digest for it")
    verifier = verifiers.get(
        identity, lambda: member_verifier(member.size, member.crc, what, digest)
    )
    if verifier.failure is not None:
        raise IntegrityError(verifier.failure)
    fd = source.open_file(member.data_name, member.size) if member.size else None
    return Streamed(VerifiedReader(FdRange(fd, member.size, what), verifier), page_cache=True)


def release(caches: Caches, content: Content) -> None:
    """Give back what an open took (a snapshot hold, a reader's fds)."""
    if isinstance(content, Snapshotted):
        assert caches.snapshots is not None
        caches.snapshots.release(content.snapshot)
    elif isinstance(content, Streamed):
        content.reader.close()
