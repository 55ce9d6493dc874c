"""The public library: a containers/storage store read as containers/image reads it.

Owns: the consistent metadata snapshot of a store (images.json, layers.json and
volatile-layers.json of every root, read under shared locks and re-read when a write token or a
JSON file changes), the resolution of image references, and per image the manifest, config,
signatures and blob list of DESIGN.md §1. It opens store metadata only through a root's
``files.StoreRoot`` (and ``locks``); layers only through ``source``.
Must not know: FUSE, trio, inode numbers, the snapshot cache.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO, Literal

from imgfs.budget import MAX_BIG_DATA_BYTES, Budget
from imgfs.digest import EMPTY_LAYER_BYTES, EMPTY_LAYER_DIGEST, is_digest, is_hex, is_id
from imgfs.errors import (
    AmbiguousName,
    BlobNotFound,
    ImageNotFound,
    ImgfsError,
    IntegrityError,
    LayerUnavailable,
    MalformedMetadata,
    OverBudget,
    StoreNotFound,
    StorePermissionError,
)
from imgfs.lru import LRU
from imgfs.store import config as configuration
from imgfs.store import manifest as manifests
from imgfs.store.files import (
    RootLayout,
    StoreFile,
    StoreRoot,
    big_data_file_name,
)
from imgfs.store.locks import read_locked
from imgfs.store.records import (
    ImageRecord,
    LayerRecord,
    load_array,
    parse_images,
    parse_layers,
    parse_signature_sizes,
)
from imgfs.store.signatures import split_signatures
from imgfs.store.source import LayerChain, LayerSource, open_layer_blob
from imgfs.store.toc import TOC_KEY

log = logging.getLogger(__name__)

BlobKind = Literal["config", "layer", "manifest", "empty-layer"]
MAX_LAYER_DEPTH = 4096


@dataclass(frozen=True)
class BlobInfo:
    """One blob an image directory offers."""

    digest: str
    size: int
    media_type: str
    kind: BlobKind
    layer_id: str | None = None


@dataclass(frozen=True)
class _Snapshot:
    images: dict[str, tuple[ImageRecord, RootLayout]]
    layers: dict[str, LayerRecord]
    state: tuple[object, ...]


class Store:
    """A containers/storage store, read-only. Thread-safe."""

    def __init__(self, cfg: configuration.StoreConfig, budget: Budget | None = None) -> None:
        self.config = cfg
        self.budget = budget if budget is not None else Budget()
        # Big-data items of every image, bounded in bytes (an Image per store snapshot, so the
        # key carries the Image's serial: a new snapshot reads its items again).
        self.big_data: LRU[tuple[int, str], bytes] = LRU(self.budget.big_data, cost=len)
        self._serials = itertools.count()
        roots = [RootLayout.at(cfg.graphroot, cfg.driver)]
        if cfg.imagestore and cfg.imagestore != cfg.graphroot:
            roots.insert(0, RootLayout.at(cfg.imagestore, cfg.driver))
        roots += [RootLayout.at(p, cfg.driver) for p in cfg.additional_image_stores]
        self.roots: tuple[RootLayout, ...] = tuple(roots)
        self._by_layers_dir = {r.layers_dir: r for r in reversed(self.roots)}
        self._lock = threading.Lock()
        self._snapshot: _Snapshot | None = None
        self._check_exists()

    @classmethod
    def open(
        cls,
        graphroot: str | None = None,
        runroot: str | None = None,
        driver: str | None = None,
        budget: Budget | None = None,
    ) -> Store:
        """Open the store at ``graphroot`` (None: the one podman would use)."""
        if graphroot is not None:
            _check_root(graphroot)
        return cls(configuration.resolve(graphroot, runroot, driver), budget)

    @property
    def graphroot(self) -> str:
        return self.config.graphroot

    @property
    def driver(self) -> str:
        return self.config.driver

    def images(self) -> list[Image]:
        """Every image of the store, from one consistent snapshot, sorted by ID."""
        snap = self._current()
        return [
            Image(self, snap, rec, root)
            for rec, root in sorted(snap.images.values(), key=lambda p: p[0].id)
        ]

    def image(self, ref: str) -> Image:
        """An image by full ID, unique ID prefix, name, or ``name@digest``."""
        snap = self._current()
        rec = _resolve(snap, ref)
        return Image(self, snap, rec, snap.images[rec.id][1])

    def changed(self) -> bool:
        """True when the store changed since the last snapshot (cheap: tokens and mtimes)."""
        with self._lock:
            old = self._snapshot
        return old is None or self._state() != old.state

    def _current(self) -> _Snapshot:
        with self._lock:
            self._snapshot = self._load(self._snapshot)
            return self._snapshot

    def _lock_paths(self) -> list[StoreFile]:
        """Every lock file, in c/storage's order: the read-write layer store's (the graph
        root's ``layers.lock``, then the image store's), the additional stores'; images."""
        paths = [*self._rw_layer_locks(), *(r.layers_file("layers.lock") for r in self._ro_roots())]
        return paths + [r.images_file("images.lock") for r in self.roots]

    def _rw_roots(self) -> tuple[RootLayout, ...]:
        """The roots of c/storage's read-write layer store: the graph root, the image store."""
        primary = self._primary_index()
        return self.roots[primary : primary + 1] + self.roots[:primary]

    def _ro_roots(self) -> tuple[RootLayout, ...]:
        return self.roots[self._primary_index() + 1 :]

    def _rw_layer_locks(self) -> tuple[StoreFile, ...]:
        """c/storage's read-write layer store takes both ``layers.lock`` files (graph root's
        first) for every read of one of its layers (layers.go ``newMultipleLockFile``)."""
        return tuple(r.layers_file("layers.lock") for r in self._rw_roots())

    def layer_locks(self, home: RootLayout) -> tuple[StoreFile, ...]:
        """The ``layers.lock`` files c/storage holds while reading a layer recorded in
        ``home``: both of the read-write store's, or the additional store's own."""
        if home in self._ro_roots():
            return (home.layers_file("layers.lock"),)
        return self._rw_layer_locks()

    def _json_paths(self, root: RootLayout) -> list[StoreFile]:
        paths = [
            root.layers_file("layers.json"),
            root.layers_file("volatile-layers.json"),
            root.images_file("images.json"),
        ]
        if root is self.roots[self._primary_index()] and self.config.transient_store:
            run = StoreRoot.resolved(self.config.runroot)
            paths.insert(2, StoreFile(run, f"{root.layers_rel}/volatile-layers.json"))
        return paths

    def _primary_index(self) -> int:
        return 1 if self.config.imagestore and self.config.imagestore != self.graphroot else 0

    def _state(self) -> tuple[object, ...]:
        with read_locked(self._lock_paths()) as tokens:
            return self._state_locked(tokens)

    def _state_locked(self, tokens: tuple[bytes, ...]) -> tuple[object, ...]:
        states = [f.root.state(f.rel) for r in self.roots for f in self._json_paths(r)]
        return (tokens, tuple(states))

    def _load(self, old: _Snapshot | None) -> _Snapshot:
        with read_locked(self._lock_paths()) as tokens:
            state = self._state_locked(tokens)
            if old is not None and old.state == state:
                return old
            layers = self._read_layers()
            images = self._read_images()
        return _Snapshot(images, layers, state)

    def _read_layers(self) -> dict[str, LayerRecord]:
        layers: dict[str, LayerRecord] = {}
        for root in self.roots:
            for path in self._json_paths(root):
                if path.rel.endswith("/images.json"):
                    continue
                for rec in self._read_records(path, root, parse_layers_at=root.layers_dir):
                    assert isinstance(rec, LayerRecord)
                    layers.setdefault(rec.id, rec)
        return layers

    def _read_images(self) -> dict[str, tuple[ImageRecord, RootLayout]]:
        images: dict[str, tuple[ImageRecord, RootLayout]] = {}
        for root in self.roots:
            path = root.images_file("images.json")
            for rec in self._read_records(path, root, parse_layers_at=None):
                assert isinstance(rec, ImageRecord)
                images.setdefault(rec.id, (rec, root))
        return images

    def _read_records(
        self, where: StoreFile, root: RootLayout, parse_layers_at: str | None
    ) -> Sequence[ImageRecord | LayerRecord]:
        path = where.path
        try:
            data = where.root.read(where.rel, 256 << 20, path)
        except MalformedMetadata:
            raise
        except OSError as exc:
            raise MalformedMetadata(f"{path}: {exc.strerror}") from exc
        if data is None:
            return []
        items = load_array(data, path)
        records: Sequence[ImageRecord | LayerRecord]
        if parse_layers_at is None:
            records, skipped = parse_images(items, path)
        else:
            records, skipped = parse_layers(items, path, parse_layers_at)
        for reason in skipped:
            log.warning("skipped: %s", reason)
        return records

    def _check_exists(self) -> None:
        primary = self.roots[self._primary_index()]
        _check_root(primary.root)
        top = primary.store_root
        dirs = [d for d in (primary.images_rel, primary.layers_rel) if top.is_dir(d)]
        if not dirs:
            raise StoreNotFound(
                f"no {primary.driver} store at {primary.root} (neither {primary.driver}-images "
                f"nor {primary.driver}-layers exists as a directory)"
            )
        for d in dirs:
            if not os.access(top.show(d), os.R_OK | os.X_OK):
                raise StorePermissionError(f"{top.show(d)}: permission denied")

    def __repr__(self) -> str:
        return f"Store({self.graphroot!r}, driver={self.driver!r})"


def _check_root(path: str) -> None:
    """StoreNotFound unless ``path`` is a directory; StorePermissionError unless we may read it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise StoreNotFound(f"no store at {path}: does not exist") from None
    except PermissionError:
        raise StorePermissionError(f"store {path}: permission denied") from None
    except OSError as exc:
        raise StoreNotFound(f"no store at {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StoreNotFound(f"no store at {path}: not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise StorePermissionError(f"store {path}: permission denied")


class Image:
    """One image of a store snapshot. Metadata reads are cached per object."""

    def __init__(self, store: Store, snap: _Snapshot, rec: ImageRecord, root: RootLayout) -> None:
        self._store = store
        self._snap = snap
        self.record = rec
        self._root = root
        self._serial = next(store._serials)
        self._parsed: manifests.Manifest | None = None
        self._blobs: list[BlobInfo] | None = None
        self._diff_ids_checked = False

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def names(self) -> tuple[str, ...]:
        return self.record.names

    @property
    def digest(self) -> str | None:
        """The image digest as containers/image reports it (big-data ``manifest`` digest)."""
        return self.record.manifest_digest

    @property
    def created(self) -> datetime | None:
        return self.record.created

    @property
    def what(self) -> str:
        return f"image {self.id[:12]}"

    def manifest(self) -> bytes:
        """The stored primary manifest, byte for byte, checked against its recorded digest."""
        return self._big_data("manifest")

    def parsed_manifest(self) -> manifests.Manifest:
        if self._parsed is None:
            self._parsed = manifests.parse(self.manifest(), self.what)
        return self._parsed

    def config(self) -> bytes | None:
        """The config blob the manifest names, or None (lists, schema1)."""
        desc = self.parsed_manifest().config
        if desc is None:
            return None
        return self._config_bytes(desc.digest)

    def signatures(self) -> list[bytes]:
        """Signature blobs of the primary manifest, as ``skopeo copy … dir:`` writes them."""
        self._check_record()
        sizes = parse_signature_sizes(self.record.metadata, self.what).default
        if not sizes:
            return []
        return split_signatures(self._big_data("signatures"), sizes, self.what)

    def blobs(self) -> list[BlobInfo]:
        """Every blob this image offers (DESIGN.md §1), sizes known without reading content."""
        if self._blobs is None:
            self._blobs = self._list_blobs()
        return list(self._blobs)

    def _list_blobs(self) -> list[BlobInfo]:
        man = self.parsed_manifest()
        found: dict[str, BlobInfo] = {}
        if man.config is not None:
            size = self._big_data_size(man.config.digest)
            found[man.config.digest] = BlobInfo(
                man.config.digest, size, man.config.media_type, "config"
            )
        layers = [] if man.is_list else self.layer_infos(man)
        for info in layers:
            found.setdefault(info.digest, info)
        for info in self._manifest_blobs(man):
            found.setdefault(info.digest, info)
        return list(found.values())

    def _config_bytes(self, digest: str) -> bytes:
        """The config blob, checked against the layer records the first time it is read (not
        when blobs are listed: a listing needs only the recorded sizes)."""
        data = self._big_data(digest)
        if not self._diff_ids_checked:
            self._diff_ids_checked = True
            self._check_diff_ids(data)
        return data

    def _check_diff_ids(self, config: bytes) -> None:
        """Log (only) when the config's rootfs.diff_ids differ from the layer records."""
        try:
            diff_ids = json.loads(config)["rootfs"]["diff_ids"]
            layers = [i.digest for i in self.layer_infos() if i.kind == "layer"]
        except (ImgfsError, ValueError, KeyError, TypeError, RecursionError):
            return
        if diff_ids != layers:
            log.warning(
                "%s: config rootfs.diff_ids differ from the layer records' digests; "
                "blobs are named by the layer records",
                self.what,
            )

    def blob(self, digest: str) -> BlobInfo:
        for info in self.blobs():
            if info.digest == digest:
                return info
        raise BlobNotFound(f"{self.what} has no blob {digest}")

    def read_small_blob(self, info: BlobInfo) -> bytes:
        """Bytes of a config, manifest or empty-layer blob (not layers)."""
        if info.kind == "empty-layer":
            return EMPTY_LAYER_BYTES
        if info.kind == "config":
            return self._config_bytes(info.digest)
        if info.kind == "manifest":
            return self._manifest_blob_bytes(info.digest)
        raise BlobNotFound(f"{self.what}: {info.digest} is a layer blob")

    def open_blob(self, digest: str) -> BinaryIO:
        """A verified, seekable binary file object over one blob."""
        import io

        info = self.blob(digest)
        if info.kind != "layer":
            return io.BytesIO(self.read_small_blob(info))
        return open_layer_blob(self.layer_source(info.digest))

    def layer_infos(self, man: manifests.Manifest | None = None) -> list[BlobInfo]:
        """LayerInfosForCopy: the chain's uncompressed layers (+ schema1 empty layers)."""
        man = man or self.parsed_manifest()
        if man.is_list:
            raise MalformedMetadata(f"{self.what}: a manifest list has no layers")
        physical = [
            BlobInfo(
                rec.diff_digest or "",
                rec.diff_size or 0,
                man.uncompressed_layer_type,
                "layer",
                rec.id,
            )
            for rec in self.layer_chain()
        ]
        result: list[BlobInfo] = []
        for desc, empty in zip(man.layers, man.empty_layers, strict=True):
            if empty:
                result.append(
                    BlobInfo(
                        EMPTY_LAYER_DIGEST, len(EMPTY_LAYER_BYTES), desc.media_type, "empty-layer"
                    )
                )
            elif not physical:
                raise MalformedMetadata(
                    f"{self.what}: manifest names more layers than the store holds"
                )
            else:
                result.append(physical.pop(0))
        if physical:
            raise MalformedMetadata(
                f"{self.what}: the store holds {len(physical)} more layers than the manifest names"
            )
        return result

    def layer_chain(self) -> list[LayerRecord]:
        """The image's layers, base first; every one present, complete and named."""
        self._check_record()
        chain: list[LayerRecord] = []
        layer_id = self.record.layer
        seen: set[str] = set()
        while layer_id is not None:
            rec = self._snap.layers.get(layer_id)
            if rec is None or rec.incomplete:
                state = "missing" if rec is None else "incomplete (c/storage deletes it)"
                raise LayerUnavailable(f"{self.what}: layer {layer_id[:12]} is {state}")
            if rec.problem:
                raise MalformedMetadata(f"{self.what}: layer {layer_id[:12]}: {rec.problem}")
            if rec.diff_digest is None:  # (an unknown size fails the layer alone: sources)
                raise LayerUnavailable(
                    f"{self.what}: layer {layer_id[:12]} has no uncompressed digest"
                )
            if layer_id in seen or len(chain) >= MAX_LAYER_DEPTH:
                raise MalformedMetadata(f"{self.what}: layer chain loops or is too deep")
            seen.add(layer_id)
            chain.append(rec)
            layer_id = rec.parent
        chain.reverse()
        return chain

    def layer_source(self, digest: str) -> LayerSource:
        """Where to rebuild the layer blob ``digest`` of this image from (the first layer of
        the chain with that digest)."""
        for source in self.layer_sources():
            if source.digest == digest:
                return source
        raise BlobNotFound(f"{self.what} has no layer {digest}")

    def layer_sources(self) -> list[LayerSource]:
        """Where to rebuild each layer of the chain, base first (one per physical layer; the
        chain's IDs are shared, so this is linear in the depth)."""
        records = self.layer_chain()
        store = self._store
        chain = LayerChain(store.roots, tuple(rec.id for rec in records), store.driver == "overlay")
        sources = []
        for depth, rec in enumerate(records):
            assert rec.diff_digest is not None
            home = store._by_layers_dir.get(rec.source, store.roots[0])
            sources.append(
                LayerSource(
                    layer_id=rec.id,
                    digest=rec.diff_digest,
                    size=rec.diff_size or 0,
                    home=home,
                    locks=store.layer_locks(home),
                    chain=chain,
                    depth=depth,
                    what=f"layer {rec.id[:12]} of image {self.id[:12]}",
                    created_ns=_ns(rec.created),
                    toc_names=TOC_KEY in rec.big_data_names,
                    refused=_refusal(rec),
                    toc_tree=_refusal(rec) is not None
                    and rec.toc_digest is not None
                    and TOC_KEY in rec.big_data_names,
                )
            )
        return sources

    def instances(self) -> list[tuple[str, str | None]]:
        """For list images: (instance digest, ID of the image holding it or None)."""
        man = self.parsed_manifest()
        holders = {
            d: rec.id
            for rec, _ in self._snap.images.values()
            for key, d in rec.big_data_digests.items()
            if key.startswith("manifest")
        }
        return [(desc.digest, holders.get(desc.digest)) for desc in man.instances]

    def _manifest_blobs(self, man: manifests.Manifest) -> Iterator[BlobInfo]:
        rec = self.record
        primary = self.digest
        if primary is not None:
            yield BlobInfo(primary, self._big_data_size("manifest"), man.media_type, "manifest")
        for key in rec.big_data_names:
            digest = key.removeprefix("manifest-")
            if key.startswith("manifest-") and is_digest(digest):
                yield BlobInfo(digest, self._big_data_size(key), "", "manifest")
        if man.is_list:
            for digest, holder in self.instances():
                if holder is not None and holder != self.id:
                    other = self._snap.images[holder][0]
                    size = other.big_data_sizes.get(f"manifest-{digest}")
                    if size is not None:
                        yield BlobInfo(digest, size, "", "manifest")

    def _manifest_blob_bytes(self, digest: str) -> bytes:
        if digest == self.digest:
            return self.manifest()
        if f"manifest-{digest}" in self.record.big_data_names:
            return self._big_data(f"manifest-{digest}")
        for instance, holder in self.instances():
            if instance == digest and holder is not None:
                other_rec, other_root = self._snap.images[holder]
                other = Image(self._store, self._snap, other_rec, other_root)
                return other._big_data(f"manifest-{digest}")
        raise BlobNotFound(f"{self.what} has no manifest {digest}")

    def _check_record(self) -> None:
        if self.record.problem:
            raise MalformedMetadata(f"{self.what}: {self.record.problem}")

    def _big_data_size(self, key: str) -> int:
        self._check_big_data(key)
        size = self.record.big_data_sizes.get(key)
        if size is None:
            raise MalformedMetadata(f"{self.what}: no recorded size for big data {key!r:.80}")
        return size

    def _big_data(self, key: str) -> bytes:
        """A big-data item, verified; kept in the store's bounded cache unless it is larger
        than ``Budget.big_data_cached_item`` (then read again at each use)."""
        cache = self._store.big_data
        cached = cache.get((self._serial, key))
        if cached is not None:
            return cached
        data = self._read_big_data(key)
        self._verify_big_data(key, data)
        if len(data) <= self._store.budget.big_data_cached_item:
            cache.put((self._serial, key), data)
        return data

    def _check_big_data(self, key: str) -> None:
        """Refuse a big-data item of a bad record, or whose recorded size is invalid."""
        self._check_record()
        if key in self.record.bad_big_data:
            raise MalformedMetadata(
                f"{self.what}: big data {key!r:.80} has an invalid recorded size or digest"
            )

    def _read_big_data(self, key: str) -> bytes:
        self._check_big_data(key)
        if key not in self.record.big_data_names:
            raise MalformedMetadata(f"{self.what}: big data {key!r:.80} is not in the store")
        name = big_data_file_name(key)
        what = f"{self.what}: big data {key!r:.80}"
        if "/" in name:
            raise MalformedMetadata(f"{what}: its file name would contain '/'")
        cap = self._store.budget.big_data_item

        def within_budget(size: int) -> None:
            if cap < size <= MAX_BIG_DATA_BYTES:
                log.error("%s: %d bytes, over the memory budget's %d per item", what, size, cap)
                raise OverBudget(f"{what}: {size} bytes, over the memory budget's {cap}")

        rel = f"{self._root.image_dir(self.id)}/{name}"
        with read_locked([self._root.images_file("images.lock")], keep=True):
            try:  # the file opened below the root in one openat2 (not its directory first)
                data = self._root.store_root.read(
                    rel, min(cap, MAX_BIG_DATA_BYTES), what, within_budget
                )
            except OSError as exc:
                raise MalformedMetadata(f"{what}: cannot read {name}: {exc.strerror}") from exc
            if data is None:
                os.close(self._open_image_dir())  # ImageNotFound when the image went
                raise MalformedMetadata(f"{what}: file {name} is missing")
            return data

    def _open_image_dir(self) -> int:
        rel = self._root.image_dir(self.id)
        try:
            return self._root.store_root.open_dir(rel, f"{self.what}: big-data directory")
        except FileNotFoundError as exc:
            raise ImageNotFound(f"{self.what}: removed from the store") from exc
        except OSError as exc:
            path = self._root.store_root.show(rel)
            raise MalformedMetadata(f"{self.what}: cannot open {path}: {exc.strerror}") from exc

    def _verify_big_data(self, key: str, data: bytes) -> None:
        """The recorded size, and every digest the item is known by: its recorded digest, its
        name when that is a digest (a config) or ``manifest-<digest>`` (an instance manifest),
        and the image digest for ``manifest``. Content whose name is a digest is never served
        unchecked, whatever ``big-data-digests`` says or omits."""
        what = f"{self.what}: big data {key!r:.80}"
        size = self.record.big_data_sizes.get(key)
        if size is not None and size != len(data):
            raise IntegrityError(f"{what}: {len(data)} bytes, recorded size {size}")
        actual = _content_digest(key, data, what)
        for expected in self._expected_digests(key):
            if actual != expected:
                raise IntegrityError(f"{what}: content digest {actual} != {expected}")

    def _expected_digests(self, key: str) -> set[str]:
        rec = self.record
        expected = {rec.big_data_digests[key]} if key in rec.big_data_digests else set()
        named = key.removeprefix("manifest-")
        if is_digest(named):
            expected.add(named)
        if key == "manifest" and rec.manifest_digest is not None:
            expected.add(rec.manifest_digest)
        return expected


def _content_digest(key: str, data: bytes, what: str) -> str:
    """The digest c/image names this item by: manifests by ``manifest.Digest``, else sha256."""
    if key.startswith("manifest"):
        return manifests.digest_of(data, what)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _refusal(rec: LayerRecord) -> str | None:
    """Why a layer of a valid chain cannot be served, or None."""
    if rec.diff_size is not None:
        return None
    if rec.toc_digest is not None:
        return (
            "a zstd:chunked layer known only by its TOC (no uncompressed size, no tar-split): "
            "its tar stream cannot be reproduced bit-exactly (c/storage itself would re-tar it)"
        )
    return "its uncompressed size is unknown (diff-size), so it cannot be checked"


def _ns(when: datetime | None) -> int:
    """Nanoseconds since the epoch (0 when unknown or out of range)."""
    if when is None:
        return 0
    try:
        return int(when.timestamp() * 1e9)
    except (OverflowError, ValueError, OSError):
        return 0


def _resolve(snap: _Snapshot, ref: str) -> ImageRecord:
    if is_id(ref) and ref in snap.images:
        return snap.images[ref][0]
    if 3 <= len(ref) < 64 and is_hex(ref):
        matches = [rec for rec, _ in snap.images.values() if rec.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise AmbiguousName(f"ID prefix {ref} matches {len(matches)} images")
    wanted = {ref, normalize_name(ref)}
    for rec, _ in sorted(snap.images.values(), key=lambda p: p[0].id):
        if wanted & set(rec.names):
            return rec
    name, _, digest = normalize_name(ref).partition("@")
    if digest:
        repo = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
        for rec, _ in sorted(snap.images.values(), key=lambda p: p[0].id):
            digests = {d for k, d in rec.big_data_digests.items() if k.startswith("manifest")}
            repos = {_repository(n) for n in rec.names}
            if digest in digests | {rec.digest} and repo in repos:
                return rec
    raise ImageNotFound(f"no image {ref!r:.200} in the store")


def _repository(name: str) -> str:
    name = name.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return name.rsplit(":", 1)[0] if ":" in last else name


def normalize_name(ref: str) -> str:
    """Docker-style normalisation: ``busybox`` → ``docker.io/library/busybox:latest``."""
    name, at, digest = ref.partition("@")
    first, slash, rest = name.partition("/")
    if not slash or ("." not in first and ":" not in first and first != "localhost"):
        rest = name
        first = "docker.io"
        if "/" not in rest:
            rest = "library/" + rest
    full = f"{first}/{rest}"
    if not at and ":" not in full.rsplit("/", 1)[-1]:
        full += ":latest"
    return full + (at + digest if at else "")
