"""Cross-file read-ahead (imgfs/views/readahead.py), kernel-free.

The window logic on listings of plain nodes (what is warmed, its bounds, jumps, entries the
reader passed, failures, the windows' bound, close), then on a store written by
tests/storemaker: files opened in listing order through ``TreeView.open_known`` bring the
next files' pages into the page cache (``mincore`` of the layer files after ``DONTNEED``;
what ``LayerSource.warm_files`` was asked for, recorded; the reader's ``RWF_NOWAIT`` reads told
of a miss whenever the file is not in the page cache, which the kernel does not always do),
never a file reached through a symlink, and the bytes read stay the layer's.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import random
import resource
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

import imgfs
import imgfs.errors
import imgfs.store.layerfiles
import imgfs.store.locks
from imgfs.store.source import LayerSource
from imgfs.views.content import Caches, Streamed, read_nowait, release
from imgfs.views.keys import RootfsKey
from imgfs.views.node import Node, Origin
from imgfs.views.readahead import ReadAhead
from imgfs.views.tree import TreeView, build_view
from tests import storemaker
from tests.tarsplit_maker import make_tar

ORIGIN = Origin(0, cast(Any, None), 0)  # ReadAhead looks only at whether a file has one


def _node(name: str, kind: str = "file", size: int = 100) -> Node:
    origin = ORIGIN if kind == "file" else None
    return Node(RootfsKey("img", b"d/" + name.encode()), cast(Any, kind), size, 0, origin=origin)


def _listing(n: int, size: int = 100) -> list[tuple[bytes, Node]]:
    return [(f"f{i:03}".encode(), _node(f"f{i:03}", size=size)) for i in range(n)]


class Warms:
    """A ``readahead.Warm`` that records what it warmed (the names, the bytes asked for, the
    files of each call); ``gate``: the first call waits for it; ``fail``: a call with one of
    these names raises (after recording them all)."""

    def __init__(self, gate: threading.Event | None = None, fail: frozenset[bytes] = frozenset()):
        self.names: list[bytes] = []
        self.lengths: list[int] = []
        self.calls: list[int] = []
        self.started = threading.Event()
        self._gate = gate
        self._fail = fail
        self._lock = threading.Lock()

    def __call__(self, nodes: Sequence[Node], length: int) -> list[int | None]:
        self.started.set()
        if self._gate is not None:
            self._gate.wait(10)
            self._gate = None
        names = []
        for node in nodes:
            assert isinstance(node.key, RootfsKey)
            names.append(node.key.path.rpartition(b"/")[2])
        with self._lock:
            self.names += names
            self.lengths += [min(node.size, length) for node in nodes]
            self.calls.append(len(nodes))
        if self._fail.intersection(names):
            raise OSError(f"cannot open {names!r}")
        return [self.fd() for _ in nodes]

    def fd(self) -> int | None:
        return None

    def wait_for(self, count: int) -> list[bytes]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.names) >= count:
                    return list(self.names)
            time.sleep(0.005)
        return list(self.names)


@pytest.fixture
def ahead() -> Iterator[ReadAhead]:
    ra = ReadAhead(files=4, max_bytes=1 << 20, windows=2)
    yield ra
    ra.close()


def _cold(ra: ReadAhead, directory: str, name: bytes, listing: Any, warm: Warms) -> None:
    """Open ``name`` and miss the page cache with its read, as a cold reader does."""
    on_miss, fd = ra.opened(directory, name, listing, warm)
    if fd is not None:
        os.close(fd)
    if on_miss is not None:
        on_miss()


def _settle(ra: ReadAhead, warms: Warms, count: int) -> list[bytes]:
    got = warms.wait_for(count)
    deadline = time.monotonic() + 10
    while ra.pending() and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)  # anything beyond ``count`` would show up now
    return list(warms.names) if len(warms.names) > len(got) else got


def test_a_lone_open_warms_nothing(ahead: ReadAhead) -> None:
    listing, warms = _listing(50), Warms()
    _cold(ahead, "d", b"f010", listing, warms)
    _cold(ahead, "e", b"f010", _listing(50), warms)
    _cold(ahead, "d", b"f040", listing, warms)  # a jump: still no order seen
    _cold(ahead, "d", b"f040", listing, warms)  # the same file again
    assert ahead.pending() == 0
    assert _settle(ahead, warms, 0) == []


def test_a_reader_served_from_the_page_cache_warms_nothing(ahead: ReadAhead) -> None:
    listing, warms = _listing(50), Warms()
    for i in range(10):
        ahead.opened("d", f"f{i:03}".encode(), listing, warms)  # no read missed
    assert _settle(ahead, warms, 0) == []
    on_miss, _ = ahead.opened("d", b"f010", listing, warms)
    assert on_miss is not None
    on_miss()  # a miss in a directory read in order: the next files now
    assert _settle(ahead, warms, 4) == [b"f011", b"f012", b"f013", b"f014"]


def test_in_order_opens_warm_the_next_files_up_to_the_bound(ahead: ReadAhead) -> None:
    listing, warms = _listing(50), Warms()
    _cold(ahead, "d", b"f000", listing, warms)
    _cold(ahead, "d", b"f001", listing, warms)
    assert _settle(ahead, warms, 4) == [b"f002", b"f003", b"f004", b"f005"]
    _cold(ahead, "d", b"f002", listing, warms)
    _cold(ahead, "d", b"f003", listing, warms)
    assert _settle(ahead, warms, 6) == [b"f00" + str(i).encode() for i in range(2, 8)]
    assert warms.lengths == [100] * 6
    _cold(ahead, "d", b"f005", listing, warms)  # a file passed over: a jump, nothing queued
    _cold(ahead, "d", b"f007", listing, warms)
    assert _settle(ahead, warms, 6) == [b"f00" + str(i).encode() for i in range(2, 8)]


def test_bytes_ahead_are_bounded_and_a_big_file_warms_only_its_start() -> None:
    ra = ReadAhead(files=10, max_bytes=2500, windows=2)
    try:
        listing, warms = _listing(50, size=1000), Warms()
        listing[5] = (b"f005", _node("f005", size=10 << 20))
        _cold(ra, "d", b"f000", listing, warms)
        _cold(ra, "d", b"f001", listing, warms)
        assert _settle(ra, warms, 2) == [b"f002", b"f003"]  # a third: 3000 > 2500 bytes
        _cold(ra, "d", b"f002", listing, warms)
        _cold(ra, "d", b"f003", listing, warms)  # f004, and f005 would be over the bound
        assert _settle(ra, warms, 3) == [b"f002", b"f003", b"f004"]
        _cold(ra, "d", b"f004", listing, warms)  # f005 alone: its first 2500 bytes
        assert _settle(ra, warms, 4) == [b"f002", b"f003", b"f004", b"f005"]
        assert warms.lengths == [1000, 1000, 1000, 2500]
    finally:
        ra.close()


def test_only_regular_files_with_content_are_warmed(ahead: ReadAhead) -> None:
    listing, warms = _listing(10), Warms()
    listing[2] = (b"f002", _node("f002", kind="dir"))
    listing[3] = (b"f003", _node("f003", kind="link"))
    listing[4] = (b"f004", _node("f004", size=0))
    _cold(ahead, "d", b"f000", listing, warms)
    _cold(ahead, "d", b"f001", listing, warms)
    assert _settle(ahead, warms, 1) == [b"f005"]
    _cold(ahead, "d", b"f004", listing, warms)  # the dir and the link between: in order
    assert _settle(ahead, warms, 4) == [b"f005", b"f006", b"f007", b"f008"]


def test_a_walk_goes_on_in_order_into_the_next_directory(ahead: ReadAhead) -> None:
    a, b, c = _listing(6), _listing(50), _listing(50)
    for i in range(6):  # a read in order to its last file
        _cold(ahead, "a", f"f{i:03}".encode(), a, Warms())
    warms = Warms()
    _cold(ahead, "b", b"f000", b, warms)  # its first file, missed: in order at once
    assert _settle(ahead, warms, 4) == [b"f001", b"f002", b"f003", b"f004"]
    _cold(ahead, "b", b"f001", b, warms)
    warms_c = Warms()
    _cold(ahead, "c", b"f000", c, warms_c)  # b was left in the middle: c starts as a lone open
    assert _settle(ahead, warms_c, 0) == []


def test_a_jump_abandons_what_was_queued() -> None:
    ra = ReadAhead(files=16, max_bytes=1 << 20)
    gate = threading.Event()
    listing, warms = _listing(60), Warms(gate)
    try:
        _cold(ra, "d", b"f000", listing, warms)
        _cold(ra, "d", b"f001", listing, warms)  # queues f002..f017: two batches
        assert warms.started.wait(10)  # the worker waits in the first, f002..f009
        _cold(ra, "d", b"f030", listing, warms)  # elsewhere: f010..f017 are not wanted now
        gate.set()
        assert _settle(ra, warms, 8) == [f"f{i:03}".encode() for i in range(2, 10)]
        _cold(ra, "d", b"f031", listing, warms)  # in order again from the new place
        assert _settle(ra, warms, 24)[8:] == [f"f{i:03}".encode() for i in range(32, 48)]
    finally:
        ra.close()


def test_a_jump_while_a_batch_is_warmed_keeps_none_of_its_files(
    ahead: ReadAhead, tmp_path: Path
) -> None:
    gate = threading.Event()
    (tmp_path / "f").write_bytes(b"x")
    listing, warms = _listing(50), OpeningWarms(tmp_path / "f", gate)
    _cold(ahead, "d", b"f000", listing, warms)
    _cold(ahead, "d", b"f001", listing, warms)
    assert warms.started.wait(10)  # the worker is in its batch f002..f005
    _cold(ahead, "d", b"f003", listing, warms)  # f002 passed over: a jump, a new window
    _cold(ahead, "d", b"f004", listing, warms)
    gate.set()
    first, second = [b"f002", b"f003", b"f004", b"f005"], [b"f005", b"f006", b"f007", b"f008"]
    assert _settle(ahead, warms, 8) == [*first, *second]
    assert warms.calls == [4, 4]
    assert ahead.open_fds() == 4  # the first batch's fds were closed: its window is gone


def test_entries_the_reader_reached_before_their_batch_was_taken_are_passed_over(
    tmp_path: Path,
) -> None:
    ra = ReadAhead(files=16, max_bytes=1 << 20)
    gate = threading.Event()
    (tmp_path / "f").write_bytes(b"x")
    listing, warms = _listing(60), OpeningWarms(tmp_path / "f", gate)
    try:
        _cold(ra, "d", b"f000", listing, warms)
        _cold(ra, "d", b"f001", listing, warms)  # f002..f017 queued: two batches
        assert warms.started.wait(10)  # the worker is in the first, f002..f009
        for i in range(2, 12):  # the reader goes on to f011, none of them warmed yet
            _, fd = ra.opened("d", f"f{i:03}".encode(), listing, warms)
            assert fd is None
        gate.set()
        names = _settle(ra, warms, 22)  # to f025: a window of 16 from f010, where it topped up
        assert names[:8] == [f"f{i:03}".encode() for i in range(2, 10)]
        assert names[8:] == [f"f{i:03}".encode() for i in range(12, 26)]  # not f010, f011
        assert warms.calls == [8, 8, 6]
        assert len(warms.fds) == 22
        assert ra.open_fds() == 14  # the first batch's were closed: the reader had passed them
    finally:
        ra.close()


def test_a_failed_warm_is_harmless(ahead: ReadAhead) -> None:
    listing, warms = _listing(50), Warms(fail=frozenset({b"f002", b"f003"}))
    _cold(ahead, "d", b"f000", listing, warms)
    _cold(ahead, "d", b"f001", listing, warms)
    assert _settle(ahead, warms, 4) == [b"f002", b"f003", b"f004", b"f005"]
    _cold(ahead, "d", b"f002", listing, warms)  # 3 of 4 still ahead: no top-up yet
    _cold(ahead, "d", b"f003", listing, warms)  # 2 left: topped up
    assert _settle(ahead, warms, 6)[-2:] == [b"f006", b"f007"]


def test_windows_are_bounded(ahead: ReadAhead) -> None:
    warms = Warms()
    lists = {d: _listing(50) for d in "abc"}
    for d in "abc":  # windows=2: a's is dropped when c's starts
        _cold(ahead, d, b"f000", lists[d], warms)
    _cold(ahead, "a", b"f001", lists["a"], warms)  # a new window for a: no order seen yet
    _cold(ahead, "c", b"f001", lists["c"], warms)
    assert _settle(ahead, warms, 4) == [b"f002", b"f003", b"f004", b"f005"]
    _cold(ahead, "a", b"f002", lists["a"], warms)  # now a is in order
    assert len(_settle(ahead, warms, 8)) == 8
    # a new listing of the same directory (a new view) starts a new window
    _cold(ahead, "a", b"f003", _listing(50), warms)
    assert _settle(ahead, warms, 8) == warms.names[:8]


def test_close_stops_the_worker_and_later_opens_do_nothing() -> None:
    ra = ReadAhead(files=4)
    listing, warms = _listing(50), Warms()
    _cold(ra, "d", b"f000", listing, warms)
    _cold(ra, "d", b"f001", listing, warms)
    assert len(warms.wait_for(4)) == 4
    workers = [t for t in threading.enumerate() if t.name == "imgfs-readahead"]
    ra.close()
    _cold(ra, "d", b"f002", listing, warms)
    _cold(ra, "d", b"f003", listing, warms)
    assert ra.pending() == 0
    for worker in workers:
        worker.join(5)
    assert not any(t.name == "imgfs-readahead" and t.is_alive() for t in workers if t in workers)


class OpeningWarms(Warms):
    """Warms that open a file (as ``LayerSource.warm_files`` does) and remember its fd."""

    def __init__(self, path: Path, gate: threading.Event | None = None) -> None:
        super().__init__(gate)
        self.path = path
        self.fds: list[int] = []

    def fd(self) -> int | None:
        fd = os.open(self.path, os.O_RDONLY)
        self.fds.append(fd)
        return fd


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_warmed_files_are_handed_to_the_reader_and_the_rest_closed(
    ahead: ReadAhead, tmp_path: Path
) -> None:
    (tmp_path / "f").write_bytes(b"x")
    listing, warms = _listing(50), OpeningWarms(tmp_path / "f")
    _cold(ahead, "d", b"f000", listing, warms)
    _cold(ahead, "d", b"f001", listing, warms)
    assert _settle(ahead, warms, 4) == [b"f002", b"f003", b"f004", b"f005"]
    assert ahead.open_fds() == 4
    on_miss, fd = ahead.opened("d", b"f002", listing, warms)
    assert fd == warms.fds[0]  # the reader owns it now
    assert on_miss is not None
    os.close(fd)
    _, fd = ahead.opened("d", b"f002", listing, warms)  # the same file again: no fd
    assert fd is None
    _, fd = ahead.opened("d", b"f003", listing, warms)
    assert fd == warms.fds[1]
    os.close(fd)
    # The window had missed, so each step of the reader moves it on: f006 and f007 follow.
    assert _settle(ahead, warms, 6)[4:] == [b"f006", b"f007"]
    assert ahead.open_fds() == 4
    _, fd = ahead.opened("d", b"f040", listing, warms)  # a jump: the window's fds are closed
    assert fd is None
    assert ahead.open_fds() == 0
    assert [_is_open(fd) for fd in warms.fds[2:4]] == [False, False]


def test_close_closes_the_fds_kept(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    ra = ReadAhead(files=4)
    listing, warms = _listing(50), OpeningWarms(tmp_path / "f")
    _cold(ra, "d", b"f000", listing, warms)
    _cold(ra, "d", b"f001", listing, warms)
    assert len(_settle(ra, warms, 4)) == 4
    ra.close()
    assert ra.open_fds() == 0
    assert not any(_is_open(fd) for fd in warms.fds)


# -- on a store ------------------------------------------------------------------------------

FILES = 40


def _content(i: int) -> bytes:
    return (f"file {i}\n".encode()) * (100 + 37 * i)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> storemaker.StoreMaker:
    members: list[tuple[str, bytes | str | None]] = [("d", None)]
    members += [(f"d/f{i:03}", _content(i)) for i in range(FILES)]
    maker = storemaker.StoreMaker(tmp_path_factory.mktemp("readahead") / "root")
    maker.add_image("localhost/many:v1", [make_tar(members)])
    maker.write()
    return maker


@pytest.fixture
def view(made: storemaker.StoreMaker, tmp_path: Path) -> Iterator[TreeView]:
    store = imgfs.Store.open(str(made.root), str(tmp_path / "run"), storemaker.DRIVER)
    caches = Caches.build(None)
    yield build_view(store.images, 0, caches)
    caches.close()


def _diff(made: storemaker.StoreMaker) -> Path:
    return made.root / storemaker.DRIVER / made.images[0].layers[0] / "diff"


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def _resident(path: Path) -> bool:
    """Whether every page of ``path`` is in the page cache (``mincore`` of a mapping)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _fd_resident(fd)
    finally:
        os.close(fd)


def _fd_resident(fd: int) -> bool:
    size = os.fstat(fd).st_size
    if not size:
        return True
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    assert addr is not None, ctypes.get_errno()
    assert addr != ctypes.c_void_p(-1).value, ctypes.get_errno()
    try:
        vec = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
        assert _libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
        return all(b & 1 for b in vec)
    finally:
        _libc.munmap(addr, size)


def _evict(paths: list[Path]) -> None:
    """Drop these files' pages (written back first: dirty pages stay)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _open_in_order(view: TreeView, image_id: str, names: list[bytes]) -> list[bytes]:
    """Open (``open_known``) and read each file as the FUSE adapter does for ``cat``: inline
    if its pages are cached (``read_nowait``), else in a worker's read."""
    top = view.resolve(f"{image_id}/rootfs/d".encode())
    view.children(top.key)
    out = []
    for name in names:
        content = view.open_known(RootfsKey(image_id, b"d/" + name))
        assert isinstance(content, Streamed), name
        try:
            data = read_nowait(content, 0, 1 << 17)
            out.append(content.reader.read(0, 1 << 17) if data is None else data)
        finally:
            release(view.caches, content)
    return out


# What is asked of the kernel is checked by what ``LayerSource.warm_files`` was called for; that
# the kernel read it in, by ``mincore``. The page cache is shared with the whole machine: this
# VM's init drops it now and then (``idle-reclaim (87): drop_caches: 1`` in dmesg), so an
# attempt during which a page the test read in itself (a sentinel) left the cache too says
# nothing and is made again, from the eviction on.
ATTEMPTS = 3


class _WarmLog:
    """``LayerSource.warm_files`` recorded: the names it was called for, those it did not open
    (None), the errors it raised."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[bytes] = []
        self.refused: list[bytes] = []
        self.failures: list[BaseException] = []
        warm_files = LayerSource.warm_files

        def recorded(
            source: LayerSource, items: Sequence[tuple[bytes, int]], length: int
        ) -> list[int | None]:
            self.names += [name for name, _ in items]
            try:
                got = warm_files(source, items, length)
            except BaseException as exc:
                self.failures.append(exc)
                raise
            self.refused += [name for (name, _), fd in zip(items, got, strict=True) if fd is None]
            return got

        monkeypatch.setattr(LayerSource, "warm_files", recorded)

    def clear(self) -> None:
        self.names.clear()
        self.refused.clear()
        self.failures.clear()

    def settled(self, view: TreeView) -> list[bytes]:
        """The names warmed once the worker has nothing left to do."""
        deadline = time.monotonic() + 10
        while view.caches.read_ahead.pending() and time.monotonic() < deadline:
            time.sleep(0.005)
        return [n.rpartition(b"/")[2] for n in self.names]


@pytest.fixture
def warm_log(monkeypatch: pytest.MonkeyPatch) -> _WarmLog:
    return _WarmLog(monkeypatch)


def _cached_sentinel(tmp_path: Path) -> Path:
    """A file of the test's own, written back and read into the page cache."""
    path = tmp_path / "sentinel"
    with open(path, "wb") as f:
        f.write(b"sentinel" * 8192)
        f.flush()
        os.fsync(f.fileno())
    path.read_bytes()  # (dropped at once: the attempt's first look says so)
    return path


def _seen_resident(paths: list[Path], sentinel: Path) -> list[bool] | None:
    """Which of ``paths`` were in the page cache at some look within 10 s (each file is warmed
    once); None if the page cache was dropped from outside meanwhile (``sentinel`` left it)."""
    seen = [False] * len(paths)
    deadline = time.monotonic() + 10
    while True:
        seen = [was or _resident(p) for was, p in zip(seen, paths, strict=True)]
        if all(seen):
            return seen
        if not _resident(sentinel):
            return None
        if time.monotonic() > deadline:
            return seen
        time.sleep(0.01)


def _dropped_in_every_attempt() -> None:
    pytest.skip(f"the page cache was dropped from outside in each of {ATTEMPTS} attempts")


@pytest.fixture
def nowait_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``RWF_NOWAIT`` read of a file not wholly in the page cache is refused (EAGAIN), as
    the kernel refuses one whose pages it must wait for. The kernel itself does not always:
    it starts the file's read at such a call, and a fast disk may finish it before the call
    looks again (seen here: 29 of 200 evicted 5000-byte files read whole, and in a memory
    cgroup with dirty pages most of them), so that the read-ahead, which starts only at a
    read that missed, would start at some file or none. Only what the read is told is
    pinned; the opens, the warms and the page cache looked at stay real."""
    preadv = os.preadv

    def pinned(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        if flags & os.RWF_NOWAIT and not _fd_resident(fd):
            raise BlockingIOError(errno.EAGAIN, "not in the page cache (pinned)")
        return preadv(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "preadv", pinned)


@pytest.mark.usefixtures("nowait_misses")
def test_files_opened_in_order_bring_the_next_ones_into_the_page_cache(
    view: TreeView, made: storemaker.StoreMaker, tmp_path: Path, warm_log: _WarmLog
) -> None:
    files = [_diff(made) / "d" / f"f{i:03}" for i in range(FILES)]
    image_id = made.images[0].id
    ahead = view.caches.read_ahead.files
    for _ in range(ATTEMPTS):
        _evict(files)
        if any(_resident(p) for p in files):
            pytest.skip("this file system keeps pages after POSIX_FADV_DONTNEED")
        sentinel = _cached_sentinel(tmp_path)
        warm_log.clear()
        # (a repeated attempt opens f000 again: a jump, so the window starts over)
        assert _open_in_order(view, image_id, [b"f000"]) == [_content(0)]
        assert warm_log.settled(view) == []  # a lone open warms nothing
        assert _open_in_order(view, image_id, [b"f001"]) == [_content(1)]
        seen = _seen_resident(files[2 : 2 + ahead], sentinel)
        if seen is not None:
            break
    else:
        _dropped_in_every_attempt()
    time.sleep(0.1)
    assert warm_log.settled(view) == [p.name.encode() for p in files[2 : 2 + ahead]]  # bounded
    assert not any(_resident(p) for p in files[2 + ahead :])
    assert seen == [True] * ahead
    names = [f"f{i:03}".encode() for i in range(2, FILES)]
    assert _open_in_order(view, image_id, names) == [_content(i) for i in range(2, FILES)]
    assert view.caches.read_ahead.open_fds() == 0  # every file warmed was handed over


@pytest.mark.usefixtures("nowait_misses")
def test_a_lone_open_warms_no_other_file(
    view: TreeView, made: storemaker.StoreMaker, warm_log: _WarmLog
) -> None:
    files = [_diff(made) / "d" / f"f{i:03}" for i in range(FILES)]
    _evict(files)
    image_id = made.images[0].id
    assert _open_in_order(view, image_id, [b"f010"]) == [_content(10)]
    assert _open_in_order(view, image_id, [b"f030"]) == [_content(30)]  # a jump
    time.sleep(0.2)
    assert warm_log.settled(view) == []
    # the two read (unless the page cache was dropped since), no other
    assert {i for i, p in enumerate(files) if _resident(p)} <= {10, 30}


@pytest.mark.usefixtures("nowait_misses")
def test_a_file_replaced_by_a_symlink_is_not_followed_and_the_rest_is_warmed(
    view: TreeView, made: storemaker.StoreMaker, tmp_path: Path, warm_log: _WarmLog
) -> None:
    diff = _diff(made) / "d"
    outside = tmp_path / "outside"
    outside.write_bytes(_content(3))  # the size the tar-split records: only the link differs
    target = diff / "f003"
    saved = target.read_bytes()
    target.unlink()
    target.symlink_to(outside)
    try:
        files = [diff / f"f{i:03}" for i in range(4, 10)]
        image_id = made.images[0].id
        ahead = view.caches.read_ahead.files
        for _ in range(ATTEMPTS):
            _evict([outside, diff / "f000", diff / "f001", *files])
            sentinel = _cached_sentinel(tmp_path)
            warm_log.clear()
            _open_in_order(view, image_id, [b"f000", b"f001"])
            seen = _seen_resident(files, sentinel)
            if seen is not None:
                break
        else:
            _dropped_in_every_attempt()
        # f003 among them: asked for, refused (below)
        assert warm_log.settled(view) == [f"f{i:03}".encode() for i in range(2, 2 + ahead)]
        assert seen == [True] * len(files)
        assert [n.rpartition(b"/")[2] for n in warm_log.refused] == [b"f003"]
        assert warm_log.failures == []
        assert not _resident(outside)
        with pytest.raises(imgfs.ImgfsError):  # the reader's own open reports it
            _open_in_order(view, image_id, [b"f003"])
    finally:
        target.unlink()
        target.write_bytes(saved)


def _weight(ra: ReadAhead, node: Node) -> int:
    """What ``node`` counts against ``ra.max_bytes`` (0: not warmed)."""
    if node.kind == "file" and node.size and node.origin is not None:
        return min(node.size, ra.max_bytes)
    return 0


def _full_plan(ra: ReadAhead, listing: Any, pos: int, queued: int) -> tuple[list[int], int]:
    """The plan recomputed over the whole window (the reference ``ReadAhead._plan`` must
    equal, however it gets there): (entries to queue, the new ``queued``)."""
    start, out, ahead = pos + 1, [], 0
    end = min(len(listing), start + ra.files)
    i = start
    while i < end:
        weight = _weight(ra, listing[i][1])
        if weight:
            ahead += weight
            if ahead > ra.max_bytes and i > start:
                break
            if i >= queued:
                out.append(i)
        i += 1
    return out, max(queued, i)


@pytest.mark.parametrize("seed", range(40))
def test_the_incremental_plan_queues_what_the_whole_window_recomputed_would(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each open adds only the entries it brings into the window (not a walk over the whole
    window): what is queued, open after open, equals the plan recomputed from scratch, for
    random listings (files of every size, empty files, directories and links between) read in
    order with the reader now and then ahead of the worker."""
    rng = random.Random(seed)
    ra = ReadAhead(
        files=rng.choice([1, 2, 4, 8, 32]), max_bytes=rng.choice([1, 500, 4096, 1 << 20])
    )
    monkeypatch.setattr(ra, "_ensure_worker", lambda: None)  # the queue is only looked at
    monkeypatch.setattr(ra, "_queue", collections.deque())  # all of it (no worker takes any)
    kinds, listing, others = ["file"] * 6 + ["dir", "link"], [], 0
    for i in range(rng.randint(1, 120)):
        # fewer entries between two files than the window holds: the reader never jumps
        kind = "file" if others == ra.files - 1 else rng.choice(kinds)
        others = 0 if kind == "file" else others + 1
        size = rng.choice([0, 1, 99, 700, 5000])
        listing.append((f"e{i:03}".encode(), _node(f"e{i:03}", kind, size)))
    files = [i for i, (_, node) in enumerate(listing) if node.kind == "file"]
    if not files:
        return
    warms = Warms()
    pos, queued, expected = files[0], files[0] + 1, []
    _cold(ra, "d", listing[files[0]][0], listing, warms)  # the first open: warms nothing yet
    for at in files[1:]:
        on_miss, fd = ra.opened("d", listing[at][0], listing, warms)
        assert fd is None
        if queued <= at:
            queued = at + 1
        pos = at
        # topped up once at most half of either bound is queued ahead of the reader
        weights = [_weight(ra, listing[i][1]) for i in range(pos + 1, queued)]
        if sum(1 for w in weights if w) <= ra.files // 2 and sum(weights) <= ra.max_bytes // 2:
            planned, queued = _full_plan(ra, listing, pos, queued)
            expected += planned
        if on_miss is not None and rng.random() < 0.5:
            on_miss()  # a repeated miss queues nothing more
        got = [i for _, i in ra._queue]
        assert got == expected, (seed, at)
    ra.close()


class _Holds:
    """A ``readahead.Hold`` counting its blocks; ``fail``: entering raises (a writer's lock)."""

    def __init__(self, fail: int = 0) -> None:
        self.entered = 0
        self.inside = False
        self._fail = fail

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self.entered += 1
        if self.entered <= self._fail:
            raise imgfs.errors.LockBusy("layers.lock: held by a writer")
        self.inside = True
        try:
            yield
        finally:
            self.inside = False


def test_the_worker_warms_a_batch_of_entries_inside_one_hold() -> None:
    ra = ReadAhead(files=16, max_bytes=1 << 20)
    holds = _Holds()
    inside: list[bool] = []

    class Recorded(Warms):
        def fd(self) -> int | None:
            inside.append(holds.inside)
            return None

    warms, listing = Recorded(), _listing(40)
    try:
        ra.opened("d", b"f000", listing, warms, holds.hold)
        on_miss, _ = ra.opened("d", b"f001", listing, warms, holds.hold)
        assert on_miss is not None
        on_miss()  # queues f002..f017 at once
        assert _settle(ra, warms, 16) == [f"f{i:03}".encode() for i in range(2, 18)]
        assert inside == [True] * 16
        assert holds.entered == 2  # 16 entries, WARM_BATCH (8) a hold
        assert warms.calls == [8, 8]  # and one warm call
    finally:
        ra.close()


def test_a_hold_that_cannot_be_had_skips_its_batch_harmlessly() -> None:
    ra = ReadAhead(files=8, max_bytes=1 << 20)
    holds, warms, listing = _Holds(fail=1), Warms(), _listing(40)

    def cold(name: bytes) -> None:
        on_miss, _ = ra.opened("d", name, listing, warms, holds.hold)
        if on_miss is not None:
            on_miss()

    try:
        cold(b"f000")
        cold(b"f001")  # queues f002..f009: the hold fails
        deadline = time.monotonic() + 10
        while ra.pending() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert ra.pending() == 0
        assert warms.names == []
        assert holds.entered == 1
        for name in (b"f002", b"f003", b"f004"):  # more than half the window still ahead
            cold(name)
        assert ra.pending() == 0
        assert holds.entered == 1
        cold(b"f005")  # half used: f010..f013 topped up, one batch, held
        assert _settle(ra, warms, 4) == [b"f010", b"f011", b"f012", b"f013"]
        assert holds.entered == 2
    finally:
        ra.close()


def test_the_view_holds_the_store_lock_once_for_a_batch_of_warms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    members: list[tuple[str, bytes | str | None]] = [("d", None)]
    members += [(f"d/f{i:03}", _content(i)) for i in range(8)]
    maker = storemaker.StoreMaker(tmp_path / "root")
    maker.add_image("localhost/many:v1", [make_tar(members)])
    maker.write()
    lock = maker.root / f"{storemaker.DRIVER}-layers" / "layers.lock"
    lock.write_bytes(b"t" * 64)  # a token: the kept directories are used
    store = imgfs.Store.open(str(maker.root), str(tmp_path / "run"), storemaker.DRIVER)
    caches = Caches.build(None)
    view = build_view(store.images, 0, caches)
    image_id = maker.images[0].id
    top = view.resolve(f"{image_id}/rootfs/d".encode())
    nodes = [node for _, node in view.children(top.key) if node.kind == "file"]
    locked: list[object] = []
    real = imgfs.store.locks._lock_shared

    def counting(fd: int, path: object) -> None:
        locked.append(path)
        real(fd, cast(Any, path))

    monkeypatch.setattr(imgfs.store.locks, "_lock_shared", counting)
    try:
        with view._hold(image_id):
            fds = view._warm(image_id, nodes, 1 << 20)
        assert len(locked) == 1  # one lock for the eight opens
        for i, fd in enumerate(fds):
            assert fd is not None
            try:
                assert os.pread(fd, 1 << 17, 0) == _content(i)
            finally:
                os.close(fd)
        writer = os.open(lock, os.O_RDWR)
        try:
            fcntl.fcntl(writer, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
            with pytest.raises(imgfs.errors.LockBusy), view._hold(image_id):
                pass  # never waits for the writer
        finally:
            os.close(writer)
    finally:
        caches.close()
        imgfs.store.locks.close_kept()


def _counted_opens(monkeypatch: pytest.MonkeyPatch, compiled: bool) -> list[bytes]:
    """The names ``LayerFiles.open`` is called for, from now on; without ``compiled``, as
    without the extension (``open_many`` opens nothing). Skips if it is not built."""
    if compiled and imgfs.store.layerfiles._OPEN_FILES is None:
        pytest.skip("imgfs.layer._fastparse is not built")
    opens: list[bytes] = []
    slow_open = imgfs.store.layerfiles.LayerFiles.open

    def counted(files: Any, name: bytes, size: int) -> int:
        opens.append(name)
        return slow_open(files, name, size)

    monkeypatch.setattr(imgfs.store.layerfiles.LayerFiles, "open", counted)
    if not compiled:
        monkeypatch.setattr(
            imgfs.store.layerfiles.LayerFiles,
            "open_many",
            lambda _files, items, _advise=0: [None] * len(items),
        )
    return opens


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "fallback"])
def test_a_warm_opens_checks_and_advises_a_file_as_open_file_does(
    view: TreeView, made: storemaker.StoreMaker, monkeypatch: pytest.MonkeyPatch, compiled: bool
) -> None:
    """``LayerSource.warm_files`` opens the files of the layer's own directory in one compiled
    call (``LayerFiles.open_many``: probe, openat2, checks, WILLNEED) and leaves what that
    call does not open (here: every file, as without the extension) to ``LayerFiles.open``:
    either way each fd holds its file, its pages are asked for, and a size the tar-split does
    not record is refused (None; ``open_file`` raises)."""
    opens = _counted_opens(monkeypatch, compiled)
    image_id = made.images[0].id
    source = view.content(view.image(image_id)).sources[0]
    tree = view.layer_tree(source)
    top = view.resolve(f"{image_id}/rootfs/d".encode())
    entries = [(name, node) for name, node in view.children(top.key) if node.kind == "file"][:8]
    files = [tree.file(cast(Origin, node.origin).ref) for _, node in entries]
    paths = [_diff(made) / "d" / name.decode() for name, _ in entries]
    _evict(paths)
    if any(_resident(p) for p in paths):
        pytest.skip("this file system keeps pages after POSIX_FADV_DONTNEED")
    items = [(file.data_name, file.size) for file in files]
    wrong = [(file.data_name, file.size + 1) for file in files[:2]]
    fds = source.warm_files([*items[:4], *wrong, *items[4:]], 1 << 20)
    assert fds[4:6] == [None, None]  # refused, and the files after them opened all the same
    try:
        for i, fd in enumerate([*fds[:4], *fds[6:]]):
            assert fd is not None
            deadline = time.monotonic() + 10
            while not _fd_resident(fd) and time.monotonic() < deadline:
                time.sleep(0.01)  # WILLNEED is queued, not waited for
            assert _fd_resident(fd)
            assert os.pread(fd, 1 << 17, 0) == _content(i)
    finally:
        for fd in fds:
            if fd is not None:
                os.close(fd)
    with pytest.raises(imgfs.IntegrityError, match="tar-split records"):
        source.open_file(*wrong[0])
    # compiled: LayerFiles.open saw only the wrong sizes (and open_file's); fallback: all
    names = [name for name, _ in items]
    refused = [name for name, _ in wrong]
    expected = refused if compiled else [*names[:4], *refused, *names[4:]]
    assert opens == [*expected, refused[0]]


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "fallback"])
def test_a_warm_stops_opening_once_the_descriptors_ran_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compiled: bool
) -> None:
    """Out of descriptors (EMFILE), a batch's warm opens nothing more: through the compiled
    call or through ``LayerFiles.open`` (whose error names the file, the EMFILE its cause)."""
    opens = _counted_opens(monkeypatch, compiled)
    maker = storemaker.StoreMaker(tmp_path / "root")
    maker.add_image("localhost/few:v1", [make_tar([("d", None), *_members(8)])])
    maker.write()
    (maker.root / f"{storemaker.DRIVER}-layers" / "layers.lock").write_bytes(b"t" * 64)
    store = imgfs.Store.open(str(maker.root), str(tmp_path / "run"), storemaker.DRIVER)
    caches = Caches.build(None)
    try:
        view = build_view(store.images, 0, caches)
        image_id = maker.images[0].id
        source = view.content(view.image(image_id)).sources[0]
        tree = view.layer_tree(source)
        top = view.resolve(f"{image_id}/rootfs/d".encode())
        nodes = [node for _, node in view.children(top.key) if node.kind == "file"]
        items = [(tree.file(cast(Origin, n.origin).ref).data_name, n.size) for n in nodes]
        with source.holding_opens():
            for fd in source.warm_files(items[:1], 1):  # the directories and lock: open now
                if fd is not None:
                    os.close(fd)
            opens.clear()
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            probe = os.open(os.devnull, os.O_RDONLY)
            os.close(probe)
            resource.setrlimit(resource.RLIMIT_NOFILE, (probe + 3, hard))  # a few left
            try:
                fds = source.warm_files(items, 1)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        try:
            opened = [fd is not None for fd in fds]
            ran_out = opened.index(False)
            assert 0 < ran_out < 8, opened
            assert not any(opened[ran_out:]), opened
        finally:
            for fd in fds:
                if fd is not None:
                    os.close(fd)
        names = [name for name, _ in items]
        assert opens == ([] if compiled else names[: ran_out + 1])  # none after it
    finally:
        caches.close()
        imgfs.store.locks.close_kept()


def _members(n: int, prefix: str = "f") -> list[tuple[str, bytes | str | None]]:
    return [(f"d/{prefix}{i:03}", _content(i)) for i in range(n)]


def test_a_layer_whose_warm_fails_leaves_the_other_layers_warmed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = make_tar([("d", None), *_members(3, "b")])
    upper = make_tar([("d", None), *_members(3, "u")])
    maker = storemaker.StoreMaker(tmp_path / "root")
    maker.add_image("localhost/two:v1", [base, upper])
    maker.write()
    store = imgfs.Store.open(str(maker.root), str(tmp_path / "run"), storemaker.DRIVER)
    caches = Caches.build(None)
    try:
        view = build_view(store.images, 0, caches)
        image_id = maker.images[0].id
        top = view.resolve(f"{image_id}/rootfs/d".encode())
        listing = [(name, node) for name, node in view.children(top.key) if node.kind == "file"]
        assert [name for name, _ in listing] == [
            b"b000",
            b"b001",
            b"b002",
            b"u000",
            b"u001",
            b"u002",
        ]
        real = LayerSource.warm_files

        def failing_base(
            source: LayerSource, items: Sequence[tuple[bytes, int]], length: int
        ) -> list[int | None]:
            if source.depth == 0:
                raise imgfs.errors.LayerUnavailable(f"{source.what}: its directory is gone")
            return real(source, items, length)

        monkeypatch.setattr(LayerSource, "warm_files", failing_base)
        fds = view._warm(image_id, [node for _, node in listing], 1 << 20)
        try:
            assert [fd is not None for fd in fds] == [False] * 3 + [True] * 3
            assert [os.pread(fd, 1 << 17, 0) for fd in fds[3:] if fd is not None] == [
                _content(i) for i in range(3)
            ]
        finally:
            for fd in fds:
                if fd is not None:
                    os.close(fd)
    finally:
        caches.close()
        imgfs.store.locks.close_kept()
