"""Read-ahead across the files of a directory, in its listing order.

Owns: ``ReadAhead`` — when a reader opens the regular files of one ``layers/`` or ``rootfs/``
directory in its readdir order (``find | xargs cat``, ``tar -c``, ``grep -r``, scanners), a
worker thread asks the kernel to read the next files of that listing into its page cache, so
that the reader's inline ``RWF_NOWAIT`` read (``content.read_nowait``) finds their pages there
instead of hopping to a thread and waiting for the disk, one file at a time; and keeps each
file it warmed open for the reader's open to take (``opened`` hands the fd over: the
requests' thread then opens nothing).

The policy and its bounds: a window per directory being read (at most ``windows``, the least
recently used dropped). A window starts at the first open in a directory and reads ahead only
once the next open is of the next regular file of the listing (a lone ``cat`` of one file
warms nothing; a directory whose first file is opened right after the last file of a
directory read in order counts as in order at once: ``find | xargs cat`` walks on) and a read
of one of its files missed the page cache (a reader served from the page caches, as a second
pass is, costs no warms); then at most ``files`` entries and ``max_bytes`` bytes ahead of the
reader, topped up once at most half of either bound is queued ahead of it (the worker wakes
once per ``files // 2`` opens of small files, not per open). An open elsewhere in the
directory (a jump) abandons what the window had queued; an entry the reader reached before
the worker took it (in a batch) is passed over; the fds kept are at most ``files`` per window,
closed when the reader passes them (before or after they were opened) or the window ends.

It only warms the page cache: the view's ``warm`` opens the files through their
``LayerSource`` (the one opener: under the layers lock, never waiting for a writer, never
through a symlink), up to ``WARM_BATCH`` entries of a window in one call (one compiled call
of the store's, which releases the GIL once for them all: released and taken again per file,
the GIL went back and forth with the requests' thread at each, 4.7 futex calls per file of a
cold ``find | xargs cat``, 2.2 in one call) inside one ``hold`` of the view, which holds that
lock across them, so that the opens take it again without a syscall;
the bytes served are still read and checked by the file's verifier, and a failed warm is only
logged (the reader's own open reports the error).
Must not know: pyfuse3, trio, the store's formats (the view's ``warm`` opens).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from imgfs.views.node import Node

log = logging.getLogger(__name__)

Listing = Sequence[tuple[bytes, Node]]
# warm(nodes, length): the first ``length`` bytes (at most) of each file of ``nodes`` asked
# into the page cache, in one call; returns each file's open fd (for the reader's open to take)
# or None, in the order of ``nodes``
Warm = Callable[[Sequence[Node], int], Sequence[int | None]]
OnMiss = Callable[[], None]
# hold(): what the worker's warms of one batch run inside (the view holds the store lock the
# opens take across the batch: one lock and token read for it instead of one per file)
Hold = Callable[[], contextlib.AbstractContextManager[object]]

READ_AHEAD_FILES = 32
READ_AHEAD_BYTES = 2 << 20  # per window (page cache the reader has not asked for yet)
READ_AHEAD_WINDOWS = 4
WARM_BATCH = 8  # entries of one window the worker warms in one call, under one ``hold``


@dataclass(eq=False)
class _Window:
    """One directory being read in order: the entry opened last (``pos``) and how far the
    worker has been given entries (``queued``: every entry before it)."""

    listing: Listing
    warm: Warm
    pos: int
    queued: int
    live: bool = True
    ordered: bool = False  # an open of the next file seen
    missing: bool = False  # a read of one of its files missed the page cache
    fds: dict[int, int] = field(default_factory=dict)  # warmed entries' open files, by index
    ahead: int = 0  # bytes the entries in (pos, queued) count against ``max_bytes``
    files_ahead: int = 0  # the entries in (pos, queued) that are warmed (weight > 0)
    on_miss: OnMiss | None = None  # what ``opened`` hands out for this window (made once)
    hold: Hold | None = None


class ReadAhead:
    """Cross-file read-ahead (the module docstring has the policy). Thread-safe: ``opened``
    is called by the requests' thread, the warms run in one worker thread (started at the
    first warm, stopped by ``close``)."""

    def __init__(
        self,
        files: int = READ_AHEAD_FILES,
        max_bytes: int = READ_AHEAD_BYTES,
        windows: int = READ_AHEAD_WINDOWS,
    ) -> None:
        self.files = files
        self.max_bytes = max_bytes
        self.windows = windows
        self._windows: collections.OrderedDict[Hashable, _Window] = collections.OrderedDict()
        self._busy = 0  # entries the worker took from the queue and has not finished
        # Entries given to the worker: bounded (the oldest dropped), one window's worth each.
        self._queue: collections.deque[tuple[_Window, int]] = collections.deque(
            maxlen=files * windows
        )
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def opened(
        self,
        directory: Hashable,
        name: bytes,
        listing: Listing,
        warm: Warm,
        hold: Hold | None = None,
    ) -> tuple[OnMiss | None, int | None]:
        """The reader opened entry ``name`` of ``directory``, whose listing is ``listing``;
        ``warm(nodes, length)`` (in the worker) reads the first ``length`` bytes of each of a
        batch of its files into the page cache. Returns what to call when a read of this file
        misses the page cache (``MemberFile``'s ``on_miss``: only then does the window read
        ahead, so that a reader served from the page caches costs no warms), and its fd if the
        worker opened it already (the caller owns it). ``hold()``: the context the worker's
        warm of one batch (at most ``WARM_BATCH`` entries) runs in (an error entering it skips
        the batch: harmless, as a failed warm is)."""
        stale: list[int] = []
        try:
            with self._cond:
                if self._closed:
                    return None, None
                window = self._windows.get(directory)
                at = None
                if window is not None and window.listing is listing:
                    if _index(listing, name, window.pos, window.pos + 1) is not None:
                        return window.on_miss, None  # the same again
                    at = _next_file(listing, name, window.pos + 1, window.pos + 1 + self.files)
                if at is None:  # a new directory, or a jump: start over, warm nothing yet
                    window = self._start(directory, name, listing, warm, window, stale, hold)
                    return (None if window is None else window.on_miss), None
                assert window is not None
                # The entries passed over to reach ``at`` are no regular files (``_next_file``):
                # of those that left (pos, queued), only ``at`` itself counted in ``ahead``
                # (a reader past ``queued`` has none ahead: ``_plan`` starts over from it).
                if at < window.queued:
                    weight = self._weight(listing[at][1])
                    window.ahead -= weight
                    if weight:
                        window.files_ahead -= 1
                window.pos = at
                window.ordered = True
                self._windows.move_to_end(directory)
                fd = window.fds.pop(at, None) if window.fds else None
                if window.fds:
                    stale += [window.fds.pop(i) for i in [i for i in window.fds if i < at]]
                if window.missing:
                    self._queue_ahead(window)
                return window.on_miss, fd
        finally:
            _close(stale)

    def _missed(self, window: _Window) -> None:
        with self._cond:
            if not window.live:
                return
            window.missing = True
            if window.ordered:
                self._queue_ahead(window)

    def _queue_ahead(self, window: _Window) -> None:
        """Top the window up once at most half of either bound is queued ahead of the reader
        (``files // 2`` files to warm, ``max_bytes // 2`` of their bytes): the worker then
        wakes once per ``files // 2`` opens of small files (per half of ``max_bytes`` of big
        ones) and warms them in batches under one ``hold``, not once per open (that wake-up
        and its lock cost more than the warm: a cold ``find | xargs cat`` of 20k small files
        took 7.1 s of daemon CPU per pass topped up at every open, 5.4 s topped up at half the
        entries, as this rule does for such files). Entries that are not warmed (empty
        files, directories, links) do not count: a window they fill is topped up at each open,
        as before."""
        if window.files_ahead > self.files // 2 or window.ahead > self.max_bytes // 2:
            return
        queued = self._plan(window)
        if queued:
            self._queue.extend((window, i) for i in queued)
            self._ensure_worker()
            self._cond.notify()

    def _start(
        self,
        directory: Hashable,
        name: bytes,
        listing: Listing,
        warm: Warm,
        old: _Window | None,
        stale: list[int],
        hold: Hold | None = None,
    ) -> _Window | None:
        if old is not None:
            _retire(old, stale)
        at = _index(listing, name, 0, len(listing))
        if at is None:
            self._windows.pop(directory, None)
            return None
        last = next(reversed(self._windows.values()), None)
        window = _Window(listing, warm, at, at + 1, hold=hold)
        window.on_miss = functools.partial(self._missed, window)
        # A walk that read its last directory in order to its last file goes on here (find
        # lists a directory's files, then the next directory's): in order from its first file.
        window.ordered = at == _first_file(listing) and last is not None and _walked(last, self)
        self._windows[directory] = window
        self._windows.move_to_end(directory)
        while len(self._windows) > self.windows:
            _retire(self._windows.popitem(last=False)[1], stale)
        return window

    def _plan(self, window: _Window) -> list[int]:
        """The entries after ``window.pos`` within the bounds that are not queued yet: from
        ``window.queued`` on, with the bytes of those queued before it (``window.ahead``), so
        that each open costs the entries it adds, not the whole window again."""
        listing, start = window.listing, window.pos + 1
        out = []
        end = min(len(listing), start + self.files)
        if window.queued > start:
            i, ahead, count = window.queued, window.ahead, window.files_ahead
        else:
            i, ahead, count = start, 0, 0
        while i < end:
            weight = self._weight(listing[i][1])
            if weight:
                ahead += weight
                if ahead > self.max_bytes and i > start:
                    ahead -= weight
                    break
                out.append(i)
                count += 1
            i += 1
        if i > window.queued:
            window.queued, window.ahead, window.files_ahead = i, ahead, count
        return out

    def _weight(self, node: Node) -> int:
        """What entry ``node`` counts against ``max_bytes`` (0: it is not warmed)."""
        if node.kind == "file" and node.size and node.origin is not None:
            return min(node.size, self.max_bytes)
        return 0

    def _ensure_worker(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="imgfs-readahead", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                window = self._queue[0][0]
                batch: list[int] = []
                while self._queue and self._queue[0][0] is window and len(batch) < WARM_BATCH:
                    i = self._queue.popleft()[1]
                    if window.live and i > window.pos:  # else abandoned, or the reader got there
                        batch.append(i)
                self._busy += len(batch)
            if batch:
                self._warm_batch(window, batch)

    def _warm_batch(self, window: _Window, batch: list[int]) -> None:
        """Warm the entries of ``batch`` (none the reader had reached when ``_work`` took
        them) in one ``warm`` call inside one ``hold``, and keep the fds of those it has not
        reached since."""
        fds: Sequence[int | None] = ()
        stale: list[int] = []
        try:
            with contextlib.nullcontext() if window.hold is None else window.hold():
                fds = window.warm([window.listing[i][1] for i in batch], self.max_bytes)
        except Exception as exc:  # harmless: a hold that cannot be had (a writer's lock), or
            log.debug("read-ahead of %d files: %s", len(batch), exc)  # the reader's open says
        finally:
            with self._cond:
                self._busy -= len(batch)
                for i, fd in zip(batch, fds, strict=False):  # (none if the warm failed)
                    if fd is None:
                        continue
                    if window.live and i > window.pos and i not in window.fds:
                        window.fds[i] = fd
                    else:
                        stale.append(fd)
            _close(stale)

    def pending(self) -> int:
        """Entries queued for the worker or being warmed by it (tests)."""
        with self._cond:
            return len(self._queue) + self._busy

    def open_fds(self) -> int:
        """Files the worker opened that no reader took yet (tests)."""
        with self._cond:
            return sum(len(w.fds) for w in self._windows.values())

    def close(self) -> None:
        stale: list[int] = []
        with self._cond:
            self._closed = True
            self._queue.clear()
            for window in self._windows.values():
                _retire(window, stale)
            self._windows.clear()
            self._cond.notify_all()
            thread = self._thread
        _close(stale)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)


def _retire(window: _Window, stale: list[int]) -> None:
    """``window`` is no longer read: its queued entries are passed over, its fds closed."""
    window.live = False
    stale += window.fds.values()
    window.fds.clear()


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _walked(window: _Window, ahead: ReadAhead) -> bool:
    """Whether ``window`` was read in order up to its last regular file (none in the next
    ``ahead.files`` entries)."""
    listing, start = window.listing, window.pos + 1
    return window.ordered and not any(
        listing[i][1].kind == "file" for i in range(start, min(len(listing), start + ahead.files))
    )


def _first_file(listing: Listing) -> int | None:
    return next((i for i, (_, node) in enumerate(listing) if node.kind == "file"), None)


def _next_file(listing: Listing, name: bytes, start: int, end: int) -> int | None:
    """The index of ``name`` if it is the first regular file of ``listing[start:end]`` (the
    next file a reader in listing order opens: directories, links and devices between are
    passed over), else None."""
    for i in range(start, min(end, len(listing))):
        entry, node = listing[i]
        if entry == name:
            return i
        if node.kind == "file":
            return None
    return None


def _index(listing: Listing, name: bytes, start: int, end: int) -> int | None:
    """The index of ``name`` among ``listing[start:end]``, or None."""
    for i in range(max(start, 0), min(end, len(listing))):
        if listing[i][0] == name:
            return i
    return None
