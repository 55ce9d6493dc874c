"""A byte stream kept in memory as zstd frames of a fixed raw size, read back through a tiny LRU.

Owns: random reads of such a stream (the tar headers and names of a layer index or layer tree
compress 10-20x), the one writer that builds such a stream, and the few zstd contexts they share
(creating one costs more than compressing a small layer's headers). Must not know: what the
bytes mean.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import zstandard

from imgfs.errors import MalformedMetadata
from imgfs.lru import LRU

_T = TypeVar("_T")
_POOLED = 2  # zstd contexts kept per kind: a new one costs more than a small tree's compress


class _Pool(Generic[_T]):
    """A few reusable zstd contexts (not thread-safe objects: one user at a time)."""

    def __init__(self, make: Callable[[], _T]) -> None:
        self._make = make
        self._free: list[_T] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def use(self) -> Iterator[_T]:
        with self._lock:
            ctx = self._free.pop() if self._free else None
        if ctx is None:
            ctx = self._make()
        try:
            yield ctx
        finally:
            with self._lock:
                if len(self._free) < _POOLED:
                    self._free.append(ctx)


_DECOMPRESSORS = _Pool(zstandard.ZstdDecompressor)
_COMPRESSORS = {1: _Pool(lambda: zstandard.ZstdCompressor(level=1))}


def _compressors(level: int) -> _Pool[zstandard.ZstdCompressor]:
    pool = _COMPRESSORS.get(level)
    if pool is None:
        pool = _COMPRESSORS.setdefault(level, _Pool(lambda: zstandard.ZstdCompressor(level=level)))
    return pool


class ChunkedBytes:
    """``length`` bytes stored as zstd frames of ``chunk`` raw bytes each. Thread-safe."""

    def __init__(
        self, frames: list[bytes], length: int, chunk: int, what: str, cache_size: int
    ) -> None:
        self.frames = frames
        self.length = length
        self._chunk_size = chunk
        self._what = what
        self._cache: LRU[int, bytes] = LRU(cache_size)
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Approximate memory: the frames, their list slots and the decompressed cache."""
        cached = len(self._cache) * self._chunk_size
        return sum(len(f) for f in self.frames) + 40 * len(self.frames) + cached

    def read(self, pos: int, n: int) -> bytes:
        """Bytes ``[pos, pos+n)`` of the stream (clipped at its end)."""
        end = min(pos + n, self.length)
        parts: list[bytes] = []
        while pos < end:
            k, skip = divmod(pos, self._chunk_size)
            raw = self._chunk(k)
            take = min(end - pos, len(raw) - skip)
            parts.append(raw[skip : skip + take])
            pos += take
        return b"".join(parts)

    def _chunk(self, k: int) -> bytes:
        with self._lock:  # the chunk cache is shared
            raw = self._cache.get(k)
            if raw is not None:
                return raw
            want = min(self._chunk_size, self.length - k * self._chunk_size)
            try:
                with _DECOMPRESSORS.use() as decompressor:
                    raw = decompressor.decompress(self.frames[k], max_output_size=want)
            except (zstandard.ZstdError, IndexError) as exc:
                raise MalformedMetadata(f"{self._what}: compressed chunk {k} is corrupt") from exc
            if len(raw) != want:
                raise MalformedMetadata(f"{self._what}: compressed chunk {k} has the wrong length")
            self._cache.put(k, raw)
        return raw


class ChunkWriter:
    """Builds a ChunkedBytes, compressing each full ``chunk`` as the stream fills.

    ``append`` returns each piece's position. Hot loops may instead append to ``parts`` and add
    to ``pending`` themselves, calling ``flush`` once ``pending >= chunk`` (and re-reading
    ``parts`` after it); ``length`` is the flushed length plus ``pending``.
    """

    def __init__(self, chunk: int, level: int = 1) -> None:
        self._chunk_size = chunk
        self._level = level
        self.parts: list[bytes] = []
        self.pending = 0
        self.flushed = 0
        self.frames: list[bytes] = []

    @property
    def length(self) -> int:
        return self.flushed + self.pending

    def append(self, data: bytes) -> int:
        pos = self.length
        self.parts.append(data)
        self.pending += len(data)
        if self.pending >= self._chunk_size:
            self.flush()
        return pos

    def flush(self, final: bool = False) -> None:
        size = self._chunk_size
        data = b"".join(self.parts)
        full = len(data) if final else len(data) - len(data) % size
        with _compressors(self._level).use() as compressor:
            for pos in range(0, full, size):
                frame = compressor.compress(data[pos : pos + size])
                # compress() returns a bytes object that keeps its compressBound()-sized
                # allocation; a copy holds only the frame.
                self.frames.append(bytes(memoryview(frame)))
        self.parts = [data[full:]] if full < len(data) else []
        self.flushed += full
        self.pending = len(data) - full

    def finish(self, what: str, cache_size: int) -> ChunkedBytes:
        self.flush(final=True)
        return ChunkedBytes(self.frames, self.length, self._chunk_size, what, cache_size)
