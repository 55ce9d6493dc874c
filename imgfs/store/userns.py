"""Opening a rootless store's layer files from inside the user's user namespace.

Owns: deciding whether a store is rootless for this process (the store is ours and we are not
root); the user's subordinate id ranges and the mapping rootless podman uses (container 0 -> the
user, container 1.. -> the ``/etc/subuid`` ranges one after the other, c/storage
``pkg/unshare``); the opener helper, a Python process in that user namespace (podman's pause
process's when it runs, else a new one mapped with ``newuidmap``/``newgidmap``; a fork of a
single-threaded caller, else a new interpreter that imports only what opening needs) that
opens files with ``LayerFiles`` -- the one resolver, the same rules as everywhere -- and passes the
descriptors back over a ``SOCK_SEQPACKET`` unix socket (``SCM_RIGHTS``); its bounded binary
protocol, its restart; ``UsernsLayerFiles``, the FileOpener of a rootless layer; and the texts
that say what is missing (at mount time, and in the EIO of a file that cannot be read).

Must not know: tar-split, blobs, caches, FUSE. The helper serves nothing and reads nothing: it
opens files beneath layer directories the caller names and hands back read-only descriptors.
The caller is the same user; the helper holds no more power than ``podman unshare`` gives them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import fcntl
import gc
import logging
import os
import pwd
import queue
import resource
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from imgfs.errors import (
    CorruptStore,
    ImgfsError,
    IntegrityError,
    LayerUnavailable,
    LayerUnreadable,
    MalformedMetadata,
    UnsafePath,
)
from imgfs.layer.tarsplit import clean_name
from imgfs.store.layerfiles import LayerFiles
from imgfs.store.locks import read_locked

log = logging.getLogger(__name__)

SUBUID = "/etc/subuid"
SUBGID = "/etc/subgid"
FIX_UIDMAP = "apt-get install uidmap"
_CLONE_NEWUSER = 0x10000000
_PR_SET_PDEATHSIG = 1
_MAX_REQUEST = 256 * 1024  # a request: header + what + layer directory paths, or a name
_MAX_REPLY = 4096
_MAX_HANDLES = 4096
_MAX_MESSAGE = 2000
_RETRY_SPAWN_AFTER = 30.0  # seconds before a failed start is tried again
FD_TABLE = 1024  # descriptors the daemon's table holds from the start (see grow_fd_table)
PRESTART_WAIT = 5.0  # seconds a mount waits for its helper before it is reported ready anyway
_REQ = struct.Struct("<BxxxIQ")  # op, handle, size
_REP = struct.Struct("<BBxxiI")  # status, error kind, errno, handle
_OP_DIRS, _OP_OPEN, _OP_CLOSE, _OP_PING, _OP_OPEN_MANY = 1, 2, 3, 4, 5
_ITEM = struct.Struct("<QH")  # an OPEN_MANY item: size, name length (then the name)
MAX_BATCH = 250  # files per OPEN_MANY (descriptors per reply: below SCM_MAX_FD, 253)
_OK, _FAIL = 0, 1
# Error classes that cross the socket, by index (never pickled: a class index and a message).
_KINDS: tuple[type[ImgfsError], ...] = (
    LayerUnavailable,
    IntegrityError,
    UnsafePath,
    MalformedMetadata,
    CorruptStore,
    ImgfsError,
)
# The helper's interpreter runs with -I -S: no site (the daemon's sys.path is passed instead, so
# no .pth file runs), and the packages imgfs, imgfs.store and imgfs.layer are entered without
# their __init__ (which import the whole library): it imports only what opening needs
# (userns, layerfiles, files, locks, errors, tarsplit), half of the start's ~0.1 s.
_HELPER_STUB = """
import sys, types
root = sys.argv[1]
sys.path[:0] = [root]
sys.path += [p for p in sys.argv[2].split("\\n") if p and p not in sys.path]
for name in ("imgfs", "imgfs.store", "imgfs.layer"):
    package = types.ModuleType(name)
    package.__path__ = [root + "/" + name.replace(".", "/")]
    sys.modules[name] = package
from imgfs.store.userns import helper_main
helper_main(sys.argv[3:])
"""
_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------
# who we are, and the mapping rootless podman uses


@dataclass(frozen=True)
class IdRange:
    start: int
    count: int


@dataclass(frozen=True)
class Identity:
    """The user this process runs as, with their subordinate ranges."""

    uid: int
    gid: int
    user: str
    uid_ranges: tuple[IdRange, ...]
    gid_ranges: tuple[IdRange, ...]

    @classmethod
    def current(cls, subuid: str = SUBUID, subgid: str = SUBGID) -> Identity:
        uid, gid = os.geteuid(), os.getegid()
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)
        return cls(
            uid,
            gid,
            user,
            tuple(subid_ranges(subuid, user, uid)),
            tuple(subid_ranges(subgid, user, uid)),
        )

    def uid_map(self) -> list[tuple[int, int, int]]:
        return id_mapping(self.uid, self.uid_ranges)

    def gid_map(self) -> list[tuple[int, int, int]]:
        return id_mapping(self.gid, self.gid_ranges)


def subid_ranges(path: str, user: str, uid: int) -> list[IdRange]:
    """The ranges of ``path`` (/etc/subuid format) for ``user`` (by name or numeric id), in
    file order, as c/storage's ``idtools.parseSubidFile`` reads them. A missing file: none."""
    ranges: list[IdRange] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read(1 << 20).splitlines()
    except OSError:
        return ranges
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split(":")
        if len(parts) != 3 or parts[0] not in (user, str(uid)):
            continue
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if start >= 0 and count > 0:
            ranges.append(IdRange(start, count))
    return ranges


def id_mapping(own: int, ranges: Sequence[IdRange]) -> list[tuple[int, int, int]]:
    """(inside, outside, count) lines: 0 -> ``own``, then each range from inside id 1 on."""
    lines = [(0, own, 1)]
    inside = 1
    for r in ranges:
        lines.append((inside, r.start, r.count))
        inside += r.count
    return lines


def inside_id(outside: int, mapping: Sequence[tuple[int, int, int]]) -> int | None:
    """The container id of host id ``outside`` under ``mapping``, or None if unmapped."""
    for inner, outer, count in mapping:
        if outer <= outside < outer + count:
            return inner + outside - outer
    return None


def is_rootless_store(path: str) -> bool:
    """Whether ``path`` (a store's graph root or layers dir) is our own store and we are not
    root: its layer files are then owned by us and by our subordinate uids."""
    euid = os.geteuid()
    if euid == 0:
        return False
    try:
        return os.stat(path).st_uid == euid
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# what is missing, in words


def _is_setid(path: str) -> bool:
    try:
        if os.stat(path).st_mode & stat.S_ISUID:
            return True
        return bool(os.getxattr(path, "security.capability"))
    except OSError:
        return False


def pause_process_pid(identity: Identity, environ: dict[str, str] | None = None) -> int | None:
    """The pid of rootless podman's pause process when one runs for us (its user namespace maps
    container 0 to us), else None. ``$XDG_RUNTIME_DIR/libpod/tmp/pause.pid``."""
    env = os.environ if environ is None else environ
    dirs = [env.get("XDG_RUNTIME_DIR", ""), f"/run/user/{identity.uid}"]
    for run_dir in dict.fromkeys(d for d in dirs if d):
        try:
            with open(os.path.join(run_dir, "libpod", "tmp", "pause.pid"), "rb") as f:
                pid = int(f.read(32).strip() or b"0")
        except (OSError, ValueError):
            continue
        if pid > 1 and _maps_us(pid, identity):
            return pid
    return None


def _maps_us(pid: int, identity: Identity) -> bool:
    try:
        if os.stat(f"/proc/{pid}").st_uid != identity.uid:
            return False
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read(4096).rpartition(b")")[2].split()[:1] == [b"Z"]:
                return False  # exited (podman starts a new one): not its namespace to join
        if os.stat(f"/proc/{pid}/ns/user").st_ino == os.stat("/proc/self/ns/user").st_ino:
            return False
        with open(f"/proc/{pid}/uid_map", "rb") as f:
            first = f.read(4096).split(b"\n", 1)[0].split()
        return [int(x) for x in first[:2]] == [0, identity.uid]
    except (OSError, ValueError):
        return False


def setup_problem(identity: Identity, search_path: str | None = None) -> str | None:
    """Why no user namespace with our subordinate ids can be made, as "what is missing (how to
    fix it)", or None. Static checks only (see ``UserNamespaceOpener.start`` for a real try)."""
    if pause_process_pid(identity) is not None:
        return None
    for tool in ("newuidmap", "newgidmap"):
        found = shutil.which(tool, path=search_path)
        if found is None:
            return f"{tool} is not installed ({FIX_UIDMAP})"
        if not _is_setid(found):
            return f"{found} is not setuid (apt-get install --reinstall uidmap)"
    fix = f"sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {identity.user}"
    if not identity.uid_ranges:
        return f"user {identity.user} has no subordinate uid range in {SUBUID} ({fix})"
    if not identity.gid_ranges:
        return f"user {identity.user} has no subordinate gid range in {SUBGID} ({fix})"
    return None


def mount_warning(store_root: str, problem: str) -> str:
    """The one line said at mount time when a rootless store's opener cannot work."""
    return (
        f"rootless store {store_root}: files owned by your subordinate uids cannot be read, "
        f"so layer blobs, layers/ and rootfs/ files that hold them fail with EIO: {problem}"
    )


def rootless_warning(store_root: str, opener: UserNamespaceOpener | None = None) -> str | None:
    """For the mount's start: None when the store is not rootless or the opener works (a
    helper is started and stopped here), else the one line to log. Starts no thread."""
    if not is_rootless_store(store_root):
        return None
    opener = opener or UserNamespaceOpener()
    try:
        opener.start(in_thread=False, fork=True)
    except LayerUnreadable:
        pass
    finally:
        problem = opener.problem()
        opener.close()
    return None if problem is None else mount_warning(store_root, problem)


def explain_denied(
    dirs: Sequence[str], name: bytes, what: str, problem: str, identity: Identity
) -> str:
    """An EIO's log text: the file, the first path element we may not pass and its owner (with
    the container uid it stands for), and the fix."""
    culprit, uid = _first_denied(dirs, name)
    owner = f"uid {uid}"
    inner = inside_id(uid, identity.uid_map()) if uid is not None else None
    if uid is None:
        owner = "an owner that cannot be seen"
    elif uid == identity.uid:
        owner = f"uid {uid} (you; container uid 0), without permission for you"
    elif inner is not None:
        owner = f"uid {uid} (your subordinate uid, container uid {inner})"
    return (
        f"{what}: file {name!r:.200}: permission denied: {culprit!r:.200} is owned by {owner}; "
        f"it can only be opened inside your user namespace, which is unavailable: {problem}"
    )


def _first_denied(dirs: Sequence[str], name: bytes) -> tuple[str, int | None]:
    """Walk ``name`` below the first layer dir with O_PATH; the element we may not pass."""
    try:
        parts = clean_name(name).split(b"/")
    except ImgfsError:
        return os.fsdecode(name), None
    base = dirs[0] if dirs else ""
    try:
        cur = os.open(base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return base, _owner(base)
    here = base
    try:
        for i, part in enumerate(parts):
            path = os.path.join(here, os.fsdecode(part))
            try:
                st = os.stat(part, dir_fd=cur, follow_symlinks=False)
            except PermissionError:
                return here, os.fstat(cur).st_uid  # no search permission in ``here``
            except OSError:
                return path, None
            if i == len(parts) - 1 or not stat.S_ISDIR(st.st_mode):
                return path, st.st_uid
            try:
                nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=cur)
            except OSError:
                return path, st.st_uid
            os.close(cur)
            cur, here = nxt, path
        return here, os.fstat(cur).st_uid
    finally:
        os.close(cur)


def _owner(path: str) -> int | None:
    try:
        return os.stat(path, follow_symlinks=False).st_uid
    except OSError:
        return None


def denied(exc: BaseException) -> bool:
    """Whether a LayerFiles error was a permission denial (EACCES/EPERM on the way)."""
    return isinstance(exc, LayerUnavailable) and isinstance(exc.__cause__, PermissionError)


# --------------------------------------------------------------------------------------------
# the client side


class _HelperGone(LayerUnavailable):
    """The helper died or stopped answering (handled here: it is restarted)."""


class _Process(Protocol):
    """What the client uses of a helper process (``subprocess.Popen`` or ``_Forked``)."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


class _Forked:
    """A helper forked without exec (``_Process``): only from a single-threaded process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._status: int | None = None

    def poll(self) -> int | None:
        if self._status is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self._status = os.waitstatus_to_exitcode(status)
        return self._status

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() > end:
                raise subprocess.TimeoutExpired(["opener"], timeout or 0.0)
            time.sleep(0.002)
        assert self._status is not None
        return self._status

    def kill(self) -> None:
        if self._status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def _fork_helper(sock_fd: int, ns_fd: int) -> _Forked:
    """The helper as a fork of this (single-threaded) process: no interpreter start and no
    imports (~0.05 s less); it keeps only ``sock_fd`` and ``ns_fd`` of our descriptors."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return _Forked(pid)
    try:  # the child: never returns
        # The daemon's uncollected garbage came along: a file object collected here would
        # close its old fd number, by then another descriptor (a layer file being sent).
        gc.disable()
        gc.freeze()
        signal.pthread_sigmask(signal.SIG_SETMASK, set())  # the daemon blocks its stop signals
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        low = 3
        for keep in sorted({sock_fd, ns_fd} - {-1}):
            os.closerange(low, keep)
            low = keep + 1
        os.closerange(low, 1 << 20)
        os.chdir("/")
        helper_main([str(sock_fd), str(parent), str(ns_fd)])
    finally:
        os._exit(1)


@dataclass
class _Helper:
    proc: _Process
    sock: socket.socket
    generation: int
    joined: bool


@dataclass(frozen=True)
class RemoteHandle:
    """Layer directories opened by the helper (valid for one helper generation)."""

    handle: int
    generation: int


class _Spawner:
    """One long-lived thread that starts helpers: PR_SET_PDEATHSIG fires when the thread that
    forked the child ends, so the helper must not be forked by a short-lived worker thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[
            tuple[Callable[[], object], concurrent.futures.Future[object]]
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def run(self, fn: Callable[[], _T]) -> _T:
        future: concurrent.futures.Future[object] = concurrent.futures.Future()
        self._put(fn, future)
        return future.result()  # type: ignore[return-value]

    def submit(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` in the thread without waiting (its errors are dropped)."""
        self._put(fn, concurrent.futures.Future())

    def _put(self, fn: Callable[[], object], future: concurrent.futures.Future[object]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # also after a fork
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=self._loop, args=(self._queue,), name="imgfs-userns", daemon=True
                )
                self._thread.start()
            self._queue.put((fn, future))

    @staticmethod
    def _loop(
        q: queue.SimpleQueue[tuple[Callable[[], object], concurrent.futures.Future[object]]],
    ) -> None:
        while True:
            fn, future = q.get()
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)


_SPAWNER = _Spawner()


class UserNamespaceOpener:
    """The client of one helper process; thread-safe (requests are serialised on one socket:
    an open costs tens of microseconds in the helper).

    The helper is started on first use (or by ``start``), restarted when it dies, and stops when
    this object is closed or this process ends (socket EOF, and PR_SET_PDEATHSIG).
    """

    def __init__(
        self,
        identity: Identity | None = None,
        *,
        search_path: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.identity = identity or Identity.current()
        self.search_path = search_path
        self.timeout = timeout
        self._lock = threading.Lock()
        self._helper: _Helper | None = None
        self._generation = 0
        self._failed: tuple[float, str] | None = None
        self._closed = False

    # -- state

    def problem(self) -> str | None:
        """Why the opener cannot work now (a static check, or the last start's failure)."""
        if self._failed is not None:
            return self._failed[1]
        return setup_problem(self.identity, self.search_path)

    @property
    def pid(self) -> int | None:
        helper = self._helper
        return None if helper is None else helper.proc.pid

    @property
    def joined_pause_process(self) -> bool:
        helper = self._helper
        return helper is not None and helper.joined

    def start(self, in_thread: bool = True, fork: bool = False) -> None:
        """Start the helper now if it is not running; raises LayerUnreadable with the reason.
        ``fork``: as a fork of this process, if it runs one thread only (a check before the
        daemon forks: see ``rootless_warning``), else a new interpreter."""
        with self._lock:
            self._ensure(in_thread, fork)

    def start_soon(self) -> threading.Event:
        """Start the helper in the spawner thread (skipped if a request is starting it
        already); the event is set once the try is over, whatever its outcome."""
        done = threading.Event()

        def start() -> None:
            try:
                if self._lock.acquire(blocking=False):
                    try:
                        self._ensure(in_thread=False)  # in the spawner thread already
                    except LayerUnreadable:
                        pass
                    finally:
                        self._lock.release()
            finally:
                done.set()

        _SPAWNER.submit(start)
        return done

    def close(self) -> None:
        """Stop the helper (idempotent); a later request starts a new one."""
        with self._lock:
            self._stop()

    # -- requests

    def ping(self) -> str:
        """The helper's view of itself (its uid, uid map and the imgfs modules it imported),
        for tests and diagnostics."""
        _, _, text = self._request(_OP_PING, 0, 0, b"")
        return text

    def open_dirs(self, dirs: Sequence[str], what: str) -> RemoteHandle:
        payload = what.encode("utf-8", "replace")[:512] + b"\0" + b"\0".join(map(os.fsencode, dirs))
        handle, _, _ = self._request(_OP_DIRS, 0, 0, payload)
        return RemoteHandle(handle, self._generation)

    def open(self, remote: RemoteHandle, name: bytes, size: int) -> int:
        if remote.generation != self._generation:
            raise _HelperGone("the opener was restarted")
        _, fd, _ = self._request(_OP_OPEN, remote.handle, size, name, remote.generation)
        if fd is None:
            raise _HelperGone("the opener answered without a descriptor")
        return fd

    def open_many(
        self, remote: RemoteHandle, items: Sequence[tuple[bytes, int]]
    ) -> list[int | None]:
        """Open up to MAX_BATCH files in one round trip: each one's fd, or None where the
        helper failed (``open`` of that one file says why)."""
        if remote.generation != self._generation:
            raise _HelperGone("the opener was restarted")
        if not 0 < len(items) <= MAX_BATCH:
            raise LayerUnavailable(f"opener: a batch of {len(items)} files")
        payload = b"".join(_ITEM.pack(size, len(name)) + name for name, size in items)
        _, fds, text = self._request_many(remote, payload, len(items))
        status = text.encode("latin-1")
        if len(status) != len(items) or status.count(b"\0") != len(fds):
            for fd in fds:
                os.close(fd)
            raise LayerUnavailable("opener: malformed batch reply")
        opened = iter(fds)
        return [next(opened) if ok == 0 else None for ok in status]

    def _request_many(
        self, remote: RemoteHandle, payload: bytes, count: int
    ) -> tuple[int, list[int], str]:
        message = _REQ.pack(_OP_OPEN_MANY, remote.handle, count) + payload
        if len(message) > _MAX_REQUEST:
            raise LayerUnavailable(f"opener request of {len(message)} bytes is too large")
        with self._lock:
            helper = self._ensure(True)
            if remote.generation != self._generation:
                raise _HelperGone("the opener was restarted")
            try:
                helper.sock.sendmsg([message])
                data, fds, flags, _ = socket.recv_fds(helper.sock, _MAX_REPLY, count)
            except OSError as exc:
                self._stop()
                raise _HelperGone(f"the opener stopped: {exc}") from exc
            if not data:
                self._stop()
                raise _HelperGone("the opener exited")
        if len(data) < _REP.size or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            for fd in fds:
                os.close(fd)
            raise LayerUnavailable("opener: malformed reply")
        status, kind, _err, handle_out = _REP.unpack_from(data)
        text = data[_REP.size :].decode("latin-1")
        if status != _OK:
            for fd in fds:
                os.close(fd)
            cls = _KINDS[kind] if kind < len(_KINDS) else LayerUnavailable
            raise cls(text)
        return handle_out, list(fds), text

    def release(self, remote: RemoteHandle) -> None:
        with contextlib.suppress(_HelperGone):
            self._request(_OP_CLOSE, remote.handle, 0, b"", remote.generation)

    def _request(
        self, op: int, handle: int, size: int, payload: bytes, generation: int | None = None
    ) -> tuple[int, int | None, str]:
        message = _REQ.pack(op, handle, size) + payload
        if len(message) > _MAX_REQUEST:
            raise LayerUnavailable(f"opener request of {len(message)} bytes is too large")
        with self._lock:
            helper = self._ensure(True)
            if generation is not None and generation != self._generation:
                raise _HelperGone("the opener was restarted")
            try:
                helper.sock.sendmsg([message])
                data, fds, flags, _ = socket.recv_fds(helper.sock, _MAX_REPLY, 1)
            except OSError as exc:  # EOF, EPIPE, ECONNRESET, timeout
                self._stop()
                raise _HelperGone(f"the opener stopped: {exc}") from exc
            if not data:
                self._stop()
                raise _HelperGone("the opener exited")
        fd = fds[0] if fds else None
        for extra in fds[1:]:
            os.close(extra)
        if len(data) < _REP.size or flags & socket.MSG_TRUNC:
            if fd is not None:
                os.close(fd)
            raise LayerUnavailable("opener: malformed reply")
        status, kind, _err, handle_out = _REP.unpack_from(data)
        text = data[_REP.size :].decode("utf-8", "replace")
        if status != _OK:
            if fd is not None:
                os.close(fd)
            cls = _KINDS[kind] if kind < len(_KINDS) else LayerUnavailable
            raise cls(text)
        return handle_out, fd, text

    # -- the helper's life

    def _ensure(self, in_thread: bool, fork: bool = False) -> _Helper:
        if self._helper is not None:
            if self._helper.proc.poll() is None:
                return self._helper
            log.warning("user-namespace opener (pid %d) died; restarting it", self._helper.proc.pid)
            self._stop()
        if self._failed is not None and time.monotonic() - self._failed[0] < _RETRY_SPAWN_AFTER:
            raise LayerUnreadable(self._failed[1])
        problem = setup_problem(self.identity, self.search_path)
        if problem is not None:
            self._failed = (time.monotonic(), problem)
            raise LayerUnreadable(problem)
        try:
            fork = fork and not in_thread and threading.active_count() == 1
            helper = _SPAWNER.run(self._spawn) if in_thread else self._spawn(fork)
        except LayerUnreadable as exc:
            self._failed = (time.monotonic(), str(exc))
            raise
        self._failed = None
        self._helper = helper
        return helper

    def _stop(self) -> None:
        helper, self._helper = self._helper, None
        if helper is None:
            return
        self._generation += 1
        helper.sock.close()  # the helper exits on EOF
        try:
            helper.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            helper.proc.kill()
            helper.proc.wait()

    def _spawn(self, fork: bool = False) -> _Helper:
        generation = self._generation + 1
        pause = pause_process_pid(self.identity)
        ns_fd = -1
        if pause is not None:
            try:
                ns_fd = os.open(f"/proc/{pause}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
                if not _maps_us(pause, self.identity):
                    os.close(ns_fd)
                    ns_fd = -1
            except OSError:
                ns_fd = -1
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = "\n".join(p for p in sys.path if os.path.isabs(p) and "\n" not in p)
        argv = [sys.executable, "-I", "-S", "-c", _HELPER_STUB, root, path]
        argv += [str(child.fileno()), str(os.getpid()), str(ns_fd)]
        try:
            proc: _Process
            if fork:
                proc = _fork_helper(child.fileno(), ns_fd)
            else:
                proc = subprocess.Popen(
                    argv,
                    pass_fds=[child.fileno()] + ([ns_fd] if ns_fd >= 0 else []),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                    cwd="/",
                )
        except OSError as exc:
            parent.close()
            raise LayerUnreadable(f"cannot start the opener: {exc.strerror}") from exc
        finally:
            child.close()
            if ns_fd >= 0:
                os.close(ns_fd)
        parent.settimeout(self.timeout)
        helper = _Helper(proc, parent, generation, ns_fd >= 0)
        try:
            self._handshake(helper)
        except BaseException:
            parent.close()
            proc.kill()
            proc.wait()
            raise
        self._generation = generation
        log.info(
            "user-namespace opener started (pid %d, %s)",
            proc.pid,
            f"joined podman's pause process {pause}" if helper.joined else "own namespace",
        )
        return helper

    def _handshake(self, helper: _Helper) -> None:
        step = self._recv_step(helper)
        if step != b"U":
            raise LayerUnreadable(f"the opener could not enter a user namespace: {step[1:]!r}")
        if not helper.joined:
            try:
                self._map(helper.proc.pid)
            except LayerUnreadable:
                helper.sock.send(b"X")
                raise
        helper.sock.send(b"M")
        step = self._recv_step(helper)
        if step != b"R":
            text = step[1:].decode("utf-8", "replace")
            raise LayerUnreadable(f"the opener failed in its user namespace: {text}")

    def _recv_step(self, helper: _Helper) -> bytes:
        try:
            step = helper.sock.recv(_MAX_REPLY)
        except OSError as exc:
            raise LayerUnreadable(f"the opener did not start: {exc}") from exc
        if not step:
            raise LayerUnreadable(f"the opener exited at start (status {helper.proc.wait()})")
        return step

    def _map(self, pid: int) -> None:
        """newgidmap, then newuidmap (c/storage's order), as rootless podman maps."""
        for tool, mapping in (
            ("newgidmap", self.identity.gid_map()),
            ("newuidmap", self.identity.uid_map()),
        ):
            path = shutil.which(tool, path=self.search_path)
            if path is None:
                raise LayerUnreadable(f"{tool} is not installed ({FIX_UIDMAP})")
            args = [str(n) for line in mapping for n in line]
            try:
                done = subprocess.run(
                    [path, str(pid), *args], capture_output=True, timeout=10, check=False
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise LayerUnreadable(f"{tool} failed: {exc}") from exc
            if done.returncode != 0:
                said = done.stderr.decode("utf-8", "replace").strip().splitlines()
                detail = said[-1] if said else f"exit status {done.returncode}"
                raise LayerUnreadable(
                    f"{tool} {pid} {' '.join(args)} failed: {detail[:300]} "
                    f"(check the ranges of {self.identity.user} in {SUBUID} and {SUBGID})"
                )


_shared: UserNamespaceOpener | None = None
_shared_lock = threading.Lock()


def shared_opener() -> UserNamespaceOpener:
    """The process's opener (one helper per process, started on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = UserNamespaceOpener()
        return _shared


class UsernsLayerFiles:
    """The FileOpener of one layer of a rootless store.

    A file the user may open directly is opened here (``LayerFiles``, no helper involved); one
    whose opening is denied (a subordinate uid's 0600 file, a 0700 directory, a 0000 file) is
    opened by the helper, with the layer's directories opened there under the layers lock. When
    the helper cannot run, such a file raises LayerUnreadable naming the file, its owner and the
    fix. Thread-safe.
    """

    def __init__(
        self,
        dirs: Sequence[str],
        what: str,
        lock_paths: Sequence[str],
        opener: UserNamespaceOpener | None = None,
    ) -> None:
        self.what = what
        self._dirs = list(dirs)
        self._lock_paths = list(lock_paths)  # the layers.lock files c/storage holds, in order
        self._opener = opener or shared_opener()
        self._lock = threading.Lock()
        self._remote: RemoteHandle | None = None
        self._direct: LayerFiles | None = None
        self._denied: LayerUnavailable | None = None
        # Directories (as the tar names them) where a direct open was denied: their other files
        # go to the helper at once (a 0700 directory of a container uid: all of them would fail).
        self._denied_dirs: set[bytes] = set()
        try:
            self._direct = LayerFiles(self._dirs, what)
        except LayerUnavailable as exc:
            if not denied(exc):
                raise
            self._denied = exc

    def _try_direct(self, name: bytes, size: int) -> int | LayerUnavailable | None:
        """The fd when this user may open ``name``; the error when it fails for another reason
        than a denial; None when the helper must open it."""
        parent = name.rpartition(b"/")[0]
        if self._direct is None or parent in self._denied_dirs:
            return None
        try:
            return self._direct.open(name, size)
        except LayerUnavailable as exc:
            if not denied(exc):
                return exc
            self._denied = exc
            self._denied_dirs.add(parent)
            return None

    def open(self, name: bytes, size: int) -> int:
        direct = self._try_direct(name, size)
        if isinstance(direct, LayerUnavailable):
            raise direct
        if direct is not None:
            return direct
        cause = self._denied
        for _attempt in range(2):
            try:
                return self._opener.open(self._remote_handle(cause, name), name, size)
            except _HelperGone:
                with self._lock:
                    self._remote = None
        raise LayerUnreadable(f"{self.what}: file {name!r:.200}: the opener keeps stopping")

    def open_many(
        self, items: Sequence[tuple[bytes, int]], advise: int = 0
    ) -> list[int | Exception | None]:
        """``assemble.BatchOpener``: the files below a directory where a direct open was
        denied are opened by the helper, one round trip per MAX_BATCH; the others are left to
        ``open`` at their turn (None: opening them ahead would gain nothing), except the
        first file of each directory not seen yet, which is opened directly here: if that is
        denied, the directory's other files of this call join the helper's batch at once
        (else a directory met for the first time cost one round trip per file). A file the
        helper could not open is asked for again alone, for its exact error."""
        results: list[int | Exception | None] = [None] * len(items)
        remote: list[int] = []
        tried: set[bytes] = set()  # directories whose first file was opened directly here
        for i, (name, size) in enumerate(items):
            parent = name.rpartition(b"/")[0]
            if self._direct is not None and parent not in self._denied_dirs and parent not in tried:
                tried.add(parent)
                direct = self._try_direct(name, size)
                if direct is not None:  # its fd, or its error (not a denial)
                    results[i] = direct
                    continue
            if self._direct is None or parent in self._denied_dirs:
                remote.append(i)
        for start in range(0, len(remote), MAX_BATCH):
            chunk = remote[start : start + MAX_BATCH]
            try:
                handle = self._remote_handle(self._denied, items[chunk[0]][0])
                fds: list[int | None] = self._opener.open_many(handle, [items[i] for i in chunk])
            except ImgfsError:  # unavailable or restarted: each file alone, with its error
                fds = [None] * len(chunk)
            for i, fd in zip(chunk, fds, strict=True):
                if fd is not None:
                    results[i] = fd
                    continue
                try:
                    results[i] = self.open(*items[i])
                except ImgfsError as exc:
                    results[i] = exc
        for (_, size), got in zip(items, results, strict=True):
            if advise and isinstance(got, int):  # the first bytes asked of the disk at once
                with contextlib.suppress(OSError):
                    os.posix_fadvise(got, 0, min(size, advise), os.POSIX_FADV_WILLNEED)
        return results

    def _remote_handle(self, cause: LayerUnavailable | None, name: bytes) -> RemoteHandle:
        with self._lock:
            remote = self._remote
            if remote is None:
                try:
                    with read_locked(self._lock_paths):
                        remote = self._opener.open_dirs(self._dirs, self.what)
                except LayerUnreadable as exc:
                    problem = self._opener.problem() or str(exc)
                    text = explain_denied(
                        self._dirs, name, self.what, problem, self._opener.identity
                    )
                    raise LayerUnreadable(text) from cause
                self._remote = remote
            return remote

    def close(self) -> None:
        """Close the directory fds here and in the helper (idempotent)."""
        if self._direct is not None:
            self._direct.close()
        with self._lock:
            remote, self._remote = self._remote, None
        if remote is not None:
            self._opener.release(remote)


def grow_fd_table(size: int = FD_TABLE) -> None:
    """Make this process's descriptor table hold ``size`` descriptors now (within
    RLIMIT_NOFILE). A batch from the helper brings up to MAX_BATCH descriptors at once, and the
    kernel grows a table by doubling it, waiting for an RCU grace period each time when the
    process runs several threads: the first cold blob of a daemon paid ~40 ms (two or three
    waits) in its first batch. A table never shrinks, and growing it in a single-threaded
    process does not wait."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    top = size if soft == resource.RLIM_INFINITY else min(size, soft)
    with contextlib.suppress(OSError):  # F_DUPFD: the first free number from top - 1 on
        os.close(fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, top - 1))  # (dup2 closed one in use)


def prestart(store_root: str, wait: float = PRESTART_WAIT) -> None:
    """Start this process's helper if ``store_root`` is rootless for us, and return once it
    runs (or failed to start): for the daemon, once serving (never before it daemonizes) and
    before the mount is reported ready, so that the first read finds it running instead of
    waiting for its start (the cold ``cp`` of a layer blob paid it). In a single-threaded
    process (the daemon before its loop starts) the helper is a fork of it (~20 ms, no
    interpreter start); else it is started in the spawner thread, waited for up to ``wait``
    seconds."""
    if not is_rootless_store(store_root):
        return
    grow_fd_table()
    opener = shared_opener()
    if threading.active_count() == 1:
        with contextlib.suppress(LayerUnreadable):
            opener.start(in_thread=False, fork=True)
        return
    opener.start_soon().wait(wait)


def open_layer_files(
    dirs: Sequence[str], what: str, lock_paths: Sequence[str]
) -> LayerFiles | UsernsLayerFiles:
    """The FileOpener for a layer: plain ``LayerFiles`` unless the store is rootless for us
    (then ``UsernsLayerFiles``). ``lock_paths``: the ``layers.lock`` files c/storage holds
    while reading the layer, in its order (an imagestore layer: the graph root's, then the
    image store's); the first one's directory decides whether the store is rootless."""
    if is_rootless_store(os.path.dirname(lock_paths[0])):
        return UsernsLayerFiles(dirs, what, lock_paths)
    return LayerFiles(list(dirs), what)


# --------------------------------------------------------------------------------------------
# the helper side (runs in its own process, in the user namespace)


def helper_main(argv: list[str]) -> None:
    """Entry point of the helper process: ``SOCK_FD PARENT_PID NS_FD`` (NS_FD -1: unshare)."""
    sock = socket.socket(fileno=int(argv[0]))
    parent, ns_fd = int(argv[1]), int(argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)  # the parent died before we could ask to follow it
    try:
        done = libc.setns(ns_fd, _CLONE_NEWUSER) if ns_fd >= 0 else libc.unshare(_CLONE_NEWUSER)
        if done != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        if ns_fd >= 0:
            os.close(ns_fd)
    except OSError as exc:
        sock.send(b"E" + f"{exc.strerror or exc}".encode()[:_MAX_MESSAGE])
        os._exit(1)
    sock.send(b"U")
    if sock.recv(16) != b"M":
        os._exit(1)
    if os.getuid() != 0:
        sock.send(b"E" + f"uid {os.getuid()} in the namespace, not 0".encode())
        os._exit(1)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # (again: ids changed)
    if os.getppid() != parent:
        os._exit(0)
    sock.send(b"R")
    _serve(sock)
    os._exit(0)


def _serve(sock: socket.socket) -> None:
    handles: dict[int, LayerFiles] = {}
    next_handle = 1
    while True:
        try:
            data, _anc, flags, _ = sock.recvmsg(_MAX_REQUEST + 1)  # any fds sent are dropped
        except InterruptedError:
            continue
        except OSError:
            return
        if not data:
            return
        fd: int | None = None
        fds: list[int] = []
        try:
            if len(data) < _REQ.size or len(data) > _MAX_REQUEST or flags & socket.MSG_TRUNC:
                raise LayerUnavailable("opener: malformed request")
            op, handle, size = _REQ.unpack_from(data)
            payload = data[_REQ.size :]
            reply_handle = 0
            text = ""
            if op == _OP_OPEN:
                files = handles.get(handle)
                if files is None:
                    raise LayerUnavailable(f"opener: no layer handle {handle}")
                fd = files.open(payload, size)
            elif op == _OP_OPEN_MANY:
                files = handles.get(handle)
                if files is None:
                    raise LayerUnavailable(f"opener: no layer handle {handle}")
                fds, text = _open_many(files, payload, size)
            elif op == _OP_DIRS:
                if len(handles) >= _MAX_HANDLES:
                    raise LayerUnavailable("opener: too many open layers")
                what_b, _, dirs_b = payload.partition(b"\0")
                dirs = [os.fsdecode(d) for d in dirs_b.split(b"\0") if d]
                handles[next_handle] = LayerFiles(dirs, what_b.decode("utf-8", "replace"))
                reply_handle, next_handle = next_handle, next_handle + 1
            elif op == _OP_CLOSE:
                closing = handles.pop(handle, None)
                if closing is not None:
                    closing.close()
            elif op == _OP_PING:
                with open("/proc/self/uid_map", encoding="ascii") as f:
                    text = " / ".join(" ".join(line.split()) for line in f.read(4096).splitlines())
                loaded = ",".join(sorted(m for m in sys.modules if m.startswith("imgfs.")))
                text = f"uid {os.getuid()}; uid_map {text}; imports {loaded}"
            else:
                raise LayerUnavailable(f"opener: unknown request {op}")
            reply = _REP.pack(_OK, 0, 0, reply_handle) + text.encode("latin-1")[:_MAX_MESSAGE]
        except Exception as exc:  # every failure becomes a reply; the helper keeps serving
            kind = next((i for i, c in enumerate(_KINDS) if isinstance(exc, c)), 0)
            cause = exc.__cause__ if isinstance(exc, ImgfsError) else exc
            err = cause.errno if isinstance(cause, OSError) and cause.errno else 0
            text = str(exc) if isinstance(exc, ImgfsError) else f"opener: {type(exc).__name__}"
            reply = _REP.pack(_FAIL, kind, err, 0) + text.encode("utf-8", "replace")[:_MAX_MESSAGE]
            for opened in fds:
                os.close(opened)
            fds = []
        if fd is not None:
            fds.append(fd)
        try:
            if fds:
                socket.send_fds(sock, [reply], fds)
            else:
                sock.sendmsg([reply])
        except OSError:
            return
        finally:
            for sent in fds:
                os.close(sent)


def _open_many(files: LayerFiles, payload: bytes, count: int) -> tuple[list[int], str]:
    """The helper's OPEN_MANY: the fds of the files it could open, and one status character
    per item ("\0" opened, "\1" not: the client asks for that one alone)."""
    if not 0 < count <= MAX_BATCH:
        raise LayerUnavailable(f"opener: a batch of {count} files")
    fds: list[int] = []
    status = bytearray()
    view = memoryview(payload)
    try:
        for _ in range(count):
            if len(view) < _ITEM.size:
                raise LayerUnavailable("opener: malformed request")
            size, length = _ITEM.unpack_from(view)
            name = bytes(view[_ITEM.size : _ITEM.size + length])
            if len(name) != length:
                raise LayerUnavailable("opener: malformed request")
            view = view[_ITEM.size + length :]
            try:
                fds.append(files.open(name, size))
                status.append(0)
            except ImgfsError:
                status.append(1)
        if len(view):
            raise LayerUnavailable("opener: malformed request")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds, status.decode("latin-1")


__all__ = [
    "IdRange",
    "Identity",
    "RemoteHandle",
    "UserNamespaceOpener",
    "UsernsLayerFiles",
    "denied",
    "explain_denied",
    "helper_main",
    "id_mapping",
    "inside_id",
    "is_rootless_store",
    "mount_warning",
    "open_layer_files",
    "pause_process_pid",
    "prestart",
    "rootless_warning",
    "setup_problem",
    "shared_opener",
    "subid_ranges",
]
