"""A byte stream kept in memory as zstd frames of a fixed raw size, read back through a tiny LRU.

Owns: random reads of such a stream (the tar headers and names of a layer index or layer tree
compress 10-20x), and a simple appender that builds one. Must not know: what the bytes mean.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import zstandard

from imgfs.errors import MalformedMetadata


class ChunkedBytes:
    """``length`` bytes stored as zstd frames of ``chunk`` raw bytes each. Thread-safe."""

    def __init__(
        self, frames: list[bytes], length: int, chunk: int, what: str, cache_size: int
    ) -> None:
        self.frames = frames
        self.length = length
        self._chunk_size = chunk
        self._what = what
        self._cache_size = cache_size
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._decompressor = zstandard.ZstdDecompressor()

    @property
    def nbytes(self) -> int:
        """Approximate memory: the frames, their list slots and the decompressed cache."""
        cached = sum(len(raw) for raw in self._cache.values())
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
        with self._lock:  # one reused decompressor (not thread-safe), so decompress locked
            raw = self._cache.get(k)
            if raw is not None:
                self._cache.move_to_end(k)
                return raw
            want = min(self._chunk_size, self.length - k * self._chunk_size)
            try:
                raw = self._decompressor.decompress(self.frames[k], max_output_size=want)
            except (zstandard.ZstdError, IndexError) as exc:
                raise MalformedMetadata(f"{self._what}: compressed chunk {k} is corrupt") from exc
            if len(raw) != want:
                raise MalformedMetadata(f"{self._what}: compressed chunk {k} has the wrong length")
            self._cache[k] = raw
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return raw


class ChunkAppender:
    """Builds a ChunkedBytes: ``append`` returns each piece's position; ``finish`` the result."""

    def __init__(self, chunk: int) -> None:
        self._chunk_size = chunk
        self._compressor = zstandard.ZstdCompressor(level=1)
        self._tail = bytearray()
        self.frames: list[bytes] = []
        self.length = 0

    def append(self, data: bytes) -> int:
        pos = self.length
        self._tail += data
        self.length += len(data)
        if len(self._tail) >= self._chunk_size:
            self._flush(final=False)
        return pos

    def _flush(self, final: bool) -> None:
        size = self._chunk_size
        full = len(self._tail) if final else len(self._tail) - len(self._tail) % size
        for pos in range(0, full, size):
            self.frames.append(self._compressor.compress(bytes(self._tail[pos : pos + size])))
        del self._tail[:full]

    def finish(self, what: str, cache_size: int) -> ChunkedBytes:
        self._flush(final=True)
        return ChunkedBytes(self.frames, self.length, self._chunk_size, what, cache_size)
