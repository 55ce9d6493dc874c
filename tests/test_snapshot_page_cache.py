"""Real mount: a layer blob whose snapshot is complete reads right again (inline from the
snapshot, with read-ahead of the snapshot file after a miss) and can be mmap'ed privately
(direct I/O refuses only MAP_SHARED); a corrupt blob fails every read."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
from pathlib import Path

import pytest

from tests import storemaker
from tests.mounting import mounted
from tests.tarsplit_maker import make_tar

FILE = os.urandom(300_000)
LAYER = make_tar([("dir", None), ("dir/file", FILE), ("dir/small", b"small\n")])


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
