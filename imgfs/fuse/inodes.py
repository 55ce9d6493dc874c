"""The inode table: stable node keys ↔ inode numbers, with kernel lookup counts.

Owns: inode allocation (monotonic, never reused within a mount, so generation 0 is valid),
the kernel's lookup counts and ``forget``. Must not know: pyfuse3, trio, the store.

Policy: an inode is dropped when its lookup count returns to zero (the root never is); looking
the same key up later allocates a fresh number. Nothing is ever unlinked, so that is all.
"""

from __future__ import annotations

from collections.abc import Hashable

ROOT_INODE = 1


class InodeTable:
    """Not thread-safe: the adapter uses it from the trio thread only."""

    def __init__(self, root_key: Hashable) -> None:
        self._by_key: dict[Hashable, int] = {root_key: ROOT_INODE}
        self._by_ino: dict[int, Hashable] = {ROOT_INODE: root_key}
        self._lookups: dict[int, int] = {}
        self._next = ROOT_INODE + 1

    def key(self, ino: int) -> Hashable | None:
        return self._by_ino.get(ino)

    def ino(self, key: Hashable) -> int:
        """The inode of ``key``, allocating one if the key has none (no lookup counted)."""
        ino = self._by_key.get(key)
        if ino is None:
            ino = self._next
            self._next += 1
            self._by_key[key] = ino
            self._by_ino[ino] = key
        return ino

    def remember(self, key: Hashable) -> int:
        """``ino(key)`` plus one kernel lookup reference."""
        ino = self.ino(key)
        self._lookups[ino] = self._lookups.get(ino, 0) + 1
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
