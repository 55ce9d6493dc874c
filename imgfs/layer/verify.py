"""The one verifier: what a reader of a layer blob or of a layer's file may be served.

Owns: the verification state of one file — a layer blob (per-file CRC-64 and the whole blob's
sha256) or one member of a layer (its CRC-64) — shared by every reader of that file, and the
rule that follows from it:

- a file whose size, CRC-64 or digest check failed stays failed: every later read raises;
- the bytes that complete a file (its last byte) are returned only once the whole file passed
  its check, however the requests arrive — in order, out of order (kernel readahead), from the
  middle, or from a second reader whose earlier pages came from the kernel's page cache. When a
  request reaches the end of a file whose prefix is not checked yet, the verifier reads and
  checks that prefix itself first;
- a read that extends the checked prefix (or lands at most ``MAX_GAP_FILL`` bytes past it) is
  checked as it is served; any other read of the middle of a file is size-checked only.

Also owns ``read_exact``, the one exact-read loop of imgfs (a short read is an integrity error,
never padding). Must not know: where the bytes come from (a ``RangeSource`` gives them), the
store, caches, FUSE.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable, Hashable
from typing import Protocol

from fastcrc import crc64

from imgfs.errors import IntegrityError
from imgfs.layer.index import LayerIndex, SegmentExtent
from imgfs.lru import LRU

MAX_GAP_FILL = 16 << 20  # a gap this small is out-of-order readahead, not a seek
CHECK_CHUNK = 1 << 20  # how much the verifier reads at a time to check a prefix itself


def read_exact(fd: int, n: int, offset: int, what: str) -> bytes:
    """Exactly ``n`` bytes at ``offset`` of ``fd``; ``IntegrityError`` if the file is shorter."""
    data = os.pread(fd, n, offset)
    if len(data) == n:
        return data
    buf = bytearray(data)
    while len(buf) < n:
        more = os.pread(fd, n - len(buf), offset + len(buf))
        if not more:
            end = offset + len(buf)
            raise IntegrityError(f"{what} is shorter than its recorded size (ends at {end})")
        buf += more
    return bytes(buf)


class RangeSource(Protocol):
    """Raw, size-checked bytes of one file: ``read_raw`` returns exactly ``n`` bytes (the caller
    never asks past ``size``) or raises ``IntegrityError``. One per open handle."""

    @property
    def size(self) -> int: ...

    def read_raw(self, offset: int, n: int) -> bytes: ...


class Checker(Protocol):
    """A running check over a file's bytes, fed in order from offset 0."""

    def feed(self, pos: int, data: memoryview) -> None:
        """Bytes ``[pos, pos + len(data))``; raises ``IntegrityError`` on a completed part that
        fails (e.g. a file inside a blob whose CRC-64 does not match)."""
        ...

    def finish(self) -> None:
        """Every byte was fed; raise ``IntegrityError`` unless the whole file passes."""
        ...


class CrcChecker:
    """One file's CRC-64/GO-ISO as the tar-split records it. ``name``: the file inside ``what``
    (the label is only built when the check fails: generation makes one checker per file)."""

    __slots__ = ("_crc", "_expected", "_name", "_what")

    def __init__(self, expected: int | None, what: str, name: bytes | None = None) -> None:
        self._expected = expected
        self._what = what
        self._name = name
        self._crc: int | None = None

    def feed(self, pos: int, data: memoryview) -> None:
        self._crc = crc64.go_iso(data, self._crc)

    def finish(self) -> None:
        if self._crc != self._expected:
            got = self._crc or 0
            what = self._what if self._name is None else f"{self._what}: file {self._name!r:.200}"
            raise IntegrityError(
                f"{what} fails its CRC-64 (got {got:016x}, "
                f"tar-split records {self._expected or 0:016x})"
            )


class DigestChecker:
    """A whole blob's sha256 (the hex of its name), or one file's (``label``: what the
    digest is, in the error).

    ``behind``: hash in a helper thread (``_HashBehind``), so that the caller reads on while
    the bytes are hashed; ``feed`` must then be given bytes that never change (the verifier's
    ``read_raw`` results), and ``finish`` waits for the hash of everything fed.
    """

    def __init__(
        self, digest_hex: str, what: str, label: str = "blob digest", behind: bool = False
    ) -> None:
        self._digest_hex = digest_hex
        self._what = what
        self._label = label
        self._hash: _HashBehind | hashlib._Hash = _HashBehind() if behind else hashlib.sha256()

    def feed(self, pos: int, data: memoryview) -> None:
        self._hash.update(data)

    def finish(self) -> None:
        got = self._hash.hexdigest()
        if got != self._digest_hex:
            raise IntegrityError(
                f"{self._what}: {self._label} sha256:{got} does not match sha256:{self._digest_hex}"
            )


HASH_BEHIND = 8 << 20  # bytes fed to a _HashBehind and not hashed yet, at most (2 windows)


class _HashBehind:
    """A sha256 computed in a helper thread (``imgfs-hash-behind``), in the order fed.

    ``update`` queues the bytes (waiting while HASH_BEHIND bytes are queued) and starts the
    thread if none runs; the thread exits once the queue is empty, so an abandoned hash leaves
    no thread behind. ``hexdigest`` waits until everything queued is hashed. sha256 releases
    the GIL for large buffers: the hashing overlaps the caller's reads.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[memoryview] = deque()
        self._queued = 0
        self._running = False

    def update(self, data: memoryview) -> None:
        with self._cond:
            while self._queued >= HASH_BEHIND:
                self._cond.wait()
            self._queue.append(data)
            self._queued += len(data)
            if self._running:
                return
            self._running = True
        try:
            threading.Thread(target=self._run, name="imgfs-hash-behind", daemon=True).start()
        except Exception:  # no thread to be had (the process's limit): hash here, go on
            self._run()  # (raising now would make the caller feed these bytes twice)
        except BaseException:
            self._run()  # nothing left queued and not running: ``hexdigest`` cannot hang
            raise

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._running = False
                    self._cond.notify_all()
                    return
                data = self._queue.popleft()
            try:
                self._hash.update(data)
            finally:
                with self._cond:
                    self._queued -= len(data)
                    self._cond.notify_all()

    def hexdigest(self) -> str:
        with self._cond:
            while self._running:
                self._cond.wait()
        return self._hash.hexdigest()


class Verifier:
    """The verification state of one file, shared by all its readers; thread-safe.

    ``read(source, offset, n)`` returns up to ``n`` bytes (fewer only at the end of the file),
    under the rule of this module. ``failure`` is why the file failed, or None.
    """

    def __init__(self, size: int, checker: Callable[[], Checker], what: str) -> None:
        self.size = size
        self.what = what
        self._new_checker = checker
        self._checker: Checker | None = None
        self._checked = 0
        self._passed = size == 0
        self._failure: str | None = None
        self._lock = threading.Lock()
        self.on_fail: Callable[[str], None] | None = None  # set by the Verifiers registry

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def passed(self) -> bool:
        return self._passed

    def fail(self, reason: str) -> None:
        """Mark the file failed (a check elsewhere, e.g. snapshot generation, found it bad)."""
        with self._lock:
            if self._failure is None:
                self._failure = reason
        self._report(reason)

    def _report(self, reason: str) -> None:
        if self.on_fail is not None:
            self.on_fail(reason)

    def read(self, source: RangeSource, offset: int, n: int, wait: bool = True) -> bytes:
        """``wait=False``: raise ``BlockingIOError`` instead of waiting for another reader
        of the file (an inline read: that reader may wait for the disk or a store lock)."""
        if offset < 0 or n < 0:
            raise ValueError("offset and n must not be negative")
        end = min(offset + n, self.size)
        if offset >= end:
            self._raise_if_failed()
            return b""
        if self._passed:
            return source.read_raw(offset, end - offset)
        if not self._lock.acquire(blocking=wait):
            raise BlockingIOError(f"{self.what}: being checked by another reader")
        try:
            self._raise_if_failed()
            try:
                return self._read_locked(source, offset, end)
            except IntegrityError as exc:
                self._failure = str(exc)
                failed = exc
        finally:
            self._lock.release()
        self._report(str(failed))
        raise failed

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise IntegrityError(self._failure)

    def _read_locked(self, source: RangeSource, offset: int, end: int) -> bytes:
        if self._passed:
            return source.read_raw(offset, end - offset)
        if offset > self._checked and (end == self.size or offset - self._checked <= MAX_GAP_FILL):
            self._check_upto(source, offset)  # readahead out of order, or a read of the end
        if offset <= self._checked < end:
            data = source.read_raw(offset, end - offset)
            self._feed(offset, data)
            return data
        return source.read_raw(offset, end - offset)  # the middle, away from the check

    def _check_upto(self, source: RangeSource, upto: int) -> None:
        """Read and check ``[checked, upto)`` ourselves."""
        while self._checked < upto:
            pos = self._checked
            self._feed(pos, source.read_raw(pos, min(CHECK_CHUNK, upto - pos)))

    def _feed(self, offset: int, data: bytes) -> None:
        """Feed the part of ``data`` (at ``offset``) past the checked prefix; finish at EOF."""
        new = memoryview(data)[self._checked - offset :]
        if not new:
            return
        if self._checker is None:
            self._checker = self._new_checker()
        self._checker.feed(self._checked, new)
        self._checked += len(new)
        if self._checked == self.size:
            self._checker.finish()
            self._passed = True
            self._checker = None


class BlobChecker:
    """A layer blob: each layer file's CRC-64 as it completes, and the blob's sha256 at the end."""

    def __init__(self, index: LayerIndex, digest_hex: str, what: str) -> None:
        self._index = index
        self._what = what
        # Fed the verifier's read_raw bytes (immutable): hashed behind, while reading goes on;
        # ``finish`` (the read that completes the blob) waits for the digest.
        self._digest = DigestChecker(digest_hex, what, behind=True)
        self._crc: CrcChecker | None = None  # of the file being fed

    def feed(self, pos: int, data: memoryview) -> None:
        self._digest.feed(pos, data)
        base, end = pos, pos + len(data)
        while pos < end:
            ext = self._index.extent_at(pos)
            if isinstance(ext, SegmentExtent):
                pos = min(end, ext.start + ext.length)
                continue
            stop = min(end, ext.start + ext.size)
            if pos == ext.start or self._crc is None:
                self._crc = CrcChecker(ext.crc, self._what, ext.name)
            self._crc.feed(pos - ext.start, data[pos - base : stop - base])
            if stop == ext.start + ext.size:
                self._crc.finish()
            pos = stop

    def finish(self) -> None:
        self._digest.finish()


def blob_verifier(index: LayerIndex, digest_hex: str, what: str) -> Verifier:
    """The verifier of a layer blob read through ``index``."""
    return Verifier(index.size, lambda: BlobChecker(index, digest_hex, what), what)


def member_verifier(size: int, crc: int | None, what: str, sha256: str | None = None) -> Verifier:
    """The verifier of one layer member of ``size`` bytes with tar-split CRC ``crc``, or (a
    layer known only by its TOC) the content's ``sha256`` hex the TOC records."""
    if sha256 is not None:
        return Verifier(size, lambda: DigestChecker(sha256, what, "content digest"), what)
    return Verifier(size, lambda: CrcChecker(crc, what), what)


class ClosableRange(RangeSource, Protocol):
    def close(self) -> None: ...


class VerifiedReader:
    """What one open handle reads: its own ``RangeSource`` checked by the file's shared
    ``Verifier``, ``identity`` in ``verifiers`` (made by ``make`` if none is live), found at the
    first read: an open whose reads the kernel serves from its page cache needs none.
    ``read(offset, n)`` returns up to ``n`` bytes (fewer only at EOF)."""

    __slots__ = ("_identity", "_lock", "_make", "_source", "_verifier", "_verifiers")

    def __init__(
        self,
        source: ClosableRange,
        verifiers: Verifiers,
        identity: Hashable,
        make: Callable[[], Verifier],
    ) -> None:
        self._source = source
        self._verifiers = verifiers
        self._identity = identity
        self._make = make
        self._verifier: Verifier | None = None
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._source.size

    @property
    def verifier(self) -> Verifier:
        found = self._verifier
        if found is None:
            found = self._verifier = self._verifiers.get(self._identity, self._make)
        return found

    def read(self, offset: int, n: int, wait: bool = True) -> bytes:
        """``wait=False``: ``BlockingIOError`` rather than wait for a lock (``Verifier.read``)."""
        if not self._lock.acquire(blocking=wait):
            raise BlockingIOError("read by another request")  # (caught: no message)
        try:
            return self.verifier.read(self._source, offset, n, wait)
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            self._source.close()


# About 1.1 KiB each (measured with tracemalloc): the registry stays within ~5 MiB, failures
# within ~10 MiB. A forgotten pass costs a re-check of that file, nothing more.
MAX_VERIFIERS = 4_096
MAX_FAILURES = 16_384


class Verifiers:
    """The verifiers of the files being read, by file identity; thread-safe.

    A verifier lives while it is recently used (``MAX_VERIFIERS``); a failure is remembered on
    its own (``MAX_FAILURES``), so a failed file stays failed when its verifier is evicted. A
    forgotten pass only costs a re-check; a forgotten failure at most a re-check that fails.
    """

    def __init__(self) -> None:
        self._live: LRU[Hashable, Verifier] = LRU(MAX_VERIFIERS)
        self._failures: LRU[Hashable, str] = LRU(MAX_FAILURES)
        self._lock = threading.Lock()

    def get(self, identity: Hashable, make: Callable[[], Verifier]) -> Verifier:
        with self._lock:
            found = self._live.get(identity)
            if found is None:
                found = make()
                failure = self._failures.get(identity)
                if failure is not None:
                    found.fail(failure)
                found.on_fail = functools.partial(self._remember_failure, identity)
                self._live.put(identity, found)
            return found

    def _remember_failure(self, identity: Hashable, reason: str) -> None:
        self._failures.put(identity, reason)

    def fail(self, identity: Hashable, reason: str) -> None:
        """Record that the file ``identity`` failed a check made elsewhere (a snapshot)."""
        self._failures.put(identity, reason)
        found = self._live.get(identity)
        if found is not None:
            found.fail(reason)

    def failure(self, identity: Hashable) -> str | None:
        return self._failures.get(identity)
