"""Temp-file snapshot cache of layer blobs: shared streaming generation, LRU eviction.

Owns: the life of the unlinked temp files that hold generated layer blobs (DESIGN.md §2): one
generation per key however many opens share it, the published mark that readers wait on, the
bounded pool of generation threads, cancellation of abandoned generations, and the byte budget
with least-recently-released eviction (``acquire_if_fits``: a new snapshot is only started when
it fits the budget with every unheld snapshot evicted, so the cache never exceeds it), and
holes: all-zero blocks are not written, only skipped (a sparse file in a layer costs no disk).

Must not know: tar-split, layers, digests, CRCs or the store (a *producer* callable writes the
bytes and decides what may be published), pyfuse3, trio or errno values (the FUSE layer maps the
``imgfs.errors`` classes raised here).

Contract with producers
-----------------------
``produce(sink)`` runs in a daemon thread. It appends the blob with ``sink.write`` and marks a
prefix servable with ``sink.publish(upto)``; it holds back the last byte of each file until the
file's CRC is verified and the final bytes of the blob until its digest is verified, so readers
never reach EOF on wrong bytes. ``sink.write`` raises :class:`SnapshotCancelled` once nobody
wants the snapshot any more (``sink.cancelled`` says so without writing). When ``produce``
returns, ``published`` must equal the size; an exception fails the snapshot and every reader of
an unpublished range gets it (non-``ImgfsError`` exceptions are wrapped in ``CorruptStore``).

Locking
-------
Three kinds of locks, taken only in this order and held only for bookkeeping (no I/O, no
thread start, no fd close: closing an unlinked multi-GiB file frees its blocks and can be slow):

1. ``SnapshotCache._lock``: the key table, reference counts, LRU order, byte accounting and fd
   ownership of every snapshot.
2. ``Snapshot._cond``: the published mark and the failure of one snapshot.
3. ``_Gate._cond``: the free generation slots.

Hot path
--------
``published`` only grows and bytes below it never change, and a snapshot's fd is never closed
while a reference is held. So ``Snapshot.read`` of a published range takes no lock at all: one
attribute compare, then ``os.pread``. The FUSE layer may go further and read ``Snapshot.fd``
itself, without a thread hop, while it holds its reference::

    end = min(offset + size, snap.size)
    if end > snap.published:
        withdraw = snap.notify_when_published(end, wake)  # wake() from the producer's thread
        ... wait for wake() in the event loop, then withdraw() ...
    if end <= snap.published:
        n = os.preadv(snap.fd, [buf], offset, os.RWF_NOWAIT)  # BlockingIOError: not in page cache
    else:  # failed or stopped: snap.read raises why
        data = await trio.to_thread.run_sync(snap.read, offset, size)

(``preadv`` may return fewer bytes than asked when only part of the range is cached.) A
waiter's ``wake`` is called outside every lock, after the mark moved past its ``end`` or when
generation failed or ended any other way.
"""

from __future__ import annotations

import copy
import enum
import errno
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from imgfs.errors import Cancelled, CorruptStore, ImgfsError, IntegrityError
from imgfs.layer.verify import read_exact

TEMP_PREFIX = ".imgfs-snap-"
"""Name prefix of the named temp files of the mkstemp fallback (removed at the next start)."""

DEFAULT_MAX_BYTES = 10 << 30
MAX_CONCURRENT_GENERATIONS = 4
CLOSE_JOIN_TIMEOUT = 5.0

# What open(O_TMPFILE) fails with where the kernel or the filesystem lacks it.
_NO_TMPFILE_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL})

_default_log = logging.getLogger(__name__)


SnapshotCancelled = Cancelled  # raised by Sink.write once the snapshot was abandoned


class Sink(Protocol):
    """Where a producer writes one blob. Used from the producer's thread only."""

    @property
    def cancelled(self) -> bool:
        """True once nobody wants the snapshot; the producer should return or raise."""
        ...

    @property
    def written(self) -> int:
        """Bytes written so far."""
        ...

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data``; raises SnapshotCancelled, OSError (ENOSPC, ...) or IntegrityError."""
        ...

    def publish(self, upto: int) -> None:
        """Make bytes ``[0, upto)`` servable; ``upto`` never decreases, never exceeds written."""
        ...


Producer = Callable[[Sink], None]


class _State(enum.Enum):
    GENERATING = "generating"
    COMPLETE = "complete"
    FAILED = "failed"


class _Outcome(enum.Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Snapshot:
    """One layer blob in an unlinked temp file, shared by every open of its key.

    Obtained from ``SnapshotCache.acquire`` and given back with ``SnapshotCache.release``;
    use it only between the two. ``read`` may be called from any number of threads.
    """

    __slots__ = (
        "_attached",
        "_cancelled",
        "_cond",
        "_error",
        "_fd",
        "_fd_closed",
        "_key",
        "_published",
        "_refs",
        "_running",
        "_size",
        "_state",
        "_thread",
        "_waiters",
    )

    def __init__(self, key: str, size: int, fd: int) -> None:
        self._key = key
        self._size = size
        self._fd = fd
        self._cond = threading.Condition(threading.Lock())
        # Guarded by _cond for writing; read without it (an int attribute read is atomic).
        self._published = 0
        self._state = _State.GENERATING
        self._error: ImgfsError | None = None
        self._waiters: list[tuple[int, Callable[[], None]]] = []  # guarded by _cond
        # Set once, never cleared; read without a lock by the producer.
        self._cancelled = False
        # Guarded by the owning cache's lock.
        self._refs = 0
        self._attached = False
        self._running = False
        self._fd_closed = False
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return (
            f"<Snapshot {self._key} {self._state.value} "
            f"{self._published}/{self._size} refs={self._refs}>"
        )

    @property
    def key(self) -> str:
        """The key the snapshot was acquired under."""
        return self._key

    @property
    def size(self) -> int:
        """The blob size; reads are clamped to it."""
        return self._size

    @property
    def fd(self) -> int:
        """The temp file, for the caller's own ``preadv`` of ranges below ``published``."""
        return self._fd

    @property
    def published(self) -> int:
        """Bytes ``[0, published)`` are final and servable; only grows."""
        return self._published

    @property
    def complete(self) -> bool:
        """True once the producer returned with every byte published."""
        return self._state is _State.COMPLETE

    @property
    def error(self) -> ImgfsError | None:
        """Why generation failed, or None."""
        return self._error

    @property
    def closed(self) -> bool:
        """True once the temp file was closed (evicted or dropped)."""
        return self._fd_closed

    def read(self, offset: int, n: int, timeout: float | None = None, ahead: int = 0) -> bytes:
        """Return bytes ``[offset, offset + n)``, fewer only at EOF.

        Waits until the range is published; a published range never waits. Raises the
        producer's error (an ``ImgfsError``) if generation failed before publishing the range,
        and ``TimeoutError`` if ``timeout`` seconds pass first. ``ahead``: also ask the kernel
        to read up to that many published bytes after the range into its cache
        (``POSIX_FADV_WILLNEED``, no waiting), so that the reads which follow find them there.
        """
        if offset < 0 or n < 0:
            raise ValueError(f"snapshot of {self._key}: bad read ({offset}, {n})")
        end = min(offset + n, self._size)
        if end <= offset:
            return b""
        if end > self._published:
            self._wait_published(end, timeout)
        if self._fd_closed:
            raise ImgfsError(f"snapshot of {self._key} was read after it was released")
        if ahead > 0 and self._published > end:
            os.posix_fadvise(
                self._fd, end, min(ahead, self._published - end), os.POSIX_FADV_WILLNEED
            )
        return self._pread(offset, end - offset)

    def notify_when_published(
        self, end: int, wake: Callable[[], None]
    ) -> Callable[[], None] | None:
        """Arrange one call of ``wake()`` once bytes up to ``end`` are published, or generation
        failed or stopped; None (and no call) if that is so already. Returns a function that
        withdraws the request (call it when done waiting; harmless after the wake-up).

        ``wake`` runs in the producer's thread, outside every lock: it must be quick and never
        raise (the FUSE adapter hands it to its event loop). A woken waiter re-checks
        ``published`` and ``error`` itself: a wake-up is a hint, not a promise.
        """
        item = (min(end, self._size), wake)
        with self._cond:
            if self._published >= item[0] or self._state is not _State.GENERATING:
                return None
            self._waiters.append(item)

        def withdraw() -> None:
            with self._cond:
                if item in self._waiters:
                    self._waiters.remove(item)

        return withdraw

    def _take_waiters(self, upto: int | None) -> list[Callable[[], None]]:
        """The waiters (all, or those waiting for at most ``upto``) removed; under ``_cond``."""
        if not self._waiters:
            return []
        if upto is None:
            woken, self._waiters = self._waiters, []
        else:
            woken = [w for w in self._waiters if w[0] <= upto]
            self._waiters = [w for w in self._waiters if w[0] > upto]
        return [wake for _, wake in woken]

    def _wake_all(self) -> None:
        """Generation ended (any outcome): wake every waiter left."""
        with self._cond:
            woken = self._take_waiters(None)
        _call_all(woken)

    def _wait_published(self, end: int, timeout: float | None) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._published >= end or self._error is not None, timeout)
            if self._published >= end:
                return
            error = self._error
        if error is not None:
            raise _fresh_copy(error) from error
        raise TimeoutError(
            f"snapshot of {self._key}: bytes up to {end} not published within {timeout} s"
        )

    def _pread(self, offset: int, n: int) -> bytes:
        return read_exact(self._fd, n, offset, f"snapshot of {self._key}: temp file")

    def _publish(self, upto: int, written: int) -> None:
        if not 0 <= upto <= written:
            raise ValueError(f"snapshot of {self._key}: publish({upto}) with {written} written")
        with self._cond:
            if upto < self._published:
                raise ValueError(
                    f"snapshot of {self._key}: publish({upto}) below {self._published}"
                )
            if upto <= self._published:
                return
            self._published = upto
            self._cond.notify_all()
            woken = self._take_waiters(upto)
        _call_all(woken)

    def _fail(self, error: ImgfsError) -> None:
        """Fail a generating snapshot and wake its readers; the first failure wins."""
        with self._cond:
            if self._state is not _State.GENERATING:
                return
            self._error = error
            self._state = _State.FAILED
            self._cond.notify_all()
            woken = self._take_waiters(None)
        _call_all(woken)

    def _mark_complete(self) -> None:
        with self._cond:
            if self._state is _State.GENERATING:
                self._state = _State.COMPLETE


_HOLE_BLOCK = 64 << 10
_ZERO_BLOCK = bytes(_HOLE_BLOCK)


def _zero(block: memoryview) -> bool:
    """Whether a ``_HOLE_BLOCK``-sized block is all zeros (two byte probes first: cheap for
    data; a copy and memcmp, ~3 us, for blocks that may be zeros)."""
    return block[0] == 0 and block[-1] == 0 and block.tobytes() == _ZERO_BLOCK


class _SnapshotSink:
    """The ``Sink`` handed to a producer: appends with ``os.pwrite``, publishes on the snapshot."""

    __slots__ = ("_snap", "_written")

    def __init__(self, snap: Snapshot) -> None:
        self._snap = snap
        self._written = 0

    @property
    def cancelled(self) -> bool:
        return self._snap._cancelled

    @property
    def written(self) -> int:
        return self._written

    def write(self, data: bytes | memoryview) -> None:
        snap = self._snap
        if snap._cancelled:
            raise SnapshotCancelled(f"snapshot of {snap.key} was abandoned")
        view = memoryview(data).cast("B")
        if self._written + len(view) > snap.size:
            raise IntegrityError(
                f"generation of {snap.key} wrote past its size {snap.size} "
                f"({self._written} + {len(view)} bytes)"
            )
        while view:
            # Block-aligned all-zero blocks stay holes (the file was sized at creation).
            # One pwrite per 64 KiB block, even between holes: one 1 MiB pwrite into ext4 cost
            # 4x the CPU (1.1 GiB from one reused buffer: 1.0-1.2 s against 0.23 s; 128 KiB
            # the same as 64 KiB, 256 KiB 0.2-0.7 s; the daemon's write thread 0.74-1.77 s
            # against 0.31 s per cold 1 GiB cp; kernel 6.18, this machine's ext4).
            block = min(len(view), _HOLE_BLOCK - self._written % _HOLE_BLOCK)
            if block == _HOLE_BLOCK and _zero(view[:block]):
                self._written += block
                view = view[block:]
                continue
            done = os.pwrite(snap._fd, view[:block], self._written)
            self._written += done
            view = view[done:]

    def publish(self, upto: int) -> None:
        self._snap._publish(upto, self._written)


class _Gate:
    """A counting semaphore whose waiters give up once their snapshot is cancelled."""

    def __init__(self, slots: int) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._free = slots

    def enter(self, cancelled: Callable[[], bool]) -> bool:
        """Take a slot, waiting for one; False (and no slot) if ``cancelled()`` became true."""
        with self._cond:
            while not cancelled():
                if self._free > 0:
                    self._free -= 1
                    return True
                self._cond.wait()
            return False

    def leave(self) -> None:
        with self._cond:
            self._free += 1
            self._cond.notify_all()

    def wake(self) -> None:
        """Make waiters re-check their cancellation."""
        with self._cond:
            self._cond.notify_all()


@dataclass(frozen=True)
class SnapshotStats:
    """Counters since the cache was created, and its current byte use."""

    generations_started: int
    generations_completed: int
    generations_failed: int
    generations_cancelled: int
    evictions: int
    bytes_cached: int
    """Bytes of complete snapshots nobody holds, kept for reuse."""
    bytes_in_use: int
    """Bytes of snapshots somebody holds (generating or complete)."""
    snapshots: int
    """Snapshots in the table (cached, in use, or failed but still held)."""


@dataclass
class _Counters:
    started: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    evictions: int = 0


class SnapshotCache:
    """Layer blobs generated on first open into unlinked temp files in ``cache_dir``.

    ``max_bytes`` (default: 10 GiB or half the free space of ``cache_dir``'s filesystem,
    whichever is smaller) bounds held plus cached snapshots; held ones are never evicted.
    Every public method may be called from any thread.
    """

    def __init__(
        self, cache_dir: str, max_bytes: int | None = None, log: logging.Logger | None = None
    ) -> None:
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        self._dir = cache_dir
        self._log = log if log is not None else _default_log
        self._max = default_max_bytes(cache_dir) if max_bytes is None else max_bytes
        if self._max < 0:
            raise ValueError(f"max_bytes must not be negative: {self._max}")
        self._lock = threading.Lock()
        self._table: dict[str, Snapshot] = {}
        self._lru: OrderedDict[str, Snapshot] = OrderedDict()
        self._live: set[Snapshot] = set()
        self._charged = 0
        self._lru_bytes = 0
        self._counters = _Counters()
        self._gate = _Gate(MAX_CONCURRENT_GENERATIONS)
        self._use_tmpfile = hasattr(os, "O_TMPFILE")
        self._closed = False
        self._remove_leftovers()

    @property
    def cache_dir(self) -> str:
        return self._dir

    @property
    def max_bytes(self) -> int:
        return self._max

    def acquire(self, key: str, size: int, produce: Producer) -> Snapshot:
        """Return the snapshot of ``key``, held once more; start ``produce`` if there is none.

        A generating or cached snapshot is shared; so is a failed one while anybody still
        holds it (the next acquire after its last release starts afresh). Held snapshots may
        take the cache over its budget (logged); ``acquire_if_fits`` never does.
        """
        snap = self._acquire(key, size, produce, strict=False)
        assert snap is not None
        return snap

    def acquire_if_fits(self, key: str, size: int, produce: Producer) -> Snapshot | None:
        """``acquire``, or None when a new snapshot of ``size`` bytes would not fit the budget
        even with every unheld snapshot evicted (the caller serves the blob another way)."""
        return self._acquire(key, size, produce, strict=True)

    def _acquire(self, key: str, size: int, produce: Producer, strict: bool) -> Snapshot | None:
        if size < 0:
            raise ValueError(f"snapshot of {key}: negative size {size}")
        with self._lock:
            self._check_open()
            existing = self._hold_existing(key, size)
            if existing is None and strict and not self._fits(size):
                return None
        if existing is not None:
            return existing
        fd = self._new_temp_file()
        try:
            snap, created = self._register_or_share(key, size, fd, strict)
        except BaseException:
            os.close(fd)
            raise
        if snap is None or not created:
            os.close(fd)
            return snap
        try:
            os.ftruncate(fd, size)  # holes where the producer skips zero blocks
        except OSError as exc:
            self._log.warning("snapshot of %s: cannot size its file: %s", key, exc)
        self._start(snap, produce)
        return snap

    def _fits(self, size: int) -> bool:
        """Whether ``size`` more bytes fit with every unheld snapshot evicted (under the lock)."""
        return self._charged - self._lru_bytes + size <= self._max

    def release(self, snap: Snapshot) -> None:
        """Give back one hold of ``snap``; do not use it afterwards."""
        with self._lock:
            if snap._refs <= 0:
                raise ValueError(f"snapshot of {snap.key} released more often than acquired")
            snap._refs -= 1
            if snap._refs > 0:
                return
            evicted = self._unreferenced(snap)
            fds = self._take_fds([snap, *evicted])
        self._after_evictions(evicted, fds)

    def stats(self) -> SnapshotStats:
        with self._lock:
            c = self._counters
            return SnapshotStats(
                generations_started=c.started,
                generations_completed=c.completed,
                generations_failed=c.failed,
                generations_cancelled=c.cancelled,
                evictions=c.evictions,
                bytes_cached=self._lru_bytes,
                bytes_in_use=self._charged - self._lru_bytes,
                snapshots=len(self._table),
            )

    def close(self, timeout: float = CLOSE_JOIN_TIMEOUT) -> None:
        """Cancel every generation, wait up to ``timeout`` s for its thread, close the fds.

        Snapshots still held stay readable up to what they published; their fd is closed at
        their last release (closing it under a reader could hand it another file's bytes).
        """
        with self._lock:
            self._closed = True
            snaps = list(self._live)
            for snap in snaps:
                snap._cancelled = True
                if snap._attached:
                    self._detach(snap)
            threads = [s._thread for s in snaps if s._running and s._thread is not None]
        self._gate.wake()
        for snap in snaps:
            snap._fail(ImgfsError(f"snapshot cache closed while generating {snap.key}"))
        _join_all(threads, timeout)
        with self._lock:
            fds = self._take_fds(snaps)
            left = len(self._live)
        _close_fds(fds)
        if left:
            self._log.warning("snapshot cache closed with %d snapshot(s) still held", left)

    # -- bookkeeping under self._lock --------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ImgfsError(f"snapshot cache in {self._dir} is closed")

    def _hold_existing(self, key: str, size: int) -> Snapshot | None:
        snap = self._table.get(key)
        if snap is None:
            return None
        if snap.size != size:
            raise ValueError(f"snapshot of {key}: size {size} asked, {snap.size} known")
        snap._refs += 1
        if snap._refs == 1 and self._lru.pop(key, None) is not None:
            self._lru_bytes -= size
        return snap

    def _register_or_share(
        self, key: str, size: int, fd: int, strict: bool
    ) -> tuple[Snapshot | None, bool]:
        """Register a new snapshot on ``fd``, unless another thread made one meanwhile (or,
        ``strict``, it no longer fits: None)."""
        with self._lock:
            self._check_open()
            existing = self._hold_existing(key, size)
            if existing is not None:
                return existing, False
            if strict and not self._fits(size):
                return None, False
            snap, evicted, over = self._register(key, size, fd)
            fds = self._take_fds(evicted)
        self._after_evictions(evicted, fds)
        if over:
            self._log_over_budget()
        return snap, True

    def _register(self, key: str, size: int, fd: int) -> tuple[Snapshot, list[Snapshot], bool]:
        snap = Snapshot(key, size, fd)
        snap._refs = 1
        snap._attached = True
        snap._running = True
        self._table[key] = snap
        self._live.add(snap)
        self._charged += size
        self._counters.started += 1
        evicted = self._evict_over_budget()
        return snap, evicted, self._charged > self._max

    def _unreferenced(self, snap: Snapshot) -> list[Snapshot]:
        """``snap`` lost its last holder: cache it, drop it, or cancel its generation."""
        if not snap._attached:
            return []
        if snap._state is _State.FAILED:
            self._detach(snap)
            return []
        if snap._published == snap.size:
            self._lru[snap.key] = snap
            self._lru_bytes += snap.size
            return self._evict_over_budget()
        snap._cancelled = True
        self._detach(snap)
        self._gate.wake()
        return []

    def _evict_over_budget(self) -> list[Snapshot]:
        evicted: list[Snapshot] = []
        while self._charged > self._max and self._lru:
            _, snap = self._lru.popitem(last=False)
            self._lru_bytes -= snap.size
            self._detach(snap)
            self._counters.evictions += 1
            evicted.append(snap)
        return evicted

    def _detach(self, snap: Snapshot) -> None:
        """Remove ``snap`` from the table and the LRU; its fd lives on while needed."""
        if self._table.get(snap.key) is snap:
            del self._table[snap.key]
        if self._lru.get(snap.key) is snap:
            del self._lru[snap.key]
            self._lru_bytes -= snap.size
        if snap._attached:
            snap._attached = False
            self._charged -= snap.size

    def _take_fds(self, snaps: Iterable[Snapshot]) -> list[int]:
        """The fds of ``snaps`` that nobody needs any more (closed by the caller, unlocked)."""
        fds: list[int] = []
        for snap in snaps:
            if snap._refs or snap._attached or snap._running or snap._fd_closed:
                continue
            snap._fd_closed = True
            self._live.discard(snap)
            fds.append(snap._fd)
        return fds

    # -- generation --------------------------------------------------------------------------

    def _start(self, snap: Snapshot, produce: Producer) -> None:
        thread = threading.Thread(
            target=self._generate,
            args=(snap, produce),
            name=f"imgfs-snapshot {snap.key}",
            daemon=True,
        )
        snap._thread = thread
        try:
            thread.start()
        except RuntimeError as exc:
            error = CorruptStore(f"cannot start the generation of {snap.key}: {exc}")
            self._finish(snap, _Outcome.FAILED, error, 0.0)

    def _generate(self, snap: Snapshot, produce: Producer) -> None:
        if not self._gate.enter(lambda: snap._cancelled):
            self._finish(snap, _Outcome.CANCELLED, None, 0.0)
            return
        started = time.monotonic()
        outcome: _Outcome = _Outcome.FAILED
        error: ImgfsError | None = CorruptStore(f"generation of {snap.key} was interrupted")
        try:
            outcome, error = self._run_producer(snap, produce)
        finally:  # also on BaseException: readers must not wait forever
            self._gate.leave()
            self._finish(snap, outcome, error, time.monotonic() - started)

    def _run_producer(
        self, snap: Snapshot, produce: Producer
    ) -> tuple[_Outcome, ImgfsError | None]:
        error: ImgfsError | None = None
        try:
            produce(_SnapshotSink(snap))
        except ImgfsError as exc:
            error = exc
        except Exception as exc:
            error = self._wrap(snap, exc)
        if snap._cancelled:
            return _Outcome.CANCELLED, None
        if error is None and snap._published != snap.size:
            error = IntegrityError(
                f"generation of {snap.key} ended with {snap._published} of {snap.size} "
                "bytes published"
            )
        return (_Outcome.FAILED, error) if error is not None else (_Outcome.COMPLETED, None)

    def _wrap(self, snap: Snapshot, exc: Exception) -> ImgfsError:
        if isinstance(exc, OSError):
            error = CorruptStore(f"cannot generate {snap.key} into {self._dir}: {exc}")
        else:
            error = CorruptStore(
                f"generation of {snap.key} failed unexpectedly: {type(exc).__name__}: {exc}"
            )
            self._log.debug("generation of %s raised", snap.key, exc_info=exc)
        error.__cause__ = exc
        return error

    def _finish(
        self, snap: Snapshot, outcome: _Outcome, error: ImgfsError | None, elapsed: float
    ) -> None:
        with self._lock:  # so that ``complete`` or ``error`` imply the thread let go of the fd
            if error is not None:
                snap._fail(error)
            elif outcome is _Outcome.COMPLETED:
                snap._mark_complete()
            snap._running = False
            self._count(outcome)
            if outcome is _Outcome.FAILED and snap._attached and snap._refs == 0:
                self._detach(snap)
            fds = self._take_fds([snap])
        snap._wake_all()  # a cancelled generation wakes its (unlikely) waiters too
        _close_fds(fds)
        self._log_outcome(snap, outcome, error, elapsed)

    def _count(self, outcome: _Outcome) -> None:
        if outcome is _Outcome.COMPLETED:
            self._counters.completed += 1
        elif outcome is _Outcome.FAILED:
            self._counters.failed += 1
        else:
            self._counters.cancelled += 1

    # -- files and logging (never under self._lock) ------------------------------------------

    def _new_temp_file(self) -> int:
        try:
            return self._open_temp_file()
        except OSError as exc:
            raise ImgfsError(f"cannot create a snapshot file in {self._dir}: {exc}") from exc

    def _open_temp_file(self) -> int:
        if self._use_tmpfile:
            flags = os.O_TMPFILE | os.O_RDWR | os.O_EXCL | os.O_CLOEXEC
            try:
                return os.open(self._dir, flags, 0o600)
            except OSError as exc:
                if exc.errno not in _NO_TMPFILE_ERRNOS:
                    raise
                self._use_tmpfile = False
                self._log.info("no O_TMPFILE in %s: snapshots use named temp files", self._dir)
        fd, path = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self._dir)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # another instance's leftover sweep got there first
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _remove_leftovers(self) -> None:
        """Delete named temp files that a crashed run of the mkstemp fallback left behind."""
        removed = 0
        with os.scandir(self._dir) as entries:
            for entry in entries:
                if not entry.name.startswith(TEMP_PREFIX):
                    continue
                if not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                removed += 1
        if removed:
            self._log.info("removed %d stale snapshot file(s) from %s", removed, self._dir)

    def _after_evictions(self, evicted: list[Snapshot], fds: list[int]) -> None:
        _close_fds(fds)
        for snap in evicted:
            self._log.info("evicted %s (%d bytes)", snap.key, snap.size)

    def _log_over_budget(self) -> None:
        self._log.warning(
            "snapshot cache over budget: snapshots in use need more than %d bytes "
            "(in-use snapshots are never evicted)",
            self._max,
        )

    def _log_outcome(
        self, snap: Snapshot, outcome: _Outcome, error: ImgfsError | None, elapsed: float
    ) -> None:
        if outcome is _Outcome.COMPLETED:
            self._log.info("generated %s (%d bytes) in %.2f s", snap.key, snap.size, elapsed)
        elif outcome is _Outcome.FAILED:
            self._log.error("generation of %s failed: %s", snap.key, error)
        else:
            self._log.debug("generation of %s cancelled", snap.key)


def default_max_bytes(cache_dir: str) -> int:
    """10 GiB or half the free space of ``cache_dir``'s filesystem, whichever is smaller."""
    st = os.statvfs(cache_dir)
    return min(DEFAULT_MAX_BYTES, st.f_bavail * st.f_frsize // 2)


def _fresh_copy(error: ImgfsError) -> ImgfsError:
    """A copy of ``error`` to raise in one more thread (raising the original again would
    grow its shared traceback with every read)."""
    try:
        clone = copy.copy(error)
    except Exception:
        return CorruptStore(str(error))
    clone.__traceback__ = None
    return clone


def _join_all(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def _call_all(wakes: list[Callable[[], None]]) -> None:
    for wake in wakes:
        try:
            wake()
        except Exception:  # a waiter's bug must not stop the producer
            _default_log.exception("snapshot waiter's wake-up failed")


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
