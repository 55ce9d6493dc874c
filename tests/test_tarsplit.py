"""Unit tests of imgfs.layer.tarsplit: decoding, bounds, duplicate paths, name cleaning."""

from __future__ import annotations

import base64
import gzip
import io
import json
import tarfile
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgfs.errors import LayerUnavailable, MalformedMetadata, UnsafePath
from imgfs.layer import tarsplit
from imgfs.layer.tarsplit import FileEntry, Segment, clean_name, go_clean, iter_entries
from tests.tarsplit_maker import disassemble, make_tar

CRC = base64.b64encode(b"\x01\x02\x03\x04\x05\x06\x07\x08").decode()


def decode(raw: bytes, what: str = "layer L") -> list[Segment | FileEntry]:
    return list(iter_entries(io.BytesIO(gzip.compress(raw)), what))


def lines(*objs: object) -> bytes:
    return b"".join(json.dumps(o, separators=(",", ":")).encode() + b"\n" for o in objs)


def fail(raw: bytes, match: str) -> MalformedMetadata:
    with pytest.raises(MalformedMetadata, match=match) as info:
        decode(raw)
    assert "layer L" in str(info.value)
    return info.value


MEMBERS: list[tuple[str | bytes, bytes | str | None]] = [
    ("dir", None),
    ("dir/a.txt", b"hello\n"),
    ("dir/" + "long" * 40 + ".txt", b"x" * 513),
    (b"caf\xe9-latin1", b"latin"),
    ("<tag>&amp", b"escaped"),
    ("empty", b""),
    ("block", b"B" * 1024),
    ("sym", "->/etc/passwd"),
    ("hard", "=>dir/a.txt"),
]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_decodes_what_the_maker_writes(fmt: int) -> None:
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else MEMBERS[:2] + MEMBERS[4:]
    tar = make_tar(members, fmt, trailer=b"\0" * 700 + b"junk")
    raw = disassemble(tar).ndjson()
    entries = decode(raw)
    files = [e for e in entries if isinstance(e, FileEntry)]
    assert [f.name.rstrip(b"/") for f in files] == [
        n if isinstance(n, bytes) else n.encode() for n, _ in members
    ]
    sizes = [len(c) if isinstance(c, bytes) else 0 for _, c in members]
    assert [f.size for f in files] == sizes
    assert all((f.crc is None) == (f.size == 0) for f in files)
    total = sum(len(e.payload) for e in entries if isinstance(e, Segment)) + sum(sizes)
    assert total == len(tar)


def test_go_escapes_and_name_raw() -> None:
    raw = disassemble(make_tar([("<a>&b", b"1"), (b"\xff\xfe", b"2")])).ndjson()
    assert b"\\u003ca\\u003e\\u0026b" in raw
    assert b'"name_raw":"//4="' in raw
    names = [e.name for e in decode(raw) if isinstance(e, FileEntry)]
    assert names == [b"<a>&b", b"\xff\xfe"]


def test_general_path_equals_fast_path() -> None:
    fast = lines(
        {"type": 2, "payload": "AAAA", "position": 0},
        {"type": 1, "name": "a/b", "size": 3, "payload": CRC, "position": 1},
        {"type": 1, "name": "c/", "payload": None, "position": 2},
    )
    slow = lines(
        {"position": 0, "payload": "AAAA", "type": 2},
        {"payload": CRC, "size": 3, "type": 1, "name": "a/\u0062", "position": 1},
        {"name": "c/", "type": 1},
    )
    assert (
        decode(fast)
        == decode(slow)
        == [
            Segment(b"\0\0\0"),
            FileEntry(b"a/b", 3, bytes(range(1, 9))),
            FileEntry(b"c/", 0, None),
        ]
    )


def test_old_trailing_empty_segment_and_blank_lines() -> None:
    raw = b'{"type":2,"payload":"","position":0}\n\n  \n{"type":2,"payload":null}'
    assert decode(raw) == [Segment(b""), Segment(b"")]


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"type": "1", "name": "a"}, "type"),
        ({"type": True, "name": "a"}, "type"),
        ({"type": 3, "name": "a"}, "unknown entry type"),
        ({"type": 1, "name": "a", "size": "3", "payload": CRC}, "size"),
        ({"type": 1, "name": "a", "size": 3.0, "payload": CRC}, "size"),
        ({"type": 1, "name": "a", "size": -1, "payload": CRC}, "out of range"),
        ({"type": 1, "name": "a", "size": 2**50 + 1, "payload": CRC}, "out of range"),
        ({"type": 1, "name": "a", "size": 3, "payload": None}, "CRC payload"),
        ({"type": 1, "name": "a", "size": 3, "payload": "AAAAAAAAAA=="}, "CRC payload"),
        ({"type": 1, "name": "a", "size": 3, "payload": "@@@@"}, "base64"),
        ({"type": 2, "payload": "AAA"}, "base64"),
        ({"type": 2, "payload": 5}, "payload"),
        ({"type": 1, "name": "a\u0000b"}, "NUL"),
        ({"type": 1, "name_raw": base64.b64encode(b"a\0").decode()}, "NUL"),
        ({"type": 1, "name": "a", "name_raw": "YQ=="}, "exactly one"),
        ({"type": 1, "size": 0}, "exactly one"),
        ({"type": 1, "name": 5}, "name"),
        ({"type": 1, "name": "a", "position": "x"}, "position"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_bad_entries(obj: object, match: str) -> None:
    raw = lines({"type": 2, "payload": "", "position": 0}, obj)
    err = fail(raw, match)
    assert "line 2" in str(err)


def test_invalid_json_and_utf8() -> None:
    fail(b'{"type":2,"payload":""}\n{"type":1,"name":"a"\n', "line 2: invalid JSON")
    fail(b'{"type":1,"name":"\xff"}\n', "line 1: invalid JSON")
    fail(b'{"type":1,"name":"\\ud800"}\n', "not valid UTF-8")


def test_duplicates_use_go_clean() -> None:
    for a, b in [("a", "./a"), ("d/", "d"), ("x//y", "x/y/."), ("/r", "/r/")]:
        raw = lines({"type": 1, "name": a}, {"type": 1, "name": b})
        fail(raw, "line 2: duplicate path")
    ok = lines({"type": 1, "name": "/a"}, {"type": 1, "name": "a"})
    assert len(decode(ok)) == 2  # distinct for filepath.Clean, as in c/storage


def test_gzip_errors() -> None:
    raw = gzip.compress(lines(*[{"type": 2, "payload": "AAAA"}] * 5000))
    for bad in (raw[: len(raw) // 2], b"not gzip at all", raw[:-4] + b"\0\0\0\0"):
        with pytest.raises(MalformedMetadata, match=r"layer L: .*bad gzip"):
            list(iter_entries(io.BytesIO(bad), "layer L"))


def test_line_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tarsplit, "MAX_LINE", 100)
    long_seg = {"type": 2, "payload": base64.b64encode(bytes(300)).decode()}
    fail(lines({"type": 2, "payload": ""}, long_seg), "line 2: line longer than 100")
    fail(b"x" * 5000, "line 1: line longer")  # no newline at all


def test_line_cap_streams_without_newline() -> None:
    # 64 MiB of no newline: refused after the cap, not loaded whole.
    data = gzip.compress(b" " * (64 << 20), compresslevel=1)
    with pytest.raises(MalformedMetadata, match="longer than"):
        list(iter_entries(io.BytesIO(data), "layer L"))


def test_entry_and_segment_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tarsplit, "MAX_ENTRIES", 10)
    fail(lines(*[{"type": 2, "payload": ""}] * 11), "line 11: more than 10 entries")
    assert len(decode(lines(*[{"type": 2, "payload": ""}] * 9))) == 9
    monkeypatch.setattr(tarsplit, "MAX_SEGMENT_BYTES", 10)
    fail(lines(*[{"type": 2, "payload": "AAAA"}] * 4), "line 4: segments exceed")


def test_lazy_streaming() -> None:
    raw = lines({"type": 2, "payload": ""}, {"type": 7})
    it = iter_entries(io.BytesIO(gzip.compress(raw)), "layer L")
    assert next(it) == Segment(b"")
    with pytest.raises(MalformedMetadata):
        next(it)


@pytest.mark.parametrize(
    ("name", "clean"),
    [
        (b"a/b", b"a/b"),
        (b"./a//b/./c/", b"a/b/c"),
        (b"/etc/passwd", b"etc/passwd"),
        (b"//x", b"x"),
        (b"./", b"."),
        (b"", b"."),
        (b"a/.../b", b"a/.../b"),
        (b"..a/b..", b"..a/b.."),
    ],
)
def test_clean_name(name: bytes, clean: bytes) -> None:
    assert clean_name(name) == clean


@pytest.mark.parametrize("name", [b"..", b"../x", b"a/../b", b"/a/..", b"a\0b", b"./.."])
def test_clean_name_rejects(name: bytes) -> None:
    with pytest.raises(UnsafePath):
        clean_name(name)


@pytest.mark.parametrize(
    ("name", "clean"),
    [
        (b"", b"."),
        (b"a/", b"a"),
        (b"./a", b"a"),
        (b"/", b"/"),
        (b"/../a", b"/a"),
        (b"a/../../b", b"../b"),
        (b"a/b/../c", b"a/c"),
        (b"//a//b//", b"/a/b"),
        (b".hidden/x", b".hidden/x"),
        (b"a/.b", b"a/.b"),
    ],
)
def test_go_clean(name: bytes, clean: bytes) -> None:
    assert go_clean(name) == clean


_names = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_names, st.integers(0, 2**50), st.binary(max_size=50)), max_size=20))
def test_any_entries_round_trip(items: list[tuple[bytes, int, bytes]]) -> None:
    seen: set[bytes] = set()
    objs: list[dict[str, object]] = []
    expected: list[Segment | FileEntry] = []
    for name, size, seg in items:
        if go_clean(name) in seen:
            continue
        seen.add(go_clean(name))
        objs.append({"type": 2, "payload": base64.b64encode(seg).decode()})
        expected.append(Segment(seg))
        try:
            field: dict[str, object] = {"name": name.decode()}
        except UnicodeDecodeError:
            field = {"name_raw": base64.b64encode(name).decode()}
        crc = bytes([size % 251]) * 8 if size else None
        text = base64.b64encode(crc).decode() if crc else None
        objs.append({"type": 1, **field, "size": size, "payload": text})
        expected.append(FileEntry(name, size, crc))
    raw = b"".join(
        json.dumps(o, separators=(",", ":"), ensure_ascii=False).encode() + b"\n" for o in objs
    )
    assert decode(raw) == expected


def test_gzip_members_and_zero_padding() -> None:
    one = lines({"type": 2, "payload": "AAAA"})
    two = lines({"type": 1, "name": "x"})
    data = gzip.compress(one) + gzip.compress(two) + b"\0" * 1000
    assert list(iter_entries(io.BytesIO(data), "layer L")) == [
        Segment(b"\0\0\0"),
        FileEntry(b"x", 0, None),
    ]
    for bad in (b"", gzip.compress(one) + b"\0\0junk", gzip.compress(one) + b"\x1f\x8b"):
        with pytest.raises(MalformedMetadata, match="bad gzip"):
            list(iter_entries(io.BytesIO(bad), "layer L"))


def test_big_stream_in_small_reads() -> None:
    objs = [{"type": 2, "payload": base64.b64encode(bytes(3000)).decode()}]
    raw = lines(*(objs * 3000))  # ~12 MiB of JSON: several inflate blocks, lines split across
    got = decode(raw)
    assert len(got) == 3000
    assert all(e == Segment(bytes([0]) * 3000) for e in got)


def test_abandoned_iteration_stops_the_helper_thread() -> None:
    raw = gzip.compress(lines(*[{"type": 2, "payload": "A" * 4000}] * 5000))
    before = {t.ident for t in threading.enumerate()}
    it = iter_entries(io.BytesIO(raw), "layer L")
    next(it)
    it.close()
    leftover = [t for t in threading.enumerate() if t.ident not in before]
    assert not leftover


def test_read_error_is_layer_unavailable() -> None:
    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            raise OSError(5, "Input/output error")

    with pytest.raises(LayerUnavailable, match="layer L: reading tar-split"):
        list(iter_entries(io.BufferedReader(Broken()), "layer L"))


def test_a_small_tar_split_file_is_inflated_without_a_thread(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = lines(*[{"type": 1, "name": f"f{i}", "size": 0} for i in range(50)])
    expected = decode(raw)
    path = tmp_path / "layer.tar-split.gz"
    path.write_bytes(gzip.compress(raw))

    def no_thread(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a helper thread for a small tar-split")

    monkeypatch.setattr(tarsplit.threading, "Thread", no_thread)
    with path.open("rb") as gz:
        assert list(iter_entries(gz, "layer L")) == expected
    path.write_bytes(gzip.compress(raw)[:-30])
    with path.open("rb") as gz, pytest.raises(MalformedMetadata, match=r"layer L: .*bad gzip"):
        list(iter_entries(gz, "layer L"))
