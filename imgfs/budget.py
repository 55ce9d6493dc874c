"""The daemon's memory budget (``--memory``, default 300 MiB) and its split between the caches.

Owns: the one table of shares (what each cache may hold, in bytes) and the per-entry size
estimates the caches charge against them, so that the daemon's resident memory stays within the
budget whatever the store holds. Must not know: what the caches hold beyond these estimates.

The split (of the whole budget; the rest is the interpreter, threads and in-flight reads)::

    reserve       15 %   Python, libraries, worker threads, 4 MiB read windows, open files' bytes
    trees         20 %   layer trees (LayerTree.nbytes); also the cap of one tree
    rootfs        20 %   the layer trees merged images pin (sum of their trees' nbytes)
    merged        10 %   merged rootfs/ directories (entries x MERGED_ENTRY_BYTES); one directory
                         over this fails
    big_data      10 %   manifests/configs/signatures kept in memory; an item over a quarter of it
                         is read again each time, one over ``big_data_item`` fails
    indexes        5 %   --direct layer-blob offset indexes (LayerIndex.nbytes)
    nodes          5 %   the view's layers/ and rootfs/ nodes (NODE_BYTES each)
    listings      15 %   directory listings, built once per view (LISTING_ENTRY_BYTES per
                         entry: a listing holds its nodes); a larger listing is built per opendir
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MEMORY = 300 << 20
MIN_MEMORY = 64 << 20
MAX_BIG_DATA_BYTES = 64 << 20  # the largest big-data item read at all (c/storage has no limit)

# Measured with tracemalloc (2e5 members): a layer tree keeps ~165 B per member plus its names
# (peak ~216 B while built); a merged directory ~460 B per entry (Entry, dict slot and the
# member parsed for it: ~300 B of it, MEMBER_BYTES); a cached Node with its key ~600 B.
TREE_MEMBER_BYTES = 220
MEMBER_BYTES = 300
MERGED_ENTRY_BYTES = 480
NODE_BYTES = 600
# A listing entry: its name, the Node (slots) and the Node's key, ~390 B measured (tracemalloc,
# 10k rootfs/ files).
LISTING_ENTRY_BYTES = 400


# The split, in percent of the budget (the module docstring explains each share).
SHARES: dict[str, int] = {
    "trees": 20,
    "rootfs": 20,
    "merged": 10,
    "big_data": 10,
    "indexes": 5,
    "nodes": 5,
    "listings": 15,
}  # the other 15 %: the reserve


@dataclass(frozen=True)
class Budget:
    """Byte limits of each cache for a daemon allowed ``total`` bytes."""

    total: int = DEFAULT_MEMORY
    trees: int = field(init=False)
    rootfs: int = field(init=False)
    merged: int = field(init=False)
    big_data: int = field(init=False)
    indexes: int = field(init=False)
    nodes: int = field(init=False)
    listings: int = field(init=False)

    def __post_init__(self) -> None:
        for name, percent in SHARES.items():
            object.__setattr__(self, name, self.total * percent // 100)

    @property
    def big_data_cached_item(self) -> int:
        """The largest big-data item kept in memory (larger ones are read again)."""
        return self.big_data // 4

    @property
    def big_data_item(self) -> int:
        """The largest big-data item served at all (larger: OverBudget)."""
        return min(MAX_BIG_DATA_BYTES, self.total // 4)
