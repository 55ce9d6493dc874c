"""Files imgfs keeps in its own cache directory: persisted layer indexes and layer trees.

Owns: naming them by layer ID and tar-split identity, loading them (a file that does not
parse is logged, removed and rebuilt), writing them atomically (temp file + rename), and
removing temp files that a killed daemon left. Must not know: what the files contain (the
caller passes the parse and serialize functions), the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from imgfs.errors import MalformedMetadata

log = logging.getLogger(__name__)

T = TypeVar("T")


def key_for(layer_id: str, st: os.stat_result) -> str:
    """A cache key that changes whenever the layer's tar-split file is replaced."""
    identity = f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode()
    return f"{layer_id}-{hashlib.sha256(identity).hexdigest()[:16]}"


def load(path: str | None, parse: Callable[[bytes], T]) -> T | None:
    """The parsed content of ``path``, or None when absent or unusable (then it is removed)."""
    if path is None or not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            return parse(f.read())
    except (OSError, MalformedMetadata) as exc:
        log.warning("ignoring cache file %s: %s", path, exc)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None


def save(path: str | None, serialize: Callable[[], bytes]) -> None:
    """Write ``serialize()`` to ``path`` atomically, unless it exists already."""
    if path is None or os.path.exists(path):
        return
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, "wb") as f:
            f.write(serialize())
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write cache file %s: %s", path, exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def prepare_dir(path: str) -> None:
    """Create the cache directory (0700) and delete temp files of daemons that died."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    removed = 0
    for name in os.listdir(path):
        _, sep, tail = name.rpartition(".tmp-")
        pid = tail.split("-", 1)[0]
        if not sep or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(path, name))
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
