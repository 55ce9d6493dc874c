"""The inode table: stable node keys ↔ inode numbers, with kernel lookup counts.

Owns: inode numbering, the kernel's lookup counts and ``forget``. Must not know: pyfuse3, trio,
the store.

Policy: a key's number is derived from the key's hash (probing past a number another live key
holds), so a key keeps its number when the kernel forgets it and looks it up again: ``find``,
``du``, ``tar`` and ``rsync -H`` see one ``st_ino`` per file (and hardlinks, which share a key,
one number) for the whole walk, even on mounts with zero timeouts (rootless, ``allow_other``),
whose dentries the kernel drops at any time. Only live keys (lookup count above zero) are
held, so the table is bounded by what the kernel holds. A number is handed to another key only
after its holder was forgotten and only on a 63-bit hash collision; generation 0 is kept: imgfs
mounts are not NFS-exportable, where that would matter.
"""

from __future__ import annotations

from collections.abc import Hashable

ROOT_INODE = 1
_MASK = (1 << 63) - 1  # st_ino is unsigned 64-bit; stay clear of the sign bit for every tool


class InodeTable:
    """Not thread-safe: the adapter uses it from the trio thread only."""

    def __init__(self, root_key: Hashable) -> None:
        self._by_key: dict[Hashable, int] = {root_key: ROOT_INODE}
        self._by_ino: dict[int, Hashable] = {ROOT_INODE: root_key}
        self._lookups: dict[int, int] = {}

    def key(self, ino: int) -> Hashable | None:
        return self._by_ino.get(ino)

    def ino(self, key: Hashable) -> int:
        """The number of ``key``: its live one, else the first free one from its hash on (not
        held until ``remember``: a readdir entry the kernel did not take costs nothing)."""
        ino = self._by_key.get(key)
        if ino is not None:
            return ino
        ino = hash(key) & _MASK
        while ino <= ROOT_INODE or ino in self._by_ino:
            ino = (ino + 1) & _MASK
        return ino

    def remember(self, key: Hashable, ino: int | None = None) -> int:
        """``ino(key)`` plus one kernel lookup reference (``ino``: what ``ino(key)`` returned
        just before, with no other call in between: a readdir entry the kernel took)."""
        if ino is None:
            ino = self.ino(key)
        self._by_key[key] = ino
        self._by_ino[ino] = key
        lookups = self._lookups
        lookups[ino] = lookups.get(ino, 0) + 1
        return ino

    def forget(self, ino: int, count: int) -> None:
        remaining = self._lookups.get(ino, 0) - count
        if remaining > 0:
            self._lookups[ino] = remaining
            return
        self._lookups.pop(ino, None)
        if ino != ROOT_INODE:
            key = self._by_ino.pop(ino, None)
            if key is not None and self._by_key.get(key) == ino:
                del self._by_key[key]

    def __len__(self) -> int:
        return len(self._by_ino)
