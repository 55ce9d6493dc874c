"""An attacker's fuzzing of the generation C of imgfs/layer/_fastparse.c (``entries``,
``open_files``, ``copy_entries``) against the Python code it stands in for.

Seeded random-mutation loops: mutated real tar-splits (the ones tests/tarsplit_maker writes,
and with ``IMGFS_FUZZ_CORPUS=/var/tmp/imgfs-bench`` a sample of every tar-split below it, read
only) decoded with ``FAST_ENTRIES`` on and off must give the same entries and the same error;
generations of layers whose files were then changed under the tar-split (same size other bytes,
shorter, longer, a symlink in place of the file or of a directory, a FIFO, a device node, a
directory, gone) with the compiled paths on and off must give the same bytes, the same publish
marks, the same error naming the same file, and leave no descriptor open. Attacks on
``open_files`` and ``copy_entries`` directly (names that leave the directory, NUL, very long
names, a buffer resized or shared while the GIL is released, refcounts) follow.

By default each loop runs a fixed number of cases (seconds in the suite);
``IMGFS_FUZZ_SECONDS=N`` runs each for N seconds instead, ``IMGFS_FUZZ_SEED`` picks the seed.
The AddressSanitizer recipe is tests/test_fastparse_fuzz.py's.
"""

from __future__ import annotations

import contextlib
import gc
import glob
import gzip
import hashlib
import io
import os
import random
import shutil
import stat
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
from fastcrc import crc64

from imgfs.errors import ImgfsError, MalformedMetadata
from imgfs.layer import assemble, compiled, tarsplit
from imgfs.layer.assemble import generate
from imgfs.layer.tarsplit import FileEntry, Segment, iter_entries
from imgfs.store import layerfiles
from imgfs.store.layerfiles import LayerFiles
from tests.tarsplit_maker import disassemble, make_tar
from tests.test_assemble import WHAT, RecordingSink, make_layer
from tests.test_assemble_batch import _open_fds
from tests.test_readahead import _is_open

EXT = compiled.extension()
pytestmark = pytest.mark.skipif(EXT is None, reason="the extension is not built")
SEED = int(os.environ.get("IMGFS_FUZZ_SEED", "13"))
SECONDS = float(os.environ.get("IMGFS_FUZZ_SECONDS", "0"))
CORPUS_DIR = os.environ.get("IMGFS_FUZZ_CORPUS", "")


def _cases(count: int) -> Iterator[int]:
    """``count`` case numbers, or as many as fit IMGFS_FUZZ_SECONDS."""
    if not SECONDS:
        yield from range(count)
        return
    end = time.monotonic() + SECONDS
    i = 0
    while time.monotonic() < end:
        yield i
        i += 1
    print(f"{i} cases", file=sys.stderr)


def _members(rng: random.Random, count: int) -> list[tuple[str | bytes, bytes | str | None]]:
    members: list[tuple[str | bytes, bytes | str | None]] = [("d", None), ("d/s", None)]
    for i in range(count):
        size = rng.choice([0, 1, 511, 512, 513, 4096, rng.randrange(3000), rng.randrange(70_000)])
        members.append((f"d/s/f{i}" if i % 2 else f"d/f{i}", rng.randbytes(size)))
    members += [("./d/dot", b"dot"), ("d/l", "->f1")]
    return members


def _ndjson_corpus(rng: random.Random) -> list[bytes]:
    out = [
        gzip.decompress(disassemble(make_tar(_members(rng, n)), None).gz()) for n in (3, 40, 300)
    ]
    if CORPUS_DIR:
        paths = sorted(glob.glob(f"{CORPUS_DIR}/**/*tar-split.gz", recursive=True))
        for path in rng.sample(paths, min(40, len(paths))):
            with open(path, "rb") as f:
                out.append(gzip.decompress(f.read()))
    return out


def _mutate_lines(rng: random.Random, ndjson: bytes) -> bytes:
    lines = ndjson.split(b"\n")
    for _ in range(rng.randrange(1, 4)):
        i = rng.randrange(len(lines))
        line = lines[i]
        how = rng.randrange(9)
        if how == 0 and line:  # a byte changed
            k = rng.randrange(len(line))
            line = (
                line[:k]
                + bytes([rng.choice(b'"\\\x00\n /.=A{}:,\x80\xff' + bytes([line[k] ^ 1]))])
                + line[k + 1 :]
            )
        elif how == 1:
            lines.insert(rng.randrange(len(lines)), line)  # a duplicate (name or segment)
        elif how == 2 and len(lines) > 1:
            del lines[i]
            continue
        elif how == 3:
            line = b""
        elif how == 4 and line:
            line = line[: rng.randrange(len(line))]
        elif how == 5:
            line = line.replace(
                b'"name":"', b'"name":"' + rng.choice([b"./", b"/", b"../", b"a//", b"x/./"]), 1
            )
        elif how == 6:
            line = line.replace(
                b'"size":', b'"size":' + rng.choice([b"-", b"9999999999999999999", b"0", b"1e3"]), 1
            )
        elif how == 7:
            line = line.replace(
                b'"payload":"', b'"payload":"' + rng.choice([b"=", b"\\u0041", b"A", b"AA=="]), 1
            )
        else:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
            continue
        lines[i] = line
    return b"\n".join(lines)


def _decode(ndjson: bytes) -> tuple[list[Segment | FileEntry], str | None]:
    out: list[Segment | FileEntry] = []
    try:
        for entry in iter_entries(io.BytesIO(gzip.compress(ndjson, 1)), WHAT):
            out.append(entry)
    except MalformedMetadata as exc:
        return out, str(exc)
    return out, None


def test_entries_fuzz_equals_the_python_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(SEED)
    corpus = _ndjson_corpus(rng)
    fast_entries = tarsplit.FAST_ENTRIES
    errors = 0
    for case in _cases(300):
        data = _mutate_lines(rng, rng.choice(corpus))
        room = rng.choice([tarsplit.MAX_SEGMENT_BYTES, rng.randrange(1, 20_000)])
        monkeypatch.setattr(tarsplit, "MAX_SEGMENT_BYTES", room)
        monkeypatch.setattr(tarsplit, "FAST_ENTRIES", fast_entries)
        fast = _decode(data)
        monkeypatch.setattr(tarsplit, "FAST_ENTRIES", None)
        slow = _decode(data)
        assert fast == slow, f"case {case} (seed {SEED})"
        errors += fast[1] is not None
    assert SECONDS or 20 < errors < 290  # the mutations reach both outcomes


# ---- generation of layers whose files changed under the tar-split ---------------------------

_ATTACKS = ["crc", "short", "long", "symlink", "dir-symlink", "fifo", "device", "dir", "gone"]


def _attack(rng: random.Random, root: Path, outside: Path, name: str, content: bytes) -> str:
    path = root / name
    how = rng.choice(_ATTACKS)
    if how == "crc" and content:
        k = rng.randrange(len(content))
        path.write_bytes(content[:k] + bytes([content[k] ^ 0x20]) + content[k + 1 :])
    elif how == "short" and content:
        path.write_bytes(content[:-1])
    elif how == "long":
        path.write_bytes(content + b"\0")
    elif how == "symlink":  # to a file of the very size and bytes the tar-split records
        target = outside / f"t{rng.randrange(1 << 30)}"
        target.write_bytes(content)
        path.unlink()
        path.symlink_to(target)
    elif how == "dir-symlink":  # the directory swapped for a symlink to a copy outside
        parent = path.parent
        if parent == root:
            return "none"
        copy = outside / f"c{rng.randrange(1 << 30)}"
        os.rename(parent, copy)
        parent.symlink_to(copy)
    elif how == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif how == "device":
        path.unlink()
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero
    elif how == "dir":
        path.unlink()
        path.mkdir()
    elif how == "gone":
        path.unlink()
    else:
        return "none"
    return how


def _run_generation(
    layer_tar: bytes, entries: list[Segment | FileEntry], root: Path
) -> tuple[object, ...]:
    sink = RecordingSink()
    files = LayerFiles([str(root)], WHAT)
    error = None
    try:
        generate(
            list(entries),
            files,
            sink,
            "sha256:" + hashlib.sha256(layer_tar).hexdigest(),
            len(layer_tar),
            WHAT,
        )
    except ImgfsError as exc:
        error = (type(exc).__name__, str(exc))
    finally:
        files.close()
    good = 0
    while good < min(len(sink.data), len(layer_tar)) and sink.data[good] == layer_tar[good]:
        good += 1
    assert sink.high <= good or sink.high == len(layer_tar) == good, "published wrong bytes"
    return error, sink.high, tuple(sink.published), len(sink.data)


def test_generation_fuzz_with_files_changed_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    rng = random.Random(SEED)
    saved = (assemble._COPY_ENTRIES, layerfiles._OPEN_FILES, tarsplit.FAST_ENTRIES)
    before = _open_fds()
    failed = 0
    for case in _cases(12):
        members = _members(rng, rng.randrange(5, 160))
        tar = make_tar(members)
        work = tmp_path / str(case)
        work.mkdir()
        layer = make_layer(work, tar)
        outside = work / "outside"
        outside.mkdir()
        files = [
            (n, c)
            for n, c in members
            if isinstance(n, str) and isinstance(c, bytes) and c and not n.startswith(".")
        ]
        for _ in range(rng.randrange(0, 3)):
            name, content = rng.choice(files)
            if (layer.dir / name).is_file() and not (layer.dir / name).is_symlink():
                _attack(rng, layer.dir, outside, name, content)
        results = []
        for on in (True, False):
            got = saved if on else (None, None, None)
            monkeypatch.setattr(assemble, "_COPY_ENTRIES", got[0])
            monkeypatch.setattr(layerfiles, "_OPEN_FILES", got[1])
            monkeypatch.setattr(tarsplit, "FAST_ENTRIES", got[2])
            results.append(_run_generation(tar, layer.entries, layer.dir))
        assert results[0] == results[1], f"case {case} (seed {SEED})"
        failed += results[0][0] is not None
        assert _open_fds() == before
        shutil.rmtree(work)  # (long runs leave no files behind)
    assert SECONDS or failed >= 3


# ---- open_files attacks ------------------------------------------------------------------------


def _open(files: LayerFiles, names: list[bytes], sizes: list[int]) -> list[int | Exception | None]:
    return files.open_many(list(zip(names, sizes, strict=True)))


def test_open_files_follows_no_symlink_and_leaves_no_directory(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    root = tmp_path / "diff"
    (root / "d").mkdir(parents=True)
    (root / "d/ok").write_bytes(b"12345")
    secret = tmp_path / "secret"
    secret.write_bytes(b"SECRT")
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir/ok").write_bytes(b"12345")
    (root / "link").symlink_to(secret)
    (root / "dlink").symlink_to(tmp_path / "outdir")
    (root / "abslink").symlink_to("/etc/passwd")
    os.mkfifo(root / "fifo")
    os.mknod(root / "dev", 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    (root / "sub").mkdir()
    (root / "d/inner").symlink_to("..")
    long = b"a" * 5000
    names = [b"d/ok", b"link", b"dlink/ok", b"abslink", b"../secret", b"d/../../secret",
             b"/secret", b"//secret", b"d/inner/d/ok", b"fifo", b"dev", b"sub", b"d/ok\0x",
             long, b"d/" * 3000 + b"ok", b"./d/ok", b"d/ok/", b"", b".", b"..",
             b"d//ok"]  # fmt: skip
    passwd = os.stat("/etc/passwd").st_size
    sizes = [5, 5, 5, passwd, 5, 5, 5, 5, 5, 0, 0, 0, 5, 5, 5, 5, 5, 0, 0, 0, 5]
    before = _open_fds()
    with LayerFiles([str(root)], WHAT) as files:
        for _ in range(50):
            got = _open(files, names, sizes)
            for k in (0, 15):  # d/ok and ./d/ok
                fd = got[k]
                assert isinstance(fd, int)
                assert os.pread(fd, 10, 0) == b"12345"
                os.close(fd)
            rest = got[1:15] + got[16:]
            assert rest == [None] * (len(names) - 2)  # every other name: open's turn
    assert _open_fds() == before


def test_open_files_argument_abuse_raises_and_leaks_nothing(tmp_path: Path) -> None:
    assert EXT is not None
    (tmp_path / "f").write_bytes(b"x")
    dirfd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    resolve = 0x08 | 0x04 | 0x02 | 0x01
    try:
        bad: list[tuple[object, ...]] = [
            (-1, [b"f"], [1], flags, resolve, 0),
            (1 << 40, [b"f"], [1], flags, resolve, 0),
            (dirfd, (b"f",), [1], flags, resolve, 0),
            (dirfd, [b"f"], [1, 2], flags, resolve, 0),
            (dirfd, ["f"], [1], flags, resolve, 0),
            (dirfd, [b"f"], [1.0], flags, resolve, 0),
            (dirfd, [b"f"], [1], -1, resolve, 0),
            (dirfd, [b"f"] * 5000, [1] * 5000, flags, resolve, 0),
        ]
        before = _open_fds()
        for args in bad:
            with pytest.raises((TypeError, ValueError, OverflowError)):
                EXT.open_files(*args)
        # sizes out of range are "no such size", not an error
        got = EXT.open_files(dirfd, [b"f", b"f", b"f"], [-1, 1 << 70, 1], flags, resolve, 1 << 62)
        assert got[:2] == [None, None]
        assert isinstance(got[2], int)
        os.close(got[2])
        assert _open_fds() == before
    finally:
        os.close(dirfd)


# ---- copy_entries under threads and abuse ------------------------------------------------------


def test_copy_entries_pins_the_buffer_while_the_gil_is_released(tmp_path: Path) -> None:
    """While one thread copies (GIL released), another cannot resize its bytearray (the export
    pins it), and two threads copying into one buffer neither crash nor lose a descriptor."""
    assert EXT is not None
    content = os.urandom(1 << 20)
    path = tmp_path / "big"
    path.write_bytes(content)
    crc = crc64.go_iso(content).to_bytes(8, "big")
    buf = bytearray(4 << 20)
    stop = threading.Event()
    resized: list[BaseException] = []

    def resizer() -> None:
        while not stop.is_set():
            try:
                buf.extend(b"x")
                del buf[-1:]
            except BufferError as exc:
                resized.append(exc)

    results: list[tuple[int, int, bool]] = []

    def copier() -> None:
        for _ in range(20):
            fds = [os.open(path, os.O_RDONLY) for _ in range(3)]
            items = [(FileEntry(b"big", len(content), crc), fd) for fd in fds]
            got = EXT.copy_entries(buf, 0, items, 0, 1 << 40, 1 << 40)
            results.append(got)
            for fd in fds[got[0] :]:
                os.close(fd)

    before = _open_fds()
    threads = [threading.Thread(target=copier) for _ in range(2)]
    spin = threading.Thread(target=resizer)
    spin.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    spin.join()
    assert _open_fds() == before
    assert resized  # the resize was refused while a copy held the buffer
    # each copy either completed (3 files) or stopped before the file the other overwrote
    assert all(nxt in (0, 1, 2, 3) and fill == nxt * len(content) for nxt, fill, _ in results)


def _leak_check(call: Callable[[], object], rounds: int = 300) -> None:
    for _ in range(20):
        call()
    gc.collect()
    tracemalloc.start()
    first = tracemalloc.take_snapshot()
    for _ in range(rounds):
        call()
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(first, "filename"))
    assert grown < 20_000, grown


def test_the_generation_calls_leak_nothing_on_any_exit_path(tmp_path: Path) -> None:
    assert EXT is not None
    (tmp_path / "f").write_bytes(b"abc")
    crc = crc64.go_iso(b"abc").to_bytes(8, "big")
    seg = Segment(b"s" * 100)
    buf = bytearray(1000)

    def copies() -> None:
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        items: list[tuple[object, object]] = [(seg, None), (FileEntry(b"f", 3, crc), fd),
                                              (FileEntry(b"f", 3, b"\0" * 8), None)]  # fmt: skip
        assert EXT.copy_entries(buf, 0, items, 0, 1000, 1000) == (2, 103, True)
        assert EXT.copy_entries(buf, 990, [(seg, None)], 0, 1000, 1000) == (0, 990, True)
        for bad in ([(seg,)], [(seg, None), 3], [(object(), None)]):
            with contextlib.suppress(TypeError):
                EXT.copy_entries(buf, 0, bad, 0, 1000, 1000)
        with pytest.raises(ValueError):
            EXT.copy_entries(buf, 1001, items, 0, 1000, 1000)
        with pytest.raises(BufferError):
            EXT.copy_entries(b"ro", 0, items, 0, 1000, 1000)

    _leak_check(copies)
    gc.collect()
    payload_refs = sys.getrefcount(seg.payload)
    for _ in range(300):
        copies()
    gc.collect()
    now = sys.getrefcount(seg.payload)  # (not inside the assert: its rewriting holds a ref)
    assert now == payload_refs
    seen: set[bytes] = set()
    chunk = gzip.decompress(disassemble(make_tar(_members(random.Random(1), 30)), None).gz())

    def decodes() -> None:
        seen.clear()
        EXT.entries(chunk, 0, seen, 1 << 30, 1 << 20)
        EXT.entries(chunk, 0, seen, 1 << 30, 1 << 20)  # every name a duplicate now
        EXT.entries(chunk, 0, set(), 10, 5)

    _leak_check(decodes)


def test_copy_entries_closes_no_descriptor_when_it_raises(tmp_path: Path) -> None:
    """Each allocation of a call made to fail in turn: copy_entries returns (and has closed the
    fds of the pairs it copied) or raises MemoryError having closed none, since the caller then
    closes every fd from where it started; an fd closed twice could be another thread's by
    then. (The old C closed each fd as it copied it, before building its result.)"""
    assert EXT is not None
    testcapi = pytest.importorskip("_testcapi")
    content = b"abc" * 100
    (tmp_path / "f").write_bytes(content)
    crc = crc64.go_iso(content).to_bytes(8, "big")
    buf = bytearray(1 << 16)
    raised = 0
    for start in range(40):
        for stop in (start + 1, 0):
            fds = [os.open(tmp_path / "f", os.O_RDONLY) for _ in range(3)]
            items = [(FileEntry(b"f", len(content), crc), fd) for fd in fds]
            testcapi.set_nomemory(start, stop)
            try:
                got = EXT.copy_entries(buf, 5000, items, 0, 1 << 40, 1 << 40)
            except MemoryError:
                got = None
            finally:
                testcapi.remove_mem_hooks()
            closed = [k for k, fd in enumerate(fds) if not _is_open(fd)]
            if got is None:
                raised += 1
                assert closed == [], f"allocation {start}: raised after closing {closed}"
            else:
                assert got == (3, 5000 + 3 * len(content), False)
                assert closed == [0, 1, 2]
            for k, fd in enumerate(fds):
                if k not in closed:
                    os.close(fd)
    assert raised


def test_open_files_keeps_the_names_alive_while_the_gil_is_released(tmp_path: Path) -> None:
    """Another thread emptying the names list during the call (GIL released) must not free the
    names the C is opening: the old C held only the list, whose items the other thread freed,
    and the kernel read the names from freed memory (invisible to AddressSanitizer, but with
    ``ASAN_OPTIONS=max_free_fill_size=999999:free_fill_byte=0`` freed memory is zeroed and the
    last name, "xxxxx", was not found)."""
    assert EXT is not None
    dirfd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    (tmp_path / "xxxxx").write_bytes(b"x")
    stop = threading.Event()
    lists: list[list[bytes]] = []

    def clearer() -> None:
        while not stop.is_set():
            for names in list(lists):
                time.sleep(0.0005)  # (the GIL back to the caller: it enters open_files)
                names.clear()

    spin = threading.Thread(target=clearer)
    spin.start()
    try:
        during = 0
        for _ in range(30):
            names = [b"missing/%d/%s" % (i, b"n" * 200) for i in range(4000)]
            names.append(("x" * 5).encode())  # (only the list holds it: no constant, no cache)
            sizes = [1] * len(names)
            lists.append(names)
            try:
                got = EXT.open_files(dirfd, names, sizes, flags, 0x0F, 0)
            except TypeError:  # emptied before the call: another round
                continue
            finally:
                lists.remove(names)
            during += not names  # emptied during the call
            assert len(got) == len(sizes)
            assert got[:-1] == [None] * (len(sizes) - 1)
            fd = got[-1]
            assert isinstance(fd, int)  # (freed, its name would be garbage: ASan's free fill)
            os.close(fd)
        assert during  # not vacuous
    finally:
        stop.set()
        spin.join()
        os.close(dirfd)


def _copy_model(
    buflen: int, fill: int, items: list[tuple[object, object]], start: int, limit: int, stop: int,
    truth: dict[int, bytes],
) -> tuple[int, int, bool]:  # fmt: skip
    """copy_entries as its docstring says, in Python (``truth``: what each fd's file holds)."""
    pos, used = fill, 0
    for i in range(start, min(len(items), start + 4096)):
        entry, opened = items[i]
        if isinstance(entry, Segment):
            size = len(entry.payload)
        elif isinstance(entry, FileEntry) and entry.size == 0:
            size = 0
        elif isinstance(entry, FileEntry) and isinstance(opened, int) and entry.crc is not None:
            size = entry.size
        else:
            return i, pos, True
        if size > limit - used or size > buflen - pos:
            return i, pos, True
        if isinstance(entry, FileEntry) and size:
            content = truth[cast(int, opened)]
            if len(content) != size or crc64.go_iso(content).to_bytes(8, "big") != entry.crc:
                return i, pos, True
        pos += size
        used += size
        if pos >= stop:
            return i + 1, pos, False
    return min(len(items), start + 4096), pos, False


def test_copy_entries_fuzz_equals_its_python_model(tmp_path: Path) -> None:
    assert EXT is not None
    rng = random.Random(SEED)
    before = _open_fds()
    for case in _cases(400):
        items: list[tuple[object, object]] = []
        truth: dict[int, bytes] = {}
        expect: list[bytes] = []
        for k in range(rng.randrange(12)):
            kind = rng.randrange(6)
            data = rng.randbytes(rng.choice([0, 1, 7, 100, 511, 512, 3000]))
            if kind == 0:
                items.append((Segment(data), None))
            elif kind == 1:
                items.append((FileEntry(b"e", 0, None), None))
            elif kind == 2:
                items.append((FileEntry(b"n", len(data) or 1, b"\0" * 8), None))  # unopened
            else:
                path = tmp_path / f"{case}-{k}"
                on_disk = rng.choice([data, data, data, data[:-1], data + b"x", b"Z" + data[1:]])
                path.write_bytes(on_disk)
                fd = os.open(path, os.O_RDONLY)
                path.unlink()  # (the fd keeps it; long runs leave no files behind)
                truth[fd] = on_disk
                crc = crc64.go_iso(data).to_bytes(8, "big") if kind != 5 else b"\0" * 7
                items.append((FileEntry(b"f", len(data), crc), fd))
            expect.append(data)
        buf = bytearray(rng.choice([0, 100, 600, 5000, 40_000]))
        fill = rng.randrange(len(buf) + 1)
        start = rng.randrange(len(items) + 1)
        limit = rng.choice([0, 50, 1000, 1 << 40])
        stop = rng.choice([0, fill + 1, fill + 600, 1 << 40])
        want = _copy_model(len(buf), fill, items, start, limit, stop, truth)
        got = EXT.copy_entries(buf, fill, items, start, limit, stop)
        assert got == want, f"case {case} (seed {SEED})"
        nxt, pos, _ = got
        copied = b"".join(
            expect[i]
            for i in range(start, nxt)
            if not isinstance(items[i][0], FileEntry) or items[i][1] is not None
        )
        assert buf[fill:pos] == copied
        for i, (entry, opened) in enumerate(items):
            if isinstance(opened, int):
                copied_fd = start <= i < nxt and cast(FileEntry, entry).size > 0
                assert _is_open(opened) != copied_fd, f"case {case} item {i}"
                if _is_open(opened):
                    os.close(opened)
    assert _open_fds() == before
