"""``layers/``, ``rootfs/`` and ``oci/`` of real mounts of real stores, against real oracles.

- ``rootfs/``: compared file by file (type, mode, owner, size, content, symlink target, mtime,
  user xattrs, hardlink identity) with skopeo's exported layer tars applied in order into a temp
  dir as c/storage applies them (tests/layer_oracle.py; devices need root).
- ``layers/<n>-<hex>/``: compared member by member with GNU ``tar -tv`` of the exported layer.
- ``oci/``: ``skopeo copy oci:… dir:`` / ``docker-archive:`` give the exported layers and config.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import tarfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests import realstores
from tests.layer_oracle import apply_layers, tar_listing
from tests.mounting import Mount, sha256_file

pytestmark = pytest.mark.usefixtures("fuse_required")

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def _images(stores: realstores.StoreSet, driver: str) -> list[realstores.Image]:
    return [i for i in stores.images[driver] if i.oracle_dir is not None and i.diff_ids]


def _walk(root: bytes) -> dict[bytes, os.stat_result]:
    """Every path below ``root`` (relative, bytes) with its lstat."""
    found: dict[bytes, os.stat_result] = {}
    pending = [b""]
    while pending:
        rel = pending.pop()
        for name in os.listdir(os.path.join(root, rel) if rel else root):
            child = os.path.join(rel, name) if rel else name
            st = os.lstat(os.path.join(root, child))
            found[child] = st
            if stat.S_ISDIR(st.st_mode):
                pending.append(child)
    return found


def _user_xattrs(path: bytes) -> dict[str, bytes]:
    names = [n for n in os.listxattr(path, follow_symlinks=False) if n.startswith("user.")]
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in names}


def _link_groups(tree: dict[bytes, os.stat_result]) -> set[frozenset[bytes]]:
    by_inode: dict[tuple[int, int], set[bytes]] = {}
    for path, st in tree.items():
        if stat.S_ISREG(st.st_mode):
            by_inode.setdefault((st.st_dev, st.st_ino), set()).add(path)
    return {frozenset(paths) for paths in by_inode.values() if len(paths) > 1}


# -- rootfs/ ------------------------------------------------------------------------------------


def _compare_trees(mine: bytes, want: bytes, what: str) -> int:
    got_tree, want_tree = _walk(mine), _walk(want)
    assert sorted(got_tree) == sorted(want_tree), what
    for rel, st in got_tree.items():
        ref = want_tree[rel]
        where = f"{what}: {rel!r}"
        assert stat.S_IFMT(st.st_mode) == stat.S_IFMT(ref.st_mode), where
        if not stat.S_ISLNK(st.st_mode):
            assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(ref.st_mode), where
            assert st.st_mtime_ns == ref.st_mtime_ns, where
        assert (st.st_uid, st.st_gid) == (ref.st_uid, ref.st_gid), where
        if stat.S_ISREG(st.st_mode):
            assert st.st_size == ref.st_size, where
            assert st.st_nlink == ref.st_nlink, where
            assert sha256_file(os.path.join(mine, rel)) == sha256_file(os.path.join(want, rel)), (
                where
            )
        elif stat.S_ISLNK(st.st_mode):
            assert os.readlink(os.path.join(mine, rel)) == os.readlink(os.path.join(want, rel))
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            assert st.st_rdev == ref.st_rdev, where
        if not stat.S_ISLNK(st.st_mode):
            got_x = _user_xattrs(os.path.join(mine, rel))
            assert got_x == _user_xattrs(os.path.join(want, rel)), where
    assert _link_groups(got_tree) == _link_groups(want_tree), what
    return len(got_tree)


def test_rootfs_equals_layers_applied_in_order(
    mount: tuple[Mount, str], real_stores: realstores.StoreSet, tmp_path: Path
) -> None:
    m, driver = mount
    compared = 0
    for img in _images(real_stores, driver):
        dest = tmp_path / img.kind
        apply_layers(img.layer_paths(), dest)
        rootfs = os.fsencode(m.path / img.id / "rootfs")
        compared += _compare_trees(rootfs, os.fsencode(dest), f"{driver}/{img.kind}")
    assert compared > 200


def _drop_pages(root: bytes) -> None:
    """Drop the page cache of every regular file below ``root`` (the store's layer files; the
    files are only opened read-only: nothing in the store changes)."""
    for top, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(top, name)
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                os.fsync(fd)  # written pages are dropped only once clean
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def test_rootfs_read_in_listing_order_from_a_cold_store_equals_the_oracle(
    mount: tuple[Mount, str], real_stores: realstores.StoreSet, tmp_path: Path
) -> None:
    """``find | xargs cat``'s order (each directory's files in readdir order) with the layer
    files' pages dropped first, so that the reads miss the page cache and the read-ahead
    across files (imgfs/views/readahead.py) warms and hands over the next files: every file's
    bytes are the layers' applied in order."""
    m, driver = mount
    store = real_stores.store(driver)
    read = 0
    for img in _images(real_stores, driver):
        want = os.fsencode(tmp_path / img.kind)
        apply_layers(img.layer_paths(), Path(os.fsdecode(want)))
        _drop_pages(os.fsencode(store.root))
        rootfs = os.fsencode(m.path / img.id / "rootfs")
        for top, _dirs, files in os.walk(rootfs):
            for name in files:  # readdir order
                path = os.path.join(top, name)
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
                rel = os.path.relpath(path, rootfs)
                with open(path, "rb") as got, open(os.path.join(want, rel), "rb") as ref:
                    assert got.read() == ref.read(), f"{driver}/{img.kind}: {rel!r}"
                read += 1
    assert read > 100


def test_rootfs_awkward_semantics(
    mount: tuple[Mount, str], real_stores: realstores.StoreSet
) -> None:
    m, driver = mount
    root = m.path / real_stores.image(driver, "awkward").id / "rootfs" / "awkward"
    names = set(os.listdir(root))
    assert "gone.txt" not in names  # whiteout
    assert not any(n.startswith(".wh.") for n in names)
    assert sorted(os.listdir(root / "opq")) == ["new.txt"]  # removed and recreated
    st = os.lstat(root / "chardev")
    assert stat.S_ISCHR(st.st_mode)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    assert stat.S_ISFIFO(os.lstat(root / "fifo").st_mode)
    assert os.lstat(root / "hl-target").st_ino == os.lstat(root / "hl-link").st_ino
    assert os.lstat(root / "hl-link").st_nlink == 2  # dir/hl-link2 was deleted in layer 2
    assert os.getxattr(root / "xattr.txt", "user.imgfs") == b"hello"
    assert (root / realstores.LONG_PATH.split("/", 1)[1]).read_bytes().startswith(b"a path")
    with pytest.raises(OSError):
        os.open(root / "hello-renamed.txt", os.O_WRONLY)


# -- layers/ ------------------------------------------------------------------------------------


def _mtime_text(st: os.stat_result) -> str:
    return datetime.fromtimestamp(st.st_mtime_ns // 10**9, UTC).strftime("%Y-%m-%d %H:%M:%S")


def test_layers_equal_tar_listing(
    mount: tuple[Mount, str], real_stores: realstores.StoreSet
) -> None:
    m, driver = mount
    compared = 0
    for img in _images(real_stores, driver):
        layers = m.path / img.id / "layers"
        expected_dirs = [f"{n}-{d.split(':')[1]}" for n, d in enumerate(img.diff_ids)]
        assert sorted(os.listdir(layers)) == sorted(expected_dirs), img.kind
        for name, tar in zip(expected_dirs, img.layer_paths(), strict=True):
            compared += _compare_layer(os.fsencode(layers / name), tar, f"{img.kind}/{name}")
    assert compared > 100


def _compare_layer(root: bytes, tar: Path, what: str) -> int:
    listed = {os.path.normpath(e.name).lstrip(b"/"): e for e in tar_listing(tar)}
    listed.pop(b".", None)
    assert sorted(_walk(root)) == sorted(listed), what
    for rel, entry in listed.items():
        path = os.path.join(root, rel)
        st = os.lstat(path)
        where = f"{what}: {rel!r}"
        assert (st.st_uid, st.st_gid) == (entry.uid, entry.gid), where
        assert _mtime_text(st) == entry.mtime, where
        if entry.type == "h":
            assert entry.link is not None
            target = os.lstat(os.path.join(root, os.path.normpath(entry.link).lstrip(b"/")))
            assert (st.st_ino, st.st_nlink) == (target.st_ino, target.st_nlink), where
            assert st.st_nlink > 1, where
            continue
        assert stat.filemode(st.st_mode) == entry.type.replace("-", "-") + entry.perms, where
        if entry.type == "-":
            assert str(st.st_size) == entry.size, where
        elif entry.type == "l":
            assert os.readlink(path) == entry.link, where
        elif entry.type in "cb":
            assert f"{os.major(st.st_rdev)},{os.minor(st.st_rdev)}" == entry.size, where
    return len(listed)


def test_layer_file_contents_equal_tar_members(
    mount: tuple[Mount, str], real_stores: realstores.StoreSet
) -> None:
    m, driver = mount
    img = real_stores.image(driver, "crafted")
    assert img.crafted_tar is not None
    layer = m.path / img.id / "layers" / f"0-{img.diff_ids[0].split(':')[1]}"
    read = 0
    with tarfile.open(img.crafted_tar, encoding="utf-8", errors="surrogateescape") as tf:
        for member in tf:
            if member.isreg() and member.size:
                source = tf.extractfile(member)
                assert source is not None
                mine = layer / _clean_str(member.name)
                assert mine.read_bytes() == source.read(), member.name
                read += 1
    assert read > 10


def _clean_str(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


# -- oci/ ---------------------------------------------------------------------------------------


def _skopeo(*args: str) -> None:
    subprocess.run(["skopeo", "--insecure-policy", *args], check=True, capture_output=True)


def test_oci_layout_round_trips_through_skopeo(
    mount: tuple[Mount, str], real_stores: realstores.StoreSet, tmp_path: Path
) -> None:
    m, driver = mount
    copied = 0
    for img in _images(real_stores, driver):
        if img.config_digest is None:
            continue  # schema1: no oci/ (test_views_absent_for_lists_and_oci_for_schema1)
        layout = m.path / img.id / "oci"
        assert (layout / "oci-layout").read_bytes() == b'{"imageLayoutVersion":"1.0.0"}'
        index = json.loads((layout / "index.json").read_bytes())
        (desc,) = index["manifests"]
        manifest_bytes = (layout / "blobs" / "sha256" / desc["digest"].split(":")[1]).read_bytes()
        assert hashlib.sha256(manifest_bytes).hexdigest() == desc["digest"].split(":")[1]
        manifest = json.loads(manifest_bytes)
        assert [layer["digest"] for layer in manifest["layers"]] == img.diff_ids, img.kind
        assert {layer["mediaType"] for layer in manifest["layers"]} == {OCI_LAYER}
        out = tmp_path / f"{img.kind}-dir"
        _skopeo("copy", "-q", f"oci:{layout}", f"dir:{out}")
        for diff_id, want in zip(img.diff_ids, img.layer_paths(), strict=True):
            assert sha256_file(out / diff_id.split(":")[1]) == sha256_file(want), img.kind
        config = manifest["config"]["digest"].split(":")[1]
        assert (out / config).read_bytes() == img.config_raw
        assert (out / "manifest.json").read_bytes() == manifest_bytes
        _check_docker_archive(layout, tmp_path / f"{img.kind}.tar", img)
        copied += 1
    assert copied >= 8


def _check_docker_archive(layout: Path, out: Path, img: realstores.Image) -> None:
    _skopeo("copy", "-q", f"oci:{layout}", f"docker-archive:{out}")
    with tarfile.open(out) as tf:
        member = tf.extractfile("manifest.json")
        assert member is not None
        (entry,) = json.load(member)
        digests = []
        for name in entry["Layers"]:
            data = tf.extractfile(name)
            assert data is not None
            digests.append("sha256:" + hashlib.sha256(data.read()).hexdigest())
    assert digests == img.diff_ids, img.kind


def test_oci_manifest_matches_skopeo_serialization(
    mount: tuple[Mount, str], real_stores: realstores.StoreSet
) -> None:
    """Skopeo 1.9.3 (c/image 5.23) keeps compressed media types when it rewrites; with those
    decompressed, its manifest must equal ours byte for byte (same Go encoding)."""
    m, driver = mount
    checked = 0
    for img in _images(real_stores, driver):
        if (
            json.loads(img.inspect_raw).get("mediaType")
            != "application/vnd.oci.image.manifest.v1+json"
        ):
            continue
        assert img.oracle_dir is not None
        theirs = (img.oracle_dir / "manifest.json").read_bytes()
        for suffix in (b"+gzip", b"+zstd"):
            theirs = theirs.replace(OCI_LAYER.encode() + suffix, OCI_LAYER.encode())
        index = json.loads((m.path / img.id / "oci" / "index.json").read_bytes())
        hex_ = index["manifests"][0]["digest"].split(":")[1]
        assert (m.path / img.id / "oci" / "blobs" / "sha256" / hex_).read_bytes() == theirs
        checked += 1
    assert checked >= 8


def test_views_absent_for_lists_and_oci_for_schema1(
    mount: tuple[Mount, str], real_stores: realstores.StoreSet
) -> None:
    m, driver = mount
    listing = os.listdir(m.path / real_stores.image(driver, "mylist").id)
    assert not {"layers", "rootfs", "oci"} & set(listing)
    schema1 = os.listdir(m.path / real_stores.image(driver, "schema1").id)
    assert {"layers", "rootfs"} <= set(schema1)
    assert "oci" not in schema1, "DESIGN.md 1: no oci/ for schema 1 images"


def test_ls_lR_rootfs_timing(mount: tuple[Mount, str], real_stores: realstores.StoreSet) -> None:
    m, driver = mount
    img = real_stores.image(driver, "awkward-gzip")
    started = time.monotonic()
    subprocess.run(["ls", "-lR", str(m.path / img.id / "rootfs")], check=True, capture_output=True)
    assert time.monotonic() - started < 10


def test_colon_free_by_name_path_works_with_skopeo_oci(
    mount: tuple[Mount, str], real_stores: realstores.StoreSet, tmp_path: Path
) -> None:
    """skopeo reads ``:`` in ``oci:PATH`` as its own separator; the ``=`` twin has none."""
    m, driver = mount
    img, name = next(
        (i, n)
        for i in _images(real_stores, driver)
        if i.config_digest is not None
        for n in i.names
        if "@" not in n
        and os.path.realpath(m.path / "by-name" / n) == os.path.realpath(m.path / i.id)
    )
    twin = m.path / "by-name" / name.replace(":", "=")
    assert ":" not in str(twin.relative_to(m.path))
    assert os.path.realpath(twin) == os.path.realpath(m.path / img.id)
    assert twin.name not in os.listdir(twin.parent)  # looked up, not listed
    out = tmp_path / "dir"
    _skopeo("copy", "-q", f"oci:{twin}/oci", f"dir:{out}")
    for diff_id, want in zip(img.diff_ids, img.layer_paths(), strict=True):
        assert sha256_file(out / diff_id.split(":")[1]) == sha256_file(want)
