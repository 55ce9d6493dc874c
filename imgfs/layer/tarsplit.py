"""Bounded streaming decoder of a layer's ``<layer>.tar-split.gz``.

Owns: the tar-split NDJSON format (storage-format.md §6.1), its bounds (line length, entry
count, total segment bytes, sizes), duplicate-path detection, and the lexical cleaning of member
names (§6.3). Must not know: where the file lives, layer files, how entries are assembled or
indexed, locks, FUSE.

Every error is ``MalformedMetadata`` (or ``UnsafePath`` from :func:`clean_name`) whose message
names the layer and the line number; an I/O error reading the file is ``LayerUnavailable``.

Speed: a fast path handles the exact line shapes Go writes (prefix checks, one small regex for
file lines), anything else goes through ``json.loads``; gzip is inflated in a helper thread
(zlib releases the GIL) so it overlaps parsing; base64 is decoded with pybase64 (SIMD, about
10x binascii, with the same strictness as binascii's strict_mode). When the compiled
``imgfs.layer._fastparse`` is built (compiled.py), ``FAST_ENTRY`` decodes those line shapes
(canonical base64 only) in C; it returns None for anything else and the Python code decides.
"""

from __future__ import annotations

import binascii
import io
import json
import os
import queue
import re
import threading
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import pybase64

from imgfs.errors import LayerUnavailable, MalformedMetadata, UnsafePath
from imgfs.layer import compiled

MAX_LINE = 8 << 20
MAX_ENTRIES = 8_000_000
MAX_SEGMENT_BYTES = 1 << 30
MAX_INPUT_BYTES = 4 << 30
MAX_SIZE = 1 << 50
CRC_LEN = 8

_RAW_READ = 1 << 20
_BLOCK = 2 << 20
_QUEUE_DEPTH = 2
_INLINE_GZIP = 64 << 10  # tar-splits up to this size are inflated in the parser's thread
_SEGMENT = 2
_FILE = 1

# The shapes Go's encoding/json writes for tar-split's storage.Entry, field order fixed by the
# struct. Names without escapes are their own UTF-8 bytes. Anything else takes json.loads.
_SEGMENT_HEAD = b'{"type":2,"payload":"'
_SEGMENT_HEAD_LEN = len(_SEGMENT_HEAD)
_SEGMENT_TAIL = re.compile(rb'","position":[0-9]{1,19}\}')
_FILE_HEAD = b'{"type":1,"name":"'
_FILE_RE = re.compile(
    rb'\{"type":1,"name":"([^"\\\x00-\x1f]+)",(?:"size":([1-9][0-9]{0,15}),)?'
    rb'"payload":(?:"([^"\\]*)"|null),"position":[0-9]{1,19}\}'
)


@dataclass(frozen=True, slots=True)
class Segment:
    """Raw tar bytes (headers, padding, end-of-archive, trailing bytes), emitted verbatim."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A tar member whose ``size`` content bytes come from the layer file ``name``.

    ``crc`` is the 8-byte big-endian CRC-64/GO-ISO of the content; None when ``size`` is 0.
    """

    name: bytes
    size: int
    crc: bytes | None


def _fast_entry() -> Callable[[bytes], Segment | FileEntry | None] | None:
    """The compiled ``_fastparse.entry`` bound to Segment and FileEntry, or None."""
    ext = compiled.extension()
    if ext is None:
        return None
    ext.bind(Segment)
    ext.bind(FileEntry)
    entry: Callable[[bytes], Segment | FileEntry | None] = ext.entry
    return entry


FAST_ENTRY = _fast_entry()
_Entries = Callable[
    [bytes, int, set[bytes], int, int], tuple[list[Segment | FileEntry], int, int, int]
]
_FAST_LINES = 256  # lines per FAST_ENTRIES call (which holds the GIL): about a millisecond
# The compiled loop over a chunk's lines (``_fastparse.entries``, bound with FAST_ENTRY), or None.
FAST_ENTRIES: _Entries | None = (
    getattr(compiled.extension(), "entries", None) if FAST_ENTRY else None
)


def _count_newlines(data: bytes) -> int:
    return data.count(b"\n")


def _fast_newlines() -> Callable[[bytes], int]:
    """``data.count(b"\\n")``: the compiled ``_fastparse.newlines`` (memchr, ~10x) if built."""
    ext = compiled.extension()
    if ext is None:
        return _count_newlines
    newlines: Callable[[bytes], int] = ext.newlines
    return newlines


_newlines = _fast_newlines()


def clean_name(name: bytes) -> bytes:
    """Clean a member name lexically, relative to the layer root.

    Leading ``/`` and ``./`` are dropped, ``//`` and ``.`` components collapse, a trailing ``/``
    goes; the root itself is ``b"."``. An absolute name stays inside the layer root, as Go's
    ``filepath.Join(root, name)`` keeps it. Any ``..`` component or NUL raises ``UnsafePath``.
    """
    body = name[2:] if name.startswith(b"./") else name
    if (
        body
        and body[0] not in b"./"
        and body[-1] != 47
        and b"//" not in body
        and b"/." not in body
        and b"\x00" not in body
    ):
        return body  # nearly every name: already clean (no "." or ".." component)
    if b"\x00" in name:
        raise UnsafePath(f"member name {name!r:.200} contains NUL")
    parts = [p for p in name.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise UnsafePath(f"member name {name!r:.200} has a '..' component")
    return b"/".join(parts) or b"."


def go_clean(name: bytes) -> bytes:
    """Go's ``filepath.Clean`` (Unix), the key tar-split uses to reject duplicate paths."""
    simple = name and b"//" not in name and b"/." not in name and not name.startswith(b".")
    if simple and (not name.endswith(b"/") or name == b"/"):
        return name
    rooted = name.startswith(b"/")
    out: list[bytes] = []
    for part in name.split(b"/"):
        if not part or part == b".":
            continue
        if part == b"..":
            if out and out[-1] != b"..":
                out.pop()
            elif not rooted:
                out.append(part)
            continue
        out.append(part)
    body = b"/".join(out)
    if rooted:
        return b"/" + body
    return body or b"."


def iter_entries(gz: BinaryIO, what: str) -> Generator[Segment | FileEntry, None, None]:
    """Decode the opened ``<layer>.tar-split.gz`` ``gz`` entry by entry, in stream order.

    ``what`` names the layer in error messages. Streams: memory is bounded by the line cap,
    a few inflated blocks and the set of seen names (for duplicate detection). Decoding starts
    at the first ``next()``; close the iterator (or exhaust it) before closing ``gz``.
    Bounds: lines <= MAX_LINE bytes, <= MAX_ENTRIES lines (blank ones included), segment bytes
    <= MAX_SEGMENT_BYTES, decompressed input <= MAX_INPUT_BYTES, sizes <= MAX_SIZE.
    """
    state = State(what)
    for lineno, chunk, newlines in iter_chunks(gz, what):
        yield from _decode_chunk(chunk, lineno, newlines, state)


class State:
    """Running counters and the duplicate set of one decode (``segment_bytes`` and ``seen``
    are also kept by ``_fastparse.columns``: tree.py)."""

    __slots__ = ("entries", "seen", "segment_bytes", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self.entries = 0
        self.segment_bytes = 0
        self.seen: set[bytes] = set()


def _fail(what: str, lineno: int, reason: str) -> MalformedMetadata:
    return MalformedMetadata(f"{what}: tar-split line {lineno}: {reason}")


def iter_chunks(gz: BinaryIO, what: str) -> Generator[tuple[int, bytes, int], None, None]:
    """Yield (number of the first line, bytes of whole lines, their count of newlines) from
    the decompressed stream
    (close it, or exhaust it, before closing ``gz``). Each chunk is decoded by ``start_chunk``
    then ``decode_lines`` of its lines (``iter_entries``), or by a caller's fast path that
    hands ``decode_lines`` every line it does not take."""
    lineno = 1
    total = 0
    pending = b""
    inflater = _Inflater(gz)
    try:
        while data := _next_block(inflater, what, lineno):
            total += len(data)
            if total > MAX_INPUT_BYTES:
                raise _fail(what, lineno, f"decompressed tar-split exceeds {MAX_INPUT_BYTES} bytes")
            cut = data.rfind(b"\n")
            if cut < 0:
                pending += data
                if len(pending) > MAX_LINE:
                    raise _fail(what, lineno, f"line longer than {MAX_LINE} bytes")
                continue
            chunk = pending + data[: cut + 1]
            pending = data[cut + 1 :]
            newlines = _newlines(chunk)
            yield lineno, chunk, newlines
            lineno += newlines
    finally:
        inflater.close()
    if pending.strip():
        yield lineno, pending, _newlines(pending)


def _next_block(inflater: _Inflater, what: str, lineno: int) -> bytes:
    try:
        return inflater.get()
    except (_GzipError, zlib.error) as exc:
        raise _fail(what, lineno, f"bad gzip data: {exc}") from exc
    except OSError as exc:
        raise LayerUnavailable(f"{what}: reading tar-split: {exc}") from exc


class _GzipError(Exception):
    """Truncated or trailing-garbage gzip input."""


class _Inflater:
    """Decompresses the gzip file in a helper thread, a few blocks ahead of the parser.

    zlib releases the GIL while it inflates, so on two cores decompression overlaps parsing.
    ``get`` re-raises the helper's exception; ``close`` stops and joins it (the caller's file
    is never touched after ``close`` returns). ``b""`` marks the end.
    """

    def __init__(self, gz: BinaryIO) -> None:
        self._gz = gz
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=_QUEUE_DEPTH)
        self._stop = threading.Event()
        self._inline: Iterator[bytes] | None = None
        self._thread: threading.Thread | None = None
        if _file_size(gz) <= _INLINE_GZIP:  # a small tar-split: a thread costs more than it saves
            self._inline = _inflate(gz)
            return
        self._thread = threading.Thread(target=self._run, name="imgfs-gunzip", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for block in _inflate(self._gz):
                if not self._put(block):
                    return
            self._put(b"")
        except BaseException as exc:  # handed to the consumer
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
            except queue.Full:
                continue
            return True
        return False

    def get(self) -> bytes:
        if self._inline is not None:
            return next(self._inline, b"")
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _file_size(gz: BinaryIO) -> int:
    """The size of the file behind ``gz``; unknown (not a file): larger than any bound."""
    try:
        return os.fstat(gz.fileno()).st_size
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return 1 << 62


def _inflate(gz: BinaryIO) -> Iterator[bytes]:
    """Decompressed blocks (<= _BLOCK bytes) of a gzip file of one or more members.

    Zero bytes after the last member are ignored (as Python's gzip module does).
    """
    member = zlib.decompressobj(wbits=31)
    started = zeros = False
    while raw := gz.read(_RAW_READ):
        while raw:
            if zeros:
                if raw.strip(b"\0"):
                    raise _GzipError("trailing garbage after gzip data")
                break
            if member.eof:  # zero padding, or another member
                zeros = raw[0] == 0
                if not zeros:
                    member = zlib.decompressobj(wbits=31)
                continue
            started = True
            if out := member.decompress(raw, _BLOCK):
                yield out
            while not member.eof and not member.unconsumed_tail:
                if not (out := member.decompress(b"", _BLOCK)):  # output zlib still holds
                    break
                yield out
            raw = member.unused_data if member.eof else member.unconsumed_tail
    if not started:
        raise _GzipError("empty file")
    if not member.eof:
        raise _GzipError("compressed file ended before the end-of-stream marker")


def _decode_chunk(
    chunk: bytes, first: int, newlines: int, state: State
) -> Iterator[Segment | FileEntry]:
    """Decode whole lines (``newlines`` of them end in a newline).

    With the extension, ``FAST_ENTRIES`` decodes runs of up to _FAST_LINES lines of the shapes
    Go writes in one call (duplicates and the segment bound checked as ``decode_lines`` does);
    the line after each run is decoded by ``decode_lines``.
    """
    utf8_ok = start_chunk(chunk, first, newlines, state)
    many = FAST_ENTRIES if utf8_ok else None
    if many is None:
        return decode_lines(chunk.split(b"\n"), first, state, utf8_ok)
    return _decode_runs(chunk, first, state, many)


def _decode_runs(
    chunk: bytes, first: int, state: State, many: _Entries
) -> Iterator[Segment | FileEntry]:
    pos, lineno, end = 0, first, len(chunk)
    while pos <= end:
        room = MAX_SEGMENT_BYTES - state.segment_bytes
        got, pos, lines, seg_bytes = many(chunk, pos, state.seen, room, _FAST_LINES)
        state.segment_bytes += seg_bytes
        lineno += lines
        yield from got
        if pos > end:
            return
        cut = chunk.find(b"\n", pos)
        line = chunk[pos:] if cut < 0 else chunk[pos:cut]
        yield from decode_lines([line], lineno, state, True)
        pos = end + 1 if cut < 0 else cut + 1
        lineno += 1


def start_chunk(chunk: bytes, first: int, newlines: int, state: State) -> bool:
    """Count the lines of ``chunk`` (blank ones too; ``newlines`` is its count of newlines)
    against MAX_ENTRIES and check their lengths, raising as the decode must; whether the chunk
    is valid UTF-8 (else no line of it may take a fast path)."""
    what = state.what
    count = newlines + 1
    if state.entries + count > MAX_ENTRIES:
        # Blank lines count too; one past the cap is already too many entries.
        raise _fail(what, first + MAX_ENTRIES - state.entries, f"more than {MAX_ENTRIES} entries")
    state.entries += count
    utf8_ok = chunk.isascii() or _valid_utf8(chunk)
    if len(chunk) > MAX_LINE:
        _check_line_lengths(chunk.split(b"\n"), first, what)
    return utf8_ok


def decode_lines(
    lines: list[bytes], first: int, state: State, utf8_ok: bool
) -> Iterator[Segment | FileEntry]:
    """Decode the lines (counted by ``start_chunk``; the first is line ``first``): a fast path
    for the shapes Go writes, json.loads for the rest."""
    what = state.what
    seen = state.seen
    seg_bytes = state.segment_bytes
    seg_tail = _SEGMENT_TAIL.fullmatch
    file_match = _FILE_RE.fullmatch
    b64 = pybase64.b64decode  # SIMD base64, same strictness as binascii's strict_mode
    lineno = first - 1
    fast = FAST_ENTRY if utf8_ok else None
    for line in lines:
        lineno += 1
        entry = None if fast is None else fast(line)
        if entry is not None:
            pass  # the compiled fast path took it
        elif utf8_ok and line.startswith(_SEGMENT_HEAD):
            end = line.find(b'"', _SEGMENT_HEAD_LEN)
            if end > 0 and seg_tail(line, end):
                try:
                    entry = Segment(b64(line[_SEGMENT_HEAD_LEN:end], validate=True))
                except binascii.Error:
                    entry = None  # let the general path decide (escapes) or explain
        elif utf8_ok and line.startswith(_FILE_HEAD):
            m = file_match(line)
            if m is not None:
                name, size_text, crc_text = m.groups()
                if size_text is None:
                    entry = FileEntry(name, 0, None)
                elif crc_text is not None and len(size_text) < 16:  # < 10**15 < MAX_SIZE
                    try:
                        crc = b64(crc_text, validate=True)
                    except binascii.Error:
                        crc = b""
                    if len(crc) == CRC_LEN:
                        entry = FileEntry(name, int(size_text), crc)
        general = entry is None
        if entry is None:
            if not line.strip():
                continue
            entry = _decode_json(line, what, lineno)
        if type(entry) is Segment:
            seg_bytes += len(entry.payload)
            if seg_bytes > MAX_SEGMENT_BYTES:
                raise _fail(what, lineno, f"segments exceed {MAX_SEGMENT_BYTES} bytes")
            yield entry
            continue
        assert isinstance(entry, FileEntry)
        name = entry.name
        # go_clean(name) is name for the names Go's fast shapes carry unless one of these holds
        if general or b"//" in name or b"/." in name or name[0] == 46 or name[-1] == 47:
            key = go_clean(name)
        else:
            key = name
        if key in seen:
            raise _fail(what, lineno, f"duplicate path {name!r:.200}")
        seen.add(key)
        yield entry
    state.segment_bytes = seg_bytes


def _check_line_lengths(lines: list[bytes], first: int, what: str) -> None:
    for lineno, line in enumerate(lines, first):
        if len(line) > MAX_LINE:
            raise _fail(what, lineno, f"line longer than {MAX_LINE} bytes")


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _b64(text: bytes | str, what: str, lineno: int) -> bytes:
    try:
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _fail(what, lineno, f"invalid base64: {exc}") from exc


def _file_entry(
    name: bytes, size: int, crc_text: bytes | str | None, what: str, lineno: int
) -> FileEntry:
    if b"\x00" in name:
        raise _fail(what, lineno, f"NUL in name {name!r:.200}")
    if size < 0 or size > MAX_SIZE:
        raise _fail(what, lineno, f"size {size} out of range")
    crc = None if crc_text is None else _b64(crc_text, what, lineno)
    if size == 0:
        return FileEntry(name, 0, None)
    if crc is None or len(crc) != CRC_LEN:
        raise _fail(what, lineno, f"file {name!r:.200}: CRC payload is not {CRC_LEN} bytes")
    return FileEntry(name, size, crc)


def _decode_json(line: bytes, what: str, lineno: int) -> Segment | FileEntry:
    """The general path: any valid JSON object with the tar-split fields."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise _fail(what, lineno, f"invalid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise _fail(what, lineno, "not a JSON object")
    kind = obj.get("type")
    _check_int_field(obj, "position", what, lineno)
    payload = obj.get("payload")
    if payload is not None and not isinstance(payload, str):
        raise _fail(what, lineno, "payload is not a string")
    if type(kind) is not int:
        raise _fail(what, lineno, f"type {kind!r:.40} is not an integer")
    if kind == _SEGMENT:
        return Segment(b"" if payload is None else _b64(payload, what, lineno))
    if kind != _FILE:
        raise _fail(what, lineno, f"unknown entry type {kind}")
    size = _check_int_field(obj, "size", what, lineno)
    return _file_entry(_json_name(obj, what, lineno), size, payload, what, lineno)


def _check_int_field(obj: dict[str, Any], key: str, what: str, lineno: int) -> int:
    value = obj.get(key)
    if value is None:
        return 0
    if type(value) is not int:
        raise _fail(what, lineno, f"{key} {value!r:.40} is not an integer")
    return value


def _json_name(obj: dict[str, Any], what: str, lineno: int) -> bytes:
    name = obj.get("name")
    raw = obj.get("name_raw")
    if (name is None) == (raw is None):
        raise _fail(what, lineno, "file entry needs exactly one of name and name_raw")
    if raw is not None:
        if not isinstance(raw, str):
            raise _fail(what, lineno, "name_raw is not a string")
        return _b64(raw, what, lineno)
    if not isinstance(name, str):
        raise _fail(what, lineno, "name is not a string")
    try:
        return name.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from \ud800-style escapes
        raise _fail(what, lineno, f"name is not valid UTF-8: {exc}") from exc
