"""Unit tests of imgfs.layer.index and imgfs.layer.assemble: exact round trips and every refusal."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import random
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgfs.cache import files as cachefiles
from imgfs.errors import IntegrityError, LayerUnavailable, MalformedMetadata, UnsafePath
from imgfs.layer import assemble, verify
from imgfs.layer import index as layerindex
from imgfs.layer.assemble import BlobFile, LayerReader, generate
from imgfs.layer.index import FileExtent, LayerIndex, SegmentExtent
from imgfs.layer.tarsplit import FileEntry, Segment, iter_entries
from imgfs.store.layerfiles import LayerFiles
from tests.tarsplit_maker import disassemble, make_tar

WHAT = "layer L"


@dataclass
class Layer:
    tar: bytes
    entries: list[Segment | FileEntry]
    dir: Path

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.tar).hexdigest()

    def files(self) -> LayerFiles:
        return LayerFiles([str(self.dir)], WHAT)

    def index(self) -> LayerIndex:
        return LayerIndex.build(self.entries, WHAT)


@dataclass
class RecordingSink:
    """Keeps what was written and checks the publish rule against the true bytes."""

    truth: bytes | None = None
    data: bytearray = field(default_factory=bytearray)
    published: list[int] = field(default_factory=list)

    def write(self, data: bytes | memoryview) -> None:
        self.data += data

    def publish(self, upto: int) -> None:
        assert not self.published or upto > self.published[-1]
        assert upto <= len(self.data)
        if self.truth is not None:
            assert self.data[:upto] == self.truth[:upto], "published unverified bytes"
        self.published.append(upto)

    @property
    def high(self) -> int:
        return self.published[-1] if self.published else 0


def make_layer(tmp_path: Path, tar: bytes, name: str = "diff") -> Layer:
    dest = tmp_path / name
    dest.mkdir()
    gz = disassemble(tar, str(dest)).gz()
    return Layer(tar, list(iter_entries(io.BytesIO(gz), WHAT)), dest)


def rich_members() -> list[tuple[str | bytes, bytes | str | None]]:
    rng = random.Random(7)
    return [
        ("./", None),
        ("etc", None),
        ("etc/hostname", b"box\n"),
        ("usr/share/" + "deep/" * 30 + "file.txt", b"long name " * 50),
        (b"latin-\xe9\xe8", b"not utf-8 name"),
        ("empty", b""),
        ("exact512", b"5" * 512),
        ("exact1024", b"k" * 1024),
        ("big.bin", rng.randbytes(3 * (1 << 20) + 17)),  # several read chunks
        ("etc/link", "->hostname"),
        ("hard", "=>etc/hostname"),
        ("abs-link", "->/etc/shadow"),
        ("tail", b"t"),
    ]


LAYOUTS = {
    "gnu": (tarfile.GNU_FORMAT, b""),
    "pax": (tarfile.PAX_FORMAT, b""),
    "pax-zeros": (tarfile.PAX_FORMAT, b"\0" * 20000),
    "gnu-garbage": (tarfile.GNU_FORMAT, b"trailing garbage" * 100),
}


@pytest.fixture(params=sorted(LAYOUTS))
def layer(request: pytest.FixtureRequest, tmp_path: Path) -> Layer:
    fmt, trailer = LAYOUTS[request.param]
    return make_layer(tmp_path, make_tar(rich_members(), fmt, trailer))


def test_generate_round_trip(layer: Layer) -> None:
    sink = RecordingSink(truth=layer.tar)
    with layer.files() as files:
        generate(layer.entries, files, sink, layer.digest, len(layer.tar), WHAT)
    assert bytes(sink.data) == layer.tar
    assert sink.published[-1] == len(layer.tar)


def test_index_shape(layer: Layer) -> None:
    index = layer.index()
    assert index.size == len(layer.tar)
    assert index.file_count == sum(isinstance(e, FileEntry) for e in layer.entries)
    data_files = [e for e in layer.entries if isinstance(e, FileEntry) and e.size]
    assert index.data_file_count == len(data_files)
    assert 0 < index.nbytes < 100_000
    for k, entry in enumerate(data_files):
        ext = index.file(k)
        assert (ext.name, ext.size) == (entry.name, entry.size)
        assert entry.crc is not None
        assert ext.crc == int.from_bytes(entry.crc, "big")
        assert index.extent_at(ext.start) == ext
        assert index.extent_at(ext.start + ext.size - 1) == ext


def test_extent_at_every_offset(tmp_path: Path) -> None:
    layer = make_layer(tmp_path, make_tar([("a", b"xy"), ("b", b""), ("c", b"z")]))
    index = layer.index()
    pieces: list[bytes] = []
    offset = 0
    while offset < index.size:
        ext = index.extent_at(offset)
        assert ext.start == offset
        if isinstance(ext, SegmentExtent):
            pieces.append(index.read_segment(ext.seg_pos, ext.length))
            offset += ext.length
        else:
            pieces.append((layer.dir / ext.name.decode()).read_bytes())
            offset += ext.size
    assert b"".join(pieces) == layer.tar
    for bad in (-1, index.size):
        with pytest.raises(ValueError, match="outside"):
            index.extent_at(bad)


def test_files_without_segments_between(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"AA")
    (tmp_path / "b").write_bytes(b"B")
    from fastcrc import crc64

    def crc(data: bytes) -> bytes:
        return crc64.go_iso(data).to_bytes(8, "big")

    entries: list[Segment | FileEntry] = [
        FileEntry(b"a", 2, crc(b"AA")),
        FileEntry(b"b", 1, crc(b"B")),
        Segment(b"end"),
    ]
    blob = b"AAB" + b"end"
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    index = LayerIndex.build(entries, WHAT)
    assert isinstance(index.extent_at(2), FileExtent)
    assert index.extent_at(2).start == 2
    with LayerFiles([str(tmp_path)], WHAT) as files:
        reader = LayerReader(index, files, digest, WHAT)
        assert [reader.read(i, 1) for i in range(6)] == [bytes([c]) for c in blob]
        sink = RecordingSink(truth=blob)
        generate(entries, files, sink, digest, len(blob), WHAT)
        assert bytes(sink.data) == blob


def test_serialization_round_trip(layer: Layer) -> None:
    index = layer.index()
    again = LayerIndex.from_bytes(index.to_bytes(), WHAT)
    assert again.to_bytes() == index.to_bytes()
    assert (again.size, again.file_count, again.data_file_count) == (
        index.size,
        index.file_count,
        index.data_file_count,
    )
    with layer.files() as files:
        assert LayerReader(again, files, layer.digest, WHAT).read(0, index.size) == layer.tar


def test_serialization_many_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layerindex, "CHUNK", 64)  # many frames in both side streams
    members: list[tuple[str | bytes, bytes | str | None]] = [
        (f"d/file-{i:04d}-{'n' * (i % 50)}", bytes([i % 256]) * (i % 700)) for i in range(120)
    ]
    layer = make_layer(tmp_path, make_tar(members, tarfile.PAX_FORMAT))
    index = LayerIndex.from_bytes(layer.index().to_bytes(), WHAT)
    with layer.files() as files:
        reader = LayerReader(index, files, layer.digest, WHAT)
        assert reader.read(0, index.size + 10) == layer.tar


def test_serialization_rejects_damage(tmp_path: Path) -> None:
    layer = make_layer(tmp_path, make_tar(rich_members()))
    data = layer.index().to_bytes()
    for blob in [b"", data[:10], data[:-1], data + b"x", b"XMGFSIDX" + data[8:]]:
        with pytest.raises(MalformedMetadata, match=WHAT):
            LayerIndex.from_bytes(blob, WHAT)
    path = str(tmp_path / "cache" / "index" / "x.idx.zst")  # any flipped bit: the envelope
    rng = random.Random(3)
    for _ in range(30):
        cachefiles.save(path, lambda: data)
        raw = bytearray(Path(path).read_bytes())
        raw[rng.randrange(len(raw))] ^= 0x40
        Path(path).write_bytes(bytes(raw))
        assert cachefiles.load(path, lambda b: LayerIndex.from_bytes(b, WHAT)) is None
        assert not os.path.exists(path)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_reader_random_windows(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    layer = _cached_layer(tmp_path_factory)
    size = len(layer.tar)
    with layer.files() as files:
        reader = LayerReader(layer.index(), files, layer.digest, WHAT)
        for _ in range(20):
            offset = data.draw(st.integers(0, size + 10))
            n = data.draw(st.integers(0, 3 << 20))
            assert reader.read(offset, n) == layer.tar[offset : offset + n]
        reader.close()


_CACHE: dict[str, Layer] = {}


def _cached_layer(factory: pytest.TempPathFactory) -> Layer:
    if "rich" not in _CACHE:
        _CACHE["rich"] = make_layer(factory.mktemp("rich"), make_tar(rich_members()))
    return _CACHE["rich"]


def test_reader_sequential_verifies(layer: Layer) -> None:
    with layer.files() as files:
        reader = LayerReader(layer.index(), files, layer.digest, WHAT)
        got = b"".join(reader.read(off, 4096) for off in range(0, len(layer.tar), 4096))
        assert got == layer.tar
        assert reader.verifier.passed
        assert reader.read(0, 100) == layer.tar[:100]  # going back is fine
        assert reader.verifier.passed
        reader.close()


def test_blobfile(layer: Layer) -> None:
    with layer.files() as files:
        f = BlobFile(LayerReader(layer.index(), files, layer.digest, WHAT))
        with f:
            assert f.readable()
            assert f.seekable()
            assert f.read() == layer.tar
            assert f.tell() == len(layer.tar)
            assert f.read(10) == b""
            assert f.seek(-5, io.SEEK_END) == len(layer.tar) - 5
            assert f.read(100) == layer.tar[-5:]
            f.seek(1000)
            f.seek(24, io.SEEK_CUR)
            buf = bytearray(600)
            assert f.readinto(buf) == 600
            assert bytes(buf) == layer.tar[1024:1624]
            with pytest.raises(ValueError, match="negative"):
                f.seek(-1)
            stream = io.BufferedReader(f)
            stream.seek(0)
            assert hashlib.sha256(stream.read()).hexdigest() == layer.digest[7:]
        assert f.closed
        with pytest.raises(ValueError, match="closed"):
            f.read(1)


# --- refusals ---------------------------------------------------------------------------


def simple_layer(tmp_path: Path) -> Layer:
    return make_layer(
        tmp_path,
        make_tar([("a", b"A" * 3000), ("d", None), ("d/b", b"B" * 700), ("c", b"C" * 10)]),
    )


def run_generate(layer: Layer, digest: str | None = None, size: int | None = None) -> RecordingSink:
    sink = RecordingSink(truth=layer.tar)
    with layer.files() as files:
        generate(
            layer.entries,
            files,
            sink,
            digest or layer.digest,
            len(layer.tar) if size is None else size,
            WHAT,
        )
    return sink


def file_start(layer: Layer, name: bytes) -> int:
    index = layer.index()
    for k in range(index.data_file_count):
        if index.file(k).name == name:
            return index.file(k).start
    raise KeyError(name)


def test_crc_mismatch(tmp_path: Path) -> None:
    layer = simple_layer(tmp_path)
    (layer.dir / "d" / "b").write_bytes(b"X" * 700)  # same size, other bytes
    sink = RecordingSink()  # the truth check would fire on the bad bytes themselves
    with layer.files() as files, pytest.raises(IntegrityError, match=r"layer L: .*d/b.*CRC-64"):
        generate(layer.entries, files, sink, layer.digest, len(layer.tar), WHAT)
    assert sink.high < file_start(layer, b"d/b") + 700  # the file's last byte never published
    assert sink.data[: sink.high] == layer.tar[: sink.high]


def test_reader_crc_mismatch_before_last_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = simple_layer(tmp_path)
    index = layer.index()
    (layer.dir / "a").write_bytes(b"A" * 2999 + b"Z")
    start = file_start(layer, b"a")
    with layer.files() as files:
        reader = LayerReader(index, files, layer.digest, WHAT)
        assert reader.read(0, start + 2999) == layer.tar[: start + 2999]
        with pytest.raises(IntegrityError, match="CRC-64"):
            reader.read(start + 2999, 1)
        with pytest.raises(IntegrityError):  # poisoned
            reader.read(0, 1)
        near_reader = LayerReader(index, files, layer.digest, WHAT)
        with pytest.raises(IntegrityError, match="CRC-64"):  # a small gap is checked first
            near_reader.read(start + 2999, 1)
        monkeypatch.setattr(verify, "MAX_GAP_FILL", 1000)
        random_reader = LayerReader(index, files, layer.digest, WHAT)
        assert random_reader.read(start + 2999, 1) == b"Z"  # random access: size-checked only
        assert not random_reader.verifier.passed
        with pytest.raises(IntegrityError, match="CRC-64"):  # the blob's end: checked first
            random_reader.read(len(layer.tar) - 1, 1)


def test_short_and_long_files(tmp_path: Path) -> None:
    layer = simple_layer(tmp_path)
    index = layer.index()
    start = file_start(layer, b"a")
    with layer.files() as files:
        reader = LayerReader(index, files, layer.digest, WHAT)
        assert reader.read(start, 10) == b"A" * 10  # fd now cached
        os.truncate(layer.dir / "a", 2000)
        with pytest.raises(IntegrityError, match="shorter"):
            reader.read(start + 1990, 100)
        with pytest.raises(IntegrityError, match="3000"):
            run_generate(layer)  # fstat size checked at open
        reader.close()


def test_missing_file(tmp_path: Path) -> None:
    layer = simple_layer(tmp_path)
    (layer.dir / "d" / "b").unlink()
    sink = RecordingSink(truth=layer.tar)
    with layer.files() as files, pytest.raises(LayerUnavailable, match=r"d/b.* not found"):
        generate(layer.entries, files, sink, layer.digest, len(layer.tar), WHAT)
    assert sink.high <= file_start(layer, b"d/b")


def test_symlinked_dir_component_to_host(tmp_path: Path) -> None:
    passwd = Path("/etc/passwd").read_bytes()
    tar = make_tar([("etc", None), ("etc/passwd", passwd)])
    layer = make_layer(tmp_path, tar)
    (layer.dir / "etc" / "passwd").unlink()
    (layer.dir / "etc").rmdir()
    (layer.dir / "etc").symlink_to("/etc")
    sink = RecordingSink()
    with layer.files() as files:
        with pytest.raises(LayerUnavailable):
            generate(layer.entries, files, sink, layer.digest, len(tar), WHAT)
        with pytest.raises(LayerUnavailable):
            LayerReader(layer.index(), files, layer.digest, WHAT).read(0, len(tar))
    assert passwd not in bytes(sink.data)


def test_unsafe_and_absolute_names(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"inside")
    from fastcrc import crc64

    crc = crc64.go_iso(b"inside").to_bytes(8, "big")
    blob = b"inside"
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    with LayerFiles([str(tmp_path)], WHAT) as files:
        sink = RecordingSink(truth=blob)
        generate([FileEntry(b"/x", 6, crc)], files, sink, digest, 6, WHAT)
        assert bytes(sink.data) == blob
        with pytest.raises(UnsafePath):
            generate([FileEntry(b"../x", 6, crc)], files, RecordingSink(), digest, 6, WHAT)


def test_fifo_where_file_expected(tmp_path: Path) -> None:
    layer = simple_layer(tmp_path)
    (layer.dir / "c").unlink()
    os.mkfifo(layer.dir / "c")
    with pytest.raises(IntegrityError, match="FIFO"):
        run_generate(layer)


def test_digest_and_size_mismatch(tmp_path: Path) -> None:
    layer = simple_layer(tmp_path)
    wrong = "sha256:" + "0" * 64
    sink = RecordingSink(truth=layer.tar)
    with layer.files() as files, pytest.raises(IntegrityError, match="digest"):
        generate(layer.entries, files, sink, wrong, len(layer.tar), WHAT)
    assert sink.high == len(layer.tar) - 1  # everything but the last byte
    for size in (len(layer.tar) - 1, len(layer.tar) + 1):
        with pytest.raises(IntegrityError, match="layer L: blob"):
            run_generate(layer, size=size)
    with layer.files() as files:
        reader = LayerReader(layer.index(), files, wrong, WHAT)
        head = reader.read(0, len(layer.tar) - 1)
        assert head == layer.tar[:-1]
        with pytest.raises(IntegrityError, match="digest"):
            reader.read(len(layer.tar) - 1, 1)
    with pytest.raises(MalformedMetadata):
        run_generate(layer, digest="md5:abc")


def test_size_zero_entries_never_opened(tmp_path: Path) -> None:
    entries: list[Segment | FileEntry] = [
        Segment(b"hdr"),
        FileEntry(b"no/such/file", 0, None),
        FileEntry(b"../../etc/passwd", 0, None),
        Segment(b"end"),
    ]
    blob = b"hdrend"
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    with LayerFiles([str(tmp_path)], WHAT) as files:
        sink = RecordingSink(truth=blob)
        generate(entries, files, sink, digest, len(blob), WHAT)
        assert bytes(sink.data) == blob
        index = LayerIndex.build(entries, WHAT)
        assert (index.file_count, index.data_file_count) == (2, 0)
        assert LayerReader(index, files, digest, WHAT).read(0, 100) == blob


def test_publish_lags_inside_files(tmp_path: Path) -> None:
    big = random.Random(1).randbytes(5 << 20)
    layer = make_layer(tmp_path, make_tar([("big", big), ("small", b"s")]))
    sink = run_generate(layer)
    start = file_start(layer, b"big")
    assert len(sink.published) > 3
    inside = [p for p in sink.published if start < p < start + len(big)]
    assert inside
    assert max(inside) <= start + len(big) - 1


def test_end_to_end_from_gzip(tmp_path: Path) -> None:
    tar = make_tar(rich_members(), tarfile.PAX_FORMAT, b"\0" * 10240)
    dest = tmp_path / "diff"
    dest.mkdir()
    gz = tmp_path / "layer.tar-split.gz"
    gz.write_bytes(disassemble(tar, str(dest)).gz())
    digest = "sha256:" + hashlib.sha256(tar).hexdigest()
    with gz.open("rb") as f:
        index = LayerIndex.build(iter_entries(f, WHAT), WHAT)
    with LayerFiles([str(dest)], WHAT) as files, gz.open("rb") as f:
        sink = RecordingSink(truth=tar)
        generate(iter_entries(f, WHAT), files, sink, digest, index.size, WHAT)
        assert bytes(sink.data) == tar


def test_truncated_tarsplit_stops_generation(tmp_path: Path) -> None:
    layer = simple_layer(tmp_path)
    gz = disassemble(layer.tar).gz()
    sink = RecordingSink(truth=layer.tar)
    entries = iter_entries(io.BytesIO(gz[: len(gz) - 20]), WHAT)
    with layer.files() as files, pytest.raises(MalformedMetadata):
        generate(entries, files, sink, layer.digest, len(layer.tar), WHAT)
    assert sink.high < len(layer.tar)


def _entries_iter(raw: bytes) -> Iterator[Segment | FileEntry]:
    return iter_entries(io.BytesIO(gzip.compress(raw)), WHAT)


def test_corrupt_crc_text_is_malformed() -> None:
    line = b'{"type":1,"name":"a","size":1,"payload":"' + base64.b64encode(b"1234567") + b'"}\n'
    with pytest.raises(MalformedMetadata, match="CRC payload"):
        list(_entries_iter(line))


def test_consumers_close_the_decoder(tmp_path: Path) -> None:
    import threading

    layer = simple_layer(tmp_path)
    (layer.dir / "a").unlink()
    gz = disassemble(layer.tar).gz()
    before = {t.ident for t in threading.enumerate()}
    failing = iter_entries(io.BytesIO(gz), WHAT)
    with layer.files() as files, pytest.raises(LayerUnavailable):
        generate(failing, files, RecordingSink(), layer.digest, len(layer.tar), WHAT)
    LayerIndex.build(iter_entries(io.BytesIO(gz), WHAT), WHAT)
    assert not [t for t in threading.enumerate() if t.ident not in before]


def _bomb(seen: list[int]) -> Iterator[Segment | FileEntry]:
    """Endless 1 MiB segments and files (what a gzip bomb decodes to), counted as taken."""
    while True:
        seen[0] += 1
        yield Segment(b"\0" * (1 << 20))
        yield FileEntry(b"f", 1 << 20, b"\0" * 8)


def test_index_stops_once_the_blob_exceeds_diff_size() -> None:
    seen = [0]
    with pytest.raises(IntegrityError, match=r"layer L: .*diff-size of 10485760"):
        LayerIndex.build(_bomb(seen), WHAT, 10 << 20)
    assert seen[0] <= 6  # at once, not at the decoder's 1 GiB segment cap


def test_generation_stops_once_the_blob_exceeds_diff_size(tmp_path: Path) -> None:
    seen = [0]
    entries = (e for e in _bomb(seen) if type(e) is Segment)
    with LayerFiles([str(tmp_path)], WHAT) as files, pytest.raises(IntegrityError):
        generate(entries, files, RecordingSink(), "sha256:" + "0" * 64, 10 << 20, WHAT)
    # 11 segments reach the check; the open-ahead thread decodes at most a batch (here: one
    # 1 MiB segment) more than the AHEAD_BATCHES it keeps ready, and the one handed out.
    assert seen[0] <= 11 + assemble.AHEAD_BATCHES + 2


class MemoryFiles:
    """An in-memory FileOpener: each name is a memfd holding its bytes (the store's
    LayerFiles is one implementation of the protocol; assembly needs nothing more)."""

    def __init__(self, contents: dict[bytes, bytes]) -> None:
        self.contents = contents
        self.opened: list[bytes] = []

    def open(self, name: bytes, size: int) -> int:
        data = self.contents.get(name)
        if data is None:
            raise LayerUnavailable(f"no file {name!r}")
        if len(data) != size:
            raise IntegrityError(f"{name!r} has {len(data)} bytes, tar-split records {size}")
        self.opened.append(name)
        fd = os.memfd_create("layer-file")
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)  # assembly reads from the file position, as from open()
        return fd

    def close(self) -> None:
        pass


def _memory_layer(
    members: list[tuple[str | bytes, bytes | str | None]],
) -> tuple[bytes, list[Segment | FileEntry], dict[bytes, bytes]]:
    tar = make_tar(members)
    split = disassemble(tar)
    entries = list(iter_entries(io.BytesIO(split.gz()), WHAT))
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        contents = {
            m.name.encode(): (tf.extractfile(m) or io.BytesIO()).read() for m in tf if m.isfile()
        }
    return tar, entries, contents


def test_generation_and_reads_through_an_in_memory_opener() -> None:
    members: list[tuple[str | bytes, bytes | str | None]] = [
        ("d", None),
        ("d/a", b"A" * 3000),
        ("d/b", bytes(range(256)) * 300),
        ("d/empty", b""),
    ]
    tar, entries, contents = _memory_layer(members)
    digest = "sha256:" + hashlib.sha256(tar).hexdigest()
    files = MemoryFiles(contents)
    sink = RecordingSink(truth=tar)
    generate(entries, files, sink, digest, len(tar), WHAT)
    assert bytes(sink.data) == tar
    assert b"d/empty" not in files.opened  # size-0 members are never opened
    reader = LayerReader(LayerIndex.build(entries, WHAT), files, digest, WHAT)
    assert reader.read(0, len(tar)) == tar
    assert reader.verifier.passed
    reader.close()
    files.contents[b"d/b"] = bytes(range(256)) * 299 + bytes(256)  # same size, other bytes
    fresh = LayerReader(LayerIndex.build(entries, WHAT), files, digest, WHAT)
    assert fresh.read(100, 1000) == tar[100:1100]  # the middle, before the bad file
    with pytest.raises(IntegrityError, match="CRC-64"):
        fresh.read(len(tar) - 1, 1)  # the end: the prefix is checked first
    fresh.close()
    with pytest.raises(IntegrityError, match="CRC-64"):
        generate(entries, files, RecordingSink(truth=tar), digest, len(tar), WHAT)


@pytest.mark.parametrize("behind", [1, verify.HASH_BEHIND])
def test_reader_hashes_behind_and_its_last_bytes_wait_for_the_digest(
    layer: Layer, monkeypatch: pytest.MonkeyPatch, behind: int
) -> None:
    """``--direct``: the blob's sha256 runs in a helper thread while reads go on; the read
    that completes the blob waits for it, a wrong digest fails that read and every later one,
    and no hashing thread is left behind (``behind``: 1 byte makes every feed wait)."""
    monkeypatch.setattr(verify, "HASH_BEHIND", behind)
    size = len(layer.tar)
    with layer.files() as files:
        good = LayerReader(layer.index(), files, layer.digest, WHAT)
        assert b"".join(good.read(off, 4096) for off in range(0, size, 4096)) == layer.tar
        assert good.verifier.passed
        wrong = LayerReader(layer.index(), files, "sha256:" + "0" * 64, WHAT)
        assert wrong.read(0, size - 1) == layer.tar[:-1]  # all but the end: served
        with pytest.raises(IntegrityError, match="digest"):
            wrong.read(size - 1, 1)
        with pytest.raises(IntegrityError, match="digest"):  # the failure sticks
            wrong.read(0, 1)
        abandoned = LayerReader(layer.index(), files, layer.digest, WHAT)
        abandoned.read(0, size // 2)  # a reader that stops half way
        for reader in (good, wrong, abandoned):
            reader.close()
    for _ in range(100):  # the helper exits once it has hashed what it was given
        if not [t for t in threading.enumerate() if t.name == "imgfs-hash-behind"]:
            break
        time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name == "imgfs-hash-behind"]
