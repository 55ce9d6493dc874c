"""Area 11: the snapshot cache never exceeds ``--cache-size`` (issue 10 class 6).

A store of a few KiB whose layer holds one sparse file (a truncated file in the layer
directory; its tar-split describes that many zero bytes, with their CRC-64 and the layer's
sha256) is mounted with the cache dir on a small tmpfs of its own (mode 0700: the cache dir
must be ours) and ``--cache-size 100M``. Reading the layer blob and the file through the mount
gives the right bytes (sha256 checked here), while the tmpfs never holds more than
``--cache-size``: a blob bigger than the budget is served like ``--direct``, and a blob that
fits is written with holes where it is all zeros.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastcrc import crc64

from tests import crafted, storemaker, tarsplit_maker
from tests.hardening import harden
from tests.hardening.harden import Counts

pytestmark = pytest.mark.usefixtures("fuse_required")

AREA = "11 bounded disk"
CACHE_SIZE = 100 << 20
TMPFS_SIZE = 400 << 20
CHUNK = 8 << 20


def _sparse_layer(root: Path, layer_id: str, size: int, data_tail: bytes = b"") -> str:
    """Make ``layer_id`` hold one file ``sparse.bin``: ``size`` zero bytes then ``data_tail``
    (the zeros a hole in the layer directory). Returns the blob's digest."""
    total = size + len(data_tail)
    info = tarfile.TarInfo("sparse.bin")
    info.size, info.mode, info.mtime = total, 0o644, 1_700_000_000
    header = info.tobuf(format=tarfile.PAX_FORMAT)
    trailer = b"\0" * ((-total) % 512 + 1024)
    crc: int | None = None
    sha = hashlib.sha256(header)
    zeros = bytes(CHUNK)
    left = size
    while left:
        part = zeros[: min(left, CHUNK)]
        crc = crc64.go_iso(part, initial=crc)
        sha.update(part)
        left -= len(part)
    if data_tail:
        crc = crc64.go_iso(data_tail, initial=crc)
        sha.update(data_tail)
    sha.update(trailer)
    assert crc is not None
    entries = [
        {"type": 2, "payload": base64.b64encode(header).decode(), "position": 0},
        {
            "type": 1,
            "name": "sparse.bin",
            "size": total,
            "payload": base64.b64encode(crc.to_bytes(8, "big")).decode(),
            "position": 1,
        },
        {"type": 2, "payload": base64.b64encode(trailer).decode(), "position": 2},
    ]
    crafted.write_entries(crafted.tarsplit_path(root, "overlay", layer_id), entries)
    diff = crafted.content_dir(root, "overlay", layer_id)
    for old in diff.iterdir():
        old.unlink()
    with open(diff / "sparse.bin", "wb") as f:
        f.truncate(size)
        f.seek(size)
        f.write(data_tail)
    digest = "sha256:" + sha.hexdigest()
    layers_json = root / "overlay-layers" / "layers.json"
    layers = json.loads(layers_json.read_bytes())
    for rec in layers:
        if rec["id"] == layer_id:
            rec["diff-size"] = len(header) + total + len(trailer)
            rec["diff-digest"] = digest
    layers_json.write_text(json.dumps(layers))
    return digest


@contextlib.contextmanager
def _tmpfs(path: Path) -> Iterator[Path]:
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the cache: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class _Peak:
    """Samples the bytes used on a file system while a block runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.peak = _used(path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _used(self.path))

    def __enter__(self) -> _Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _used(self.path))


def _sha_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


CASES = {
    # name: (zero bytes, data after them): 1 GiB > --cache-size; 64 MiB of zeros + data fits
    "1 GiB sparse file, bigger than the cache": (1 << 30, b""),
    "64 MiB mostly-zero file, fits the cache": (64 << 20, harden.pseudo_random(3, 1 << 20)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["snapshots", "direct"])
def test_the_cache_never_exceeds_cache_size(
    tmp_path: Path, counts: Counts, case: str, mode: str
) -> None:
    zeros, tail = CASES[case]
    maker = storemaker.StoreMaker(tmp_path / "root")
    image = maker.add_image("localhost/sparse:1", [tarsplit_maker.make_tar([("x", b"x")])])
    maker.write()
    digest = _sparse_layer(tmp_path / "root", image.layers[0], zeros, tail)
    store_bytes = sum(
        os.stat(os.path.join(d, f)).st_blocks * 512
        for d, _, files in os.walk(tmp_path / "root")
        for f in files
    )
    extra = ["--cache-size", str(CACHE_SIZE)] + (["--direct"] if mode == "direct" else [])
    with (
        _tmpfs(tmp_path / "cachefs") as cachefs,
        harden.daemon_for(
            tmp_path / "root", tmp_path / "run", "overlay", tmp_path, "--cache-dir",
            str(cachefs / "c"), *extra,
        ) as d,
        _Peak(cachefs) as peak,
    ):  # fmt: skip
        blob = d.mnt / image.id / "blobs" / digest
        got_blob = _sha_of(blob)
        got_file = _sha_of(d.mnt / image.id / "rootfs" / "sparse.bin")
        alive = harden.alive(d.pid)
    want_file = hashlib.sha256(bytes(zeros) + tail).hexdigest() if zeros < (1 << 28) else None
    counts.add(AREA, f"sparse stores read ({mode})")
    counts.peak(AREA, f"store on disk, KiB ({mode})", store_bytes // 1024)
    counts.peak(AREA, f"cache disk peak, MiB ({mode}, {case[:8].strip()})", peak.peak / 2**20)
    counts.put(AREA, "--cache-size, MiB", CACHE_SIZE >> 20)
    assert alive
    assert got_blob == digest
    if want_file is not None:
        assert got_file == "sha256:" + want_file
    assert peak.peak <= CACHE_SIZE, f"{case}: the cache took {peak.peak / 2**20:.0f} MiB"
    if mode == "snapshots" and zeros < CACHE_SIZE:
        # it fits: a snapshot was made, with holes (its zeros cost no disk)
        assert peak.peak < zeros // 2, f"{case}: zeros were written out"
    assert "do not fit the snapshot cache" in d.log() or zeros < CACHE_SIZE or mode == "direct"
