"""Real mounts of real stores, driven with ls/cat/cp/stat; skopeo's export is the oracle."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
import threading
from pathlib import Path

import pytest

import imgfs
from imgfs.views.keys import RootfsKey
from imgfs.views.tree import build_view
from tests import realstores
from tests.mounting import Mount, mounted, sha256_file

pytestmark = pytest.mark.usefixtures("fuse_required")


def test_root_lists_every_image(mount: tuple[Mount, str], real_stores: realstores.StoreSet) -> None:
    m, driver = mount
    listed = set(os.listdir(m.path))
    assert "by-name" in listed
    assert {img.id for img in real_stores.images[driver]} <= listed


def test_manifest_config_signatures_equal_skopeo(
    mount: tuple[Mount, str], real_stores: realstores.StoreSet
) -> None:
    m, driver = mount
    for img in real_stores.images[driver]:
        d = m.path / img.id
        assert (d / "manifest.json").read_bytes() == img.inspect_raw, img.kind
        assert (d / "manifest.json").stat().st_size == len(img.inspect_raw)
        if img.config_raw is not None:
            assert (d / "config.json").read_bytes() == img.config_raw, img.kind
        sigs = sorted(os.listdir(d / "signatures"), key=lambda n: int(n.split("-")[1]))
        assert sigs == [f"signature-{i}" for i in range(1, len(img.expected_signatures) + 1)]
        for name, want in zip(sigs, img.expected_signatures, strict=True):
            assert (d / "signatures" / name).read_bytes() == want, img.kind


def test_cp_of_every_blob_equals_skopeo_dir(
    mount: tuple[Mount, str], real_stores: realstores.StoreSet, tmp_path: Path
) -> None:
    m, driver = mount
    copied = 0
    for img in real_stores.images[driver]:
        if img.oracle_dir is None:
            continue
        blobs = m.path / img.id / "blobs"
        names = set(os.listdir(blobs))
        for name, oracle in img.oracle_files().items():
            if name in ("version", "manifest.json") or name.startswith("signature-"):
                continue
            assert f"sha256:{name}" in names, (img.kind, name)
            src = blobs / f"sha256:{name}"
            dst = tmp_path / name
            subprocess.run(["cp", str(src), str(dst)], check=True)
            assert dst.stat().st_size == src.stat().st_size == oracle.stat().st_size
            assert sha256_file(dst) == sha256_file(oracle) == name, (img.kind, name)
            dst.unlink()
            copied += 1
    assert copied >= 10


def test_random_offset_reads_equal_slices(
    mount: tuple[Mount, str], real_stores: realstores.StoreSet
) -> None:
    m, driver = mount
    img = real_stores.image(driver, "awkward")
    rng = random.Random(11)
    for diff_id, oracle in zip(img.diff_ids, img.layer_paths(), strict=True):
        want = oracle.read_bytes()
        fd = os.open(m.path / img.id / "blobs" / diff_id, os.O_RDONLY)
        try:
            for _ in range(100):
                off = rng.randrange(0, len(want) + 100)
                size = rng.choice([1, 100, 512, 4096, 131072, 1 << 20])
                assert os.pread(fd, size, off) == want[off : off + size]
        finally:
            os.close(fd)


def test_by_name_links_and_prefix_lookup(
    mount: tuple[Mount, str], real_stores: realstores.StoreSet
) -> None:
    m, driver = mount
    for img in real_stores.images[driver]:
        for name in img.names:
            if "@" in name:
                continue
            link = m.path / "by-name" / name
            assert os.readlink(link).endswith(img.id)
            assert not os.readlink(link).startswith("/")
            assert os.path.realpath(link) == str(m.path / img.id)
    tiny = real_stores.image(driver, "tiny")
    assert os.path.realpath(m.path / tiny.id[:10]) == str(m.path / tiny.id)
    assert tiny.id[:10] not in os.listdir(m.path)


def test_modes_owner_sizes_xattrs_and_read_only(
    mount: tuple[Mount, str], real_stores: realstores.StoreSet
) -> None:
    m, driver = mount
    img = real_stores.image(driver, "awkward")
    d = m.path / img.id
    st_root = os.stat(real_stores.store(driver).root)
    assert os.stat(d).st_mode & 0o777 == 0o500
    blob = d / "blobs" / img.diff_ids[0]
    st = os.stat(blob)
    assert st.st_mode & 0o777 == 0o400
    assert (st.st_uid, st.st_gid) == (st_root.st_uid, st_root.st_gid)
    assert st.st_blksize == 1 << 20
    assert st.st_size == img.layer_paths()[0].stat().st_size
    assert os.getxattr(blob, "user.imgfs.media_type").endswith(b".tar")
    assert len(os.getxattr(blob, "user.imgfs.layer_id")) == 64
    with pytest.raises(OSError) as info:
        os.open(blob, os.O_WRONLY)
    assert info.value.errno in (errno.EROFS, errno.EACCES)
    with pytest.raises(OSError):
        (d / "new").write_text("x")


def test_list_image_has_instances(
    mount: tuple[Mount, str], real_stores: realstores.StoreSet
) -> None:
    m, driver = mount
    lst = real_stores.image(driver, "mylist")
    inst = m.path / lst.id / "instances"
    targets = {os.path.basename(os.path.realpath(inst / n)) for n in os.listdir(inst)}
    assert real_stores.image(driver, "tiny").id in targets
    assert (m.path / lst.id / "manifest.json").read_bytes() == lst.inspect_raw


def test_concurrent_cp_generates_each_blob_once(
    real_stores: realstores.StoreSet, tmp_path: Path
) -> None:
    store = real_stores.store("overlay")
    img = real_stores.image("overlay", "awkward")
    with mounted(store.root, store.runroot, "overlay", tmp_path) as m:
        sources = [m.path / img.id / "blobs" / d for d in img.diff_ids]
        jobs = [(sources[i % len(sources)], tmp_path / f"out{i}") for i in range(8)]
        errors: list[BaseException] = []

        def copy(src: Path, dst: Path) -> None:
            try:
                subprocess.run(["cp", str(src), str(dst)], check=True)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=copy, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        for src, dst in jobs:
            assert sha256_file(dst) == src.name.split(":")[1]
        generations = [line for line in m.log().splitlines() if "generating layer" in line]
        assert len(generations) == len(set(img.diff_ids)), generations


def test_direct_mode_serves_the_same_bytes(
    real_stores: realstores.StoreSet, tmp_path: Path
) -> None:
    store = real_stores.store("vfs")
    img = real_stores.image("vfs", "awkward")
    with mounted(store.root, store.runroot, "vfs", tmp_path, "--direct") as m:
        for diff_id, oracle in zip(img.diff_ids, img.layer_paths(), strict=True):
            assert sha256_file(m.path / img.id / "blobs" / diff_id) == sha256_file(oracle)
        assert not [p for p in m.cache_dir.iterdir() if p.name != "index"]


def test_schema1_image_served_exactly(
    mount: tuple[Mount, str], real_stores: realstores.StoreSet
) -> None:
    """Signed schema1: no config.json, the stored (signed) manifest, the gzipped empty layer and
    the layer tars as skopeo exports them, the manifest blob named by the JWS payload digest."""
    m, driver = mount
    img = real_stores.image(driver, "schema1")
    assert img.oracle_dir is not None
    empty = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4"
    d = m.path / img.id
    listing = set(os.listdir(d))
    assert "config.json" not in listing
    assert {"manifest.json", "signatures", "blobs", "layers", "rootfs"} <= listing
    assert (d / "manifest.json").read_bytes() == img.inspect_raw
    assert os.listdir(d / "signatures") == []
    digest = "sha256:" + hashlib.sha256(realstores.jws_payload(img.inspect_raw)).hexdigest()
    assert img.manifest_digest == digest
    blobs = d / "blobs"
    assert sorted(os.listdir(blobs)) == sorted({empty, *img.diff_ids, digest})
    assert (blobs / digest).read_bytes() == img.inspect_raw
    assert os.stat(blobs / empty).st_size == 32
    assert (blobs / empty).read_bytes() == (img.oracle_dir / empty.split(":")[1]).read_bytes()
    for diff_id, oracle in zip(img.diff_ids, img.layer_paths(), strict=True):
        assert os.stat(blobs / diff_id).st_size == oracle.stat().st_size
        assert sha256_file(blobs / diff_id) == sha256_file(oracle) == diff_id.split(":")[1]
    assert sorted(os.listdir(d / "layers")) == [
        f"{n}-{diff_id.split(':')[1]}" for n, diff_id in enumerate(img.diff_ids)
    ]
    assert (d / "rootfs" / "schema1" / "two.txt").read_bytes() == b"schema1 layer two\n"
    assert os.path.realpath(m.path / "by-name" / "localhost" / "schema1:v1") == str(d)


def test_cache_dir_on_tmpfs(real_stores: realstores.StoreSet, tmp_path: Path) -> None:
    """tmpfs has no RWF_NOWAIT: snapshot reads must still work (inline, without the flag)."""
    store = real_stores.store("overlay")
    img = real_stores.image("overlay", "awkward")
    work = tmp_path / "work"
    (work / "cache").mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(work / "cache")],
        check=True,
    )
    try:
        with mounted(store.root, store.runroot, "overlay", work) as m:
            for diff_id in img.diff_ids:
                blob = m.path / img.id / "blobs" / diff_id
                assert sha256_file(blob) == diff_id.split(":")[1]
                assert sha256_file(blob) == diff_id.split(":")[1]  # again, from the cached snapshot
    finally:
        subprocess.run(["umount", "-l", str(work / "cache")], check=False)


def test_layer_blobs_are_direct_io_private_mmap_works(
    mount: tuple[Mount, str], real_stores: realstores.StoreSet
) -> None:
    """Layer blobs are opened with direct I/O (README): MAP_PRIVATE works, MAP_SHARED may not."""
    import mmap

    m, driver = mount
    img = real_stores.image(driver, "awkward")
    blob = m.path / img.id / "blobs" / img.diff_ids[-1]
    want = img.layer_paths()[-1].read_bytes()
    with open(blob, "rb") as f:
        with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as view:
            assert view[:] == want
        assert f.read() == want


def test_a_listed_rootfs_entry_stats_as_the_image_root(
    real_stores: realstores.StoreSet, tmp_path: Path
) -> None:
    """An image directory lists ``rootfs/`` provisionally (its attributes need the layer
    trees); a ``stat`` after the listing still shows the merged root's own attributes."""
    store = real_stores.store("overlay")
    view = build_view(imgfs.Store.open(str(store.root), str(store.runroot), "overlay").images, 0)
    with mounted(store.root, store.runroot, "overlay", tmp_path) as m:
        for img in real_stores.images["overlay"]:
            d = m.path / img.id
            if "rootfs" not in os.listdir(d):  # readdirplus: rootfs/ with timeouts 0
                continue
            st = os.stat(d / "rootfs")
            node = view.node(RootfsKey(img.id))
            assert (st.st_mode, st.st_uid, st.st_gid) == (node.mode, node.uid, node.gid), img.id
            assert st.st_mtime_ns == node.mtime_ns, img.id
            assert [e.name for e in os.scandir(d) if e.name == "rootfs" and e.is_dir()]
