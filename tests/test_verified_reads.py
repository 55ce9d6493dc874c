"""No read pattern ends at EOF on bytes that failed their check (DESIGN.md §2), real mounts.

A store made by buildah holds a layer with an 8 MiB file; a copy of it gets one byte of that
file flipped (same size), and every pattern below — whole, ``head`` then whole, from the
middle, the last bytes, two readers at once, a second reader after a failed one — must fail
for ``rootfs/``, ``layers/`` and the layer blob, in snapshot mode and with ``--direct``. The
same patterns on the intact store must succeed with the right bytes (so the test cannot pass
on a mount that refuses everything).
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

import imgfs
from tests import crafted, smallstore
from tests.mounting import Mount, mounted

DRIVER = smallstore.DRIVER
BIG = random.Random(9).randbytes(8 << 20)
MODES = {"snapshot": (), "direct": ("--direct",)}


@pytest.fixture(scope="session")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A buildah store with ``localhost/big:1``: ``/big.bin`` (8 MiB) and ``/small.txt``."""
    pytest.importorskip("pyfuse3")
    base = tmp_path_factory.mktemp("bigstore")
    (base / "big.bin").write_bytes(BIG)
    (base / "small.txt").write_text("small\n")
    ctr = smallstore.buildah(base, "from", "scratch")
    smallstore.buildah(base, "copy", ctr, str(base / "big.bin"), str(base / "small.txt"), "/")
    smallstore.buildah(base, "commit", "-q", ctr, "localhost/big:1")
    smallstore.buildah(base, "rm", ctr)
    return base


def _image(root: Path) -> tuple[str, str, str]:
    """(image ID, layer ID, layer digest) of the one image."""
    (image,) = json.loads((root / f"{DRIVER}-images" / "images.json").read_bytes())
    layers = json.loads((root / f"{DRIVER}-layers" / "layers.json").read_bytes())
    (record,) = [r for r in layers if r["id"] == image["layer"]]
    return image["id"], record["id"], record["diff-digest"]


def _paths(mnt: Path, root: Path) -> dict[str, Path]:
    image_id, _, digest = _image(root)
    base = mnt / image_id
    (layer_dir,) = (base / "layers").iterdir()
    return {
        "rootfs": base / "rootfs" / "big.bin",
        "layers": layer_dir / "big.bin",
        "blob": base / "blobs" / digest,
    }


def _cat(path: Path) -> tuple[int, bytes]:
    done = subprocess.run(["cat", str(path)], capture_output=True, check=False, timeout=120)
    return done.returncode, done.stdout


def _dd_from_middle(path: Path) -> tuple[int, bytes]:
    cmd = ["dd", f"if={path}", "bs=1M", "skip=4", "status=none"]
    done = subprocess.run(cmd, capture_output=True, check=False, timeout=120)
    return done.returncode, done.stdout


def _tail(path: Path) -> tuple[int, bytes]:
    done = subprocess.run(["tail", "-c", "100", str(path)], capture_output=True, check=False)
    return done.returncode, done.stdout


def _head_then_cat(path: Path) -> tuple[int, bytes]:
    subprocess.run(["head", "-c", "1M", str(path)], capture_output=True, check=False)
    return _cat(path)


def _cat_twice(path: Path) -> tuple[int, bytes]:
    _cat(path)
    return _cat(path)


def _two_at_once(path: Path) -> tuple[int, bytes]:
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(_cat, [path, path])
    return (first[0] or second[0]), first[1]


Pattern = Callable[[Path], tuple[int, bytes]]
PATTERNS: dict[str, tuple[Pattern, slice]] = {
    "whole": (_cat, slice(None)),
    "head-then-whole": (_head_then_cat, slice(None)),
    "whole-twice": (_cat_twice, slice(None)),
    "from-middle": (_dd_from_middle, slice(4 << 20, None)),
    "last-bytes": (_tail, slice(-100, None)),
    "two-readers": (_two_at_once, slice(None)),
}


@pytest.fixture(scope="module", params=sorted(MODES))
def stores(
    request: pytest.FixtureRequest, big_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, Path]:
    """(mode, intact store, a copy with one byte of big.bin flipped)."""
    work = tmp_path_factory.mktemp(f"verified-{request.param}")
    intact = crafted.copy_store(big_store / "root", work / "intact")
    broken = crafted.copy_store(big_store / "root", work / "broken")
    _, layer, _ = _image(broken)
    target = crafted.content_dir(broken, DRIVER, layer) / "big.bin"
    data = bytearray(target.read_bytes())
    data[(5 << 20) + 12345] ^= 0x01
    target.write_bytes(data)
    return request.param, intact, broken


def _mount(root: Path, mode: str, work: Path) -> AbstractContextManager[Mount]:
    return mounted(root, root.parent / "run", DRIVER, work, *MODES[mode])


def _expected(view: str, root: Path) -> bytes:
    """The right bytes of ``view``'s file, from the library (which checks them itself)."""
    if view != "blob":
        return BIG
    _, _, digest = _image(root)
    (image,) = imgfs.Store.open(str(root), str(root.parent / "run"), DRIVER).images()
    with image.open_blob(digest) as f:
        data = f.read()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    return bytes(data)


@pytest.mark.fuse_required
@pytest.mark.parametrize("view", ["rootfs", "layers", "blob"])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_no_pattern_reaches_eof_on_a_corrupt_file(
    stores: tuple[str, Path, Path], view: str, pattern: str, tmp_path: Path
) -> None:
    mode, intact, broken = stores
    read, part = PATTERNS[pattern]
    good = _expected(view, intact)
    with _mount(intact, mode, tmp_path / "intact") as m:
        status, data = read(_paths(m.path, intact)[view])
        assert status == 0, m.log()
        assert hashlib.sha256(data).digest() == hashlib.sha256(good[part]).digest()
    with _mount(broken, mode, tmp_path / "broken") as m:
        status, data = read(_paths(m.path, broken)[view])
        assert status != 0, f"{pattern} of {view} ended at EOF on a corrupt file ({mode})"
        _assert_logged(m)


def _assert_logged(m: Mount) -> None:
    log = m.log()
    assert "CRC-64" in log or "digest" in log, log[-2000:]


@pytest.mark.fuse_required
@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_small_corrupt_file_opened_and_read_inline_fails_every_time(
    big_store: Path, mode: str, tmp_path: Path
) -> None:
    """A listed small file opens and reads without a thread hop (its node from the listing,
    its bytes with RWF_NOWAIT): each read of a corrupt one still fails, a good one never."""
    intact = crafted.copy_store(big_store / "root", tmp_path / "intact")
    broken = crafted.copy_store(big_store / "root", tmp_path / "broken")
    _, layer, _ = _image(broken)
    target = crafted.content_dir(broken, DRIVER, layer) / "small.txt"
    target.write_bytes(b"smell\n")  # same size, another CRC-64
    for root, good in ((intact, True), (broken, False)):
        with _mount(root, mode, tmp_path / f"mnt-{good}") as m:
            image_id, _, _ = _image(root)
            for view in ("rootfs", "layers"):
                base = m.path / image_id / view
                directory = base if view == "rootfs" else next(base.iterdir())
                subprocess.run(["ls", "-lR", str(directory)], capture_output=True, check=True)
                small = directory / "small.txt"
                for _ in range(3):  # each open: inline, from the listing's node
                    status, data = _cat(small)
                    assert (status, data) == ((0, b"small\n") if good else (1, b"")), m.log()
                status, _ = _tail(small)
                assert (status == 0) == good
            if not good:
                _assert_logged(m)
