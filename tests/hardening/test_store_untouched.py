"""Area 4: the store is never written.

A full inventory (type, mode, owner, size, mtime, ctime, inode, sha256 or link target of every
entry, lock files included) of each real store, before and after a mount, a browse of every
directory, a read of every file and a ``cp`` of every blob, and the unmount: identical.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import realstores
from tests.hardening import harden
from tests.hardening.harden import Counts

pytestmark = pytest.mark.usefixtures("fuse_required")

AREA = "4 store untouched"


def _browse(mnt: Path, out: Path) -> tuple[int, int, int]:
    """Walk everything, read every file, cp every blob; returns (entries, files, bytes)."""
    entries = files = nbytes = 0
    for dirpath, dirnames, filenames in os.walk(mnt):
        entries += len(dirnames) + len(filenames)
        for name in filenames:
            path = Path(dirpath) / name
            mode = os.lstat(path).st_mode
            if path.is_symlink():
                os.readlink(path)
                continue
            if not stat.S_ISREG(mode):  # rootfs/ and layers/ FIFOs and devices: never opened
                continue
            if path.parent.name == "blobs":
                subprocess.run(["cp", str(path), str(out)], check=True)
                nbytes += (out / name).stat().st_size
                (out / name).unlink()
            else:
                nbytes += len(path.read_bytes())
            os.listxattr(path)
            files += 1
    return entries, files, nbytes


@pytest.mark.parametrize("mode", ["snapshot", "direct"])
@pytest.mark.parametrize("driver", realstores.DRIVERS)
def test_mount_browse_copy_unmount_changes_nothing(
    driver: str, mode: str, real_stores: realstores.StoreSet, tmp_path: Path, counts: Counts
) -> None:
    store = real_stores.store(driver)
    tops = [p for p in (store.root, store.runroot) if p.exists()]
    before = {str(top): harden.inventory(top) for top in tops}
    out = tmp_path / "out"
    out.mkdir()
    extra = ("--direct",) if mode == "direct" else ()
    with harden.daemon_for(store.root, store.runroot, driver, tmp_path / "m", *extra) as d:
        entries, files, nbytes = _browse(d.mnt, out)
    after = {str(top): harden.inventory(top) for top in tops}
    diffs = [
        f"{top}: {line}" for top in before for line in harden.differences(before[top], after[top])
    ]
    locks = [p for top in before.values() for p in top if p.endswith(".lock")]
    inventoried = sum(len(v) for v in before.values())
    counts.add(AREA, "mount cycles", 1)
    counts.add(AREA, "store entries inventoried", inventoried)
    counts.add(AREA, "lock files inventoried", len(locks))
    counts.add(AREA, "mounted entries browsed", entries)
    counts.add(AREA, "files read (blobs by cp)", files)
    counts.add(AREA, "MiB read", nbytes >> 20)
    counts.add(AREA, "inventory differences (must be 0)", len(diffs))
    assert locks, "the inventory must cover the lock files"
    assert files > 10
    assert nbytes > 1 << 20
    assert not diffs, diffs[:20]


# -- atimes ------------------------------------------------------------------------------------


def _atimes(top: Path) -> dict[str, int]:
    found = {}
    for dirpath, _dirs, names in os.walk(top):
        for name in names:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                found[os.path.relpath(path, top)] = st.st_atime_ns
    return found


def _read_through_library(root: Path, runroot: Path, driver: str) -> int:
    """Every image's metadata and every blob, through the library; returns bytes read."""
    import imgfs

    nbytes = 0
    store = imgfs.Store.open(str(root), str(runroot), driver)
    for image in store.images():
        try:
            blobs = image.blobs()
            image.signatures()
        except imgfs.ImgfsError:
            continue
        for blob in blobs:
            with image.open_blob(blob.digest) as f:
                while chunk := f.read(1 << 20):
                    nbytes += len(chunk)
    return nbytes


@pytest.fixture
def strictatime_store(
    real_stores: realstores.StoreSet, tmp_path: Path
) -> Iterator[tuple[Path, Path]]:
    """A copy (cp -a) of the real overlay store on a tmpfs mounted ``strictatime``: every read
    that is not O_NOATIME moves an atime."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts a tmpfs)")
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "strictatime,mode=0700,size=512m", "tmpfs", str(fs)],
        check=True,
    )
    try:
        store = real_stores.store("overlay")
        for part in ("root", "runroot"):
            subprocess.run(["cp", "-a", str(getattr(store, part)), str(fs / part)], check=True)
        yield fs / "root", fs / "runroot"
    finally:
        harden.unmount_below(fs)
        subprocess.run(["umount", "-l", str(fs)], check=False)


@pytest.mark.parametrize("how", ["library", "snapshot", "direct"])
def test_reading_the_store_keeps_every_atime(
    how: str, strictatime_store: tuple[Path, Path], tmp_path: Path, counts: Counts
) -> None:
    root, runroot = strictatime_store
    before = _atimes(root)
    if how == "library":
        nbytes = _read_through_library(root, runroot, "overlay")
    else:
        out = tmp_path / "out"
        out.mkdir()
        extra = ("--direct",) if how == "direct" else ()
        with harden.daemon_for(root, runroot, "overlay", tmp_path / "m", *extra) as d:
            _entries, _files, nbytes = _browse(d.mnt, out)
    after = _atimes(root)
    moved = sorted(p for p in before if after.get(p) != before[p])
    counts.add(AREA, f"atimes checked on a strictatime tmpfs ({how})", len(before))
    counts.add(AREA, "atimes moved (must be 0)", len(moved))
    assert nbytes > 1 << 20
    assert not moved, moved[:20]
    control = next(root.rglob("layers.json"))  # a plain read does move it here
    old = control.stat().st_atime_ns
    control.read_bytes()
    assert control.stat().st_atime_ns != old, "the tmpfs is not strictatime: the test is blind"
