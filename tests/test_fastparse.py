"""The compiled fast path of LayerTree._parse (imgfs/layer/_fastparse.c) against the Python code.

The Python code (``tree.parse_member``) is the reference: wherever the extension returns a member
it must be the very member the Python code builds (same field values and types); wherever the
Python code raises, or anything is not plain, it must return None. Hypothesis mutates real header
blocks (tarfile's ustar/GNU/PAX/v7 blocks and the awkward test layer's); crafted blocks put
every field at its limits. In CI (``CI`` set) the extension must have been built: a silent
fallback to Python would hide a broken build.
"""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgfs.errors import MalformedMetadata, UnsafePath
from imgfs.layer import tarsplit, tree
from imgfs.layer.tarsplit import FileEntry, Segment, iter_entries
from imgfs.layer.tree import LayerTree, Member, parse_member
from tests.realstores import awkward_tar
from tests.tarsplit_maker import disassemble

try:
    from imgfs.layer import _fastparse as _fast_module
except ImportError:  # not built: only the CI test and the pure-Python tests run
    _fast_module = None
else:  # bound here too: with IMGFS_PURE_PYTHON set, imgfs itself does not bind them
    for _cls in (Member, tarsplit.Segment, tarsplit.FileEntry):
        _fast_module.bind(_cls)

needs_ext = pytest.mark.skipif(_fast_module is None, reason="imgfs.layer._fastparse not built")
_FIELDS = [f.name for f in dataclasses.fields(Member)]
_OFFSETS = {  # field: (offset, length) in a header block
    "name": (0, 100), "mode": (100, 8), "uid": (108, 8), "gid": (116, 8), "size": (124, 12),
    "mtime": (136, 12), "chksum": (148, 8), "typeflag": (156, 1), "linkname": (157, 100),
    "magic": (257, 6), "version": (263, 2), "devmajor": (329, 8), "devminor": (337, 8),
    "prefix": (345, 155), "star": (508, 4),
}  # fmt: skip


def _ext() -> ModuleType:
    assert _fast_module is not None
    return _fast_module


def _snapshot(member: Member) -> list[tuple[str, type, object]]:
    return [(f, type(getattr(member, f)), getattr(member, f)) for f in _FIELDS]


def _python(data: bytes, name: bytes, size: int, crc: int | None, ref: int) -> Member | None:
    try:
        return parse_member(data, name, size, crc, ref, "t")
    except (MalformedMetadata, UnsafePath):
        return None


def _same_or_none(
    data: bytes, name: bytes, size: int, crc: int | None = None, ref: int = 7
) -> bool:
    """Check the extension against the Python code; True when the extension took the member."""
    got = _ext().member(data, name, size, crc, ref)
    if got is None:
        return False
    want = _python(data, name, size, crc, ref)
    assert want is not None, f"the extension accepted what Python rejects: {got}"
    assert type(got) is Member
    assert _snapshot(got) == _snapshot(want)
    assert got == want
    assert hash(got) == hash(want)
    return True


def _last_blocks(tar: bytes) -> Iterator[bytes]:
    """The last header block before each member's content, as the tar-split holds it."""
    pending: list[bytes] = []
    for entry in iter_entries(io.BytesIO(disassemble(tar).gz()), "t"):
        if isinstance(entry, Segment):
            pending.append(entry.payload)
            continue
        assert isinstance(entry, FileEntry)
        yield b"".join(pending)[-512:]
        pending.clear()


def _block(name: str = "dir/file", kind: bytes = tarfile.REGTYPE, fmt: int = tarfile.USTAR_FORMAT,
           size: int = 0, **kw: object) -> bytes:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime, info.uid, info.gid, info.mode = kind, size, 1700, 5, 6, 0o640
    for key, value in kw.items():
        setattr(info, key, value)
    return info.tobuf(fmt, "utf-8", "surrogateescape")


def _v7(block: bytes) -> bytes:
    return block[:257] + b"\0" * 255  # no magic: a v7 header (no prefix, no device numbers)


def _corpus() -> list[bytes]:
    """Real header blocks: every member type in each format, long names, the awkward layer."""
    blocks = []
    kinds = [tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
             tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE]  # fmt: skip
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT):
        for kind in kinds:
            size = 700 if kind in tarfile.REGULAR_TYPES else 0
            link = "dir/target" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            block = _block("dir/x" + ("/" if kind == tarfile.DIRTYPE else ""), kind, fmt, size,
                           linkname=link, devmajor=8, devminor=1)  # fmt: skip
            blocks += [block, _v7(block)]
    blocks.append(_block("p" * 150 + "/" + "n" * 99, fmt=tarfile.USTAR_FORMAT))  # prefix
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):  # (ustar cannot hold its long paths)
        blocks += list(_last_blocks(awkward_tar(fmt)))
    return blocks


_CORPUS = _corpus()


def _name_of(block: bytes) -> bytes:
    """The name the header gives (what the tar-split holds), or the raw field when it fails."""
    try:
        return tree.parse_header(block, "t").name
    except MalformedMetadata:
        return block[:100].partition(b"\0")[0]


def _size_of(block: bytes) -> int:
    try:
        header = tree.parse_header(block, "t")
    except MalformedMetadata:
        return 0
    return header.size if header.typeflag == tree.REGULAR else 0


# -- the extension is there when it should be, and the Python path works without it ---------------


def test_extension_is_built_in_ci() -> None:
    """CI runs on a fresh clone after scripts/setup.sh: the extension must have been built."""
    if not os.environ.get("CI"):
        pytest.skip("outside CI a missing extension only means the slower pure-Python path")
    assert _fast_module is not None, "imgfs.layer._fastparse did not build (gcc, python3-dev?)"
    assert tree.FAST_MEMBER is _fast_module.member
    root = os.path.dirname(os.path.dirname(os.path.abspath(tree.__file__)))
    assert os.path.abspath(_fast_module.__file__ or "").startswith(root)  # this checkout's


def test_pure_python_switch_turns_the_extension_off() -> None:
    code = "import imgfs.layer.tree as t; print(t.FAST_MEMBER is None)"
    env = {**os.environ, "IMGFS_PURE_PYTHON": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_trees_are_the_same_with_and_without_the_extension(
    fmt: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    tar = awkward_tar(fmt)

    def members() -> list[list[tuple[str, type, object]]]:
        layer = LayerTree.build(iter_entries(io.BytesIO(disassemble(tar).gz()), "t"), "t")
        return [_snapshot(layer.member(ref)) for ref in range(layer.member_count)]

    with_ext = members()
    monkeypatch.setattr(tree, "FAST_MEMBER", None)
    assert members() == with_ext


# -- differential: the extension equals the Python code or declines ------------------------------


@needs_ext
def test_plain_blocks_take_the_fast_path() -> None:
    """Not vacuous: every plain single-block header of the corpus is built by the extension."""
    taken = 0
    for block in _CORPUS:
        name, size = _name_of(block), _size_of(block)
        for pad in (0, 1, 511):
            taken += _same_or_none(b"\xaa" * pad + block, name, size, 99 if size else None)
    assert taken >= 3 * 40


def _octal(value: int, width: int, end: bytes = b"\0") -> bytes:
    return (b"%o" % value).rjust(width - len(end), b"0") + end


_MAX_MTIME = (1 << 63) // 10**9  # the largest mtime whose ns fit 64 bits (the extension's limit)
_CASES = [
    ("size", b"777777777777", 8**12 - 1, True),  # 12 digits, no terminator: 2**36 - 1
    ("size", b"77777777777\0", 8**11 - 1, True),
    ("size", b"\0" * 12, 0, True),
    ("size", b" " * 12, 0, True),
    ("size", b"  0001750  \0", 0o1750, True),
    ("size", b"0001 750000\0", None, False),  # a space between digits: Python's error
    ("size", b"0001\x00750000\0", None, False),
    ("size", b"00000000008\0", None, False),
    ("size", b"\x80" + b"\0" * 6 + (1 << 33).to_bytes(5, "big"), 1 << 33, False),  # base-256
    ("mtime", _octal(_MAX_MTIME, 12, b""), None, True),  # 2262: still in the extension's range
    ("mtime", _octal(_MAX_MTIME + 1, 12, b""), None, False),  # beyond: Python's big ints
    ("mtime", b"777777777777", None, False),
    ("mtime", b"\xff" * 11 + b"\xfe", None, False),  # negative base-256
    ("mode", b"7777777\0", None, True),  # masked to 07777
    ("mode", b"0000644 ", None, True),
    ("uid", b"77777777", None, True),  # 8 digits, no terminator
    ("uid", b"\t0001750", None, False),
    ("uid", b"+0001750", None, False),
    ("uid", b"000_750\0", None, False),
    ("gid", b"\xff" * 8, None, False),
    ("devmajor", b"7777777\0", None, True),
    ("devminor", b"7 7\0\0\0\0\0", None, False),
    ("devmajor", b"\x80\0\0\0\0\0\0\x01", None, False),
    ("chksum", b"garbage!", None, True),  # not checked by the Python code either
    ("typeflag", b"x", None, False),  # PAX header: parse_header's loop
    ("typeflag", b"L", None, False),
    ("typeflag", b"K", None, False),
    ("typeflag", b"g", None, True),
    ("typeflag", b"7", None, True),  # contiguous file: regular
    ("typeflag", b"\0", None, True),
    ("typeflag", b"9", None, False),  # unknown type: Python's error
    ("typeflag", b"\xff", None, False),
    ("name", b"n" * 100, None, True),  # no NUL terminator
    ("name", b"a/../b" + b"\0" * 94, None, False),  # UnsafePath
    ("name", b"./a//b/./c/" + b"\0" * 89, None, True),  # cleaned
    ("name", b"/" + b"\0" * 99, None, True),  # the root
    ("name", b"./" + b"\0" * 98, None, True),
    ("name", b"\0" * 100, None, True),  # empty name
    ("prefix", b"p" * 155, None, True),  # no NUL terminator
    ("star", b"tar\0", None, True),  # star: a 131-byte prefix
    ("magic", b"ustar ", None, True),  # GNU magic with ustar version: v7 rules
    ("version", b" \0", None, True),
]


@needs_ext
@pytest.mark.parametrize(("field", "raw", "size", "fast"), _CASES)
@pytest.mark.parametrize("kind", [tarfile.REGTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE])
def test_fields_at_their_limits(
    field: str, raw: bytes, size: int | None, fast: bool, kind: bytes
) -> None:
    """Each case is taken by the extension (``fast``) or declined, and equals Python's member."""
    base = _block("dir/x", kind, tarfile.USTAR_FORMAT, 0, linkname="./a//b", devmajor=1)
    if field in ("prefix", "star"):
        base = _block("p" * 150 + "/n", kind, tarfile.USTAR_FORMAT, 0, linkname="t")
    pos, length = _OFFSETS[field]
    assert len(raw) == length
    block = base[:pos] + raw + base[pos + length :]
    if size is None:
        size = _size_of(block)
    elif kind != tarfile.REGTYPE:
        fast = fast and size == 0  # content on a non-regular member: Python's error
    name = _name_of(block)
    assert _same_or_none(block, name, size) == fast
    assert not _same_or_none(block, name + b"x", size)  # the tar-split names another member
    if kind == tarfile.REGTYPE:
        assert not _same_or_none(block, name, size + 1)  # sizes differ


@needs_ext
@pytest.mark.parametrize("length", [0, 1, 511, 1024, 1025, 1535, 2048])
def test_other_lengths_are_left_to_python(length: int) -> None:
    """No block, or more than one (extension headers, stray bytes): Python decides."""
    block = _block()
    data = block[:length] if length < 512 else b"\0" * (length - 512) + block
    assert _ext().member(data, b"dir/file", 0, None, 1) is None


@needs_ext
def test_hardlink_targets_are_cleaned_and_unsafe_ones_declined() -> None:
    link = _block("a", tarfile.LNKTYPE, linkname="./x//y/")
    got = _ext().member(link, b"a", 0, None, 3)
    assert got is not None
    assert got.linkname == b"x/y"
    empty = _block("a", tarfile.LNKTYPE, linkname="")
    assert _ext().member(empty, b"a", 0, None, 3).linkname == b"."
    assert _ext().member(_block("a", tarfile.LNKTYPE, linkname="x/../y"), b"a", 0, None, 3) is None
    symlink = _block("a", tarfile.SYMTYPE, linkname="../../etc/x")  # verbatim
    assert _ext().member(symlink, b"a", 0, None, 3).linkname == b"../../etc/x"


@needs_ext
def test_no_reference_is_leaked_or_lost() -> None:
    name, crc, ref = b"dir/file", 1 << 70, 1 << 65  # big ints: not the small-int cache
    block = _block(size=5)
    before = [sys.getrefcount(o) for o in (name, crc, ref)]
    kept = [_ext().member(block, name, 5, crc, ref) for _ in range(1000)]
    assert all(m is not None and m.data_name is name and m.path is name for m in kept)
    del kept
    for _ in range(1000):
        assert _ext().member(block, name, 6, crc, ref) is None
    assert [sys.getrefcount(o) for o in (name, crc, ref)] == before


@needs_ext
def test_bind_takes_only_member_shaped_classes() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Other:
        path: bytes

    for cls in (object, int, Other, 5):
        with pytest.raises(TypeError):
            _ext().bind(cls)
    with pytest.raises(TypeError):
        _ext().member(b"", "not bytes", 0, None, 1)
    assert _ext().member(_block(), b"dir/file", 0, None, 1) is not None  # still bound to Member


_FIELD_VALUES = st.one_of(
    st.binary(max_size=12),
    st.sampled_from([b"0", b"7", b"8", b" ", b"\0", b"\x80", b"\xff", b"/", b".", b"..", b"x"]),
    st.integers(0, 8**12 - 1).map(lambda v: b"%o" % v),
    st.tuples(st.integers(0, 8**8), st.sampled_from([b" ", b"\0", b"  ", b" \0"])).map(
        lambda t: b"%o" % t[0] + t[1]
    ),
)


@needs_ext
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(_CORPUS),
    edits=st.lists(
        st.tuples(st.sampled_from(sorted(_OFFSETS)), st.integers(0, 160), _FIELD_VALUES),
        max_size=4,
    ),
    flips=st.lists(st.tuples(st.integers(0, 511), st.integers(0, 255)), max_size=3),
    pad=st.one_of(st.just(0), st.integers(0, 600)),
    name_edit=st.sampled_from([None, b"", b"/", b"x", b"./"]),
    size_edit=st.sampled_from([0, 0, 0, 1, -1, 1 << 36, (1 << 64) - 1]),
)
def test_mutated_headers_equal_python_or_decline(
    base: bytes,
    edits: list[tuple[str, int, bytes]],
    flips: list[tuple[int, int]],
    pad: int,
    name_edit: bytes | None,
    size_edit: int,
) -> None:
    block = bytearray(base)
    for field, at, value in edits:
        pos, length = _OFFSETS[field]
        start = pos + min(at, length - 1)
        value = value[: pos + length - start]
        block[start : start + len(value)] = value
    for at, byte in flips:
        block[at] = byte
    data = b"\x00" * pad + bytes(block)
    name = _name_of(bytes(block))
    if name_edit is not None:
        name = name_edit + name if name_edit in (b"./", b"/") else name + name_edit
    size = max(0, min(_size_of(bytes(block)) + size_edit, (1 << 64) - 1))
    _same_or_none(data, name, size, 5 if size else None, 11)


# -- tar-split lines: the extension's entry() equals the Python decoder or declines --------------


def _decode(data: bytes, fast: bool, monkeypatch: pytest.MonkeyPatch) -> list[object] | str:
    """The entries the decoder yields for ``data`` (whole lines), or its error's type."""
    monkeypatch.setattr(tarsplit, "FAST_ENTRY", _ext().entry if fast else None)
    try:
        return list(tarsplit._decode_chunk(data, 1, data.count(b"\n"), tarsplit.State("t")))
    except (MalformedMetadata, UnsafePath) as exc:
        return type(exc).__name__ + str(exc)


def _check_line(line: bytes, monkeypatch: pytest.MonkeyPatch) -> bool:
    """True when the extension took ``line``; either way the decoder's results are equal.
    (The decoder calls the extension only for valid UTF-8, as entry() requires.)"""
    got = _ext().entry(line)
    want = _decode(line, False, monkeypatch)
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        got = None
    if got is not None:
        assert isinstance(want, list), f"the extension accepted what Python rejects: {got}"
        assert want == [got]
        assert [type(e) for e in want] == [type(got)]
        fields = [f.name for f in dataclasses.fields(got)]
        assert [type(getattr(got, f)) for f in fields] == [
            type(getattr(want[0], f)) for f in fields
        ]
    assert _decode(line, True, monkeypatch) == want
    return got is not None


def _lines() -> list[bytes]:
    tars = [awkward_tar(tarfile.PAX_FORMAT), awkward_tar(tarfile.GNU_FORMAT, b"\0" * 3000)]
    return [line for tar in tars for line in disassemble(tar).ndjson().split(b"\n") if line]


_LINES = _lines()


@needs_ext
def test_tar_split_lines_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = sum(_check_line(line, monkeypatch) for line in _LINES)
    assert taken >= len(_LINES) * 9 // 10  # not vacuous: nearly every line Go writes


_LINE_CASES = [
    (b'{"type":2,"payload":"","position":0}', True),
    (b'{"type":2,"payload":"QQ==","position":0}', True),
    (b'{"type":2,"payload":"QR==","position":0}', False),  # unused bits set: not canonical
    (b'{"type":2,"payload":"QUI=","position":1}', True),
    (b'{"type":2,"payload":"QUJ=","position":1}', False),
    (b'{"type":2,"payload":"QQ=","position":0}', False),
    (b'{"type":2,"payload":"Q===","position":0}', False),
    (b'{"type":2,"payload":"QQ==QQ==","position":0}', False),
    (b'{"type":2,"payload":"QU I","position":0}', False),
    (b'{"type":2,"payload":"-_-_","position":0}', False),  # url-safe alphabet
    (b'{"type":2,"payload":"QUJD\\n","position":0}', False),  # an escape
    (b'{"type":2,"payload":"QUJD","position":1234567890123456789}', True),  # 19 digits
    (b'{"type":2,"payload":"QUJD","position":12345678901234567890}', False),
    (b'{"type":2,"payload":"QUJD","position":}', False),
    (b'{"type":2,"payload":"QUJD","position":1} ', False),
    (b'{"type":2,"payload":"QUJD","position":1}}', False),
    (b'{"type":2, "payload":"QUJD","position":1}', False),
    (b'{"type":2,"payload":null,"position":1}', False),
    (b'{"type":1,"name":"a/b","payload":null,"position":1}', True),
    (b'{"type":1,"name":"a/b","payload":"junk","position":1}', True),  # no size: CRC ignored
    (b'{"type":1,"name":"a","size":5,"payload":"AAAAAAAAAAE=","position":1}', True),
    (b'{"type":1,"name":"a","size":5,"payload":"AAAAAAAAAAF=","position":1}', False),
    (b'{"type":1,"name":"a","size":5,"payload":"AAAAAAAAAA==","position":1}', False),  # 7 bytes
    (b'{"type":1,"name":"a","size":5,"payload":null,"position":1}', False),
    (b'{"type":1,"name":"a","size":0,"payload":null,"position":1}', False),
    (b'{"type":1,"name":"a","size":05,"payload":"AAAAAAAAAAE=","position":1}', False),
    (b'{"type":1,"name":"a","size":999999999999999,"payload":"AAAAAAAAAAE=","position":1}', True),
    (b'{"type":1,"name":"a","size":1000000000000000,"payload":"AAAAAAAAAAE=","position":1}', False),
    (b'{"type":1,"name":"a","size":-5,"payload":"AAAAAAAAAAE=","position":1}', False),
    (b'{"type":1,"name":"","payload":null,"position":1}', False),
    (b'{"type":1,"name":"a\\"b","payload":null,"position":1}', False),
    (b'{"type":1,"name":"a\\u0000b","payload":null,"position":1}', False),
    (b'{"type":1,"name":"a\tb","payload":null,"position":1}', False),
    (b'{"type":1,"name":"a\x7fb","payload":null,"position":1}', True),
    ('{"type":1,"name":"\u00fc/\u65e5","payload":null,"position":1}'.encode(), True),
    (b'{"type":1,"name":"../x","payload":null,"position":1}', True),  # go_clean: still one name
    (b'{"type":1,"name":"a","payload":nul,"position":1}', False),
    (b'{"type":1,"name":"a","position":1,"payload":null}', False),
    (b'{"type":1,"name_raw":"YQ==","payload":null,"position":1}', False),
    (b'{"type":3,"payload":"","position":0}', False),
    (b"", False),
    (b"\xff\xfe", False),
]


@needs_ext
@pytest.mark.parametrize(("line", "fast"), _LINE_CASES)
def test_tar_split_line_shapes(line: bytes, fast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _check_line(line, monkeypatch) == fast


@needs_ext
def test_duplicates_and_bounds_stay_with_the_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoder's running checks still apply to the entries the extension builds."""
    twice = b'{"type":1,"name":"a/b","payload":null,"position":1}\n' * 2
    assert "duplicate path" in str(_decode(twice, True, monkeypatch))
    cleaned = twice.replace(b'"a/b"', b'"./a//b"', 1)
    assert "duplicate path" in str(_decode(cleaned, True, monkeypatch))
    monkeypatch.setattr(tarsplit, "MAX_SEGMENT_BYTES", 2)
    segments = b'{"type":2,"payload":"QUI=","position":0}\n' * 2
    assert "segments exceed" in str(_decode(segments, True, monkeypatch))


@needs_ext
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(_LINES + [c for c, _ in _LINE_CASES]),
    edits=st.lists(
        st.tuples(
            st.integers(0, 2000),
            st.integers(0, 3),
            st.sampled_from(
                [
                    b"",
                    b'"',
                    b"\\",
                    b"=",
                    b"==",
                    b"A",
                    b"/",
                    b"+",
                    b"-",
                    b"0",
                    b"9",
                    b" ",
                    b",",
                    b"}",
                    b"\x00",
                    b"\x1f",
                    b"\xc3\xbc",
                    b"\xff",
                    b"null",
                    b'"size":1,',
                ]
            ),
        ),
        max_size=3,
    ),
)
def test_mutated_lines_equal_python_or_decline(
    base: bytes, edits: list[tuple[int, int, bytes]]
) -> None:
    line = bytearray(base)
    for at, cut, value in edits:
        at = min(at, len(line))
        line[at : at + cut] = value
    with pytest.MonkeyPatch.context() as monkeypatch:
        _check_line(bytes(line).replace(b"\n", b""), monkeypatch)
