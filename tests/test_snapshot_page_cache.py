"""Real mount: a layer blob whose snapshot is complete reads right again (inline from the
snapshot, into the adapter's one reused buffer, with read-ahead of the snapshot file after a
miss) in every order: while it generates, right after, after the page cache was dropped, by
several readers at once; it can be mmap'ed privately (direct I/O refuses only MAP_SHARED); a
corrupt blob fails every read."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import subprocess
import threading
from pathlib import Path

import pytest

from tests import storemaker
from tests.mounting import mounted
from tests.tarsplit_maker import make_tar

FILE = os.urandom(300_000)
LAYER = make_tar([("dir", None), ("dir/file", FILE), ("dir/small", b"small\n")])


BIG = os.urandom(5 << 20)  # several 1 MiB requests, some of them concurrent
BIG_LAYER = make_tar([("big", BIG), ("tail", os.urandom(70_000))])
CHUNK = 1 << 20


def _private_map(path: Path) -> bytes:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, mmap.MAP_PRIVATE, mmap.PROT_READ) as m:
        return bytes(m)


@pytest.fixture
def made(tmp_path: Path) -> storemaker.StoreMaker:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("FUSE is not available (/dev/fuse missing)")
    maker = storemaker.StoreMaker(tmp_path / "root")
    maker.add_image("localhost/app:v1", [LAYER])
    maker.write()
    return maker


def test_a_complete_snapshot_reads_again_and_maps_a_corrupt_one_never_reads(
    made: storemaker.StoreMaker, tmp_path: Path
) -> None:
    image = made.images[0]
    with mounted(made.root, tmp_path / "run", storemaker.DRIVER, tmp_path / "m") as m:
        blob = m.path / image.id / "blobs" / image.diff_ids[0]
        data = blob.read_bytes()  # generates the snapshot
        assert "sha256:" + hashlib.sha256(data).hexdigest() == image.diff_ids[0]
        assert _private_map(blob) == data
        assert blob.read_bytes() == data
    diff = made.root / "overlay" / image.layers[0] / "diff" / "dir" / "file"
    diff.write_bytes(bytes([FILE[0] ^ 0xFF]) + FILE[1:])
    with mounted(made.root, tmp_path / "run", storemaker.DRIVER, tmp_path / "m2") as m:
        blob = m.path / image.id / "blobs" / image.diff_ids[0]
        for _ in range(2):
            with pytest.raises(OSError) as info:
                blob.read_bytes()
            assert info.value.errno == errno.EIO


def _read_chunks(path: Path, offsets: list[int]) -> bytes:
    """The file read with 1 MiB preads at ``offsets`` (in that order), put back in order."""
    fd = os.open(path, os.O_RDONLY)
    try:
        got = {off: os.pread(fd, CHUNK, off) for off in offsets}
    finally:
        os.close(fd)
    return b"".join(got[off] for off in sorted(got))


def _in_threads(*jobs: tuple[Path, list[int]]) -> list[bytes]:
    """Run ``_read_chunks`` of every job at once; their results in order."""
    results: list[bytes | BaseException] = [b""] * len(jobs)

    def run(i: int, path: Path, offsets: list[int]) -> None:
        try:
            results[i] = _read_chunks(path, offsets)
        except BaseException as exc:  # re-raised below, in the test's thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return [bytes(r) for r in results if not isinstance(r, BaseException)]


def _drop_page_cache() -> bool:
    """Drop the page cache (root only); False where that is not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return False
    return True


def test_a_complete_snapshot_reads_byte_identical_in_every_order(tmp_path: Path) -> None:
    """Readers while generating, at once after, after dropping the page cache, cat, and several
    readers at once (forward, backward, interleaved 1 MiB requests, which share the adapter's
    one read buffer): every read equals the layer, whose digest is the blob's name."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("FUSE is not available (/dev/fuse missing)")
    maker = storemaker.StoreMaker(tmp_path / "root")
    maker.add_image("localhost/big:v1", [BIG_LAYER])
    maker.write()
    image = maker.images[0]
    assert "sha256:" + hashlib.sha256(BIG_LAYER).hexdigest() == image.diff_ids[0]
    forward = list(range(0, len(BIG_LAYER), CHUNK))
    backward = forward[::-1]
    odd_first = forward[1::2] + forward[::2]
    with mounted(maker.root, tmp_path / "run", storemaker.DRIVER, tmp_path / "m") as m:
        blob = m.path / image.id / "blobs" / image.diff_ids[0]
        generating = _in_threads((blob, forward), (blob, forward), (blob, odd_first))
        assert generating == [BIG_LAYER] * 3  # readers that started while it generated
        assert blob.read_bytes() == BIG_LAYER  # at once after the generating reads
        dropped = _drop_page_cache()
        assert _read_chunks(blob, forward) == BIG_LAYER  # (the page cache dropped if root)
        if dropped:
            _drop_page_cache()
        cat = subprocess.run(["cat", str(blob)], capture_output=True, check=True, timeout=60)
        assert cat.stdout == BIG_LAYER
        for _ in range(3):
            together = _in_threads((blob, forward), (blob, backward), (blob, odd_first))
            assert together == [BIG_LAYER] * 3
