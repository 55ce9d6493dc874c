"""The one LRU (imgfs/lru.py): its bound, its recency order, and the batch calls a listing uses."""

from __future__ import annotations

from imgfs.lru import LRU


def test_put_evicts_the_oldest_down_to_the_bound_and_keeps_the_newest() -> None:
    cache: LRU[str, bytes] = LRU(10, len)
    assert cache.put("a", b"1234") == []
    assert cache.put("b", b"1234") == []
    cache.get("a")  # b is now the oldest
    assert cache.put("c", b"1234") == [b"1234"]
    assert [k for k in ("a", "b", "c") if k in cache] == ["a", "c"]
    assert cache.total == 8
    assert cache.put("huge", b"x" * 50) == [b"1234", b"1234"]
    assert (len(cache), cache.total) == (1, 50)


def test_put_many_is_put_of_each_pair_in_order() -> None:
    one: LRU[int, bytes] = LRU(12, len)
    many: LRU[int, bytes] = LRU(12, len)
    pairs = [(1, b"aaaa"), (2, b"bb"), (1, b"a"), (3, b"cccccc"), (4, b"dddd")]
    evicted_one = [gone for key, value in pairs for gone in one.put(key, value)]
    assert many.put_many(pairs) == evicted_one
    assert [k for k in range(5) if k in many] == [k for k in range(5) if k in one] == [1, 3, 4]
    assert many.total == one.total == 11
    assert many.put_many([(5, b"ee")]) == [b"a"]  # 1 was replaced after 2: now the oldest


def test_put_many_replacing_a_key_makes_it_the_newest() -> None:
    cache: LRU[int, int] = LRU(3)
    cache.put_many([(1, 10), (2, 20), (3, 30), (1, 11)])
    cache.put(4, 40)
    assert [k for k in range(5) if k in cache] == [1, 3, 4]
    assert cache.get(1) == 11


def test_get_many_returns_the_cached_ones_and_makes_them_newest() -> None:
    cache: LRU[int, int] = LRU(3)
    cache.put_many([(1, 10), (2, 20), (3, 30)])
    assert cache.get_many([3, 1, 9]) == {3: 30, 1: 10}
    cache.put(4, 40)  # 2 was the least recently used
    assert [k for k in range(5) if k in cache] == [1, 3, 4]
