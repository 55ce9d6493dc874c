"""Area 5: faults — the daemon killed mid-copy, a full cache disk, layer files deleted or
changed while they are read. Never wrong bytes; clean errors; the next mount works."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

import imgfs
from tests import crafted
from tests.hardening import harden
from tests.hardening.harden import Counts
from tests.mounting import imgfs_command

pytestmark = pytest.mark.usefixtures("fuse_required")

AREA = "5 faults"
BIG = harden.pseudo_random(5, 24 << 20)
MEDIUM = harden.pseudo_random(6, 3 << 20)
SMALL = b"small\n" * 1000


@dataclass
class Base:
    tools: harden.Tools
    big: str  # image IDs
    medium: str
    small: str


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    tools = harden.Tools.at(tmp_path_factory.mktemp("faults"))
    big = tools.commit_files("localhost/big:1", {"big.bin": BIG})
    medium = tools.commit_files("localhost/medium:1", {"medium.bin": MEDIUM})
    small = tools.commit_files("localhost/small:1", {"small.txt": SMALL})
    return Base(tools, big, medium, small)


@dataclass
class Copy:
    root: Path
    runroot: Path
    base: Base

    def layer_blob(self, image_id: str) -> str:
        image = imgfs.Store.open(str(self.root), str(self.runroot), harden.DRIVER).image(image_id)
        return next(b.digest for b in image.blobs() if b.kind == "layer")

    def content(self, image_id: str) -> Path:
        layer = crafted.layer_of(self.root, harden.DRIVER, image_id)
        return crafted.content_dir(self.root, harden.DRIVER, layer)


@pytest.fixture
def store(base: Base, tmp_path: Path) -> Copy:
    root = crafted.copy_store(base.tools.root, tmp_path / "root")
    return Copy(root, tmp_path / "run", base)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _read_all(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        parts = []
        while chunk := f.read(1 << 20):
            parts.append(chunk)
    return b"".join(parts)


def _drain(f: BinaryIO) -> None:
    while f.read(1 << 20):
        pass


# -- SIGKILL -----------------------------------------------------------------------------------


def test_sigkill_mid_copy_then_cleanup_and_remount(
    store: Copy, tmp_path: Path, counts: Counts
) -> None:
    blob = store.layer_blob(store.base.big)
    work = tmp_path / "m"
    d = harden.start(store.root, store.runroot, work / "mnt", work / "cache", work / "log")
    try:
        path = d.mnt / store.base.big / "blobs" / blob
        f = open(path, "rb", buffering=0)  # noqa: SIM115 (closing it fails: ENOTCONN)
        first = f.read(1 << 20)
        os.kill(d.pid, signal.SIGKILL)
        for _ in range(100):
            if not harden.alive(d.pid):
                break
            time.sleep(0.05)
        with pytest.raises(OSError) as info:
            _drain(f)
        with contextlib.suppress(OSError):
            f.close()
        counts.add(AREA, "SIGKILL mid-copy: reads after the kill failed cleanly")
        assert info.value.errno in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED)
        stale = [
            work / "cache" / ".imgfs-snap-stale1",
            work / "cache" / "index" / "x.idx.zst.tmp-999999-1",
        ]
        for p in stale:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"stale")
        result = subprocess.run(
            imgfs_command("-u", str(d.mnt)), capture_output=True, text=True, timeout=30, check=False
        )
        counts.add(
            AREA, "SIGKILL: `imgfs -u` on the dead mount exit 0", int(result.returncode == 0)
        )
        assert result.returncode == 0, result.stderr
        assert not os.path.ismount(d.mnt)
    finally:
        harden.stop(d)
    d2 = harden.start(store.root, store.runroot, work / "mnt", work / "cache", work / "log2")
    try:
        data = _read_all(d2.mnt / store.base.big / "blobs" / blob)
        counts.add(AREA, "SIGKILL: next mount served correct bytes", int(_sha(data) == blob))
        assert _sha(data) == blob
        assert data[:512] == first[:512]
        left = [str(p) for p in stale if p.exists()]
        counts.add(AREA, "SIGKILL: stale temp files left after restart (must be 0)", len(left))
        assert not left, left
    finally:
        harden.stop(d2)


# -- disk full ---------------------------------------------------------------------------------


@pytest.fixture
def tiny_cache(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "tiny-cache"
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_cache(store: Copy, tmp_path: Path, tiny_cache: Path, counts: Counts) -> None:
    medium, small = store.layer_blob(store.base.medium), store.layer_blob(store.base.small)
    work = tmp_path / "m"
    d = harden.start(store.root, store.runroot, work / "mnt", tiny_cache, work / "log")
    try:
        outcomes = []
        for _ in range(3):
            try:
                data = _read_all(d.mnt / store.base.medium / "blobs" / medium)
            except OSError as exc:
                outcomes.append(exc.errno)
            else:
                assert _sha(data) == medium, "wrong bytes from a full cache disk"
                outcomes.append(0)
        counts.add(AREA, "disk full: 3 MiB layer reads with EIO", outcomes.count(errno.EIO))
        counts.add(
            AREA, "disk full: 3 MiB layer reads served correctly (fallback)", outcomes.count(0)
        )
        assert set(outcomes) <= {0, errno.EIO}, outcomes
        data = _read_all(d.mnt / store.base.small / "blobs" / small)
        ok_small = _sha(data) == small
        manifest = (d.mnt / store.base.medium / "manifest.json").read_bytes()
        counts.add(AREA, "disk full: small layer still served correctly", int(ok_small))
        assert ok_small
        assert manifest
        assert harden.alive(d.pid)
        assert "ENOSPC" in d.log() or "No space left" in d.log() or 0 in outcomes
    finally:
        harden.stop(d)


# -- layer files deleted / changed mid-read --------------------------------------------------------


@pytest.mark.parametrize("mode", ["snapshot", "direct"])
@pytest.mark.parametrize("fault", ["deleted-before-open", "deleted-mid-read", "changed-mid-read"])
def test_layer_files_change_under_a_reader(
    store: Copy, tmp_path: Path, mode: str, fault: str, counts: Counts
) -> None:
    blob = store.layer_blob(store.base.big)
    target = store.content(store.base.big) / "big.bin"
    extra = ("--direct",) if mode == "direct" else ()
    with harden.daemon(store.root, store.runroot, tmp_path / "m", *extra) as d:
        path = d.mnt / store.base.big / "blobs" / blob
        if fault == "deleted-before-open":
            target.unlink()
        got = b""
        error = 0
        try:
            with open(path, "rb", buffering=0) as f:
                got = f.read(1 << 20)
                if fault == "deleted-mid-read":
                    target.unlink()
                elif fault == "changed-mid-read":
                    with open(target, "r+b") as w:  # same inode, same size, other bytes
                        w.seek(len(BIG) // 2)
                        w.write(b"\0" * (1 << 20))
                while chunk := f.read(1 << 20):
                    got += chunk
        except OSError as exc:
            error = exc.errno or -1
        alive = harden.alive(d.pid)
    wrong = error == 0 and _sha(got) != blob
    outcome = (
        "EIO" if error == errno.EIO else "correct bytes" if not error and not wrong else "WRONG"
    )
    counts.add(AREA, f"layer file {fault} ({mode}): {outcome}")
    counts.add(AREA, "layer file faults: complete reads with wrong bytes (must be 0)", int(wrong))
    assert not wrong
    assert error in (0, errno.EIO), error
    assert alive
    if fault == "deleted-before-open":
        assert error == errno.EIO
