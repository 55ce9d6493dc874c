"""The files of one layer as its tar describes them: a compact, lazily parsed directory model.

Owns: turning tar-split entries into the layer's members (content identity from the file
entries: name, size, CRC-64; metadata from the header blocks the segments hold, parsed on first
use), the directory model (directory path → child name → member ref, including directories the
tar only implies), hardlink resolution inside the layer, and the versioned, checksummed
serialization (so a remount skips the tar-split parse).
Must not know: where the tar-split or the layer files live, other layers, whiteout semantics
(whiteouts are ordinary members here), FUSE.

Paths are cleaned member names relative to the layer root (``b""`` is the root itself, no
leading ``./`` or ``/``, no trailing ``/``); hardlink targets are cleaned the same way, symlink
targets are kept verbatim. A *ref* is a member's position in the tar (>= 0) or, for an implied
directory, a negative number. Building reads only each member's name and type byte; the header
blocks are kept zstd-compressed in chunks and parsed when a member is first asked for.

Speed: a member whose header is one plain block (nearly all) is parsed by the compiled
``imgfs.layer._fastparse`` when it is built (setup.py); it returns None for anything else and
this module's Python code, the reference and the only one that raises, decides.
(``IMGFS_PURE_PYTHON=1``, for tests only, turns it off: compiled.py).
"""

from __future__ import annotations

import struct
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from imgfs.budget import MEMBER_BYTES, TREE_MEMBER_BYTES
from imgfs.errors import MalformedMetadata, NotFound, OverBudget
from imgfs.layer import compiled, tarsplit
from imgfs.layer.index import MAX_BLOB_SIZE, close_iterable, longer_than
from imgfs.layer.tarheader import (
    BLOCK,
    DIRECTORY,
    GLOBAL,
    HARDLINK,
    KNOWN_TYPES,
    REGULAR,
    parse_header,
)
from imgfs.layer.tarsplit import FileEntry, Segment, clean_name
from imgfs.layer.zchunks import ChunkedBytes, ChunkWriter
from imgfs.lru import LRU

MAX_LINK_DEPTH = 64
MAX_DEPTH = 4096  # path components of a member (PATH_MAX / 2: "a/" repeated fills PATH_MAX)
MAX_IMPLIED_BYTES = 64 << 20  # path bytes of directories the tar implies but does not list
MAX_HEADER_BYTES = 16 << 20  # tar headers (PAX records included) before one member
ROOT_REF = -(1 << 62)  # the ref of a layer root the tar does not list
CHUNK = 32 << 10  # small: a directory's members may be spread over the whole tar
_CHUNK_CACHE = 64
MEMBER_CACHE = 32_768  # parsed members kept per tree (~300 B each)
SPAN_BYTES = 1 << 20  # a listing reads its members' headers in spans of at most this
_MAGIC = b"IMGFSTRE"
_VERSION = 2
_HEADER = struct.Struct("<8sI")  # magic, version (integrity: the cache files' envelope)
_COUNTS = struct.Struct("<QQQQ")  # members, header bytes, name bytes, frames
_MAX_BODY = 4 << 30
_DIR_BYTE = ord(DIRECTORY)
_REGULAR_BYTE = ord(REGULAR)  # the columns' type byte of every regular member ('\0' and '7' too)
_HARDLINK_BYTE = ord(HARDLINK)
_SKIP_BYTE = ord(GLOBAL)


@dataclass(frozen=True, slots=True)
class Member:
    """One tar member (or a directory the tar implies by naming a path below it)."""

    path: bytes
    typeflag: str  # tarheader constants: REGULAR, HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, ...
    mode: int  # permission bits (07777)
    uid: int
    gid: int
    size: int  # content bytes: regular files only, else 0
    mtime_ns: int
    linkname: bytes  # symlink: target verbatim; hardlink: cleaned target path
    devmajor: int
    devminor: int
    xattrs: tuple[tuple[str, bytes], ...]
    crc: int | None  # CRC-64/GO-ISO of the content (size > 0)
    data_name: bytes  # the tar-split name, as LayerFiles.open wants it
    ref: int
    implied: bool = False

    @property
    def is_dir(self) -> bool:
        return self.typeflag == DIRECTORY


@dataclass(frozen=True, slots=True)
class FileData:
    """A regular member's content identity, all of it in the tree's columns: its tar-split
    name (what ``LayerFiles.open`` wants), size and CRC-64/GO-ISO (None when empty)."""

    data_name: bytes
    size: int
    crc: int | None


def _fast_member() -> Callable[[bytes, bytes, int, int | None, int], Member | None] | None:
    """The compiled ``_fastparse.member`` bound to Member, or None (see compiled.py)."""
    ext = compiled.extension()
    if ext is None:
        return None
    ext.bind(Member)
    member: Callable[[bytes, bytes, int, int | None, int], Member | None] = ext.member
    return member


FAST_MEMBER = _fast_member()
_Columns_Fn = Callable[
    [bytes, int, "array[int]", set[bytes], bytearray, tuple[bytearray, ...]], tuple[int, bool]
]


def _fast_columns() -> _Columns_Fn | None:
    """The compiled ``_fastparse.columns`` (the build loop of ``from_tarsplit``), or None."""
    ext = compiled.extension()
    if ext is None or array("I").itemsize != 4 or array("q").itemsize != 8:
        return None
    fn: _Columns_Fn = ext.columns
    return fn


FAST_COLUMNS = _fast_columns()


@dataclass(frozen=True)
class _Columns:
    """Per member: type byte, content size, CRC, header position/length, raw name."""

    types: bytearray
    sizes: array[int]
    crcs: array[int]
    head_pos: array[int]
    head_len: array[int]
    name_pos: array[int]  # n + 1 offsets into names
    names: bytes
    headers: ChunkedBytes


class LayerTree:
    """The members of one layer, by directory. Thread-safe; members parse on first use."""

    def __init__(self, columns: _Columns, what: str, max_bytes: int | None = None) -> None:
        self.what = what
        self._cols = columns
        _check_budget(len(columns.types), len(columns.names), max_bytes, what)
        self.dirs: dict[bytes, dict[bytes, int]] = {b"": {}}
        self.hardlinks: list[int] = []
        self._implied: list[Member] = []
        self._implied_order: list[int] = []
        self._root_ref: int | None = None
        self._members: LRU[int, Member] = LRU(MEMBER_CACHE)  # parsed again when evicted
        self._link_counts: dict[int, int] | None = None
        self._lock = threading.Lock()
        self._implied_bytes = 0
        self._index_names()

    # -- building ----------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        entries: Iterable[Segment | FileEntry],
        what: str,
        expected_size: int | None = None,
        max_bytes: int | None = None,
    ) -> LayerTree:
        """The tree of ``entries`` (from ``tarsplit.iter_entries``), which is closed after.

        With ``expected_size`` (the layer's ``diff-size``), parsing stops with
        ``IntegrityError`` as soon as the tar described so far is longer; with ``max_bytes``,
        with ``OverBudget`` as soon as the tree would hold more (``nbytes``' estimate).
        """
        collector = _Collector(what, expected_size, max_bytes)
        try:
            for entry in entries:
                collector.add(entry)
        finally:
            close_iterable(entries)
        return cls(collector.finish(), what, max_bytes)

    @classmethod
    def from_tarsplit(
        cls,
        gz: BinaryIO,
        what: str,
        expected_size: int | None = None,
        max_bytes: int | None = None,
    ) -> LayerTree:
        """``build(tarsplit.iter_entries(gz, what), ...)``: the same tree, the same errors;
        with the compiled ``FAST_COLUMNS`` the lines it takes build their columns in C and
        every other line goes through the Python code (``_Collector.add``)."""
        if FAST_COLUMNS is None:
            return cls.build(tarsplit.iter_entries(gz, what), what, expected_size, max_bytes)
        collector = _Collector(what, expected_size, max_bytes)
        state = tarsplit.State(what)
        chunks = tarsplit.iter_chunks(gz, what)
        try:
            for first, chunk, newlines in chunks:
                collector.add_chunk(chunk, first, newlines, state, FAST_COLUMNS)
        finally:
            close_iterable(chunks)
        return cls(collector.finish(), what, max_bytes)

    def _index_names(self) -> None:
        cols = self._cols
        names, name_pos, types = cols.names, cols.name_pos, cols.types
        dirs = self.dirs
        for ref in range(len(types)):
            flag = types[ref]
            if flag == _SKIP_BYTE:
                continue
            path = clean_name(names[name_pos[ref] : name_pos[ref + 1]])
            if path == b".":
                if flag != _DIR_BYTE:
                    raise MalformedMetadata(f"{self.what}: the layer root is not a directory")
                self._root_ref = ref
                continue
            if len(path) > 2 * MAX_DEPTH and path.count(b"/") >= MAX_DEPTH:
                raise MalformedMetadata(
                    f"{self.what}: {path[:200]!r}... is deeper than {MAX_DEPTH} components"
                )
            parent, _, base = path.rpartition(b"/")
            siblings = dirs.get(parent)
            if siblings is None:
                siblings = self._ensure_dir(parent, ref)
            old = siblings.get(base)
            if old is not None and not (old < 0 and flag == _DIR_BYTE):
                raise MalformedMetadata(f"{self.what}: {path!r:.200} appears twice")
            siblings[base] = ref
            if flag == _DIR_BYTE:
                if path not in dirs:
                    dirs[path] = {}
            elif flag == _HARDLINK_BYTE:
                self.hardlinks.append(ref)

    def _ensure_dir(self, path: bytes, first_child: int) -> dict[bytes, int]:
        """The children of directory ``path``, which with its missing ancestors becomes an
        implied directory (iterative: a path may be MAX_DEPTH components deep)."""
        missing: list[bytes] = []
        children = self.dirs.get(path)
        while children is None:
            missing.append(path)
            path = path.rpartition(b"/")[0]
            children = self.dirs.get(path)  # the root b"" is always there
        for below in reversed(missing):
            children = self._add_implied(children, below, first_child)
        return children

    def _add_implied(
        self, siblings: dict[bytes, int], path: bytes, first_child: int
    ) -> dict[bytes, int]:
        """Make ``path`` (a child of ``siblings``' directory) a directory; its children."""
        base = path.rpartition(b"/")[2]
        existing = siblings.get(base)
        if existing is not None and not self.is_dir(existing):
            raise MalformedMetadata(f"{self.what}: {path!r:.200} has members below a non-directory")
        if existing is None:
            self._implied_bytes += len(path)
            if self._implied_bytes > MAX_IMPLIED_BYTES:
                raise MalformedMetadata(
                    f"{self.what}: more than {MAX_IMPLIED_BYTES} bytes of implied directory paths"
                )
            ref = -1 - len(self._implied)
            self._implied.append(_implied_dir(path, ref))
            self._implied_order.append(first_child)
            siblings[base] = ref
        children: dict[bytes, int] = {}
        self.dirs[path] = children
        return children

    # -- queries -----------------------------------------------------------------------------

    @property
    def member_count(self) -> int:
        return len(self._cols.types)

    @property
    def nbytes(self) -> int:
        """Estimated memory: per member (columns, directory model) plus names and header
        frames, and the parsed-member cache when full (MEMBER_CACHE members)."""
        cols = self._cols
        parsed = min(len(cols.types), MEMBER_CACHE) * MEMBER_BYTES
        return _estimate(len(cols.types), len(cols.names)) + cols.headers.nbytes + parsed

    def root_ref(self) -> int:
        """The ref of the layer root's ``./`` member, else ROOT_REF."""
        return ROOT_REF if self._root_ref is None else self._root_ref

    def root(self) -> Member:
        """The layer root's own member (its ``./`` entry), or an implied directory."""
        if self._root_ref is None:
            return _implied_dir(b"", ROOT_REF)
        return self.member(self._root_ref)

    def ref(self, path: bytes) -> int:
        """The ref of the member at ``path`` (not the root); NotFound when there is none."""
        parent, _, base = path.rpartition(b"/")
        found = self.dirs.get(parent, {}).get(base)
        if found is None:
            raise NotFound(f"{self.what}: no {path!r:.200} in the layer")
        return found

    def child_refs(self, path: bytes) -> dict[bytes, int]:
        """Child name → ref below directory ``path``; NotFound if it is not a directory."""
        children = self.dirs.get(path)
        if children is None:
            raise NotFound(f"{self.what}: {path!r:.200} is not a directory of the layer")
        return children

    def typeflag(self, ref: int) -> str:
        return DIRECTORY if ref < 0 else chr(self._cols.types[ref])

    def is_dir(self, ref: int) -> bool:
        return ref < 0 or self._cols.types[ref] == _DIR_BYTE

    def order(self, ref: int) -> int:
        """Where the member took effect in the tar (implied dirs: with their first child)."""
        return self._implied_order[-1 - ref] if ref < 0 else ref

    def member(self, ref: int) -> Member:
        """The member ``ref``, its header parsed (and cached) on first use."""
        if ref == ROOT_REF:
            return self.root()
        if ref < 0:
            return self._implied[-1 - ref]
        found = self._members.get(ref)
        if found is None:
            found = self._parse(ref)
            self._members.put(ref, found)
        return found

    def file(self, ref: int) -> FileData:
        """The content identity of regular member ``ref`` from the columns alone: no header
        is read or parsed, so this is for a member already parsed as a regular file (a node
        made from ``member(ref)``, whose parse checked its header against these columns).
        MalformedMetadata if the columns do not say regular file."""
        cols = self._cols
        if ref < 0 or cols.types[ref] != _REGULAR_BYTE:
            raise MalformedMetadata(f"{self.what}: member {ref} is not a regular file")
        size = cols.sizes[ref]
        name = cols.names[cols.name_pos[ref] : cols.name_pos[ref + 1]]
        return FileData(name, size, cols.crcs[ref] if size else None)

    def members(self, refs: Iterable[int], keep: bool = True) -> dict[int, Member]:
        """ref → member of each of ``refs`` (a listing's): the ones not cached are parsed in
        tar order, their headers read in spans of up to SPAN_BYTES, and cached unless not
        ``keep`` (a caller that keeps what it builds from them: caching them too would only
        evict others)."""
        wanted = set(refs)
        found = self._members.get_many(r for r in wanted if r >= 0)
        missing = sorted(r for r in wanted if r >= 0 and r not in found)
        parsed = list(self._parse_in_order(missing))
        if keep:
            self._members.put_many(parsed)
        found.update(parsed)
        for ref in wanted:
            if ref < 0:
                found[ref] = self.member(ref)
        return found

    def _parse_in_order(self, refs: list[int]) -> Iterator[tuple[int, Member]]:
        """(ref, member) of ascending ``refs``, one header read per span of neighbours."""
        cols = self._cols
        pos, length = cols.head_pos, cols.head_len
        i = 0
        while i < len(refs):
            start = pos[refs[i]]
            j = i + 1
            while j < len(refs) and 0 <= pos[refs[j]] - start <= SPAN_BYTES - length[refs[j]]:
                j += 1
            end = max(pos[r] + length[r] for r in refs[i:j])
            span = cols.headers.read(start, end - start)
            for ref in refs[i:j]:
                at = pos[ref] - start
                yield ref, self._parse(ref, span[at : at + length[ref]])
            i = j

    def _parse(self, ref: int, data: bytes | None = None) -> Member:
        """Member ``ref`` from its header bytes ``data`` (read here when None)."""
        cols = self._cols
        name = cols.names[cols.name_pos[ref] : cols.name_pos[ref + 1]]
        if data is None:
            data = cols.headers.read(cols.head_pos[ref], cols.head_len[ref])
        size = cols.sizes[ref]
        crc = cols.crcs[ref] if size else None
        found = None if FAST_MEMBER is None else FAST_MEMBER(data, name, size, crc, ref)
        if found is None:
            found = parse_member(data, name, size, crc, ref, self.what)
        if ord(found.typeflag) != cols.types[ref]:  # what ``file`` and the model go by
            raise MalformedMetadata(
                f"{_member_what(self.what, name)}: its tar header and its type in the layer "
                f"tree differ ({found.typeflag!r}, {chr(cols.types[ref])!r})"
            )
        return found

    def link_target(self, ref: int) -> int | None:
        """The ref a hardlink shares its inode with (an earlier non-link member), else None."""
        current = ref
        for _ in range(MAX_LINK_DEPTH):
            try:
                target = self.ref(self.member(current).linkname)
            except NotFound:
                return None
            if target < 0 or target >= current or self.is_dir(target):
                return None
            if self.typeflag(target) != HARDLINK:
                return target
            current = target
        return None

    def link_count(self, ref: int) -> int:
        """How many paths of this layer share the inode of non-link member ``ref``."""
        with self._lock:
            counts = self._link_counts
        if counts is None:
            counts = {}
            for link in self.hardlinks:
                target = self.link_target(link)
                if target is not None:
                    counts[target] = counts.get(target, 0) + 1
            with self._lock:
                self._link_counts = counts
        return counts.get(ref, 0) + 1

    # -- persistence ---------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Serialize: header (magic, version) + columns + header frames (no checksum:
        persisted files carry the cache's integrity envelope)."""
        cols = self._cols
        frames = cols.headers.frames
        lengths = array("Q", [len(f) for f in frames])
        counts = _COUNTS.pack(len(cols.types), cols.headers.length, len(cols.names), len(frames))
        table = b"".join(
            bytes(p)
            for p in (counts, cols.types, cols.sizes, cols.crcs, cols.head_pos, cols.head_len)
        )
        table += bytes(cols.name_pos) + cols.names + bytes(lengths)
        head = zstandard.ZstdCompressor(level=1).compress(table)
        body = struct.pack("<Q", len(head)) + head + b"".join(frames)
        return _HEADER.pack(_MAGIC, _VERSION) + body

    @classmethod
    def from_bytes(cls, data: bytes, what: str, max_bytes: int | None = None) -> LayerTree:
        """Load what :meth:`to_bytes` wrote; anything off raises ``MalformedMetadata``, a
        tree over ``max_bytes`` ``OverBudget``."""
        return cls(_load_columns(data, what), what, max_bytes)


def parse_member(
    data: bytes, name: bytes, size: int, crc: int | None, ref: int, what: str
) -> Member:
    """Member ``ref`` of layer ``what`` from its header bytes ``data`` (the previous member's
    padding, then its header blocks), tar-split ``name``, ``size`` and ``crc``: the reference
    that ``FAST_MEMBER`` must equal wherever it returns a member."""
    try:
        header = parse_header(data, what)
    except MalformedMetadata:  # again, to name the member (not formatted for every member)
        header = parse_header(data, _member_what(what, name))
    if header.name != name:
        raise MalformedMetadata(
            f"{_member_what(what, name)}: the tar header names {header.name!r:.200}"
        )
    flag = header.typeflag
    if flag not in KNOWN_TYPES or (flag != REGULAR and size):
        raise MalformedMetadata(f"{_member_what(what, name)}: unsupported tar member type {flag!r}")
    if flag == REGULAR and header.size != size:
        raise MalformedMetadata(f"{_member_what(what, name)}: header and tar-split sizes differ")
    path = clean_name(name)
    link = clean_name(header.linkname) if flag == HARDLINK else header.linkname
    return Member(
        b"" if path == b"." else path, flag, header.mode, header.uid, header.gid, size,
        header.mtime_ns, link, header.devmajor, header.devminor, header.xattrs, crc, name, ref,
    )  # fmt: skip


def _member_what(what: str, name: bytes) -> str:
    return f"{what}: member {name!r:.200}"


def _estimate(members: int, name_bytes: int) -> int:
    return members * TREE_MEMBER_BYTES + 2 * name_bytes


def _check_budget(members: int, name_bytes: int, max_bytes: int | None, what: str) -> None:
    if max_bytes is not None and _estimate(members, name_bytes) > max_bytes:
        raise OverBudget(
            f"{what}: the file tree of more than {members} members would take more than "
            f"{max_bytes >> 20} MiB, its share of the memory budget (--memory)"
        )


def _implied_dir(path: bytes, ref: int) -> Member:
    return Member(path, DIRECTORY, 0o755, 0, 0, 0, 0, b"", 0, 0, (), None, b"", ref, True)


# _Collector.counts: what _fastparse.columns reads and updates (its C_* order)
_TOTAL, _LIMIT, _PENDING, _MAX_PENDING, _SEGMENTS, _MAX_SEGMENTS, _MEMBERS = range(7)
_HEAD_BASE, _NAME_BASE, _N_COUNTS = 7, 8, 9
_INT64_MAX = (1 << 63) - 1


class _Collector:
    """The columns of a tree being built, member by member; only the type byte of each
    member's header is looked at. Stops as soon as the tar described so far is longer than the
    limit, or the tree would be larger than ``max_bytes`` (checked every 4096 members)."""

    def __init__(self, what: str, expected_size: int | None, max_bytes: int | None) -> None:
        self.what = what
        self.max_bytes = max_bytes
        self.headers = ChunkWriter(CHUNK)
        self.cols = _Columns(
            bytearray(), array("Q"), array("Q"), array("Q"), array("I"), array("Q", [0]), b"",
            ChunkedBytes([], 0, CHUNK, what, _CHUNK_CACHE),
        )  # fmt: skip
        self.names: list[bytes] = []
        self.name_total = 0
        # bounded: a gzip bomb of segments must not be held in memory (MAX_HEADER_BYTES)
        self.pending = bytearray()
        limit = MAX_BLOB_SIZE if expected_size is None else expected_size
        self.limit = limit
        self.total = 0  # tar bytes described so far (a Python int: the limit may be any size)
        self.counts = array("q", [0] * _N_COUNTS)
        self.counts[_LIMIT] = min(limit, _INT64_MAX)
        self.counts[_MAX_PENDING] = MAX_HEADER_BYTES
        self.counts[_MAX_SEGMENTS] = tarsplit.MAX_SEGMENT_BYTES

    def add(self, entry: Segment | FileEntry) -> None:
        """Append one entry (the reference of ``_fastparse.columns``)."""
        counts, what = self.counts, self.what
        if type(entry) is Segment:
            counts[_PENDING] += len(entry.payload)
            self.total += len(entry.payload)
            if self.total > self.limit:
                raise longer_than(what, self.limit)
            if counts[_PENDING] <= MAX_HEADER_BYTES:
                self.pending += entry.payload
            else:
                self.pending.clear()  # only trailing data may be this long
            return
        assert isinstance(entry, FileEntry)
        self.total += entry.size
        if self.total > self.limit:
            raise longer_than(what, self.limit)
        if counts[_PENDING] > MAX_HEADER_BYTES:
            raise MalformedMetadata(
                f"{what}: more than {MAX_HEADER_BYTES} bytes of tar headers before "
                f"{entry.name!r:.200}"
            )
        data = self.pending
        skip = len(data) % BLOCK
        if len(data) - skip < BLOCK:
            raise MalformedMetadata(f"{what}: no tar header before {entry.name!r:.200}")
        flag = data[-BLOCK + 156]
        if flag in (0, 0x30, 0x37):  # Go: '\0' names ending in '/' are directories
            flag = _DIR_BYTE if flag == 0 and entry.name.endswith(b"/") else 0x30
        cols = self.cols
        cols.types.append(flag)
        cols.sizes.append(entry.size)
        cols.crcs.append(0 if entry.crc is None else int.from_bytes(entry.crc, "big"))
        cols.head_pos.append(self.headers.append(bytes(data[skip:])))
        cols.head_len.append(len(data) - skip)
        data.clear()
        counts[_PENDING] = 0
        self.names.append(entry.name)
        self.name_total += len(entry.name)
        cols.name_pos.append(self.name_total)
        if not len(cols.types) & 4095:
            _check_budget(len(cols.types), self.name_total, self.max_bytes, what)

    def add_chunk(
        self, chunk: bytes, first: int, newlines: int, state: tarsplit.State, columns: _Columns_Fn
    ) -> None:
        """Append the entries of the tar-split lines ``chunk`` (``tarsplit.iter_chunks``), its
        first line ``first``: each line ``columns`` takes in C, every other one through
        ``tarsplit.decode_lines`` and ``add``."""
        utf8_ok = tarsplit.start_chunk(chunk, first, newlines, state)
        if not utf8_ok or not 0 <= self.total <= self.counts[_LIMIT]:
            # (past 2**63 bytes, or a negative diff-size: the Python code's ints decide)
            for entry in tarsplit.decode_lines(chunk.split(b"\n"), first, state, utf8_ok):
                self.add(entry)
            return
        cols, counts, headers = self.cols, self.counts, self.headers
        out = (bytearray(), bytearray(), bytearray(), bytearray(), bytearray(), bytearray())
        names, head_bytes = bytearray(), bytearray()
        out_all = (*out, names, head_bytes)
        pos, end = 0, len(chunk)
        counted, lineno = 0, first  # line ``lineno`` starts at offset ``counted``
        while pos <= end:
            counts[_TOTAL] = self.total
            counts[_SEGMENTS] = state.segment_bytes
            counts[_MEMBERS] = len(cols.types)
            counts[_HEAD_BASE] = headers.length
            counts[_NAME_BASE] = self.name_total
            pos, declined = columns(chunk, pos, counts, state.seen, self.pending, out_all)
            state.segment_bytes = counts[_SEGMENTS]
            self.total = counts[_TOTAL]
            if names or head_bytes or out[0]:
                cols.types.extend(out[0])
                cols.sizes.frombytes(out[1])
                cols.crcs.frombytes(out[2])
                cols.head_pos.frombytes(out[3])
                cols.head_len.frombytes(out[4])
                cols.name_pos.frombytes(out[5])
                self.names.append(bytes(names))
                self.name_total += len(names)
                headers.append(bytes(head_bytes))
                for column in out_all:
                    column.clear()
                if not len(cols.types) & 4095:
                    _check_budget(len(cols.types), self.name_total, self.max_bytes, self.what)
            if declined:  # the Python code decides this line
                stop = chunk.find(b"\n", pos)
                stop = end if stop < 0 else stop
                lineno += chunk.count(b"\n", counted, pos)
                counted = pos
                for entry in tarsplit.decode_lines([chunk[pos:stop]], lineno, state, True):
                    self.add(entry)
                pos = stop + 1
                if self.total > counts[_LIMIT] and pos <= end:  # past 2**63 bytes: Python's
                    rest = chunk[pos:].split(b"\n")
                    for entry in tarsplit.decode_lines(rest, lineno + 1, state, True):
                        self.add(entry)
                    return

    def finish(self) -> _Columns:
        headers = self.headers.finish(self.what, _CHUNK_CACHE)
        return _Columns(**{**self.cols.__dict__, "names": b"".join(self.names), "headers": headers})


def _load_columns(data: bytes, what: str) -> _Columns:
    def fail(reason: str) -> MalformedMetadata:
        return MalformedMetadata(f"{what}: cached layer tree: {reason}")

    if len(data) < _HEADER.size:
        raise fail("truncated header")
    magic, version = _HEADER.unpack_from(data)
    body = memoryview(data)[_HEADER.size :]
    if magic != _MAGIC or version != _VERSION or len(body) > _MAX_BODY:
        raise fail("bad magic, version or length")
    try:
        (head_len,) = struct.unpack_from("<Q", body)
        table = zstandard.ZstdDecompressor().decompress(
            body[8 : 8 + head_len], max_output_size=_MAX_BODY
        )
        return _parse_columns(table, body[8 + head_len :], what)
    except (zstandard.ZstdError, struct.error, ValueError) as exc:
        raise fail(f"corrupt: {exc}") from exc


def _parse_columns(table: bytes, frames_raw: memoryview, what: str) -> _Columns:
    n, header_bytes, name_bytes, n_frames = _COUNTS.unpack_from(table)
    pos = _COUNTS.size

    def take(typecode: str, count: int) -> array[int]:
        nonlocal pos
        column = array(typecode)
        column.frombytes(table[pos : pos + column.itemsize * count])
        if len(column) != count:
            raise ValueError("truncated column")
        pos += column.itemsize * count
        return column

    types = bytearray(table[pos : pos + n])
    pos += n
    sizes, crcs, head_pos, head_len = take("Q", n), take("Q", n), take("Q", n), take("I", n)
    name_pos = take("Q", n + 1)
    names = table[pos : pos + name_bytes]
    pos += name_bytes
    lengths = take("Q", n_frames)
    if pos != len(table) or len(types) != n or len(names) != name_bytes:
        raise ValueError("table length does not match counts")
    if name_pos[-1] != name_bytes or any(
        p + q > header_bytes for p, q in zip(head_pos, head_len, strict=True)
    ):
        raise ValueError("offsets out of range")
    frames, at = [], 0
    for length in lengths:
        frames.append(bytes(frames_raw[at : at + length]))
        at += length
    if at != len(frames_raw) or -(-header_bytes // CHUNK) != n_frames:
        raise ValueError("frames do not match lengths")
    return _Columns(
        types,
        sizes,
        crcs,
        head_pos,
        head_len,
        name_pos,
        names,
        ChunkedBytes(frames, header_bytes, CHUNK, what, _CHUNK_CACHE),
    )
