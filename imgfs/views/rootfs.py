"""The merged filesystem of an image: its layers applied in order, computed per directory.

Owns: the layer-application rules of c/storage's ``UnpackLayer`` as ``podman image mount``
shows their result: ``.wh.<name>`` deletes ``<name>`` from the layers below (and from the same
layer when it comes earlier in the tar), ``.wh..wh..opq`` hides everything the layers below hold
in its directory, a directory over a directory merges (the upper one's attributes win, an
implied one keeps the lower's), anything else replaces; top-level ``.wh..wh.*`` AUFS metadata is
skipped; a hardlink shares the inode of its target (an earlier member of its layer, else the
path as the layers below left it), and the link count is the number of paths still showing it.
Must not know: tar-split, tar headers, layer files, the store, FUSE.

Nothing is merged until asked for: ``children(path)`` merges that one directory (from the
directories the layers hold at that path) and caches it in the merged-directory LRU every
RootFS of the cache shares, bounded in bytes (``budget.MERGED_ENTRY_BYTES`` per entry); a
directory whose merge alone would exceed that bound fails with ``OverBudget``.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from imgfs.budget import MERGED_ENTRY_BYTES, Budget
from imgfs.errors import NotFound, OverBudget
from imgfs.layer.tarheader import DIRECTORY, HARDLINK
from imgfs.layer.tree import MAX_DEPTH, LayerTree, Member
from imgfs.lru import LRU

WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
AUFS_META = b".wh..wh."

Identity = tuple[int, int]  # (layer index, member ref)


@dataclass(frozen=True, slots=True)
class Entry:
    """What the merged tree shows at one path: a member of one layer."""

    layer: int
    ref: int
    sources: tuple[int, ...] = ()  # directories: the layers merged into it, bottom first

    @property
    def is_dir(self) -> bool:
        return bool(self.sources)

    @property
    def identity(self) -> Identity:
        return (self.layer, self.ref)


class RootFS:
    """The merged tree of ``layers`` (base first). Thread-safe; directories merge lazily."""

    def __init__(
        self, layers: Sequence[LayerTree], what: str, dirs: MergedDirs | None = None
    ) -> None:
        self.what = what
        self.layers = tuple(layers)
        self._dirs = dirs if dirs is not None else MergedDirs(Budget().merged)
        self._serial = next(_serials)
        self._lowers: dict[int, RootFS] = {}
        self._groups: dict[Identity, frozenset[bytes]] | None = None
        self._nlinks: dict[Identity, int] = {}
        self._lock = threading.Lock()
        self._root = self._merge_root()

    # -- queries -----------------------------------------------------------------------------

    def root(self) -> Entry:
        return self._root

    def member(self, entry: Entry) -> Member:
        """The member whose attributes ``entry`` shows (a hardlink's target for hardlinks)."""
        return self.layers[entry.layer].member(entry.ref)

    def entry(self, path: bytes) -> Entry:
        """The entry at ``path`` (b"" = root); NotFound when the merged tree has none."""
        if not path:
            return self._root
        parent, _, name = path.rpartition(b"/")
        found = self.children(parent).get(name)
        if found is None:
            raise NotFound(f"{self.what}: no {path!r:.200} in the image")
        return found

    def children(self, path: bytes) -> dict[bytes, Entry]:
        """Name → entry of directory ``path``, merged on first use; NotFound if not a dir."""
        cached = self._dirs.get((self._serial, path))
        if cached is not None:
            return cached
        if path.count(b"/") >= MAX_DEPTH:
            raise NotFound(f"{self.what}: {path[:200]!r}... is deeper than any layer")
        return self._walk(path)

    def _walk(self, path: bytes) -> dict[bytes, Entry]:
        """Merge the directories from the root down to ``path``, each once (iterative: paths
        may be MAX_DEPTH components deep)."""
        current = b""
        merged = self._merged(current, self._root)
        for name in path.split(b"/") if path else ():
            entry = merged.get(name)
            if entry is None:
                raise NotFound(f"{self.what}: no {path!r:.200} in the image")
            current = current + b"/" + name if current else name
            merged = self._merged(current, entry)
        return merged

    def _merged(self, path: bytes, entry: Entry) -> dict[bytes, Entry]:
        """The children of directory ``path`` whose entry is ``entry``, merged once."""
        cached = self._dirs.get((self._serial, path))
        if cached is not None:
            return cached
        if not entry.is_dir:
            raise NotFound(f"{self.what}: {path!r:.200} is not a directory")
        self._check_budget(path, entry.sources)
        merged = self._merge(path, entry.sources)
        self._dirs.put((self._serial, path), merged)
        return merged

    def members(self, entries: Collection[Entry]) -> list[Member]:
        """The members ``entries`` show, in their order, each layer's parsed in tar order (a
        listing's; not done by every merge: a lookup merges the directories above it, whose
        members nothing may ask for). Not kept in the trees' member caches: the listing keeps
        the nodes built from them."""
        by_layer: dict[int, list[int]] = {}
        for entry in entries:
            by_layer.setdefault(entry.layer, []).append(entry.ref)
        parsed = {i: self.layers[i].members(refs, keep=False) for i, refs in by_layer.items()}
        return [parsed[entry.layer][entry.ref] for entry in entries]

    def _check_budget(self, path: bytes, sources: tuple[int, ...]) -> None:
        """OverBudget when merging ``path`` alone could exceed the merged directories' bound."""
        entries = sum(len(self.layers[i].dirs.get(path, ())) for i in sources)
        need = entries * MERGED_ENTRY_BYTES
        if need > self._dirs.max_cost:
            raise OverBudget(
                f"{self.what}: directory {path!r:.200} of {entries} entries would take "
                f"{need >> 20} MiB, over its share of the memory budget "
                f"({self._dirs.max_cost >> 20} MiB, --memory)"
            )

    def hardlinked(self, entry: Entry) -> bool:
        """Whether some hardlink member of the image resolves to ``entry``'s inode."""
        groups = self._groups if self._groups is not None else self._link_groups()
        return bool(groups) and not entry.sources and (entry.layer, entry.ref) in groups

    def nlink(self, entry: Entry) -> int:
        """How many paths of the merged tree show ``entry``'s inode."""
        identity = entry.identity
        paths = self._link_groups().get(identity)
        if paths is None or entry.is_dir:
            return 1
        with self._lock:
            count = self._nlinks.get(identity)
        if count is None:
            count = sum(1 for path in paths if self._shows(path, identity))
            with self._lock:
                self._nlinks[identity] = count
        return max(count, 1)

    # -- merging -----------------------------------------------------------------------------

    def _merge_root(self) -> Entry:
        if not self.layers:
            raise NotFound(f"{self.what}: the image has no layers")
        sources: list[int] = []
        top = (len(self.layers) - 1, self.layers[-1].root_ref())
        for i, tree in enumerate(self.layers):
            if OPAQUE in tree.dirs[b""]:
                sources.clear()
            sources.append(i)
            if tree.root_ref() >= 0:
                top = (i, tree.root_ref())
        return Entry(top[0], top[1], tuple(sources))

    def _merge(self, path: bytes, sources: tuple[int, ...]) -> dict[bytes, Entry]:
        result: dict[bytes, Entry] = {}
        for i in sources:
            tree = self.layers[i]
            refs = tree.dirs.get(path)
            if refs:
                self._apply_layer(i, tree, path, refs, result)
        return dict(sorted(result.items()))

    def _apply_layer(
        self, i: int, tree: LayerTree, path: bytes, refs: dict[bytes, int], out: dict[bytes, Entry]
    ) -> None:
        whiteouts: dict[bytes, int] = {}
        for name, ref in refs.items():
            aufs_meta = path == b"" and name.startswith(AUFS_META)
            if name.startswith(WHITEOUT) and name != OPAQUE and not aufs_meta:
                whiteouts[name[len(WHITEOUT) :]] = tree.order(ref)
        for name in whiteouts:
            out.pop(name, None)
        for name, ref in refs.items():
            if name.startswith(WHITEOUT):
                continue
            deleted_at = whiteouts.get(name)
            if deleted_at is not None and deleted_at > tree.order(ref):
                continue
            out[name] = self._apply(i, tree, path, name, ref, out.get(name))

    def _apply(
        self, i: int, tree: LayerTree, path: bytes, name: bytes, ref: int, below: Entry | None
    ) -> Entry:
        flag = tree.typeflag(ref)
        if flag == DIRECTORY:
            child = path + b"/" + name if path else name
            opaque = OPAQUE in tree.dirs.get(child, {})
            if below is not None and below.is_dir and not opaque:
                if ref < 0:  # implied: the directory below keeps its attributes
                    return Entry(below.layer, below.ref, (*below.sources, i))
                return Entry(i, ref, (*below.sources, i))
            return Entry(i, ref, (i,))
        if flag == HARDLINK:
            return self._resolve_link(i, ref)
        return Entry(i, ref)

    def _resolve_link(self, i: int, ref: int) -> Entry:
        """A hardlink's inode: an earlier member of its layer, else its target as merged below."""
        tree = self.layers[i]
        target = tree.link_target(ref)
        if target is not None:
            return Entry(i, target)
        if i > 0:
            try:
                below = self._lower(i).entry(tree.member(ref).linkname)
            except NotFound:
                below = None
            if below is not None and not below.is_dir:
                return below
        return Entry(i, ref)  # unresolved: shown as the link member itself

    def _lower(self, count: int) -> RootFS:
        with self._lock:
            lower = self._lowers.get(count)
        if lower is None:
            lower = RootFS(self.layers[:count], self.what, self._dirs)
            with self._lock:
                self._lowers[count] = lower
        return lower

    # -- hardlinks -----------------------------------------------------------------------------

    def _link_groups(self) -> dict[Identity, frozenset[bytes]]:
        with self._lock:
            groups = self._groups
        if groups is not None:
            return groups
        found: dict[Identity, set[bytes]] = {}
        for i, tree in enumerate(self.layers):
            for ref in tree.hardlinks:
                target = self._resolve_link(i, ref)
                if self.layers[target.layer].typeflag(target.ref) == HARDLINK:
                    continue  # unresolved
                paths = found.setdefault(target.identity, {self.member(target).path})
                paths.add(tree.member(ref).path)
        groups = {identity: frozenset(paths) for identity, paths in found.items()}
        with self._lock:
            self._groups = groups
        return groups

    def _shows(self, path: bytes, identity: Identity) -> bool:
        try:
            return self.entry(path).identity == identity
        except NotFound:
            return False


class MergedDirs(LRU[tuple[int, bytes], dict[bytes, Entry]]):
    """Merged directories of every RootFS sharing it, keyed by (RootFS serial, path)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes, cost=lambda d: (len(d) + 1) * MERGED_ENTRY_BYTES)


_serials = itertools.count()


def _pinned(rootfs: RootFS) -> int:
    return sum(tree.nbytes for tree in rootfs.layers) + 1024


class RootFSCache:
    """The merged trees of the most recently used images, bounded by the bytes of the layer
    trees they pin; their merged directories in one shared ``MergedDirs``. Thread-safe."""

    def __init__(self, budget: Budget | None = None) -> None:
        budget = budget if budget is not None else Budget()
        self._cache: LRU[tuple[str, ...], RootFS] = LRU(budget.rootfs, cost=_pinned)
        self.dirs = MergedDirs(budget.merged)

    def get(
        self, key: tuple[str, ...], what: str, trees: Callable[[], Sequence[LayerTree]]
    ) -> RootFS:
        """The merged tree cached under ``key`` (an image and its layers), else built from
        ``trees()`` (base first)."""
        found = self._cache.get(key)
        if found is None:
            found = RootFS(list(trees()), what, self.dirs)
            self._cache.put(key, found)
        return found
