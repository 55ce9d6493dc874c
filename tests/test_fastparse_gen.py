"""The compiled generation paths (``_fastparse.open_files``, ``copy_entries``, ``entries``)
against the Python code they stand in for: the same blob bytes and publish marks, the same
errors at the same files and lines, nothing unverified published, no descriptor left and no
symlink followed. Each test runs the same input with the compiled path on and off (the module
attributes that bind it set to None), so a C that drifts from the Python reference fails here.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import random
from pathlib import Path

import pytest
from fastcrc import crc64

from imgfs.errors import ImgfsError, IntegrityError, LayerUnavailable, MalformedMetadata
from imgfs.layer import assemble, compiled, tarsplit
from imgfs.layer.assemble import generate
from imgfs.layer.tarsplit import FileEntry, Segment, iter_entries
from imgfs.store import layerfiles
from imgfs.store.layerfiles import LayerFiles
from tests.tarsplit_maker import make_tar
from tests.test_assemble import WHAT, Layer, RecordingSink, make_layer, rich_members
from tests.test_assemble_batch import _open_fds

EXT = compiled.extension()
pytestmark = pytest.mark.skipif(EXT is None, reason="the extension is not built")


@pytest.fixture(params=["compiled", "python"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test once with the compiled generation paths and once with the Python code."""
    if request.param == "python":
        monkeypatch.setattr(assemble, "_COPY_ENTRIES", None)
        monkeypatch.setattr(layerfiles, "_OPEN_FILES", None)
        monkeypatch.setattr(tarsplit, "FAST_ENTRIES", None)
    return str(request.param)


def _generate(layer: Layer, sink: RecordingSink) -> None:
    files = layer.files()
    try:
        generate(layer.entries, files, sink, layer.digest, len(layer.tar), WHAT)
    finally:
        files.close()


def _mixed_members(seed: int, count: int) -> list[tuple[str | bytes, bytes | str | None]]:
    """Many small files (0-4 KiB, as the 100k-file image), a few big ones (the Python copy
    loop), sizes at the edges of a block and of the publish step, names the C leaves to Python
    ("./" prefix: cleaned by Python; non-UTF-8: the general decoder)."""
    rng = random.Random(seed)
    members: list[tuple[str | bytes, bytes | str | None]] = [("d", None), ("d/sub", None)]
    for i in range(count):
        pick = rng.random()
        if pick < 0.02:
            size = rng.choice([assemble.PUBLISH_STEP - 512, assemble.READ_CHUNK, (1 << 20) + 3])
        else:
            size = rng.choice([0, 1, 511, 512, 513, 1023, 1024, rng.randrange(4097)])
        name = f"d/sub/f{i}" if i % 3 else f"d/f{i}"
        members.append((name, rng.randbytes(size)))
    members += [("./d/dotted", b"dot"), (b"d/latin-\xe9", b"raw name"), ("d/l", "->f1")]
    return members


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_generation_is_the_same_blob_and_publishes_nothing_unverified(
    tmp_path: Path, mode: str, seed: int
) -> None:
    layer = make_layer(tmp_path, make_tar(_mixed_members(seed, 400)))
    before = _open_fds()
    sink = RecordingSink(truth=layer.tar)  # asserts each publish covers only verified bytes
    _generate(layer, sink)
    assert bytes(sink.data) == layer.tar
    assert sink.high == len(layer.tar)
    assert _open_fds() == before


def test_the_rich_layer_is_the_same_blob(tmp_path: Path, mode: str) -> None:
    layer = make_layer(tmp_path, make_tar(rich_members()))
    sink = RecordingSink(truth=layer.tar)
    _generate(layer, sink)
    assert bytes(sink.data) == layer.tar


def _corrupt_case(tmp_path: Path, how: str) -> tuple[Layer, int, str]:
    members = _mixed_members(5, 200)
    layer = make_layer(tmp_path, make_tar(members))
    victim = "d/sub/f100"
    content = next(c for n, c in members if n == victim)
    assert isinstance(content, bytes)
    assert len(content) > 1
    path = layer.dir / victim
    if how == "crc":  # same size, one byte changed: only the CRC-64 can tell
        path.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))
        match = "fails its CRC-64"
    else:  # another size: the open's check
        path.write_bytes(content + b"x")
        match = "tar-split records"
    start = layer.tar.index(content)  # (random content: unique in the tar)
    return layer, start + len(content) - 1, match


@pytest.mark.parametrize("how", ["crc", "size"])
def test_a_corrupt_file_fails_the_same_way_and_is_never_published(
    tmp_path: Path, mode: str, how: str
) -> None:
    layer, last_byte, match = _corrupt_case(tmp_path, how)
    before = _open_fds()
    sink = RecordingSink(truth=layer.tar)
    with pytest.raises(IntegrityError, match=match) as info:
        _generate(layer, sink)
    assert str(info.value).startswith(f"{WHAT}: ")
    assert "d/sub/f100" in str(info.value)
    assert sink.high <= last_byte  # its last byte (and all after) never published
    assert _open_fds() == before


def test_copy_entries_stops_before_a_file_changed_after_its_open(tmp_path: Path) -> None:
    """A file shortened, lengthened or rewritten between its open and its copy: the C copies
    the pairs before it, leaves its fd open and says the Python code must copy it."""
    assert EXT is not None
    data = [os.urandom(n) for n in (10, 700, 3000)]
    for bad in ("short", "long", "crc"):
        fds = []
        for i, content in enumerate(data):
            path = tmp_path / f"{bad}{i}"
            path.write_bytes(content)
            fds.append(os.open(path, os.O_RDONLY))
        changed = {"short": data[1][:-1], "long": data[1] + b"!", "crc": b"X" + data[1][1:]}
        (tmp_path / f"{bad}1").write_bytes(changed[bad])
        items: list[tuple[Segment | FileEntry, int | Exception | None]] = [
            (Segment(b"H" * 512), None),
            *(
                (FileEntry(b"n", len(c), crc64.go_iso(c).to_bytes(8, "big")), fd)
                for c, fd in zip(data, fds, strict=True)
            ),
        ]
        buf = bytearray(1 << 20)
        nxt, fill, slow = EXT.copy_entries(buf, 0, items, 0, 1 << 40, 1 << 20)
        assert (nxt, fill, slow) == (2, 512 + 10, True)
        assert buf[:fill] == b"H" * 512 + data[0]
        with pytest.raises(OSError):
            os.fstat(fds[0])  # copied: closed
        os.fstat(fds[1])  # not copied: still the caller's
        for fd in fds[1:]:
            os.close(fd)


def test_copy_entries_honours_the_limits() -> None:
    """The blob-size limit, the buffer's room and the publish step stop it where Python would."""
    assert EXT is not None
    items: list[tuple[Segment | FileEntry, int | Exception | None]] = [
        (Segment(bytes([i]) * 100), None) for i in range(10)
    ]
    buf = bytearray(450)
    assert EXT.copy_entries(buf, 0, items, 0, 1000, 10_000) == (4, 400, True)  # room
    assert EXT.copy_entries(buf, 0, items, 0, 250, 10_000) == (2, 200, True)  # blob size
    assert EXT.copy_entries(buf, 0, items, 0, 1000, 150) == (2, 200, False)  # publish step
    assert EXT.copy_entries(buf, 100, items, 8, 1000, 10_000) == (10, 300, False)  # the end
    assert buf[100:300] == b"\x08" * 100 + b"\x09" * 100
    unopened = [(FileEntry(b"n", 5, b"\0" * 8), None), (FileEntry(b"e", 0, None), None)]
    assert EXT.copy_entries(buf, 0, unopened, 0, 1000, 1000) == (0, 0, True)
    assert EXT.copy_entries(buf, 0, unopened, 1, 1000, 1000) == (2, 0, False)  # empty: skipped


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 1000, 65_537])
def test_crc64_is_fastcrcs_go_iso(n: int) -> None:
    assert EXT is not None
    data = random.Random(n).randbytes(n)
    assert EXT.crc64_go_iso(data) == crc64.go_iso(data)
    half = EXT.crc64_go_iso(data[: n // 3])
    assert EXT.crc64_go_iso(data[n // 3 :], half) == crc64.go_iso(data)


# -- open_files: the batched open of LayerFiles, its rules those of ``open`` ------------------


def test_open_many_opens_what_open_opens_and_leaves_the_rest_to_it(tmp_path: Path) -> None:
    root = tmp_path / "diff"
    (root / "d").mkdir(parents=True)
    (root / "d" / "a").write_bytes(b"aaaa")
    (root / "d" / "b").write_bytes(b"bb")
    os.symlink("a", root / "d" / "link")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "a").write_bytes(b"aaaa")
    os.symlink(tmp_path / "outside", root / "escape")  # a directory replaced by a symlink
    os.mkfifo(root / "d" / "fifo")
    items = [
        (b"d/a", 4),  # opened
        (b"./d/b", 2),  # opened ("./" dropped, as clean_name does)
        (b"d/b", 3),  # another size: open raises IntegrityError
        (b"d/link", 4),  # a symlink: never followed
        (b"escape/a", 4),  # through a symlinked directory: never followed
        (b"d/fifo", 0),  # not a regular file
        (b"d/../d/a", 4),  # a ".." component
        (b"d//a", 4),  # not already clean: open cleans it
        (b"d/missing", 1),
    ]
    before = _open_fds()
    with LayerFiles([str(root)], WHAT) as files:
        got = files.open_many(items, advise=1 << 20)
        assert [isinstance(fd, int) for fd in got] == [True, True] + [False] * 7
        assert got[2:] == [None] * 7  # each left to ``open`` at its turn, which says why
        for fd, (name, size) in zip(got[:2], items, strict=False):
            assert isinstance(fd, int)
            assert os.read(fd, 10) == (root / os.fsdecode(name)).read_bytes()[:size]
            flags = int(Path(f"/proc/self/fdinfo/{fd}").read_text().split()[3], 8)
            assert flags & os.O_NOATIME  # (root may always set it)
            os.close(fd)
        for name, size in items[2:]:
            if name == b"d//a":
                os.close(files.open(name, size))
                continue
            with pytest.raises(ImgfsError):
                files.open(name, size)
    assert _open_fds() == before


def test_open_many_without_the_extension_leaves_everything_to_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").write_bytes(b"a")
    monkeypatch.setattr(layerfiles, "_OPEN_FILES", None)
    with LayerFiles([str(tmp_path)], WHAT) as files:
        assert files.open_many([(b"a", 1)]) == [None]


# -- entries: the tar-split decoder's loop -------------------------------------------------


def _line(obj: dict[str, object]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _seg(payload: bytes, pos: int) -> bytes:

    return _line({"type": 2, "payload": base64.b64encode(payload).decode(), "position": pos})


def _file(name: str, size: int, pos: int) -> bytes:

    if not size:
        return _line({"type": 1, "name": name, "payload": None, "position": pos})
    crc = base64.b64encode(os.urandom(8)).decode()
    return _line({"type": 1, "name": name, "size": size, "payload": crc, "position": pos})


def _decode(ndjson: bytes) -> tuple[list[Segment | FileEntry], str | None]:
    out: list[Segment | FileEntry] = []
    try:
        for entry in iter_entries(io.BytesIO(gzip.compress(ndjson)), WHAT):
            out.append(entry)
    except MalformedMetadata as exc:
        return out, str(exc)
    return out, None


def _crafted(kind: str) -> bytes:
    lines = [_seg(b"h" * 512, 0), _file("a/b", 3, 1), _seg(b"pad", 2), _file("a/c", 0, 3)]
    extra = {
        "plain": [],
        "blank": [b"", b"  ", _file("a/z", 1, 9)],
        "escaped": [b'{"type":1,"name":"a/\\u00e9","payload":null,"position":9}', _seg(b"x", 10)],
        "dup": [_file("a/b", 3, 9), _seg(b"after", 10)],
        "dup-cleaned": [_file("./a/b", 3, 9)],
        "dotted": [_file("a/./q", 1, 9), _file("a/q", 1, 10)],
        "bad-json": [b'{"type":2,"payload":"AAAA"', _seg(b"x", 10)],
        "bad-b64": [b'{"type":2,"payload":"A===","position":9}'],
        "big-segment": [_seg(b"s" * 4000, 9), _seg(b"t", 10)],
    }[kind]
    mid = len(lines) // 2
    return b"\n".join(lines[:mid] + extra + lines[mid:]) + b"\n"


@pytest.mark.parametrize(
    "kind",
    [
        "plain",
        "blank",
        "escaped",
        "dup",
        "dup-cleaned",
        "dotted",
        "bad-json",
        "bad-b64",
        "big-segment",
    ],
)
def test_entries_decode_as_the_python_loop_does(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    monkeypatch.setattr(tarsplit, "MAX_SEGMENT_BYTES", 3000)
    ndjson = _crafted(kind)
    fast = _decode(ndjson)
    monkeypatch.setattr(tarsplit, "FAST_ENTRIES", None)
    assert _decode(ndjson) == fast  # same entries, same error (and line number)
    if kind in ("dup", "dup-cleaned", "bad-json", "big-segment"):
        assert fast[1] is not None


def test_entries_on_a_big_real_shaped_stream_equal_the_python_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Thousands of lines over several inflated blocks (lines cut across blocks)."""
    rng = random.Random(11)
    lines = []
    for i in range(6000):
        lines.append(_seg(rng.randbytes(rng.choice([512, 1024, 1536])), 2 * i))
        lines.append(_file(f"d{i % 50}/f{i}", rng.randrange(5000), 2 * i + 1))
    ndjson = b"\n".join(lines) + b"\n"
    fast = _decode(ndjson)
    assert fast[1] is None
    assert len(fast[0]) == 12_000
    monkeypatch.setattr(tarsplit, "FAST_ENTRIES", None)
    assert _decode(ndjson) == fast


def test_generation_errors_name_the_layer_in_both_modes(tmp_path: Path, mode: str) -> None:
    members = _mixed_members(9, 50)
    layer = make_layer(tmp_path, make_tar(members))
    name = next(n for n, c in members[30:] if isinstance(c, bytes) and c and isinstance(n, str))
    (layer.dir / name).unlink()
    with pytest.raises(LayerUnavailable, match=f"^{WHAT}: file b'{name}' not found"):
        _generate(layer, RecordingSink(truth=layer.tar))


def test_open_many_out_of_descriptors_says_so_and_tries_no_more(tmp_path: Path) -> None:
    """EMFILE is not the file's fault: its OSError (which makes open-ahead stop, so the file
    opens at its turn once descriptors are free), and nothing tried after it."""
    import errno
    import resource

    for i in range(40):
        (tmp_path / f"f{i}").write_bytes(b"x")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with LayerFiles([str(tmp_path)], WHAT) as files:
        probe = os.open(os.devnull, os.O_RDONLY)
        os.close(probe)
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe + 10, hard))
        try:
            got = files.open_many([(f"f{i}".encode(), 1) for i in range(40)])
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        fds = [fd for fd in got if isinstance(fd, int)]
        errors = [k for k, fd in enumerate(got) if isinstance(fd, OSError)]
        assert len(errors) == 1
        err = got[errors[0]]
        assert isinstance(err, OSError)
        assert err.errno == errno.EMFILE
        assert assemble.out_of_descriptors(err)
        assert got[errors[0] + 1 :] == [None] * (39 - errors[0])
        assert len(fds) == errors[0]
        for fd in fds:
            os.close(fd)
