"""Files imgfs keeps in its own cache directory: persisted layer indexes and layer trees.

Owns: trusting the cache directory (``open_cache_dir``: it and its ``index/`` subdirectory are
created 0700 or must be owned by the mounting user and not writable by group or others, and are
opened without following symlinks; else ``UnsafeCacheDir``), the one envelope of every persisted
file (an HMAC-SHA256 over the file's name and body, keyed by a random per-directory key in a
0600 file another user can neither read nor forge), naming files by layer ID and tar-split
identity, loading them (a file that is not ours, or fails its check or its parse, is logged,
removed and rebuilt), writing them atomically (O_EXCL temp file + rename), and removing temp
files that a killed daemon left. Must not know: what the files contain (the caller passes the
parse and serialize functions), the store.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import logging
import os
import stat
import struct
import threading
from collections.abc import Callable
from typing import TypeVar

from imgfs.errors import MalformedMetadata, UnsafeCacheDir

log = logging.getLogger(__name__)

T = TypeVar("T")

INDEX_DIR = "index"
KEY_FILE = "integrity.key"
KEY_BYTES = 32
MAX_FILE_BYTES = 4 << 30
_MAGIC = b"IMGFSCF1"
_HEADER = struct.Struct("<8sQ32s")  # magic, body length, HMAC-SHA256(key, magic|name|len|body)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH

_keys: dict[str, bytes] = {}
_keys_lock = threading.Lock()


# -- the directory -------------------------------------------------------------------------------


def open_cache_dir(path: str) -> str:
    """Create or check the cache directory and its ``index/`` subdirectory; returns the latter.

    Both must be directories (not symlinks) owned by this process's user and not writable by
    group or others, else ``UnsafeCacheDir``: the default path can be predictable
    (``/var/tmp/imgfs-$UID``) and another user who made it first could read or plant files.
    """
    path = os.path.abspath(path)
    fd = _own_dir(path, tighten=False)
    try:
        if os.fstat(fd).st_mode & 0o077:
            log.warning("cache dir %s is readable by others (its index/ is not)", path)
    finally:
        os.close(fd)
    index = os.path.join(path, INDEX_DIR)
    prepare_dir(index)
    return index


def prepare_dir(path: str) -> None:
    """Create (0700) or check a directory of persisted files, load or create its key, and delete
    temp files of daemons that died. Raises ``UnsafeCacheDir`` when it is not ours alone."""
    path = os.path.abspath(path)
    fd = _own_dir(path, tighten=True)
    try:
        key = _load_key(fd, path)
        _remove_stale_temps(fd, path)
    finally:
        os.close(fd)
    with _keys_lock:
        _keys[path] = key


def _own_dir(path: str, tighten: bool) -> int:
    """``path`` created 0700 or opened without following a symlink, and checked to be ours
    alone. ``tighten``: also drop group/other read and search bits (nobody else reads it)."""
    parent, name = os.path.split(path)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    parent_fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeCacheDir(f"cache dir {path}: is not a directory (a symlink?)") from exc
            raise UnsafeCacheDir(f"cache dir {path}: cannot open: {exc.strerror}") from exc
    finally:
        os.close(parent_fd)
    try:
        _check_ours(os.fstat(fd), f"cache dir {path}")
        if tighten:
            _tighten(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_ours(st: os.stat_result, what: str) -> None:
    uid = os.geteuid()
    if st.st_uid != uid:
        raise UnsafeCacheDir(
            f"{what}: owned by uid {st.st_uid}, not by uid {uid} who mounts; another user could "
            "read or plant cache files (remove it, or pass another --cache-dir)"
        )
    if st.st_mode & _OTHERS_WRITE:
        raise UnsafeCacheDir(
            f"{what}: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            "another user could plant cache files (chmod go-w it, or pass another --cache-dir)"
        )


def _tighten(fd: int, path: str) -> None:
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & 0o077:
        log.warning("cache dir %s was readable by others (mode %04o): now 0700", path, mode)
        os.fchmod(fd, mode & 0o700)


# -- the key -----------------------------------------------------------------------------------


def _load_key(dir_fd: int, path: str) -> bytes:
    """The directory's HMAC key: read, or created when absent; replaced when others may read
    it or it has the wrong size (every file sealed with the old one is then rebuilt)."""
    what = f"cache key {os.path.join(path, KEY_FILE)}"
    try:
        fd = os.open(KEY_FILE, _READ_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return _create_key(dir_fd, path, replace=False)
    except OSError as exc:
        raise UnsafeCacheDir(f"{what}: cannot open: {exc.strerror} (a symlink?)") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeCacheDir(f"{what}: not a regular file")
        _check_ours(st, what)
        key = os.pread(fd, KEY_BYTES + 1, 0)
    finally:
        os.close(fd)
    if stat.S_IMODE(st.st_mode) & 0o077 or len(key) != KEY_BYTES:
        log.warning("%s: readable by others or damaged; made a new one", what)
        return _create_key(dir_fd, path, replace=True)
    return key


def _create_key(dir_fd: int, path: str, replace: bool) -> bytes:
    """A new random key, published atomically (link: the first of racing daemons wins)."""
    key = os.urandom(KEY_BYTES)
    tmp = _temp_name(KEY_FILE)
    fd = os.open(tmp, _CREATE_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        _write_all(fd, [key])
    finally:
        os.close(fd)
    try:
        if replace:
            os.replace(tmp, KEY_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return key
        try:
            os.link(tmp, KEY_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except FileExistsError:
            return _load_key(dir_fd, path)  # another daemon made it first
        return key
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)


def _key_for(directory: str) -> bytes:
    directory = os.path.abspath(directory)
    with _keys_lock:
        key = _keys.get(directory)
    if key is None:
        prepare_dir(directory)
        with _keys_lock:
            key = _keys[directory]
    return key


# -- the envelope ------------------------------------------------------------------------------


def header_for(name: str, body: bytes, key: bytes) -> bytes:
    """The envelope header that makes ``body`` the content of the persisted file ``name``."""
    return _HEADER.pack(_MAGIC, len(body), _mac(key, name, body))


def unseal_header(name: str, header: bytes) -> int:
    """The body length a header announces (MalformedMetadata when it is no header of ours)."""
    if len(header) != _HEADER.size:
        raise MalformedMetadata(f"cache file {name}: truncated header")
    magic, length, _mac_value = _HEADER.unpack(header)
    if magic != _MAGIC or length > MAX_FILE_BYTES:
        raise MalformedMetadata(f"cache file {name}: not an imgfs cache file of this version")
    return int(length)


def check_seal(name: str, header: bytes, body: bytes, key: bytes) -> None:
    """Raise MalformedMetadata unless ``header`` seals exactly ``body`` as ``name``."""
    if unseal_header(name, header) != len(body):
        raise MalformedMetadata(f"cache file {name}: wrong length")
    if not hmac.compare_digest(_HEADER.unpack(header)[2], _mac(key, name, body)):
        raise MalformedMetadata(f"cache file {name}: fails its integrity check")


def _mac(key: bytes, name: str, body: bytes) -> bytes:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    encoded = os.fsencode(name)
    mac.update(_MAGIC + struct.pack("<Q", len(encoded)) + encoded + struct.pack("<Q", len(body)))
    mac.update(body)
    return mac.digest()


# -- persisted files ---------------------------------------------------------------------------


def key_for(layer_id: str, st: os.stat_result) -> str:
    """A cache key that changes whenever the layer's tar-split file is replaced."""
    identity = f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode()
    return f"{layer_id}-{hashlib.sha256(identity).hexdigest()[:16]}"


def load(path: str | None, parse: Callable[[bytes], T]) -> T | None:
    """The parsed content of ``path``, or None when absent or unusable (then it is removed):
    not a regular file of ours, not sealed with our key for this name, or not parsing."""
    if path is None:
        return None
    try:
        key = _key_for(os.path.dirname(path))
        body = _read_sealed(path, key)
        return None if body is None else parse(body)
    except (OSError, MalformedMetadata, UnsafeCacheDir) as exc:
        log.warning("ignoring cache file %s (will rebuild it): %s", path, exc)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None


def _read_sealed(path: str, key: bytes) -> bytes | None:
    name = os.path.basename(path)
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise MalformedMetadata(f"cache file {name}: is a symlink") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MalformedMetadata(f"cache file {name}: not a regular file")
        _check_ours(st, f"cache file {name}")
        header = os.pread(fd, _HEADER.size, 0)
        body = _read_exactly(fd, unseal_header(name, header), _HEADER.size)
        if os.pread(fd, 1, _HEADER.size + len(body)):
            raise MalformedMetadata(f"cache file {name}: longer than its header says")
    finally:
        os.close(fd)
    check_seal(name, header, body, key)
    return body


def _read_exactly(fd: int, length: int, offset: int) -> bytes:
    buf = bytearray(length)
    view = memoryview(buf)
    done = 0
    while done < length:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise MalformedMetadata("cache file: shorter than its header says")
        done += n
    return bytes(buf)


def save(path: str | None, serialize: Callable[[], bytes]) -> None:
    """Write ``serialize()``, sealed, to ``path`` atomically, unless it exists already."""
    if path is None or os.path.lexists(path):
        return
    tmp = _temp_name(path)
    try:
        key = _key_for(os.path.dirname(path))
        body = serialize()
        fd = os.open(tmp, _CREATE_FLAGS, 0o600)
        try:
            _write_all(fd, [header_for(os.path.basename(path), body, key), body])
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except (OSError, UnsafeCacheDir) as exc:
        log.warning("cannot write cache file %s: %s", path, exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _write_all(fd: int, parts: list[bytes]) -> None:
    for part in parts:
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view) :]


def _temp_name(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"


def _remove_stale_temps(dir_fd: int, path: str) -> None:
    removed = 0
    for name in os.listdir(dir_fd):
        _, sep, tail = name.rpartition(".tmp-")
        pid = tail.split("-", 1)[0]
        if not sep or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
            removed += 1
    if removed:
        log.info("removed %d stale temp file(s) from %s", removed, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
