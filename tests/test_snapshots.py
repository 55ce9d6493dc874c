"""Tests of imgfs.cache.snapshots: real temp dirs, real threads, real temp files.

Waits are bounded by generous timeouts (WAIT) so that a broken implementation fails instead of
hanging; no assertion depends on how fast anything runs.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imgfs.cache.snapshots import (
    MAX_CONCURRENT_GENERATIONS,
    TEMP_PREFIX,
    Sink,
    Snapshot,
    SnapshotCache,
    SnapshotCancelled,
    default_max_bytes,
)
from imgfs.errors import CorruptStore, ImgfsError, IntegrityError

WAIT = 10.0  # seconds: only ever reached when something is broken
BLOCKED = 0.3  # seconds a reader is given to (wrongly) return before we say it blocks


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def whole(data: bytes, chunk: int = 4096) -> Callable[[Sink], None]:
    """A producer that writes and publishes ``data`` chunk by chunk."""

    def produce(sink: Sink) -> None:
        for start in range(0, len(data), chunk):
            sink.write(data[start : start + chunk])
            sink.publish(sink.written)
        sink.publish(len(data))

    return produce


def wait_for(event: threading.Event) -> None:
    assert event.wait(WAIT), "timed out waiting for the producer"


class Reader(threading.Thread):
    """Reads one range in a thread and keeps the result or the exception."""

    def __init__(self, snap: Snapshot, offset: int, n: int) -> None:
        super().__init__(daemon=True)
        self.snap, self.offset, self.n = snap, offset, n
        self.result: bytes | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.snap.read(self.offset, self.n, timeout=WAIT)
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.join(WAIT)
        assert not self.is_alive(), "reader still blocked"


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def cache(cache_dir: Path) -> Iterator[SnapshotCache]:
    c = SnapshotCache(str(cache_dir), max_bytes=1 << 30)
    yield c
    c.close()


def test_concurrent_acquires_share_one_generation(cache: SnapshotCache) -> None:
    data = blob(300_000)
    calls = 0
    go = threading.Event()

    def produce(sink: Sink) -> None:
        nonlocal calls
        calls += 1
        wait_for(go)
        whole(data)(sink)

    barrier = threading.Barrier(8)
    snaps: list[Snapshot] = []
    results: list[bytes] = []
    lock = threading.Lock()

    def opener() -> None:
        barrier.wait(WAIT)
        snap = cache.acquire("k", len(data), produce)
        with lock:
            snaps.append(snap)
        got = snap.read(0, len(data), timeout=WAIT)
        with lock:
            results.append(got)

    threads = [threading.Thread(target=opener, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(WAIT)
    assert calls == 1
    assert len(snaps) == 8
    assert all(s is snaps[0] for s in snaps)
    assert results == [data] * 8
    assert cache.stats().generations_started == 1
    for s in snaps:
        cache.release(s)
    assert cache.stats().bytes_cached == len(data)


def test_reader_streams_published_range(cache: SnapshotCache) -> None:
    data = blob(3 * 65536, seed=1)
    steps = [threading.Event() for _ in range(3)]
    published = [threading.Event() for _ in range(3)]

    def produce(sink: Sink) -> None:
        for i in range(3):
            wait_for(steps[i])
            sink.write(data[i * 65536 : (i + 1) * 65536])
            sink.publish((i + 1) * 65536)
            published[i].set()

    snap = cache.acquire("k", len(data), produce)
    steps[0].set()
    wait_for(published[0])
    # The first step is published and the producer waits for step 1: this must not block.
    assert snap.read(100, 1000, timeout=WAIT) == data[100:1100]
    late = Reader(snap, 65536 + 10, 100)
    late.start()
    late.join(BLOCKED)
    assert late.is_alive(), "read of an unpublished range returned"
    steps[1].set()
    late.finish()
    assert late.result == data[65536 + 10 : 65536 + 110]
    assert not snap.complete  # streamed: step 2 has not even started
    steps[2].set()
    assert snap.read(0, len(data) + 10, timeout=WAIT) == data
    cache.release(snap)


def test_reader_never_gets_held_back_bytes(cache: SnapshotCache) -> None:
    data = blob(10_000, seed=2)
    verified = threading.Event()

    def produce(sink: Sink) -> None:
        sink.write(data)
        sink.publish(len(data) - 1)  # last byte held back until "verified"
        wait_for(verified)
        sink.publish(len(data))

    snap = cache.acquire("k", len(data), produce)
    assert snap.read(0, len(data) - 1, timeout=WAIT) == data[:-1]
    assert snap.published == len(data) - 1
    with pytest.raises(TimeoutError):
        snap.read(len(data) - 1, 1, timeout=BLOCKED)
    with pytest.raises(TimeoutError):
        snap.read(0, len(data), timeout=BLOCKED)
    tail = Reader(snap, len(data) - 1, 4096)
    tail.start()
    tail.join(BLOCKED)
    assert tail.is_alive()
    verified.set()
    tail.finish()
    assert tail.result == data[-1:]
    cache.release(snap)


def test_failure_reaches_every_waiting_reader_then_regenerates(cache: SnapshotCache) -> None:
    data = blob(8192, seed=3)
    fail = threading.Event()
    calls = 0

    def failing(sink: Sink) -> None:
        nonlocal calls
        calls += 1
        sink.write(data[:4096])
        sink.publish(4096)
        wait_for(fail)
        raise IntegrityError("layer L: CRC-64 mismatch in etc/passwd")

    snap = cache.acquire("k", len(data), failing)
    readers = [Reader(snap, 4000, 200) for _ in range(3)]
    for r in readers:
        r.start()
    for r in readers:
        r.join(BLOCKED / 3)
    assert all(r.is_alive() for r in readers)
    fail.set()
    for r in readers:
        r.finish()
        assert isinstance(r.error, IntegrityError)
        assert "CRC-64 mismatch" in str(r.error)
    assert snap.error is not None
    assert snap.read(0, 4096) == data[:4096]  # verified bytes before the failure stay valid
    # While somebody holds the failed snapshot, new opens share its failure.
    again = cache.acquire("k", len(data), failing)
    assert again is snap
    with pytest.raises(IntegrityError):
        again.read(0, len(data), timeout=WAIT)
    cache.release(again)
    cache.release(snap)
    assert calls == 1
    fresh = cache.acquire("k", len(data), whole(data))
    assert fresh is not snap
    assert fresh.read(0, len(data), timeout=WAIT) == data
    cache.release(fresh)
    stats = cache.stats()
    assert (stats.generations_started, stats.generations_failed) == (2, 1)
    assert stats.generations_completed == 1


def test_unexpected_exception_is_wrapped(cache: SnapshotCache) -> None:
    def buggy(sink: Sink) -> None:
        raise KeyError("oops")

    snap = cache.acquire("layer-x", 10, buggy)
    with pytest.raises(CorruptStore, match="layer-x") as info:
        snap.read(0, 10, timeout=WAIT)
    assert isinstance(info.value.__cause__, CorruptStore)
    assert isinstance(info.value.__cause__.__cause__, KeyError)
    cache.release(snap)


def test_enospc_is_reported_on_read(cache: SnapshotCache) -> None:
    def full_disk(sink: Sink) -> None:
        sink.write(b"x" * 100)
        sink.publish(100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    snap = cache.acquire("k", 1000, full_disk)
    with pytest.raises(ImgfsError, match="No space left") as info:
        snap.read(50, 100, timeout=WAIT)
    assert isinstance(info.value, CorruptStore)
    assert snap.read(0, 100) == b"x" * 100
    cache.release(snap)
    assert cache.stats().generations_failed == 1


def test_producer_that_stops_short_fails(cache: SnapshotCache) -> None:
    def short(sink: Sink) -> None:
        sink.write(b"abc")
        sink.publish(3)

    snap = cache.acquire("k", 4, short)
    with pytest.raises(IntegrityError, match="3 of 4"):
        snap.read(0, 4, timeout=WAIT)
    cache.release(snap)


def _outcome(call: Callable[[], None]) -> str:
    try:
        call()
    except (IntegrityError, ValueError) as exc:
        return type(exc).__name__
    return "ok"


def test_sink_rejects_bad_writes_and_publishes(cache: SnapshotCache) -> None:
    seen: list[str] = []

    def produce(sink: Sink) -> None:
        sink.write(b"abcd")
        seen.append(_outcome(lambda: sink.write(b"e")))  # past the size
        seen.append(_outcome(lambda: sink.publish(5)))  # past what was written
        sink.publish(3)
        seen.append(_outcome(lambda: sink.publish(2)))  # backwards
        sink.publish(4)

    snap = cache.acquire("k", 4, produce)
    assert snap.read(0, 10, timeout=WAIT) == b"abcd"
    assert seen == ["IntegrityError", "ValueError", "ValueError"]
    cache.release(snap)


def test_reads_are_clamped_at_eof(cache: SnapshotCache) -> None:
    data = blob(5000, seed=4)
    snap = cache.acquire("k", len(data), whole(data, chunk=1000))
    assert snap.read(4990, 100, timeout=WAIT) == data[4990:]
    assert snap.read(5000, 100, timeout=WAIT) == b""
    assert snap.read(9000, 1) == b""
    assert snap.read(0, 0) == b""
    with pytest.raises(ValueError, match="bad read"):
        snap.read(-1, 10)
    cache.release(snap)
    with pytest.raises(ValueError, match="released more often"):
        cache.release(snap)


def test_empty_blob(cache: SnapshotCache) -> None:
    snap = cache.acquire("empty", 0, whole(b""))
    assert snap.read(0, 10, timeout=WAIT) == b""
    cache.release(snap)


def _fd_identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _fd_still_open(fd: int, identity: tuple[int, int]) -> bool:
    """True if ``fd`` still refers to the file it did (not closed, nor reused since)."""
    try:
        return _fd_identity(fd) == identity
    except OSError as exc:
        if exc.errno == errno.EBADF:
            return False
        raise


def _complete(cache: SnapshotCache, key: str, data: bytes) -> Snapshot:
    snap = cache.acquire(key, len(data), whole(data))
    assert snap.read(0, len(data), timeout=WAIT) == data
    return snap


def _wait_complete(snap: Snapshot) -> None:
    """``complete`` flips just after the last publish, when the producer returns."""
    done = threading.Event()
    for _ in range(int(WAIT / 0.01)):
        if snap.complete:
            done.set()
            break
        done.wait(0.01)
    assert snap.complete


def test_lru_evicts_least_recently_released(cache_dir: Path) -> None:
    cache = SnapshotCache(str(cache_dir), max_bytes=250)
    a_data, b_data, c_data = blob(100, 1), blob(100, 2), blob(100, 3)
    a = _complete(cache, "a", a_data)
    b = _complete(cache, "b", b_data)
    _wait_complete(a)
    _wait_complete(b)
    b_identity = _fd_identity(b.fd)
    cache.release(a)
    cache.release(b)
    assert cache.stats().bytes_cached == 200
    # A cache hit on "a" makes it the most recently released one.
    calls = 0

    def never(sink: Sink) -> None:
        nonlocal calls
        calls += 1

    a2 = cache.acquire("a", 100, never)
    assert a2 is a
    assert a2.read(0, 100) == a_data
    cache.release(a2)
    assert _fd_still_open(b.fd, b_identity)
    c = _complete(cache, "c", c_data)  # 300 > 250: evict the oldest unreferenced, "b"
    assert b.closed
    assert not _fd_still_open(b.fd, b_identity)
    assert not a.closed
    stats = cache.stats()
    assert stats.evictions == 1
    assert stats.generations_started == 3
    assert (stats.bytes_cached, stats.bytes_in_use) == (100, 100)
    assert calls == 0
    cache.release(c)
    b2 = cache.acquire("b", 100, whole(b_data))  # evicted: generated again
    assert b2 is not b
    assert b2.read(0, 100, timeout=WAIT) == b_data
    cache.release(b2)
    assert cache.stats().generations_started == 4
    cache.close()


def test_in_use_snapshots_are_never_evicted(
    cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = SnapshotCache(str(cache_dir), max_bytes=150)
    x_data, y_data = blob(100, 5), blob(100, 6)
    x = _complete(cache, "x", x_data)
    with caplog.at_level(logging.WARNING, logger="imgfs.cache.snapshots"):
        y = _complete(cache, "y", y_data)
    assert "over budget" in caplog.text
    assert not x.closed
    assert not y.closed
    assert cache.stats().evictions == 0
    assert x.read(0, 100) == x_data
    assert y.read(0, 100) == y_data
    _wait_complete(y)
    cache.release(y)  # unreferenced and over budget: evicted at once
    assert y.closed
    assert not x.closed
    assert x.read(0, 100) == x_data
    stats = cache.stats()
    assert (stats.evictions, stats.bytes_in_use, stats.bytes_cached) == (1, 100, 0)
    cache.release(x)
    assert not x.closed  # 100 <= 150: cached
    cache.close()
    assert x.closed


def test_release_mid_generation_cancels(cache: SnapshotCache) -> None:
    started = threading.Event()
    observed = threading.Event()

    def endless(sink: Sink) -> None:
        sink.write(b"a" * 100)
        sink.publish(100)
        started.set()
        try:
            while not sink.cancelled:
                observed.wait(0.01)
            observed.set()
            sink.write(b"b")  # the next write after cancellation raises
        except SnapshotCancelled:
            raise
        raise AssertionError("write after cancellation did not raise")

    snap = cache.acquire("k", 10_000, endless)
    wait_for(started)
    cache.release(snap)
    wait_for(observed)
    for _ in range(int(WAIT / 0.01)):
        if cache.stats().generations_cancelled:
            break
        observed.wait(0.01)
    stats = cache.stats()
    assert (stats.generations_cancelled, stats.generations_failed) == (1, 0)
    assert stats.snapshots == 0
    assert snap.closed
    data = blob(10_000, 7)
    fresh = cache.acquire("k", len(data), whole(data))
    assert fresh is not snap
    assert fresh.read(0, len(data), timeout=WAIT) == data
    cache.release(fresh)


def test_generations_are_bounded(cache: SnapshotCache) -> None:
    go = threading.Event()
    lock = threading.Lock()
    running = 0
    peak = 0
    entered = threading.Semaphore(0)

    def produce(sink: Sink) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        entered.release()
        wait_for(go)
        sink.write(b"z")
        sink.publish(1)
        with lock:
            running -= 1

    n = MAX_CONCURRENT_GENERATIONS + 3
    snaps = [cache.acquire(f"k{i}", 1, produce) for i in range(n)]
    for _ in range(MAX_CONCURRENT_GENERATIONS):
        assert entered.acquire(timeout=WAIT)
    assert not entered.acquire(timeout=BLOCKED), "more generations than allowed ran at once"
    assert peak == MAX_CONCURRENT_GENERATIONS
    go.set()
    assert [s.read(0, 1, timeout=WAIT) for s in snaps] == [b"z"] * n
    assert peak == MAX_CONCURRENT_GENERATIONS
    for s in snaps:
        cache.release(s)


def test_queued_generation_cancelled_before_it_runs(cache: SnapshotCache) -> None:
    go = threading.Event()
    ran: list[str] = []

    def blocker(sink: Sink) -> None:
        wait_for(go)
        sink.write(b"1")
        sink.publish(1)

    def queued(sink: Sink) -> None:
        ran.append("queued")

    busy = [cache.acquire(f"busy{i}", 1, blocker) for i in range(MAX_CONCURRENT_GENERATIONS)]
    waiting = cache.acquire("queued", 1, queued)
    cache.release(waiting)
    for _ in range(int(WAIT / 0.01)):
        if cache.stats().generations_cancelled:
            break
        go.wait(0.01)
    assert cache.stats().generations_cancelled == 1
    assert waiting.closed
    go.set()
    for s in busy:
        assert s.read(0, 1, timeout=WAIT) == b"1"
        cache.release(s)
    assert ran == []


def test_cache_dir_stays_empty_and_close_cleans_up(cache_dir: Path) -> None:
    cache = SnapshotCache(str(cache_dir), max_bytes=1 << 20)
    hold = threading.Event()
    cancelled = threading.Event()

    def stuck(sink: Sink) -> None:
        sink.write(b"s" * 10)
        sink.publish(10)
        wait_for(hold)
        if sink.cancelled:
            cancelled.set()
        sink.write(b"t")

    cached = _complete(cache, "cached", blob(1000, 8))
    cache.release(cached)
    generating = cache.acquire("generating", 100, stuck)
    waiter = Reader(generating, 0, 100)
    waiter.start()
    waiter.join(BLOCKED)
    assert waiter.is_alive()
    assert os.listdir(cache_dir) == []  # O_TMPFILE: nothing has a name
    assert cache.stats().snapshots == 2
    closer = threading.Thread(target=cache.close, daemon=True)
    closer.start()
    waiter.finish()
    assert isinstance(waiter.error, ImgfsError)
    assert "closed" in str(waiter.error)
    hold.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert cancelled.is_set()
    assert cached.closed
    assert not generating.closed  # still held: closed at its release, never under a reader
    assert generating.read(0, 10) == b"s" * 10
    cache.release(generating)
    assert generating.closed
    assert os.listdir(cache_dir) == []
    with pytest.raises(ImgfsError, match="closed"):
        cache.acquire("new", 1, whole(b"n"))


def test_named_temp_file_fallback_leaves_nothing(cache_dir: Path) -> None:
    cache = SnapshotCache(str(cache_dir), max_bytes=1 << 20)
    cache._use_tmpfile = False  # as on a filesystem without O_TMPFILE
    data = blob(3000, 9)
    snap = cache.acquire("k", len(data), whole(data))
    assert snap.read(0, len(data), timeout=WAIT) == data
    assert os.listdir(cache_dir) == []
    cache.release(snap)
    cache.close()
    assert os.listdir(cache_dir) == []


def test_stale_leftovers_are_removed_at_start(cache_dir: Path) -> None:
    cache_dir.mkdir()
    (cache_dir / f"{TEMP_PREFIX}abc123").write_bytes(b"old")
    (cache_dir / f"{TEMP_PREFIX}dir").mkdir()
    (cache_dir / "layer-index.zst").write_bytes(b"keep")
    (cache_dir / f"{TEMP_PREFIX}link").symlink_to(cache_dir / "layer-index.zst")
    cache = SnapshotCache(str(cache_dir), max_bytes=0)
    assert sorted(os.listdir(cache_dir)) == sorted(
        [f"{TEMP_PREFIX}dir", f"{TEMP_PREFIX}link", "layer-index.zst"]
    )
    cache.close()


def test_default_budget(cache_dir: Path) -> None:
    cache_dir.mkdir()
    st = os.statvfs(cache_dir)
    expected = min(10 << 30, st.f_bavail * st.f_frsize // 2)
    assert abs(default_max_bytes(str(cache_dir)) - expected) <= 1 << 24  # free space moves
    cache = SnapshotCache(str(cache_dir))
    assert 0 <= cache.max_bytes <= 10 << 30
    cache.close()


def test_log_lines(cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.snapshots")
    cache = SnapshotCache(str(cache_dir), max_bytes=1 << 20, log=log)
    expected = ["generated good-key (5 bytes) in", "generation of bad-key failed: digest mismatch"]

    def bad(sink: Sink) -> None:
        raise IntegrityError("digest mismatch")

    with caplog.at_level(logging.INFO, logger="test.snapshots"):
        good = _complete(cache, "good-key", b"12345")
        failed = cache.acquire("bad-key", 5, bad)
        with pytest.raises(IntegrityError):
            failed.read(0, 5, timeout=WAIT)
        cache.release(failed)
        cache.release(good)
        pause = threading.Event()
        for _ in range(int(WAIT / 0.01)):
            if all(line in caplog.text for line in expected):
                break
            pause.wait(0.01)
        cache.close()
    for line in expected:
        assert line in caplog.text
    assert all(r.name == "test.snapshots" for r in caplog.records)


def test_many_threads_many_keys(cache_dir: Path) -> None:
    cache = SnapshotCache(str(cache_dir), max_bytes=40_000)
    blobs = {f"k{i}": blob(5000 + 997 * i, seed=i) for i in range(12)}
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(60):
                key = rng.choice(sorted(blobs))
                data = blobs[key]
                snap = cache.acquire(key, len(data), whole(data, chunk=1500))
                off = rng.randrange(len(data))
                n = rng.randrange(1, 4000)
                assert snap.read(off, n, timeout=WAIT) == data[off : off + n]
                cache.release(snap)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 3)
    assert errors == []
    assert not any(t.is_alive() for t in threads)
    stats = cache.stats()
    assert stats.bytes_in_use == 0
    assert stats.bytes_cached <= 40_000
    cache.close()
    assert os.listdir(cache_dir) == []


def test_waiters_are_woken_once_their_range_is_published_or_generation_fails(
    cache: SnapshotCache,
) -> None:
    """The hook the FUSE adapter waits on (in its event loop, no thread): ``wake`` is called
    once the range is published, or once generation failed; never before; withdrawn ones never."""
    data = blob(16384, seed=9)
    step, fail = threading.Event(), threading.Event()

    def produce(sink: Sink) -> None:
        sink.write(data[:4096])
        sink.publish(4096)
        wait_for(step)
        sink.write(data[4096:8192])
        sink.publish(8192)
        wait_for(fail)
        raise IntegrityError("layer L: CRC-64 mismatch in etc/passwd")

    snap = cache.acquire("k", len(data), produce)
    woken: dict[str, threading.Event] = {k: threading.Event() for k in ("8k", "end", "gone")}
    assert snap.read(0, 4096, timeout=WAIT) == data[:4096]
    assert snap.notify_when_published(4096, woken["8k"].set) is None  # published: no wait
    withdraw_8k = snap.notify_when_published(8192, woken["8k"].set)
    withdraw_end = snap.notify_when_published(len(data), woken["end"].set)
    withdraw_gone = snap.notify_when_published(len(data), woken["gone"].set)
    assert withdraw_8k is not None
    assert withdraw_end is not None
    assert withdraw_gone is not None
    withdraw_gone()
    assert not woken["8k"].wait(BLOCKED)  # 8192 not published yet
    step.set()
    wait_for(woken["8k"])
    assert snap.published >= 8192
    assert not woken["end"].wait(BLOCKED)
    fail.set()
    wait_for(woken["end"])  # the failure wakes the waiter of a range never published
    assert snap.error is not None
    assert not woken["gone"].is_set()
    assert snap.notify_when_published(len(data), woken["gone"].set) is None  # failed: no wait
    withdraw_end()  # after the wake-up: harmless
    cache.release(snap)


def test_closing_the_cache_wakes_waiters(cache_dir: Path) -> None:
    cache = SnapshotCache(str(cache_dir), max_bytes=1 << 20)
    stop = threading.Event()

    def produce(sink: Sink) -> None:
        while not sink.cancelled:
            stop.wait(0.01)
        raise SnapshotCancelled("abandoned")

    snap = cache.acquire("k", 4096, produce)
    woken = threading.Event()
    assert snap.notify_when_published(4096, woken.set) is not None
    cache.close()
    wait_for(woken)
    with pytest.raises(ImgfsError):
        snap.read(0, 4096, timeout=WAIT)
    cache.release(snap)


def test_a_read_with_ahead_advises_only_published_bytes_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Snapshot.read(ahead=)``: POSIX_FADV_WILLNEED of what follows the range, never past
    the published mark, and none at all without ``ahead`` or at the mark."""
    advised: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def recording(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            advised.append((offset, length))
        real(fd, offset, length, advice)

    cache = SnapshotCache(str(tmp_path / "snaps"), max_bytes=1 << 20)
    data = os.urandom(10000)
    gate = threading.Event()

    def produce(sink: Sink) -> None:
        sink.write(data)
        sink.publish(6000)
        gate.wait(10)
        sink.publish(len(data))

    snap = cache.acquire("k", len(data), produce)
    try:
        assert snap.read(0, 1000, timeout=10) == data[:1000]
        monkeypatch.setattr(os, "posix_fadvise", recording)
        assert snap.read(0, 1000) == data[:1000]
        assert advised == []  # no ahead asked
        assert snap.read(1000, 1000, ahead=1 << 20) == data[1000:2000]
        assert advised == [(2000, 4000)]  # up to the published mark only
        assert snap.read(5000, 1000, ahead=1 << 20) == data[5000:6000]
        assert advised == [(2000, 4000)]  # at the mark: nothing to advise
        gate.set()
        assert snap.read(9000, 1000, timeout=10, ahead=100) == data[9000:]
        assert snap.read(2000, 1000, ahead=100) == data[2000:3000]
        assert advised == [(2000, 4000), (3000, 100)]
    finally:
        gate.set()
        cache.release(snap)
        cache.close()


HOLE = 64 << 10  # the sink's hole block (snapshots._HOLE_BLOCK)


def _pieces(*parts: tuple[str, int]) -> bytes:
    """``("d", n)``: n bytes with no zero byte, ``("z", n)``: n zero bytes."""
    rng = random.Random(7)
    return b"".join(
        bytes(n) if kind == "z" else bytes(b or 1 for b in rng.randbytes(n)) for kind, n in parts
    )


@pytest.mark.parametrize(
    ("parts", "chunk", "writes"),
    [
        # 1 MiB of data in one sink.write: block by block
        ((("d", 1 << 20),), 1 << 20, [(k * HOLE, HOLE) for k in range(16)]),
        # aligned all-zero blocks are skipped (holes); the partial last block is written
        (
            (("d", 2 * HOLE), ("z", 2 * HOLE), ("d", HOLE + 5), ("z", HOLE - 5), ("z", 100)),
            1 << 20,
            [(0, HOLE), (HOLE, HOLE), (4 * HOLE, HOLE), (5 * HOLE, HOLE), (6 * HOLE, 100)],
        ),
        # a zero block split between two writes is written, not skipped
        (
            (("d", 1000), ("z", 2 * HOLE), ("d", 1000)),
            HOLE + 300,
            [
                (0, HOLE),
                (HOLE, 300),
                (HOLE + 300, HOLE - 300),
                (2 * HOLE, 600),
                (2 * HOLE + 600, 1400),
            ],
        ),
    ],
)
def test_the_sink_writes_block_by_block_and_skips_zero_blocks(
    cache: SnapshotCache,
    monkeypatch: pytest.MonkeyPatch,
    parts: tuple[tuple[str, int], ...],
    chunk: int,
    writes: list[tuple[int, int]],
) -> None:
    """Bytes and holes as written, and no pwrite larger than a block: one 1 MiB pwrite into
    ext4 cost 4x the CPU of sixteen 64 KiB ones (see _SnapshotSink.write)."""
    data = _pieces(*parts)
    calls: list[tuple[int, int]] = []
    real = os.pwrite

    def counting(fd: int, buf: bytes | memoryview, offset: int) -> int:
        calls.append((offset, len(buf)))
        return real(fd, buf, offset)

    monkeypatch.setattr(os, "pwrite", counting)
    snap = cache.acquire("k", len(data), whole(data, chunk=chunk))
    try:
        assert snap.read(0, len(data), timeout=WAIT) == data
        assert calls == writes
        assert os.pread(snap.fd, len(data), 0) == data  # the holes read as zeros
    finally:
        cache.release(snap)
