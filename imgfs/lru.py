"""The one least-recently-used cache of imgfs, bounded by a cost (bytes, or entries).

Owns: recency order, the running total of the entries' costs and eviction down to the bound
(the newest entry always stays, so one oversized value is still cached alone). Thread-safe.
Must not know: what is cached.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _one(_value: object) -> int:
    return 1


class LRU(Generic[K, V]):
    """At most ``max_cost`` in total (``cost(value)`` each, default 1 per entry)."""

    def __init__(self, max_cost: int, cost: Callable[[V], int] = _one) -> None:
        self.max_cost = max_cost
        self._cost = cost
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: K, value: V) -> list[V]:
        """Insert or replace ``key``; return the values evicted to stay within the bound."""
        cost = self._cost(value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._total -= old[1]
            self._items[key] = (value, cost)
            self._total += cost
            return self._evict()

    def _evict(self) -> list[V]:
        """Drop the oldest entries down to the bound (the newest stays); lock held."""
        evicted = []
        while self._total > self.max_cost and len(self._items) > 1:
            _, (gone, gone_cost) = self._items.popitem(last=False)
            self._total -= gone_cost
            evicted.append(gone)
        return evicted

    def get_many(self, keys: Iterable[K]) -> dict[K, V]:
        """``get`` of each of ``keys`` under one lock: the ones cached."""
        found: dict[K, V] = {}
        with self._lock:
            items = self._items
            for key in keys:
                item = items.get(key)
                if item is not None:
                    items.move_to_end(key)
                    found[key] = item[0]
        return found

    def put_many(self, pairs: Iterable[tuple[K, V]]) -> list[V]:
        """``put`` of each pair under one lock (a listing's nodes); the values evicted."""
        cost_of = self._cost
        with self._lock:
            items = self._items
            for key, value in pairs:
                cost = cost_of(value)
                old = items.get(key)
                if old is not None:
                    self._total -= old[1]
                    items.move_to_end(key)
                items[key] = (value, cost)
                self._total += cost
            return self._evict()

    def pop(self, key: K) -> V | None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self._total -= item[1]
            return item[0]

    def clear(self) -> list[V]:
        """Drop every entry; return their values (for a caller that must close them)."""
        with self._lock:
            values = [value for value, _ in self._items.values()]
            self._items.clear()
            self._total = 0
            return values

    @property
    def total(self) -> int:
        return self._total

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items
