"""``--debug``'s log of every FUSE request: operation, arguments, result or errno, duration.

Owns: formatting one request as one log line (logger ``imgfs.fuse.requests``, level DEBUG)::

    read fh=7 off=1048576 size=131072 -> 131072 bytes (0.21 ms)
    lookup parent_inode=1 (/) name='abc' -> ino=5 size=0 (0.05 ms)
    open inode=9 (/<id>/blobs/sha256:…) flags=0x8000 -> ENOENT (0.10 ms)

The adapter's errno boundary (``imgfs.fuse.ops._boundary``) calls ``traced`` around a handler
when the operations run with ``debug``, with ``path_of`` giving an inode's node key (shown
as a path, ``imgfs.views.keys.display``); the handler's own error line (what failed and why)
is logged by the boundary before the errno line, so an EIO reads as cause, then reply. Must not
know: pyfuse3 or trio (results and errors are read by duck typing: ``errno``, ``st_ino``, ``fh``),
the tree, or the store.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, cast

from imgfs.views.keys import Key, display

log = logging.getLogger("imgfs.fuse.requests")

_SKIPPED: Final = frozenset({"self", "ctx", "token"})
_INODE_ARGS: Final = frozenset({"inode", "parent_inode", "parent_inode_old", "parent_inode_new"})
_MAX_TEXT: Final = 120


def enabled() -> bool:
    """True when request lines would be written (so callers skip the work otherwise)."""
    return log.isEnabledFor(logging.DEBUG)


async def traced(
    handler: Callable[..., Any],
    args: Sequence[Any],
    call: Awaitable[Any],
    path_of: Callable[[int], object] | None = None,
) -> Any:
    """Await ``call`` (``handler(*args)``, already guarded) and log the request and its end."""
    if not enabled():
        return await call
    start = time.perf_counter()
    try:
        result = await call
    except BaseException as exc:
        _log(handler, args, path_of, _error(exc), start)
        raise
    _log(handler, args, path_of, describe_result(result), start)
    return result


def _log(
    handler: Callable[..., Any],
    args: Sequence[Any],
    path_of: Callable[[int], object] | None,
    outcome: str,
    start: float,
) -> None:
    elapsed_ms = (time.perf_counter() - start) * 1000
    request = describe_request(handler, args, path_of)
    log.debug("%s -> %s (%.2f ms)", request, outcome, elapsed_ms)


def describe_request(
    handler: Callable[..., Any],
    args: Sequence[Any],
    path_of: Callable[[int], object] | None = None,
) -> str:
    """``name arg=value …`` for a handler called with ``args`` (self excluded)."""
    parts = [handler.__name__]
    for name, value in zip(_parameter_names(handler), args, strict=False):
        if name in _SKIPPED:
            continue
        parts.append(f"{name}={_value(name, value)}")
        if name in _INODE_ARGS and path_of is not None and isinstance(value, int):
            path = _path(path_of, value)
            if path is not None:
                parts.append(f"({path})")
    return " ".join(parts)


def describe_result(result: Any) -> str:
    """A short summary of a handler's reply."""
    if result is None:
        return "ok"
    if isinstance(result, bytes | bytearray | memoryview):
        return f"{memoryview(result).nbytes} bytes"
    if isinstance(result, bool | int):
        return str(result)
    if isinstance(result, list | tuple):
        return f"{len(result)} items"
    ino = getattr(result, "st_ino", None)
    if ino is not None:
        if ino == 0:
            return "negative entry"
        return f"ino={ino} size={getattr(result, 'st_size', '?')}"
    fh = getattr(result, "fh", None)
    if fh is not None:
        return f"fh={fh}"
    return type(result).__name__


def _error(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return errno.errorcode.get(code, str(code))
    return f"raised {type(exc).__name__}"


@functools.lru_cache(maxsize=128)
def _parameter_names(handler: Callable[..., Any]) -> tuple[str, ...]:
    names = tuple(inspect.signature(handler).parameters)
    return names[1:] if names and names[0] == "self" else names


def _value(name: str, value: Any) -> str:
    if isinstance(value, bytes):
        text = repr(value.decode("utf-8", "backslashreplace"))
        return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "…"
    if name == "flags" and isinstance(value, int):
        return hex(value)
    if name == "mode" and isinstance(value, int):
        return oct(value)
    return str(value)


def _path(path_of: Callable[[int], object], ino: int) -> str | None:
    try:
        key = path_of(ino)
    except Exception:
        return None
    if key is None:
        return None
    text = display(cast(Key, key))
    return text if len(text) <= _MAX_TEXT else "…" + text[-_MAX_TEXT:]
