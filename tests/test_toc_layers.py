"""Crafted podman 5 layer kinds the tools here cannot make, following containers/storage:

- a composefs-style flat layout (pkg/chunked ``makeEntriesFlat``): ``diff/<2hex>/<62hex>``
  objects named by the content's sha256, the name map in the TOC big data
  ``zstd-chunked-manifest``, ``zstd-chunked-layer-data`` ``{"format":1}``; the tar-split names
  paths that are not in ``diff/``;
- a TOC-only layer (partial pull without tar-split under
  ``insecure_allow_unpredictable_image_contents``): empty ``diff-digest``, ``diff-size`` -1,
  ``expected-layer-diffid``, ``toc-digest``, no tar-split: its blob refused per layer, its
  ``rootfs/``/``layers/`` built from the TOC, file contents checked against the TOC's sha256;
- ``incomplete`` layers, ``diff-size`` -1 with a tar-split, the newer ``layers.json`` fields;
- one diff on two parents (``LayersByUncompressedDigest`` returns both): each image's own chain.

Stores are written by ``tests/storemaker.py`` (no tools needed); a real mount checks EIO.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import imgfs
from imgfs.errors import ImgfsError, LayerUnavailable, MalformedMetadata
from imgfs.layer.tree import LayerTree
from imgfs.store.files import big_data_file_name
from imgfs.store.records import parse_layers
from imgfs.store.toc import toc_tar_entries
from tests.layer_oracle import apply_layers
from tests.mounting import Mount, mounted
from tests.storemaker import StoreMaker
from tests.test_views import _compare_trees as compare_trees

DUP = b"the same content twice\n" * 50


def _tar(members: list[tuple[str, bytes | str | None]]) -> bytes:
    """name -> bytes (file), str (symlink target), None (directory); ``name@`` hardlinks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, value in members:
            ti = tarfile.TarInfo(name.rstrip("@"))
            ti.mtime, ti.uid, ti.gid, ti.mode = 1_700_000_000, 1000, 100, 0o644
            if value is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            elif name.endswith("@"):
                ti.type, ti.linkname = tarfile.LNKTYPE, str(value)
                tf.addfile(ti)
            elif isinstance(value, str):
                ti.type, ti.linkname = tarfile.SYMTYPE, value
                tf.addfile(ti)
            else:
                ti.size = len(value)
                tf.addfile(ti, io.BytesIO(value))
    return buf.getvalue()


BASE = _tar([
    ("etc", None), ("etc/a.conf", DUP), ("etc/b.conf", DUP), ("etc/empty", b""),
    ("usr", None), ("usr/bin", None), ("usr/bin/tool", os.urandom(70_000)),
    ("usr/bin/link@", "usr/bin/tool"), ("usr/bin/sym", "tool"), ("gone.txt", b"bye\n"),
])  # fmt: skip
TOP = _tar([("etc", None), ("etc/c.conf", DUP + b"!"), (".wh.gone.txt", b"")])


def _records(root: Path) -> list[dict[str, Any]]:
    value = json.loads((root / "overlay-layers/layers.json").read_text())
    assert isinstance(value, list)
    return value


def _edit_layer(root: Path, layer_id: str, **changes: Any) -> None:
    recs = _records(root)
    for rec in recs:
        if rec["id"] == layer_id:
            for key, value in changes.items():
                if value is None:
                    rec.pop(key, None)
                else:
                    rec[key] = value
    (root / "overlay-layers/layers.json").write_text(json.dumps(recs))


_TOC_TYPES = {
    tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo",
}  # fmt: skip


def _toc(tar: bytes) -> bytes:
    """The TOC c/storage's zstd:chunked writer makes of ``tar`` (pkg/chunked/internal/minimal
    ``FileMetadata``: omitempty fields, RFC 3339 times, base64 xattrs), big files split into
    ``chunk`` entries."""
    entries = []
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        for m in tf.getmembers():
            when = datetime.fromtimestamp(m.mtime, UTC)
            entry: dict[str, Any] = {
                "type": _TOC_TYPES.get(m.type, "reg"), "name": m.name, "linkName": m.linkname,
                "mode": m.mode, "uid": m.uid, "gid": m.gid,
                "modtime": when.isoformat().replace("+00:00", "Z"),
                "devMajor": m.devmajor if m.ischr() or m.isblk() else 0,
                "devMinor": m.devminor if m.ischr() or m.isblk() else 0,
                "xattrs": {
                    k.removeprefix("SCHILY.xattr."): base64.b64encode(
                        v.encode("utf-8", "surrogateescape")).decode()
                    for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")
                },
            }  # fmt: skip
            entries.append({k: v for k, v in entry.items() if v or k in ("type", "name")})
            if m.isfile() and m.size:
                data = tf.extractfile(m).read()  # type: ignore[union-attr]
                entries[-1] |= {"size": m.size, "digest": _sha(data)}
                if m.size > 4096:
                    entries[-1] |= {"chunkSize": 4096, "chunkDigest": _sha(data[:4096])}
                    entries.append(
                        {
                            "type": "chunk",
                            "name": m.name,
                            "chunkOffset": 4096,
                            "chunkSize": m.size - 4096,
                            "chunkDigest": _sha(data[4096:]),
                        }
                    )
    return json.dumps({"version": 1, "entries": entries}).encode()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _make_chunked(root: Path, layer_id: str, tar: bytes, *, flat: bool) -> None:
    """Give a layer the zstd:chunked big data of a partial pull; ``flat``: composefs layout."""
    big = root / "overlay-layers" / layer_id
    big.mkdir()
    toc = _toc(tar)
    (big / big_data_file_name("zstd-chunked-manifest")).write_bytes(toc)
    layer_data = json.dumps({"format": 1 if flat else 0}).encode()
    (big / big_data_file_name("zstd-chunked-layer-data")).write_bytes(layer_data)
    _edit_layer(
        root, layer_id,
        **{"toc-digest": "sha256:" + hashlib.sha256(toc).hexdigest(), "compression": 4,
           "uidset": [1000], "gidset": [100],
           "big-data-names": ["zstd-chunked-manifest", "zstd-chunked-layer-data"]},
    )  # fmt: skip
    if not flat:
        return
    diff = root / "overlay" / layer_id / "diff"
    flat_dir = diff.with_name("flat")
    flat_dir.mkdir()
    for entry in json.loads(toc)["entries"]:
        if entry["type"] == "reg" and entry.get("size"):
            hex_ = entry["digest"].split(":")[1]
            obj = flat_dir / hex_[:2] / hex_[2:]
            obj.parent.mkdir(exist_ok=True)
            if not obj.exists():
                shutil.copyfile(diff / entry["name"], obj)
    shutil.rmtree(diff)
    flat_dir.rename(diff)


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, StoreMaker]:
    maker = StoreMaker(tmp_path / "store")
    maker.add_image("localhost/flat:v1", [BASE, TOP])
    return maker.write(), maker


def _image(root: Path) -> imgfs.Image:
    return imgfs.Store.open(str(root), str(root.parent / "run"), "overlay").images()[0]


def _read(image: imgfs.Image, digest: str) -> bytes:
    with image.open_blob(digest) as f:
        return f.read()


def _both_modes(root: Path, tmp_path: Path) -> Iterator[Mount]:
    """A mount of ``root`` in snapshot mode, then one in ``--direct`` mode."""
    for extra in [(), ("--direct",)]:
        with mounted(
            root, root.parent / "run", "overlay", tmp_path / f"m{len(extra)}", *extra
        ) as m:
            yield m


def _applied(tmp_path: Path, layers: list[bytes]) -> Path:
    """The oracle: ``layers`` applied in order (tests/layer_oracle.py)."""
    oracle, tars = tmp_path / "oracle", []
    for n, tar in enumerate(layers):
        tars.append(tmp_path / f"{n}.tar")
        tars[-1].write_bytes(tar)
    apply_layers(tars, oracle)
    return oracle


def test_flat_layout_is_read_through_the_toc(
    store: tuple[Path, StoreMaker], tmp_path: Path, fuse_required: None
) -> None:
    root, maker = store
    made = maker.images[0]
    for layer_id, tar in zip(made.layers, [BASE, TOP], strict=True):
        _make_chunked(root, layer_id, tar, flat=True)
    diff = root / "overlay" / made.layers[0] / "diff"
    assert not (diff / "etc").exists()  # the tar-split's names are not in diff/
    assert len(list(diff.glob("*/*"))) == 3  # a.conf and b.conf share one object
    image = _image(root)
    assert [_read(image, d) for d in made.diff_ids] == [BASE, TOP]
    oracle = _applied(tmp_path, [BASE, TOP])
    for m in _both_modes(root, tmp_path):
        d = m.path / made.id
        for digest, tar in zip(made.diff_ids, [BASE, TOP], strict=True):
            try:
                assert (d / "blobs" / digest).read_bytes() == tar
            except OSError as exc:
                raise AssertionError(f"{exc}: {m.log()[-3000:]}") from exc
        assert compare_trees(os.fsencode(d / "rootfs"), os.fsencode(oracle), "flat") >= 9


def test_flat_layout_failures_name_the_cause(store: tuple[Path, StoreMaker]) -> None:
    root, maker = store
    made = maker.images[0]
    _make_chunked(root, made.layers[0], BASE, flat=True)
    image = _image(root)
    (obj,) = [p for p in (root / "overlay" / made.layers[0] / "diff").glob("*/*")
              if p.stat().st_size == 70_000]  # fmt: skip
    obj.unlink()
    with pytest.raises(ImgfsError, match=r"not found \(the flat layout.s object of b.usr/bin/tool"):
        _read(image, made.diff_ids[0])
    toc = root / "overlay-layers" / made.layers[0] / big_data_file_name("zstd-chunked-manifest")
    toc.unlink()
    with pytest.raises(ImgfsError, match=r"flat \(composefs\) layout but no TOC"):
        _read(_image(root), made.diff_ids[0])
    assert _read(_image(root), made.diff_ids[1]) == TOP  # the other layer is not affected


def _make_toc_only(
    root: Path, layer_id: str, tar: bytes, diff_id: str, *, flat: bool = False
) -> None:
    _make_chunked(root, layer_id, tar, flat=flat)
    (root / "overlay-layers" / f"{layer_id}.tar-split.gz").unlink()
    _edit_layer(
        root, layer_id,
        **{"diff-digest": "", "diff-size": -1, "compressed-diff-digest": None,
           "flags": {"expected-layer-diffid": diff_id}},
    )  # fmt: skip


def test_toc_only_layer_fails_alone_with_the_reason(
    store: tuple[Path, StoreMaker], tmp_path: Path, fuse_required: None
) -> None:
    root, maker = store
    made = maker.images[0]
    _make_toc_only(root, made.layers[1], TOP, made.diff_ids[1])
    image = _image(root)
    blobs = {b.digest: b for b in image.blobs()}
    assert blobs[made.diff_ids[1]].size == 0  # named (expected-layer-diffid), size unknown
    with pytest.raises(
        LayerUnavailable, match=r"known only by its TOC .*cannot be reproduced bit-exactly"
    ):
        _read(image, made.diff_ids[1])
    assert _read(image, made.diff_ids[0]) == BASE
    assert image.config() == made.config
    with mounted(root, root.parent / "run", "overlay", tmp_path / "m") as m:
        d = m.path / made.id
        assert (d / "blobs" / made.diff_ids[0]).read_bytes() == BASE
        with pytest.raises(OSError) as exc:
            (d / "blobs" / made.diff_ids[1]).read_bytes()
        assert exc.value.errno == errno.EIO
        assert "known only by its TOC" in m.log()
        # (its rootfs/ comes from the TOC: test_toc_only_layers_rootfs_and_layers_come_...)
        assert sorted(os.listdir(d / "rootfs")) == ["etc", "usr"]
        assert (d / "rootfs/etc/c.conf").read_bytes() == DUP + b"!"


def _rich_tar() -> bytes:
    """A top layer with what a TOC has to carry: modes, owners, xattrs, a FIFO, a device,
    links, a whiteout, a file in chunks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:

        def add(name: str, kind: bytes, data: bytes = b"", **fields: Any) -> None:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mtime, ti.mode, ti.size = kind, 1_700_000_123, 0o644, len(data)
            for key, value in fields.items():
                setattr(ti, key, value)
            tf.addfile(ti, io.BytesIO(data) if data else None)

        add("srv", tarfile.DIRTYPE, mode=0o750, uid=33, gid=44)
        add(
            "srv/secret",
            tarfile.REGTYPE,
            b"top secret\n",
            mode=0o710,
            uid=1234,
            gid=5678,
            pax_headers={"SCHILY.xattr.user.note": "kept", "SCHILY.xattr.user.bin": "\udcff"},
        )
        add("srv/big.bin", tarfile.REGTYPE, os.urandom(20_000), mode=0o4755)
        add("srv/fifo", tarfile.FIFOTYPE, mode=0o640)
        add("srv/null", tarfile.CHRTYPE, mode=0o620, devmajor=1, devminor=3)
        add("srv/link", tarfile.LNKTYPE, linkname="srv/secret", mode=0o710, uid=1234, gid=5678)
        add("srv/sym", tarfile.SYMTYPE, linkname="../etc/a.conf")
        add("srv/empty", tarfile.REGTYPE)
        add(".wh.gone.txt", tarfile.REGTYPE)
    return buf.getvalue()


def test_toc_only_layers_rootfs_and_layers_come_from_the_toc(
    tmp_path: Path, fuse_required: None
) -> None:
    """No tar-split: the blob stays refused, but ``rootfs/`` and ``layers/`` are built from the
    TOC (names, types, modes, owners, times, links, devices, xattrs, whiteouts), the contents
    from the diff directory (or its flat layout's objects), each checked against the TOC's
    sha256 when read."""
    rich = _rich_tar()
    maker = StoreMaker(tmp_path / "store")
    made = maker.add_image("localhost/toc:v1", [BASE, rich])
    root = maker.write()
    _make_toc_only(root, made.layers[0], BASE, made.diff_ids[0], flat=True)  # composefs layout
    _make_toc_only(root, made.layers[1], rich, made.diff_ids[1])
    oracle = _applied(tmp_path, [BASE, rich])
    for m in _both_modes(root, tmp_path):
        d = m.path / made.id
        try:
            got = compare_trees(os.fsencode(d / "rootfs"), os.fsencode(oracle), "toc-only")
        except OSError as exc:
            raise AssertionError(f"{exc}: {m.log()[-3000:]}") from exc
        assert got >= 15
        (top,) = [p for p in (d / "layers").iterdir() if p.name.startswith("1-")]
        assert sorted(os.listdir(top)) == [".wh.gone.txt", "srv"]
        assert (top / "srv/link").stat().st_ino == (top / "srv/secret").stat().st_ino
        assert (top / "srv/secret").stat().st_nlink == 2
        for digest in made.diff_ids:
            with pytest.raises(OSError) as exc:
                (d / "blobs" / digest).read_bytes()
            assert exc.value.errno == errno.EIO
    # A changed file of the same size fails its TOC digest; the other files are still served.
    target = root / "overlay" / made.layers[1] / "diff/srv/big.bin"
    target.write_bytes(b"\0" * target.stat().st_size)
    with mounted(root, root.parent / "run", "overlay", tmp_path / "m-bad") as m:
        rootfs = m.path / made.id / "rootfs"
        with pytest.raises(OSError) as exc:
            (rootfs / "srv/big.bin").read_bytes()
        assert exc.value.errno == errno.EIO
        assert "content digest sha256:" in m.log()
        assert (rootfs / "srv/secret").read_bytes() == b"top secret\n"


def test_toc_entries_keep_what_the_toc_says() -> None:
    """Fractional RFC 3339 times (the oracle applies whole seconds only), zones, chunks."""
    entries = [
        {"type": "reg", "name": "a", "size": 5000, "digest": _sha(b"x"), "mode": 0o100755,
         "uid": 7, "gid": 8, "modtime": "2023-11-14T22:13:20.123456789Z",
         "xattrs": {"user.k": base64.b64encode(b"\xff\x00v").decode()}},
        {"type": "chunk", "name": "a", "chunkOffset": 4096, "chunkSize": 904},
        {"type": "dir", "name": "d", "modtime": "2023-11-14T23:13:20+01:00"},
        {"type": "symlink", "name": "d/s", "linkName": "../a"},
    ]  # fmt: skip
    toc = json.dumps({"version": 1, "entries": entries}).encode()
    tree = LayerTree.build(toc_tar_entries(toc, "t"), "t")
    a = tree.member(tree.ref(b"a"))
    assert (a.size, a.mode, a.uid, a.gid) == (5000, 0o755, 7, 8)
    assert a.mtime_ns == 1_700_000_000_123_456_789
    assert a.xattrs == (("user.k", b"\xff\x00v"),)
    assert tree.member(tree.ref(b"d")).mtime_ns == 1_700_000_000 * 10**9
    assert tree.member(tree.ref(b"d/s")).linkname == b"../a"
    assert tree.member_count == 3
    with pytest.raises(MalformedMetadata, match="of type 'sock'"):
        LayerTree.build(toc_tar_entries(b'{"entries": [{"type": "sock", "name": "x"}]}', "t"), "t")


def test_diff_size_unknown_with_a_tar_split_is_refused(store: tuple[Path, StoreMaker]) -> None:
    root, maker = store
    made = maker.images[0]
    _edit_layer(root, made.layers[1], **{"diff-size": -1})
    image = _image(root)
    with pytest.raises(LayerUnavailable, match="uncompressed size is unknown"):
        _read(image, made.diff_ids[1])
    assert _read(image, made.diff_ids[0]) == BASE


def test_incomplete_layer_is_absent(store: tuple[Path, StoreMaker]) -> None:
    root, maker = store
    made = maker.images[0]
    _edit_layer(root, made.layers[1], flags={"incomplete": True})
    image = _image(root)
    assert image.manifest() == made.manifest
    with pytest.raises(LayerUnavailable, match=r"layer \w+ is incomplete"):
        image.layer_chain()
    _edit_layer(root, made.layers[1], flags={"incomplete": False})
    assert _read(_image(root), made.diff_ids[1]) == TOP  # a false flag is no flag


def test_one_diff_on_two_parents_is_served_from_each_images_chain(tmp_path: Path) -> None:
    maker = StoreMaker(tmp_path / "store")
    other_base = _tar([("other.txt", b"another base\n")])
    first = maker.add_image("localhost/first:v1", [BASE, TOP])
    second = maker.add_image("localhost/second:v1", [other_base, TOP])
    root = maker.write()
    assert first.layers[1] != second.layers[1]
    assert first.diff_ids[1] == second.diff_ids[1]
    (root / "overlay" / first.layers[1] / "diff/etc/c.conf").write_bytes(b"x" * len(DUP + b"!"))
    store = imgfs.Store.open(str(root), str(tmp_path / "run"), "overlay")
    good = store.image("localhost/second:v1")
    assert _read(good, second.diff_ids[1]) == TOP
    assert {b.layer_id for b in good.blobs() if b.kind == "layer"} == set(second.layers)
    with pytest.raises(ImgfsError, match="CRC"):
        _read(store.image("localhost/first:v1"), first.diff_ids[1])


def test_layer_record_fields_of_containers_storage_1_5x() -> None:
    toc = "sha256:" + "1" * 64
    diff = "sha256:" + "2" * 64
    items: list[object] = [
        {"id": "a" * 64, "diff-digest": diff, "toc-digest": toc, "diff-size": 10,
         "compression": 4, "uidset": [0, 1000], "gidset": [0], "flags": {},
         "big-data-names": ["zstd-chunked-manifest", "zstd-chunked-layer-data"]},
        {"id": "b" * 64, "diff-digest": "", "toc-digest": toc, "diff-size": -1,
         "flags": {"expected-layer-diffid": diff}},
        {"id": "c" * 64, "diff-digest": diff, "uidset": "bad", "compression": True,
         "flags": {"incomplete": True}},
        {"id": "d" * 64, "toc-digest": "sha256:zz", "diff-digest": diff},
    ]  # fmt: skip
    (a, b, c, d), skipped = parse_layers(items, "layers.json", "/x")
    assert skipped == []
    assert (a.toc_digest, a.compression, a.uids, a.gids) == (toc, 4, (0, 1000), (0,))
    assert a.big_data_names == ("zstd-chunked-manifest", "zstd-chunked-layer-data")
    assert not a.expected_diff_digest
    assert a.problem is None
    assert (b.diff_digest, b.diff_size, b.expected_diff_digest) == (diff, None, True)
    assert b.problem is None
    assert (c.incomplete, c.uids, c.compression, c.problem) == (True, (), None, None)
    assert d.problem is not None
    assert "toc-digest" in d.problem
