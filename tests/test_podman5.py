"""Stores written by podman 5 (Debian 13's podman 5.4 / buildah 1.39 / skopeo 1.18), against
podman 5's own skopeo.

The stores (tests/podman5.py): buildah-made layers, zstd:chunked partial pulls from a loopback
registry (with and without ``convert_images``, and with
``insecure_allow_unpredictable_image_contents``: empty ``diff-digest``, ``expected-layer-diffid``),
and an ``imagestore`` store. Oracle: ``skopeo inspect --raw`` and ``skopeo copy
containers-storage:[overlay@graph+run]IMG dir:`` run in the trixie root. Compared: the library's
manifest, config and every blob byte for byte; a real mount in snapshot and ``--direct`` mode:
every ``blobs/`` file and ``rootfs/`` against the exported layers applied in order.

Skips with the reason when the trixie root cannot be built (not root, no debootstrap, no
network); a failure of the tools on a built root fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import imgfs
from imgfs.errors import LockBusy
from imgfs.store.locks import no_waiting
from tests.layer_oracle import apply_layers
from tests.mounting import Mount, mounted, sha256_file
from tests.podman5 import (
    ID_MAPS,
    P5Image,
    P5Store,
    P5Stores,
    build_podman5_stores,
    stores_dir_from_env,
)
from tests.test_views import _compare_trees as compare_trees
from tests.trixie import TrixieUnavailable

# The first use on a machine builds the trixie root (debootstrap: minutes, once).
pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(scope="session")
def p5(tmp_path_factory: pytest.TempPathFactory) -> P5Stores:
    base = stores_dir_from_env() or tmp_path_factory.mktemp("podman5")
    started = time.monotonic()
    try:
        stores = build_podman5_stores(base)
    except TrixieUnavailable as exc:
        pytest.skip(f"podman 5 stores need a Debian 13 root: {exc}")
    print(f"podman 5 stores ready in {time.monotonic() - started:.1f} s")
    return stores


@contextlib.contextmanager
def _store_env(st: P5Store) -> Iterator[None]:
    """The store's storage.conf with host paths (for the imagestore, which only it names)."""
    with pytest.MonkeyPatch.context() as mp:
        if st.imagestore is not None:
            conf = st.storage_conf.with_name("host-storage.conf")
            conf.write_text(
                f'[storage]\ndriver = "overlay"\ngraphroot = "{st.graphroot}"\n'
                f'runroot = "{st.runroot}"\nimagestore = "{st.imagestore}"\n'
            )
            mp.setenv("CONTAINERS_STORAGE_CONF", str(conf))
        yield


def _open(p5: P5Stores, img: P5Image) -> imgfs.Image:
    st = p5.stores[img.store]
    return imgfs.Store.open(str(st.graphroot), str(st.runroot), "overlay").image(img.id)


def _export_blobs(img: P5Image) -> dict[str, Path]:
    """digest -> file of the skopeo dir: export (config and layers)."""
    manifest = json.loads((img.export / "manifest.json").read_bytes())
    digests = [manifest["config"]["digest"]] + [d["digest"] for d in manifest["layers"]]
    return {d: img.export / d.split(":", 1)[1] for d in digests}


def _layer_paths(img: P5Image) -> list[Path]:
    manifest = json.loads((img.export / "manifest.json").read_bytes())
    return [img.export / d["digest"].split(":", 1)[1] for d in manifest["layers"]]


def test_the_stores_hold_the_podman5_layer_kinds(p5: P5Stores) -> None:
    """What the tools made is what this file claims to test (else the tests prove nothing)."""
    assert "podman version 5." in p5.versions

    def layers(store: str, where: str = "graph") -> list[dict[str, object]]:
        st = p5.stores[store]
        path = (st.graphroot if where == "graph" else st.imagestore) / "overlay-layers/layers.json"
        value = json.loads(path.read_text())
        assert isinstance(value, list)
        return value

    for rec in layers("partial"):
        assert rec["toc-digest"]
        assert rec["diff-digest"]
        uids = rec["uidset"]
        assert isinstance(uids, list)
        # layer 2 has files of 1234 and 4321; podman writes the set in Go map order
        assert sorted(uids) in ([0], [0, 1234, 4321])
        assert "zstd-chunked-manifest" in rec["big-data-names"]  # type: ignore[operator]
    for rec in layers("convert"):
        assert "zstd-chunked-manifest" in rec["big-data-names"]  # type: ignore[operator]
    for rec in layers("unpredictable"):
        assert not rec.get("diff-digest")
        assert rec["toc-digest"]
        assert rec["flags"]["expected-layer-diffid"]  # type: ignore[index]
    unpredictable = p5.image("unpredictable", "p5:zc")
    assert unpredictable.id != p5.image("partial", "p5:zc").id  # its ID comes from the TOCs
    st = p5.stores["imagestore"]
    assert st.imagestore is not None
    assert (st.imagestore / "overlay-images/images.json").is_file()
    assert not (st.graphroot / "overlay-images/images.json").exists()
    ids = [rec["id"] for rec in layers("imagestore")]
    assert all((st.imagestore / "overlay" / str(i) / "diff").is_dir() for i in ids)
    assert all((st.graphroot / "overlay-layers" / f"{i}.tar-split.gz").is_file() for i in ids)


def test_library_serves_what_podman5_skopeo_exports(p5: P5Stores) -> None:
    compared = 0
    for img in p5.images:
        with _store_env(p5.stores[img.store]):
            image = _open(p5, img)
            what = f"{img.store}/{img.ref}"
            assert image.manifest() == img.raw_manifest, what
            offered = {b.digest for b in image.blobs()}
            for digest, path in _export_blobs(img).items():
                assert digest in offered, what
                with image.open_blob(digest) as f:
                    got = hashlib.sha256(f.read()).hexdigest()
                assert f"sha256:{got}" == digest, what
                assert got == hashlib.sha256(path.read_bytes()).hexdigest(), what
                compared += 1
            layer_blobs = [b.digest for b in image.blobs() if b.kind == "layer"]
            assert layer_blobs == list(img.diff_ids), what
    assert compared >= 2 * len(p5.images)


@pytest.mark.fuse_required
@pytest.mark.parametrize("mode", ["snapshot", "direct"])
def test_mounts_serve_what_podman5_skopeo_exports(p5: P5Stores, mode: str, tmp_path: Path) -> None:
    extra = ("--direct",) if mode == "direct" else ()
    checked = 0
    for name, st in p5.stores.items():
        images = [i for i in p5.images if i.store == name]
        with (
            _store_env(st),
            mounted(st.graphroot, st.runroot, "overlay", tmp_path / name, *extra) as m,
        ):
            for img in images:
                checked += _check_mounted(m, img, tmp_path / "oracle" / name / img.ref)
    assert checked >= 20 * len(p5.images)


def _check_mounted(m: Mount, img: P5Image, oracle: Path) -> int:
    what = f"{img.store}/{img.ref}"
    d = m.path / img.id
    assert (d / "manifest.json").read_bytes() == img.raw_manifest, what
    for digest, path in _export_blobs(img).items():
        blob = d / "blobs" / digest
        assert blob.stat().st_size == path.stat().st_size, what
        assert sha256_file(blob) == sha256_file(path), f"{what}: {digest}: {m.log()[-2000:]}"
    if not oracle.exists():
        apply_layers(_layer_paths(img), oracle)
    return compare_trees(os.fsencode(d / "rootfs"), os.fsencode(oracle), what)


def _records(root: Path, kind: str) -> list[dict[str, Any]]:
    value = json.loads((root / f"overlay-{kind}" / f"{kind}.json").read_text())
    assert isinstance(value, list)
    return value


def test_the_idmapped_store_holds_idmapped_copies(p5: P5Stores) -> None:
    """What drivers/overlay's ``UpdateLayerIDMap`` made: per mapping a layer with the top
    layer's parent, digests and tar-split, its files chowned into ``diff1``, ``diff`` empty."""
    root = p5.stores["idmapped"].graphroot
    layers = {rec["id"]: rec for rec in _records(root, "layers")}
    image = next(i for i in _records(root, "images") if i["id"] == p5.image("idmapped", "p5:gz").id)
    top = layers[image["layer"]]
    mapped = [layers[i] for i in image["mapped-layers"]]
    assert sorted(m["uidmap"][0]["host_id"] for m in mapped) == sorted(ID_MAPS)
    top_link = (root / "overlay" / top["id"] / "link").read_text()
    tarsplit = root / "overlay-layers" / f"{top['id']}.tar-split.gz"
    for rec in mapped:
        assert rec["parent"] == top["parent"]
        assert rec["diff-digest"] == top["diff-digest"]
        assert rec["gidmap"] == rec["uidmap"]
        d = root / "overlay" / rec["id"]
        assert os.listdir(d / "diff") == []
        assert (d / "lower").read_text().split(":")[0] == f"l/{top_link}"
        host = rec["uidmap"][0]["host_id"]
        assert (d / "diff1/srv/new/hello.txt").stat().st_uid == host  # chowned copy-up
        assert (d / "diff1/etc/secret").stat().st_uid == host + 1234
        assert (d / "diff1/usr/lib/big.bin").stat().st_uid == host  # from the base layer too
        copy = root / "overlay-layers" / f"{rec['id']}.tar-split.gz"
        assert copy.read_bytes() == tarsplit.read_bytes()
    commit = next(i for i in _records(root, "images") if "localhost/p5:mapcommit" in i["names"])
    chain = []
    layer_id = commit["layer"]
    while layer_id:
        chain.append(layer_id)
        layer_id = layers[layer_id].get("parent")
    assert top["id"] in chain
    assert not {m["id"] for m in mapped} & set(chain)


def test_idmapped_copies_are_not_the_images_layers(p5: P5Stores) -> None:
    """The image's blobs come from its own chain (``layer``, then parents), never from an
    ID-mapped copy with the same digest and parent (whose ``diff`` is empty)."""
    root = p5.stores["idmapped"].graphroot
    img = p5.image("idmapped", "p5:gz")
    rec = next(i for i in _records(root, "images") if i["id"] == img.id)
    sources = _open(p5, img).layer_sources()
    assert sources[-1].layer_id == rec["layer"]
    assert not {s.layer_id for s in sources} & set(rec["mapped-layers"])


def test_the_forcemask_stores_keep_the_real_stat_in_an_xattr(p5: P5Stores) -> None:
    """force_mask: every file stored as mode 0700 (a device or FIFO as a regular file), the
    tar's owner and mode in ``user.containers.override_stat``."""
    for name in ("forcemask", "forcemask-zc"):
        root = p5.stores[name].graphroot
        top = _open(p5, p5.image(name, f"p5:{'zc' if name.endswith('zc') else 'gz'}"))
        diff = root / "overlay" / top.layer_sources()[-1].layer_id / "diff"
        for rel, real in (
            ("etc/secret", "1234:5678:0000:file"),
            ("srv/closed", "0:0:0000:dir"),
            ("srv/new/null", "0:0:0620:char-1-3"),
            ("srv/new/fifo", "0:0:0640:pipe"),
            # pkg/chunked drops the setuid bit here (``fs.FileMode(r.Mode)`` has no
            # ModeSetuid): what a reader of the xattr would get wrong, the tar header not
            ("srv/new/suid", "0:0:0755:file" if name.endswith("zc") else "0:0:4755:file"),
        ):
            st = os.lstat(diff / rel)
            assert stat.S_IMODE(st.st_mode) == 0o700, (name, rel, oct(st.st_mode))
            assert stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode), (name, rel)
            value = os.getxattr(diff / rel, "user.containers.override_stat", follow_symlinks=False)
            assert value.decode() == real, (name, rel, value)


def _hold_lock(path: Path) -> subprocess.Popen[bytes]:
    """Another process holding ``path`` the way a c/storage writer does (fcntl write lock)."""
    code = (
        "import fcntl, sys, time; f = open(sys.argv[1], 'r+'); fcntl.lockf(f, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"locked\n"
    return proc


def test_imagestore_layer_reads_take_both_layers_locks(p5: P5Stores) -> None:
    """c/storage's layer store of a store with an ``imagestore`` holds the graph root's and
    the image store's ``layers.lock`` (graph root's first): a writer holding either one
    keeps imgfs from opening the layer's tar-split or files."""
    st = p5.stores["imagestore"]
    assert st.imagestore is not None
    with _store_env(st):
        image = _open(p5, p5.image("imagestore", "p5:zc"))
        source = image.layer_sources()[-1]
        graph_lock = st.graphroot / "overlay-layers/layers.lock"
        image_lock = st.imagestore / "overlay-layers/layers.lock"
        for held in (graph_lock, image_lock):
            writer = _hold_lock(held)
            try:
                with no_waiting(), pytest.raises(LockBusy):
                    source.open_tarsplit()
                with no_waiting(), pytest.raises(LockBusy):
                    image.layer_sources()[0].open_file(b"etc/motd", 20)
            finally:
                writer.kill()
                writer.wait()
        os.close(source.open_tarsplit())
        assert [f.path for f in source.locks] == [str(graph_lock), str(image_lock)]
