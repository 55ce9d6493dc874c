"""The pyfuse3 adapter: the mounted tree served over FUSE.

Owns: the inode table, open handles, the kernel cache policy (timeouts, keep_cache), the
thread hand-off of blocking core calls, the live-view poller, and the ONE place where
exceptions become errno values (``_errno_for``; every handler runs inside ``_boundary``).
Must not know: store formats, tar-split, how blobs are generated (it calls the core).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import pyfuse3
import trio

from imgfs.cache.snapshots import Snapshot
from imgfs.errors import (
    AmbiguousName,
    CorruptStore,
    ImgfsError,
    IntegrityError,
    LockBusy,
    NotFound,
    OverBudget,
    StorePermissionError,
)
from imgfs.fuse import requestlog
from imgfs.fuse.inodes import ROOT_INODE, InodeTable
from imgfs.store import locks
from imgfs.store.image import Store
from imgfs.views import content as contents
from imgfs.views.content import Caches, Content, Inline, Snapshotted, Streamed
from imgfs.views.keys import ROOT, Key, display
from imgfs.views.node import Node, Ownership
from imgfs.views.tree import TreeView, build_view

log = logging.getLogger(__name__)

STABLE_TIMEOUT = 86400.0  # content-addressed entries never change
NAME_TIMEOUT = 1.0  # names (images, tags) follow the store within the poll period
POLL_SECONDS = 1.0
BLOCK_SIZE = 1 << 20
READ_AHEAD = 4 << 20
SNAPSHOT_AHEAD = 16 << 20  # advised after a snapshot read that missed the page cache
READ_AHEAD_WINDOWS = 2  # per --direct handle: the one being served and one more
_QUIET_NAMESPACES = (b"security.", b"system.")  # xattrs imgfs only has where the tar has them
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _errno_for(exc: BaseException) -> int:
    """The errno for an exception that reached a handler (the only mapping there is)."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    if isinstance(exc, NotFound | AmbiguousName):
        return errno.ENOENT
    if isinstance(exc, StorePermissionError):
        return errno.EACCES
    if isinstance(exc, CorruptStore | ImgfsError):
        return errno.EIO
    return errno.EIO


def _boundary(handler: F) -> F:
    """Run a handler so that only FUSEError leaves it (pyfuse3 unmounts on anything else)."""

    @functools.wraps(handler)
    async def wrapper(self: Operations, *args: Any) -> Any:
        if self.debug:  # --debug: one log line per request (imgfs/fuse/requestlog.py)
            return await requestlog.traced(handler, args, guarded(self, *args), self.inodes.key)
        try:  # guarded's body again: one coroutine less per request (three per file read)
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise _fuse_error(handler, exc) from None

    async def guarded(self: Operations, *args: Any) -> Any:
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise _fuse_error(handler, exc) from None

    return cast(F, wrapper)


def _fuse_error(handler: Callable[..., Any], exc: Exception) -> pyfuse3.FUSEError:
    """The FUSEError a handler's exception becomes, logged (the handler named)."""
    if isinstance(exc, ImgfsError):
        level = logging.DEBUG if isinstance(exc, NotFound) else logging.ERROR
        log.log(level, "%s: %s", handler.__name__, exc)
    else:
        log.exception("%s failed unexpectedly", handler.__name__)
    return pyfuse3.FUSEError(_errno_for(exc))


@dataclass(eq=False)
class _Fetch:
    """One read-ahead window of a --direct handle, read by a worker thread."""

    start: int
    length: int
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes = b""
    error: Exception | None = None

    def covers(self, off: int, size: int) -> bool:
        return self.start <= off and off + size <= self.start + self.length


@dataclass
class _Handle:
    ino: int
    key: Key
    content: Content | None = None  # files
    fetches: list[_Fetch] = field(default_factory=list)  # --direct read-ahead windows
    listing: list[tuple[bytes, Node]] = field(default_factory=list)  # directories


class Operations(pyfuse3.Operations):
    """imgfs's pyfuse3 Operations. All state is touched on the trio thread only."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self, store: Store, caches: Caches, ownership: Ownership, debug: bool = False
    ) -> None:
        super().__init__()
        self.store = store
        self.caches = caches
        self.ownership = ownership
        self.debug = debug
        self.inodes = InodeTable(ROOT)
        self.handles: dict[int, _Handle] = {}
        self._next_fh = 1
        # Bytes that open small files (Inline content) hold at once: one largest big-data item.
        self.inline_limit = caches.budget.big_data_item
        self._inline_held = 0
        self.limiter = trio.CapacityLimiter(8)
        # Requests that found a store lock held by a writer wait here, on their own threads:
        # a writer holding layers.lock never takes the slots of requests that need no lock.
        self.lock_waits = trio.CapacityLimiter(8)
        self._nowait_flag = os.RWF_NOWAIT  # 0 once the cache's file system refused it
        # The buffer inline snapshot reads fill (see _read_snapshot): one, reused.
        self._scratch = bytearray(BLOCK_SIZE)
        self.view = build_view(store.images, _now_ns(), caches)
        self._listing_failed = False

    # -- helpers -----------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a worker thread; first without waiting for store locks, and again
        (behind ``lock_waits``) if a writer held one."""
        try:
            return await trio.to_thread.run_sync(_no_waiting, fn, *args, limiter=self.limiter)
        except LockBusy:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.lock_waits)

    def _key(self, ino: int) -> Key:
        key = self.inodes.key(ino)
        if key is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return cast(Key, key)

    def _attrs(self, node: Node, ino: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = ino
        attrs.generation = 0
        timeout = STABLE_TIMEOUT if node.stable else NAME_TIMEOUT
        if self.ownership.shared and (node.mode is not None or self.ownership.self_checked):
            # Other users reach the mount: the kernel must ask again on every path walk, so
            # that the view access rule (``_visible``) sees each caller, not a cached answer.
            # Without default_permissions (self_checked) that holds for every node.
            timeout = 0.0
        if node.provisional:  # a listing's stand-in: a stat must ask for the real node
            timeout = 0.0
        attrs.entry_timeout = timeout
        attrs.attr_timeout = timeout
        attrs.st_mode = self.ownership.mode(node.kind) if node.mode is None else node.mode
        attrs.st_nlink = node.nlink or (2 if node.kind == "dir" else 1)
        attrs.st_uid = self.ownership.uid if node.uid is None else node.uid
        attrs.st_gid = self.ownership.gid if node.gid is None else node.gid
        attrs.st_rdev = node.rdev
        attrs.st_size = node.size
        attrs.st_blksize = BLOCK_SIZE
        attrs.st_blocks = (node.size + 511) // 512
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = node.mtime_ns
        return attrs

    async def _node(self, key: Key) -> Node:
        """The node of ``key``; a cached ``layers/``/``rootfs/`` node without a thread hop."""
        node = self.view.peek(key)
        if node is None:
            node = await self._run(self.view.node, key)
        return cast(Node, node)

    async def _visible(self, key: Key, caller: _Caller) -> Node:
        """The node of ``key`` if ``caller`` may see it: the ONE place of the access rule for
        lookup, getattr, readlink, xattrs, open, opendir and access. With default_permissions
        the kernel checks the shown modes and this adds ``Ownership.may_search`` of the
        directory holding a ``layers/``/``rootfs/`` node; without (a rootless store mounted by
        its owner: ``Ownership.self_checked``) nothing else checks, so every node needs search
        permission on its directory (``Ownership.allows``) and every lookup asks again."""
        node = await self._node(key)
        if self.ownership.self_checked:
            if key != ROOT:
                self._check_access(await self._node(key.parent()), caller, os.X_OK)
            return node
        if node.mode is not None and self.ownership.shared:
            parent = await self._node(key.parent())
            if parent.mode is not None and not self.ownership.may_search(caller.uid, parent.mode):
                raise pyfuse3.FUSEError(errno.EACCES)
        return node

    def _check_access(self, node: Node, caller: _Caller, want: int) -> None:
        """EACCES unless ``caller`` may ``want`` (R_OK/X_OK) on ``node``: the whole check when
        self_checked (``Ownership.allows``), else the view rule on top of the kernel's
        (``Ownership.may_open_view`` and ``may_search``, ``layers/``/``rootfs/`` nodes only)."""
        own = self.ownership
        if own.self_checked:
            allowed = own.allows(node, want, caller.uid, caller.gid, caller.groups)
        elif node.mode is None:
            allowed = True  # the kernel checked imgfs's own mode
        elif want & os.X_OK:
            allowed = own.may_search(caller.uid, node.mode)
        else:
            allowed = own.may_open_view(caller.uid, node.mode)
        if not allowed:
            raise pyfuse3.FUSEError(errno.EACCES)

    def _new_fh(self, handle: _Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        return fh

    # -- metadata ----------------------------------------------------------------------------

    @_boundary
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        parent = self._key(parent_inode)
        caller = _caller(ctx)
        self._check_access(await self._visible(parent, caller), caller, os.X_OK)
        node = self.view.peek_child(parent, name)
        if node is None:
            try:
                node = await self._run(self.view.lookup, parent, name)
            except NotFound:
                negative = pyfuse3.EntryAttributes()
                negative.st_ino = 0
                negative.entry_timeout = NAME_TIMEOUT
                if self.ownership.shared and self.ownership.self_checked:
                    negative.entry_timeout = 0.0  # no kernel check guards a cached answer
                return negative
        return self._attrs(node, self.inodes.remember(node.key))

    @_boundary
    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        node = await self._visible(self._key(inode), _caller(ctx))
        return self._attrs(node, inode)

    @_boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = await self._visible(self._key(inode), _caller(ctx))
        if node.kind != "link":
            raise pyfuse3.FUSEError(errno.EINVAL)
        target: bytes = node.target
        return target

    @_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        key = self._key(inode)
        caller = _caller(ctx)
        self._check_access(await self._visible(key, caller), caller, os.R_OK)
        listing = self.view.peek_children(key)  # built once per view: no hop after the first
        if listing is None:
            listing = await self._run(self.view.children, key)
        return self._new_fh(_Handle(inode, key, listing=listing))

    @_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self.handles[fh].listing
        inodes, reply, attrs = self.inodes, pyfuse3.readdir_reply, self._attrs
        for index in range(start_id, len(listing)):
            name, node = listing[index]
            key = node.key
            ino = inodes.ino(key)
            if not reply(token, name, attrs(node, ino), index + 1):
                break
            inodes.remember(key, ino)

    @_boundary
    async def releasedir(self, fh: int) -> None:
        self.handles.pop(fh, None)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            try:
                self.inodes.forget(ino, count)
            except Exception:  # forget must never raise
                log.exception("forget(%d) failed", ino)

    @_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = BLOCK_SIZE
        data.f_namemax = 255
        data.f_files = len(self.view.images)
        return data

    @_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        caller = _caller(ctx)
        node = await self._visible(self._key(inode), caller)
        if self.ownership.self_checked:  # the kernel's rule for user.* without d_p: read
            self._check_access(node, caller, os.R_OK)
        for attr, value in node.xattrs:
            if attr.encode() == name:
                found: bytes = value
                return found
        namespace = name.partition(b".")[0] + b"."
        if namespace in _QUIET_NAMESPACES and not any(
            a.encode().startswith(namespace) for a, _ in node.xattrs
        ):
            # ls -l asks for security.selinux and system.posix_acl_* on every entry, and the
            # kernel never caches ENODATA; ENOTSUP makes it stop asking for the whole mount.
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        raise pyfuse3.FUSEError(errno.ENODATA)

    @_boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = await self._visible(self._key(inode), _caller(ctx))
        return [attr.encode() for attr, _ in node.xattrs]

    @_boundary
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        """access(2), and chdir when self_checked (the kernel asks only without
        default_permissions; with it, it has checked the shown mode already)."""
        if mode & os.W_OK:
            return False
        if not self.ownership.self_checked:
            return True
        caller = _caller(ctx)
        try:
            self._check_access(await self._visible(self._key(inode), caller), caller, mode)
        except pyfuse3.FUSEError:
            return False
        return True

    # -- files -------------------------------------------------------------------------------

    @_boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        key = self._key(inode)
        caller = _caller(ctx)
        view = self.view
        node = await self._visible(key, caller)
        self._check_access(node, caller, os.R_OK)
        if node.kind != "file":
            codes = {"dir": errno.EISDIR, "link": errno.ELOOP}
            raise pyfuse3.FUSEError(codes.get(node.kind, errno.EACCES))
        # A known layers/ or rootfs/ file opens without a hop (its layer file at the first read)
        content = self.view.open_known(key, node if self.view is view else None)
        if content is None:
            content = await self._run(self.view.open, key)
        if isinstance(content, Inline):
            self._hold_inline(content, key)
        fh = self._new_fh(_Handle(inode, key, content))
        if isinstance(content, Inline):
            # Only content-addressed files keep the kernel's pages across opens: a manifest
            # rewritten with the same length and mtime is read again at the next open.
            return pyfuse3.FileInfo(fh=fh, keep_cache=node.stable)
        if isinstance(content, Streamed) and content.page_cache:
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        # Layer blobs use direct I/O: a reader's 1 MiB reads (st_blksize) reach us as 1 MiB
        # requests instead of 128 KiB page-cache ones, a fraction of the Python round trips.
        # Measured here, cp of a 1 GiB blob: cold 3.9-6.2 s -> 2.1-2.6 s; from a complete
        # snapshot with the kernel's cache cold 3.8 s -> about 0.9 s (page cache warm: 0.55 s).
        # The price: no shared mmap of layer blobs (the README says so). Complete snapshots
        # stay direct I/O too. With keep_cache (measured again, fresh daemon each, medians of
        # 3, load 5.2-5.6, 1 GiB blob): a cp right after the generating cp 2.42 s vs 0.94 s,
        # daemon CPU 1.03 vs 0.40 s; cp after drop_caches 2.58 vs 1.83 s (CPU 0.95 vs 0.60);
        # cat after drop_caches 1.97 vs 1.20 s; only a repeat read whose pages the kernel still
        # holds wins (cat 0.34 vs 0.72 s, CPU 0.00 vs 0.48). Filling the kernel's cache costs
        # the daemon more per byte: ~4,360 requests of ~240 KiB instead of 1,090 of 1 MiB (the
        # FUSE mount's 128 KiB read-ahead), and the page-cache reply path spins in
        # fuse_copy_fill (12.6 % of the daemon's samples, perf) where direct I/O copies
        # straight to the reader; a 4 MiB read_ahead_kb gave 1 MiB requests but no less CPU.
        return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=True)

    @_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        # pyfuse3 accepts any contiguous buffer: memoryviews avoid a copy.
        handle = self.handles[fh]
        content = handle.content
        try:
            if isinstance(content, Inline):
                return cast(bytes, memoryview(content.data)[off : off + size])
            if isinstance(content, Snapshotted):
                return cast(bytes, await self._read_snapshot(content.snapshot, off, size))
            assert isinstance(content, Streamed)
            if content.page_cache:  # a layer file: inline unless that would wait
                data = contents.read_nowait(content, off, size)
                if data is None:
                    data = await self._run(content.reader.read, off, size)
                return data
            return cast(bytes, await self._read_direct(handle, content, off, size))
        except IntegrityError:
            for ino in self._names_of(handle):
                self._drop_cached_pages(ino)
            raise

    def _names_of(self, handle: _Handle) -> set[int]:
        """The inodes of ``handle``'s file that are open (its ``rootfs/`` and ``layers/`` names
        in every image with the layer: one identity, one verifier), read yet or not: a failure
        must drop their pages."""
        identity = _identity_of(handle.content)
        return {handle.ino} | {
            other.ino
            for other in self.handles.values()
            if identity is not None and _identity_of(other.content) == identity
        }

    def _drop_cached_pages(self, ino: int) -> None:
        """The file failed a check: drop whatever the kernel cached of it. In a thread, after
        this request's reply: invalidating a page that this very read holds would deadlock."""
        trio.lowlevel.spawn_system_task(self._invalidate, ino)

    async def _invalidate(self, ino: int) -> None:
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino)
        except Exception as exc:  # the kernel may have forgotten the inode already
            log.debug("invalidate_inode(%d): %s", ino, exc)

    async def _read_snapshot(self, snap: Snapshot, off: int, size: int) -> bytes | memoryview:
        end = min(off + size, snap.size)
        if end <= off:
            return b""
        if end > snap.published and snap.error is None:
            await _until_published(snap, end)  # woken by the producer: no thread waits
        if end <= snap.published:
            # Read into the one scratch buffer: pyfuse3 copies the reply to the kernel
            # (fuse_reply_buf, a writev) as soon as this handler returns, before the event loop
            # runs any other request, and nothing awaits between here and there. A fresh
            # bytearray per 1 MiB request was ~50 us of memset each, the largest per-read cost
            # above the minimal fs's pread (py-spy of the daemon during cat, page cache warm).
            n = end - off
            buf = memoryview(self._scratch)[:n] if n <= len(self._scratch) else bytearray(n)
            try:
                got = os.preadv(snap.fd, [buf], off, self._nowait_flag)
            except BlockingIOError:
                got = 0
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL) or not self._nowait_flag:
                    raise
                # The cache dir's file system has no RWF_NOWAIT (tmpfs): its pages are in
                # memory anyway, so read inline without the flag from now on.
                log.info("cache file system lacks RWF_NOWAIT; reading snapshots inline")
                self._nowait_flag = 0
                got = os.preadv(snap.fd, [buf], off)
            if got == n:
                return memoryview(buf)
        # Not in the page cache (a thread reads it from disk, and asks for the next
        # SNAPSHOT_AHEAD bytes at once, so the requests that follow are served inline: a
        # complete snapshot read through the kernel's page cache comes as 128 KiB requests),
        # or generation failed or stopped before the range (Snapshot.read raises its error).
        data: bytes = await self._run(snap.read, off, size, None, SNAPSHOT_AHEAD)
        return data

    async def _read_direct(
        self, handle: _Handle, content: Streamed, off: int, size: int
    ) -> bytes | memoryview:
        # Reads are served from READ_AHEAD windows read in a worker thread (one hop per window,
        # not per request). Requests that the kernel sends concurrently wait for the window
        # that covers them instead of reading it again. Reading window n+1 in the background
        # while serving window n was measured slower, twice (GIL contention on 2 cores: 358 vs
        # 416 MB/s; and again with the sha256 hashed behind the reads, cp of the 1 GiB blob
        # cold: 4.3-8.1 s vs 2.2-3.5 s), so not: the overlap comes from the verifier's hash
        # thread instead.
        fetch = next((f for f in handle.fetches if f.covers(off, size)), None)
        if fetch is None:
            fetch = self._start_fetch(handle, content, off, max(size, READ_AHEAD))
        await fetch.done.wait()
        if fetch.error is not None:
            raise fetch.error
        return memoryview(fetch.data)[off - fetch.start : off - fetch.start + size]

    def _start_fetch(self, handle: _Handle, content: Streamed, start: int, length: int) -> _Fetch:
        fetch = _Fetch(start, length)
        handle.fetches = [f for f in handle.fetches[-(READ_AHEAD_WINDOWS - 1) :] if f.start < start]
        handle.fetches.append(fetch)
        trio.lowlevel.spawn_system_task(self._fetch, content, fetch)
        return fetch

    async def _fetch(self, content: Streamed, fetch: _Fetch) -> None:
        try:
            fetch.data = await self._run(content.reader.read, fetch.start, fetch.length)
        except Exception as exc:  # raised by the reads that wait for this window
            fetch.error = exc
        except BaseException:
            fetch.error = ImgfsError("read-ahead was cancelled")
            raise
        finally:
            fetch.done.set()

    @_boundary
    async def flush(self, fh: int) -> None:
        """Nothing to write back at a close of a read-only file: ENOSYS, which the kernel
        keeps for the mount (``fc->no_flush``: no FLUSH request again, one round trip less
        per close; pyfuse3's default answers 0, so every close of every file asked)."""
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_boundary
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        content = None if handle is None else handle.content
        if isinstance(content, Inline):
            self._inline_held -= len(content.data)
        elif isinstance(content, Streamed) and content.page_cache:
            contents.release(self.caches, content)  # a layer file: one close(2), inline
        elif content is not None:
            await self._run(contents.release, self.caches, content)

    def _hold_inline(self, content: Inline, key: Key) -> None:
        """Count an open small file's bytes against the budget: the bytes open handles hold
        are bounded too (forty opens of one 60 MiB manifest would hold 2.4 GB)."""
        size = len(content.data)
        if self._inline_held + size > self.inline_limit and self._inline_held:
            raise OverBudget(
                f"{display(key)}: {size} bytes would take the open files over "
                f"{self.inline_limit} bytes of the memory budget (--memory); close some first"
            )
        self._inline_held += size

    # -- live view ---------------------------------------------------------------------------

    async def run_background(self) -> None:
        """Poll the store's lock tokens and follow changes (pulls, rmi, tags)."""
        while True:
            await trio.sleep(POLL_SECONDS)
            try:
                changed = await self._run(self.store.changed)
                if changed:
                    await self._follow_change()
            except Exception:
                log.exception("refreshing the store view failed")

    async def _follow_change(self) -> None:
        old = self.view
        try:
            images = await self._run(self.store.images)
        except ImgfsError as exc:  # a store mid-change or out of resources: keep what we show
            if not self._listing_failed:
                log.error("cannot list the store's images (keeping the last view): %s", exc)
            self._listing_failed = True
            return
        self._listing_failed = False
        new = TreeView(images, _now_ns(), self.caches)
        self.view = new
        gone = set(old.images) - set(new.images)
        log.info("store changed: %d images (%d removed)", len(new.images), len(gone))
        for image_id in gone:
            pyfuse3.invalidate_entry_async(ROOT_INODE, image_id.encode(), ignore_enoent=True)

    def close(self) -> None:
        for handle in self.handles.values():
            if handle.content is not None:
                contents.release(self.caches, handle.content)
        self.handles.clear()
        self.caches.close()


def _identity_of(content: Content | None) -> Hashable | None:
    """The file a streamed content reads, as its verifier knows it (None for other contents)."""
    return content.identity if isinstance(content, Streamed) else None


async def _until_published(snap: Snapshot, end: int) -> None:
    """Wait in trio until ``snap`` published up to ``end``, failed or stopped (the producer's
    thread wakes this task through the trio token); returns at once if it already has."""
    published = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def wake() -> None:  # in the producer's thread
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(published.set)

    withdraw = snap.notify_when_published(end, wake)
    if withdraw is None:
        return
    try:
        await published.wait()
    finally:
        withdraw()


def _no_waiting(fn: Callable[..., Any], *args: Any) -> Any:
    with locks.no_waiting():
        return fn(*args)


def _now_ns() -> int:
    return time.time_ns()


@dataclass(frozen=True)
class _Caller:
    """Who sent a request (pyfuse3 passes no context for some internal calls: root)."""

    uid: int
    gid: int
    pid: int

    def groups(self) -> frozenset[int]:
        """The caller's supplementary groups (read only when a group's bits decide), from
        /proc: the request carries only uid, gid and pid. Unknown (the caller is gone): none."""
        try:
            with open(f"/proc/{self.pid}/status", "rb") as f:
                status = f.read(1 << 16)
        except OSError:
            return frozenset()
        for line in status.splitlines():
            if line.startswith(b"Groups:"):
                return frozenset(int(g) for g in line.split()[1:] if g.isdigit())
        return frozenset()


def _caller(ctx: pyfuse3.RequestContext | None) -> _Caller:
    if ctx is None:
        return _Caller(0, 0, 0)
    return _Caller(int(ctx.uid), int(ctx.gid), int(ctx.pid))
