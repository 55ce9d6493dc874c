"""Layer blob bytes from tar-split entries and layer files, verified before they are served.

Owns: the reassembly rule (storage-format.md §6.2), per-file CRC-64 and whole-stream sha256
checks, the publish-lag rule of snapshot generation (DESIGN.md §2: no byte is published before
the check that covers it, the last byte not before the digest), random-access reads for
``--direct`` and the library's blob file object. Must not know: where entries or files come
from, temp files, caches, the store layout, FUSE.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol, cast, runtime_checkable

from imgfs.digest import check_digest
from imgfs.errors import IntegrityError, OutOfResources
from imgfs.layer import compiled
from imgfs.layer.index import FileExtent, LayerIndex, SegmentExtent, close_iterable
from imgfs.layer.tarsplit import FileEntry, Segment
from imgfs.layer.verify import CrcChecker, DigestChecker, Verifier, blob_verifier, read_exact

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

READ_CHUNK = 1 << 20
PUBLISH_STEP = 256 << 10
_MAX_OPEN_FDS = 16
_EXT = compiled.extension()
# The compiled copy loop (_fastparse.copy_entries), or None: the Python code of _Generator.
_COPY_ENTRIES: (
    Callable[
        [bytearray, int, list[tuple[Segment | FileEntry, int | Exception | None]], int, int, int],
        tuple[int, int, bool],
    ]
    | None
) = None if _EXT is None else _EXT.copy_entries


class FileOpener(Protocol):
    """How assembly reaches a layer's content files (tar-split's FileGetter): the store's
    FileOpener, or an in-memory fake in tests."""

    def open(self, name: bytes, size: int) -> int:
        """A read-only fd of the regular file ``name`` holding exactly ``size`` bytes."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class BatchOpener(Protocol):
    """A FileOpener that opens several files in one call for less than several calls cost (a
    rootless store's user-namespace helper: one round trip instead of one per file; the
    store's LayerFiles: one compiled call instead of Python per file)."""

    def open(self, name: bytes, size: int) -> int: ...

    def close(self) -> None: ...

    def open_many(
        self, items: Sequence[tuple[bytes, int]], advise: int = 0
    ) -> list[int | Exception | None]:
        """For each ``(name, size)``: its fd (as ``open`` returns it), the error ``open`` would
        raise for it, or None (``open`` it at its turn); the caller closes the fds. Each fd
        returned has had its first ``min(size, advise)`` bytes asked of the disk
        (``POSIX_FADV_WILLNEED``)."""
        ...


PREFETCH = 64  # files opened ahead in one batch (one open_many call) during generation
AHEAD_BATCHES = 2  # batches opened ahead of the one being copied
READAHEAD = 16 << 20  # bytes of each file asked of the disk ahead of the copy (WILLNEED)
READAHEAD_STEP = 8 << 20  # a big file's read-ahead window moves on in steps of this
AHEAD_BYTES = 64 << 20  # a batch ends once its files' first READAHEAD bytes add up to this
AHEAD_SEGMENT_BYTES = 1 << 20  # ... or its segments' bytes (held in memory) add up to this


class Sink(Protocol):
    """Where ``generate`` writes. ``data`` is only valid during ``write`` (a reused buffer)."""

    def write(self, data: bytes | memoryview) -> None: ...

    def publish(self, upto: int) -> None:
        """Bytes ``[0, upto)`` are verified enough to serve; ``upto`` never decreases."""
        ...


def _sha256_hex(expected_digest: str, what: str) -> str:
    return check_digest(expected_digest, what).removeprefix("sha256:")


def generate(
    entries: Iterable[Segment | FileEntry],
    files: FileOpener,
    sink: Sink,
    expected_digest: str,
    expected_size: int,
    what: str,
) -> None:
    """Write the whole blob to ``sink``, publishing each byte only once it is verified.

    Raises ``IntegrityError`` (naming the layer and file) on a size, CRC or digest mismatch,
    plus whatever ``files.open`` raises; nothing unverified has been published by then.
    ``entries`` is closed (if it has ``close``) before this returns or raises. ``sink.write``
    and ``sink.publish`` are called, in order, from one helper thread (then this one, for the
    last byte) so that writing overlaps reading and hashing.
    """
    digest_hex = _sha256_hex(expected_digest, what)
    pipe = _Pipeline(sink, DigestChecker(digest_hex, what))
    ahead = _OpenedAhead(entries, files)
    try:
        gen = _Generator(files, pipe, expected_size, what)
        for batch in ahead.batches():
            gen.run(batch)
        gen.finish(sink)
    finally:
        ahead.close()  # joins its thread: nothing iterates ``entries`` any more
        close_iterable(entries)
        pipe.close()


_Opened = int | Exception | None  # a file's fd opened ahead, the error of opening it, or None


class _OpenedAhead:
    """The entries, each file with its fd opened ahead by a helper thread (``imgfs-open-ahead``).

    The thread decodes the entries, opens the next PREFETCH files (in one ``open_many`` call for
    a ``BatchOpener``), asks the disk for each file's first READAHEAD bytes
    (``POSIX_FADV_WILLNEED``: a cold store is read with many requests in flight instead of one
    at a time) and keeps up to AHEAD_BATCHES such batches ready. Errors are handed out in tar
    order: an open's error with its file (the thread opens nothing past it), the entries'
    own error after the entries before it. Out of descriptors (EMFILE), the thread opens
    nothing more: every later file is opened at its turn, as without it. ``close`` stops and
    joins the thread and closes the fds not handed out; only then may ``entries`` be closed.
    """

    def __init__(self, entries: Iterable[Segment | FileEntry], files: FileOpener) -> None:
        self._entries = iter(entries)
        self._files = files
        self._cond = threading.Condition(threading.Lock())
        self._ready: deque[deque[tuple[Segment | FileEntry, _Opened]]] = deque()
        self._current: deque[tuple[Segment | FileEntry, _Opened]] = deque()
        self._error: BaseException | None = None
        self._done = False  # the thread delivers nothing more
        self._stop = False
        self._exhausted = False  # out of descriptors once: every later file opens at its turn
        self._batch = isinstance(files, BatchOpener)  # (a protocol check costs microseconds)
        self._thread: threading.Thread | None = None

    def __iter__(self) -> Iterator[tuple[Segment | FileEntry, _Opened]]:
        for batch in self.batches():
            while batch:
                yield batch.popleft()

    def batches(self) -> Iterator[deque[tuple[Segment | FileEntry, _Opened]]]:
        """The batches in order; the consumer pops a pair off the batch to own its fd (the
        pairs left in it are closed by ``close``), and takes the next batch once it is empty."""
        if self._thread is None:
            thread = threading.Thread(target=self._run, name="imgfs-open-ahead", daemon=True)
            thread.start()  # (a thread that never started is not joined by ``close``)
            self._thread = thread
        while True:
            if self._current:
                yield self._current
                if self._current:
                    raise RuntimeError("_OpenedAhead: a batch was not consumed")
            with self._cond:
                while not self._ready and not self._done:
                    self._cond.wait()
                if not self._ready:
                    if self._error is not None:
                        raise self._error
                    return
                self._current = self._ready.popleft()
                self._cond.notify_all()

    def _run(self) -> None:
        try:
            more = True
            while more:
                batch, more = self._fill()
                with self._cond:
                    while len(self._ready) >= AHEAD_BATCHES and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        _close_opened(batch)
                        return
                    if batch:
                        self._ready.append(batch)
                        self._cond.notify_all()
        except BaseException as exc:  # handed to the consumer after what came before it
            with self._cond:
                self._error = exc
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _fill(self) -> tuple[deque[tuple[Segment | FileEntry, _Opened]], bool]:
        """The next batch (opened, read-ahead asked) and whether to go on after it."""
        batch: list[Segment | FileEntry] = []
        wanted: list[FileEntry] = []
        ahead = held = 0
        failed: BaseException | None = None
        try:
            for entry in self._entries:
                batch.append(entry)
                if isinstance(entry, Segment):
                    held += len(entry.payload)
                    if held >= AHEAD_SEGMENT_BYTES:
                        break
                elif entry.size:
                    wanted.append(entry)
                    ahead += min(entry.size, READAHEAD)
                    if len(wanted) == PREFETCH or ahead >= AHEAD_BYTES:
                        break
                if len(batch) >= 4 * PREFETCH:
                    break
            else:
                if not batch:
                    return deque(), False
        except BaseException as exc:  # the entries' own error: after the entries before it
            failed = exc
        opened = self._open(wanted)
        out: deque[tuple[Segment | FileEntry, _Opened]] = deque()
        handed = iter(opened)
        for entry in batch:
            wants = type(entry) is FileEntry and entry.size
            out.append((entry, next(handed) if wants else None))
        if failed is not None:
            with self._cond:
                self._error = failed
            return out, False
        return out, bool(batch) and not any(isinstance(o, Exception) for o in opened)

    def _open(self, wanted: list[FileEntry]) -> list[_Opened]:
        if self._exhausted:
            return [None] * len(wanted)
        if not wanted:
            return []
        files = self._files
        advised = self._batch
        if advised:
            opened = cast(BatchOpener, files).open_many(
                [(e.name, e.size) for e in wanted], READAHEAD
            )
        else:
            opened = []
            for entry in wanted:
                try:
                    opened.append(files.open(entry.name, entry.size))
                except Exception as exc:  # raised at its file's turn; nothing opened past it
                    opened.append(exc)
                    break
            opened += [None] * (len(wanted) - len(opened))
        for k, fd in enumerate(opened):
            if isinstance(fd, Exception) and out_of_descriptors(fd):
                self._exhausted = True
                opened[k] = None  # not the file's fault: opened at its turn, fds freed by then
        if not advised:
            for entry, fd in zip(wanted, opened, strict=True):
                if isinstance(fd, int):
                    will_need(fd, 0, min(entry.size, READAHEAD))
        return opened

    def close(self) -> None:
        """Stop the thread (after the batch it is opening), close every fd not handed out."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        _close_opened(self._current)
        while self._ready:
            _close_opened(self._ready.popleft())


def out_of_descriptors(exc: BaseException) -> bool:
    """``exc`` (or what caused it) says the process has no descriptor left (EMFILE, ENFILE):
    opening ahead then must stop, not fail the file it was opening."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OutOfResources) or (
            isinstance(seen, OSError) and seen.errno in (errno.EMFILE, errno.ENFILE)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _close_opened(batch: Iterable[tuple[Segment | FileEntry, _Opened]]) -> None:
    for _, opened in batch:
        if isinstance(opened, int):
            os.close(opened)


def will_need(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to read ``[offset, offset + length)`` of ``fd`` ahead (a hint)."""
    with contextlib.suppress(OSError):  # not a regular file (a test's pipe): a hint only
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


_BUFFERS = 8  # staging buffers of READ_CHUNK bytes in flight between reading and writing


class _Pipeline:
    """Two stage threads: hashing and writing overlap reading (and CRC-checking) the next buffers.

    The producer fills a buffer from ``take``, then ``submit``s it with a publish mark; the
    hasher feeds it to the blob's ``DigestChecker`` (sha256 releases the GIL, so it runs beside
    the reader), the writer
    writes it, publishes the mark and recycles the buffer. A stage error (ENOSPC, a cancelled
    snapshot) is re-raised by the producer's next ``take``/``submit``/``drain``.
    """

    def __init__(self, sink: Sink, digest: DigestChecker) -> None:
        self._sink = sink
        self.digest = digest  # check it (``finish``) only after ``drain``
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(_BUFFERS):
            self._free.put(bytearray(READ_CHUNK))
        self._to_hash: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._to_write: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def take(self) -> bytearray:
        buf = self._free.get()
        self._check()
        return buf

    def submit(self, buf: bytearray, length: int, publish: int) -> None:
        """Hash and write ``buf[:length]``, then publish ``publish`` (unless it is negative)."""
        self._check()
        if not self._threads:
            for target, name in ((self._hash_stage, "hash"), (self._write_stage, "write")):
                thread = threading.Thread(target=target, name=f"imgfs-{name}", daemon=True)
                thread.start()
                self._threads.append(thread)
        self._to_hash.put((buf, length, publish))

    def _hash_stage(self) -> None:
        while True:
            job = self._to_hash.get()
            buf, length, _ = job
            if buf is not None and length and self._error is None:
                self.digest.feed(0, memoryview(buf)[:length])
            self._to_write.put(job)
            if buf is None:
                return

    def _write_stage(self) -> None:
        while True:
            buf, length, publish = self._to_write.get()
            if buf is None:
                return
            try:
                if self._error is None:
                    if length:
                        self._sink.write(memoryview(buf)[:length])
                    if publish >= 0:
                        self._sink.publish(publish)
            except BaseException as exc:  # handed to the producer
                self._error = exc
            finally:
                self._free.put(buf)

    def drain(self) -> None:
        """Wait until everything submitted is hashed, written and published; raise an error."""
        self.close()
        self._check()

    def close(self) -> None:
        """Stop the stage threads after what was submitted (idempotent; never raises)."""
        threads, self._threads = self._threads, []
        if threads:
            self._to_hash.put((None, 0, -1))
            for thread in threads:
                thread.join()


_Job = tuple[bytearray | None, int, int]


class _Generator:
    """State of one sequential generation: a staging buffer, hash, verified and published marks.

    Every byte goes through the staging buffer (file content is read straight into it, by the
    compiled ``copy_entries`` for runs of small files when the extension is built), which is
    hashed and submitted to the pipeline when full. ``_verified`` is how far the bytes passed
    their checks: segments at once, file content up to its last byte until the CRC matches.
    """

    def __init__(self, files: FileOpener, pipe: _Pipeline, expected_size: int, what: str) -> None:
        self._files = files
        self._pipe = pipe
        self._expected_size = expected_size
        self._what = what
        self._buf = pipe.take()
        self._fill = 0
        self._written = 0
        self._verified = 0
        self._published = 0

    def _too_long(self) -> IntegrityError:
        return IntegrityError(
            f"{self._what}: blob is longer than its recorded size {self._expected_size}"
        )

    def _room(self) -> memoryview:
        """The free part of the staging buffer (submitting it first if it is full)."""
        if self._fill == len(self._buf):
            self._submit()
        return memoryview(self._buf)[self._fill :]

    def _submit(self) -> None:
        mark = min(self._verified, self._expected_size - 1)
        publish = mark if mark > self._published else -1
        self._pipe.submit(self._buf, self._fill, publish)
        self._published = max(self._published, mark)
        self._buf = self._pipe.take()
        self._fill = 0

    def run(self, batch: deque[tuple[Segment | FileEntry, _Opened]]) -> None:
        """Copy a batch of pairs (taking them off ``batch``: their fds are then this one's).

        With the extension, runs of pairs go through one ``copy_entries`` call each (the GIL
        released while it reads, copies and CRC-checks them), which stops after the pair that
        fills PUBLISH_STEP bytes (the buffer is handed over, as ``_submit_early`` does) or
        before a pair it does not complete cleanly: that one is copied here (``segment``,
        ``file``), from its start, and raises whatever it raises.
        """
        items = list(batch)
        batch.clear()
        fast = _COPY_ENTRIES
        i = 0
        try:
            while i < len(items):
                if fast is not None:
                    limit = self._expected_size - self._written
                    i, fill, slow = fast(self._buf, self._fill, items, i, limit, PUBLISH_STEP)
                    self._written += fill - self._fill
                    self._fill = fill
                    self._verified = self._written  # every file copied passed its CRC
                    self._submit_early()
                    if not slow:
                        continue
                entry, opened = items[i]
                i += 1  # its fd is now ``file``'s
                if type(entry) is Segment:
                    self.segment(entry.payload)
                else:
                    assert isinstance(entry, FileEntry)
                    if entry.size:
                        self.file(entry, opened)
        finally:
            _close_opened(items[i:])

    def segment(self, payload: bytes) -> None:
        if self._written + len(payload) > self._expected_size:
            raise self._too_long()
        view = memoryview(payload)
        while view:
            room = self._room()
            n = min(len(room), len(view))
            room[:n] = view[:n]
            self._fill += n
            view = view[n:]
        self._written += len(payload)
        self._verified = self._written
        self._submit_early()

    def file(self, entry: FileEntry, opened: _Opened = None) -> None:
        """Copy one member's content; ``opened``: its fd (or error) opened ahead, else None."""
        if isinstance(opened, Exception):
            raise opened
        assert entry.crc is not None
        if self._written + entry.size > self._expected_size:
            if opened is not None:
                os.close(opened)
            raise self._too_long()
        fd = self._files.open(entry.name, entry.size) if opened is None else opened
        checker = CrcChecker(int.from_bytes(entry.crc, "big"), self._what, entry.name)
        try:
            self._copy(fd, entry, checker)
        finally:
            os.close(fd)
        checker.finish()
        self._verified = self._written
        self._submit_early()

    def _submit_early(self) -> None:
        """Between members: hand over a staging buffer once PUBLISH_STEP bytes wait in it, so
        readers of a layer of small files need not wait for a whole READ_CHUNK."""
        if self._fill >= PUBLISH_STEP:
            self._submit()

    def _file_what(self, entry: FileEntry) -> str:
        return f"{self._what}: file {entry.name!r:.200}"

    def _copy(self, fd: int, entry: FileEntry, checker: CrcChecker) -> None:
        remaining = entry.size
        advised = READAHEAD  # the open asked for the first READAHEAD bytes
        while remaining:
            if entry.size - remaining + READAHEAD - READAHEAD_STEP >= advised < entry.size:
                will_need(fd, advised, READAHEAD_STEP)  # keep a big file's window ahead
                advised += READAHEAD_STEP
            room = self._room()
            n = os.readv(fd, [room[: min(remaining, len(room))]])
            if n == 0:
                raise IntegrityError(
                    f"{self._file_what(entry)} is shorter than its recorded {entry.size} bytes"
                )
            checker.feed(entry.size - remaining, room[:n])
            self._fill += n
            self._written += n
            remaining -= n
            if remaining:  # all but the file's last byte may be served before its CRC check
                self._verified = self._written
            else:
                self._verified = self._written - 1
        if os.read(fd, 1):
            raise IntegrityError(
                f"{self._file_what(entry)} is longer than its recorded {entry.size} bytes"
            )

    def finish(self, sink: Sink) -> None:
        """Submit the rest, check size and digest, then publish the last bytes."""
        if self._written != self._expected_size:
            raise IntegrityError(
                f"{self._what}: blob has {self._written} bytes, expected {self._expected_size}"
            )
        self._submit()  # all but the last byte
        self._pipe.drain()
        self._pipe.digest.finish()
        if self._written > self._published:
            sink.publish(self._written)
            self._published = self._written


class LayerReader:
    """Random-access reads of one layer blob through its offset index (``--direct``, library).

    ``read_raw`` serves exact, size-checked bytes (a short file raises ``IntegrityError``, never
    padding); ``read`` serves them through the blob's ``Verifier`` (``imgfs.layer.verify``),
    shared by every reader of the blob when the caller passes one: the blob's last bytes only
    once its sha256 and every file's CRC-64 passed, whatever order the reads come in.

    Thread-safety: ``read`` and ``close`` take a per-reader lock (the fd cache is per reader).
    """

    def __init__(
        self,
        index: LayerIndex,
        files: FileOpener,
        expected_digest: str,
        what: str,
        *,
        verifier: Verifier | None = None,
        close_files: bool = False,
    ) -> None:
        self._index = index
        self._files = files
        self._what = what
        self.verifier = verifier or blob_verifier(index, _sha256_hex(expected_digest, what), what)
        self._close_files = close_files
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def size(self) -> int:
        """Blob size in bytes."""
        return self._index.size

    def read(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` bytes from ``offset``, fewer only at EOF (``b""`` at or past it)."""
        with self._lock:
            if self._closed:
                raise ValueError(f"{self._what}: reader is closed")
            return self.verifier.read(self, offset, n)

    def read_raw(self, offset: int, n: int) -> bytes:
        """Bytes ``[offset, offset + n)`` (within the blob), size-checked only.

        A range over several files opens the next of them (up to PREFETCH at a time) and asks
        the disk for their bytes at once (``POSIX_FADV_WILLNEED``) before reading the first: a
        cold store is read with many requests in flight. An error opening one of them is
        raised when the read reaches that file, as if it had been opened then.
        """
        parts: list[bytes] = []
        pos, end = offset, offset + n
        ahead: dict[int, _Opened] = {}  # data file number -> its fd opened ahead (or error)
        try:
            while pos < end:
                ext = self._index.extent_at(pos)
                if isinstance(ext, SegmentExtent):
                    take = min(end, ext.start + ext.length) - pos
                    parts.append(self._index.read_segment(ext.seg_pos + pos - ext.start, take))
                else:
                    take = min(end, ext.start + ext.size) - pos
                    if ext.index not in self._fds and not ahead and ext.start + ext.size < end:
                        self._open_ahead(ext.index, end, ahead)
                    fd = self._fd(ext, ahead.pop(ext.index, None))
                    what = f"{self._what}: file {ext.name!r:.200}"
                    parts.append(read_exact(fd, take, pos - ext.start, what))
                pos += take
        finally:
            for opened in ahead.values():  # not reached (an error stopped the read)
                if isinstance(opened, int):
                    os.close(opened)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _open_ahead(self, first: int, end: int, ahead: dict[int, _Opened]) -> None:
        """Open data files ``first``, ``first + 1``, ... that start before ``end`` (at most
        PREFETCH, none already cached) and ask for their first READAHEAD bytes."""
        last = min(self._index.data_file_count, first + PREFETCH)
        for k in range(first, last):
            ext = self._index.file(k)
            if ext.start >= end:
                break
            if k in self._fds:
                continue
            try:
                fd = self._files.open(ext.name, ext.size)
            except Exception as exc:  # raised when the read reaches this file
                if not out_of_descriptors(exc):  # (else it is opened then, fds freed by then)
                    ahead[k] = exc
                break
            ahead[k] = fd
            will_need(fd, 0, min(ext.size, READAHEAD))

    def _fd(self, ext: FileExtent, opened: _Opened = None) -> int:
        """The cached fd of ``ext``'s file; else ``opened`` (an fd or error opened ahead) or a
        new open, then cached."""
        if isinstance(opened, Exception):
            raise opened
        fd = self._fds.get(ext.index)
        if fd is not None:
            if opened is not None:
                os.close(opened)
            self._fds.move_to_end(ext.index)
            return fd
        fd = self._files.open(ext.name, ext.size) if opened is None else opened
        self._fds[ext.index] = fd
        while len(self._fds) > _MAX_OPEN_FDS:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        """Close cached file fds (and the FileOpener if ``close_files``); idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            fds, self._fds = self._fds, OrderedDict()
            for fd in fds.values():
                os.close(fd)
            if self._close_files:
                self._files.close()


class BlobFile(io.RawIOBase):
    """A readable, seekable binary file over a LayerReader; closing it closes the reader."""

    def __init__(self, reader: LayerReader) -> None:
        super().__init__()
        self._reader = reader
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._reader.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def read(self, size: int = -1, /) -> bytes:
        self._checkClosed()
        if size is None or size < 0:
            return self.readall()
        data = self._reader.read(self._pos, size)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        parts: list[bytes] = []
        while chunk := self.read(READ_CHUNK):
            parts.append(chunk)
        return b"".join(parts)

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._reader.close()
        super().close()
