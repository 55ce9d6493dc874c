"""Sanity checks that the real_stores fixture built what realstores.py claims."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.mounting import sha256_file
from tests.realstores import (
    BIG_SIZE,
    DRIVERS,
    LONG_NAME,
    LONG_PATH,
    NON_UTF8_NAMES,
    Image,
    StoreSet,
    build_stores,
    images_json,
    jws_payload,
    source_hash,
)

EXPECTED_NAMES: dict[str, list[str]] = {
    "tiny": ["localhost/tiny:v1"],
    "awkward-stage1": ["localhost/awkward:stage1"],
    "awkward-stage2": ["localhost/awkward:stage2"],
    "awkward": ["localhost/awkward:v1"],
    "awkward-gzip": ["localhost/awkward:gzip"],
    "awkward-zstd": ["localhost/awkward:zstd"],
    "awkward-v2s2": ["localhost/awkward:v2s2"],
    "reimport-shared": ["localhost/reimport:gzip", "localhost/reimport:v1"],
    "signed": ["localhost/signed:v1"],
    "signed-gzip": ["localhost/signed:gzip"],
    "fromlist": ["localhost/fromlist:v1"],
    "mylist": ["localhost/mylist:v1"],
    "untagged": [],
    "crafted": ["localhost/crafted:v1"],
    "schema1": ["localhost/schema1:v1"],
}
# Images whose stored layers are uncompressed with plain descriptors: skopeo's dir: export keeps
# the stored manifest byte for byte (storage-format 9.2). All others are rewritten.
MANIFEST_KEPT = {
    "tiny",
    "awkward-stage1",
    "awkward-stage2",
    "awkward",
    "untagged",
    "signed",
    "crafted",
}
NO_ORACLE = {"mylist"}
DIR_VERSION = b"Directory Transport Version: 1.1\n"
EMPTY_LAYER = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4"
EMPTY_LAYER_BYTES = bytes.fromhex(
    "1f8b080000096e8800ff621805a360148c5800080000ffff2eafb5ef00040000"
)

params = pytest.mark.parametrize("driver", DRIVERS)


def _record(ss: StoreSet, img: Image) -> dict[str, Any]:
    records = [r for r in images_json(ss.store(img.driver)) if r["id"] == img.id]
    assert len(records) == 1, f"{img.kind}: {len(records)} records with ID {img.id}"
    return records[0]


def _layers_by_id(ss: StoreSet, driver: str) -> dict[str, dict[str, Any]]:
    data = json.loads(ss.store(driver).layers_json_path.read_bytes())
    return {rec["id"]: rec for rec in data}


def _chain(ss: StoreSet, img: Image) -> list[dict[str, Any]]:
    layers = _layers_by_id(ss, img.driver)
    out: list[dict[str, Any]] = []
    layer_id = _record(ss, img).get("layer")
    while layer_id:
        out.append(layers[layer_id])
        layer_id = layers[layer_id].get("parent")
    return out[::-1]


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path, encoding="utf-8", errors="surrogateescape") as tf:
        return tf.getmembers()


def test_build_time_and_isolation(real_stores: StoreSet) -> None:
    print(f"\nreal stores: built in {real_stores.build_seconds:.1f}s at {real_stores.base}")
    assert real_stores.build_seconds < 600
    # isolated = built in a private mount namespace (root + unshare); otherwise a note says so
    assert real_stores.isolated or real_stores.notes
    assert set(real_stores.stores) == set(DRIVERS)


@params
def test_every_kind_present(real_stores: StoreSet, driver: str) -> None:
    kinds = [img.kind for img in real_stores.images[driver]]
    assert sorted(kinds) == sorted(EXPECTED_NAMES)


@params
def test_images_json_names_and_digests(real_stores: StoreSet, driver: str) -> None:
    records = images_json(real_stores.store(driver))
    assert len(records) == len(EXPECTED_NAMES), "every image record is one the fixture describes"
    for img in real_stores.images[driver]:
        rec = _record(real_stores, img)
        assert sorted(rec.get("names") or []) == EXPECTED_NAMES[img.kind], img.kind
        assert sorted(img.names) == EXPECTED_NAMES[img.kind]
        digested = jws_payload(img.inspect_raw) if img.kind == "schema1" else img.inspect_raw
        assert img.manifest_digest == "sha256:" + hashlib.sha256(digested).hexdigest(), img.kind
        assert rec["big-data-digests"]["manifest"] == img.manifest_digest, img.kind
        assert len(img.id) == 64
        if img.config_digest is not None and img.kind != "mylist":
            assert img.id == img.config_digest.split(":")[1], "c/image: image ID = config hex"


@params
def test_oracle_dirs(real_stores: StoreSet, driver: str) -> None:
    for img in real_stores.images[driver]:
        if img.kind in NO_ORACLE:
            assert img.oracle_dir is None
            assert img.oracle_note
            continue
        assert img.oracle_dir is not None, img.kind
        assert img.oracle_dir.is_dir(), img.kind
        files = img.oracle_files()
        assert files["version"].read_bytes() == DIR_VERSION
        if img.kind == "schema1":
            continue  # test_schema1_image
        assert img.config_digest is not None
        manifest = json.loads(files["manifest.json"].read_bytes())
        assert manifest["config"]["digest"] == img.config_digest
        layer_digests = [ly["digest"] for ly in manifest["layers"]]
        assert layer_digests == img.diff_ids, f"{img.kind}: dir: layers are the uncompressed ones"
        blobs = {name for name in files if len(name) == 64}
        expected = {d.split(":")[1] for d in [img.config_digest, *img.diff_ids]}
        assert blobs == expected, img.kind
        for hexname in blobs:
            assert sha256_file(files[hexname]) == hexname, f"{img.kind}/{hexname}"
        assert files[img.config_digest.split(":")[1]].read_bytes() == img.config_raw
        if img.kind in MANIFEST_KEPT:
            assert files["manifest.json"].read_bytes() == img.inspect_raw, img.kind
        else:
            assert files["manifest.json"].read_bytes() != img.inspect_raw, img.kind
        sig_files = sorted(n for n in files if n.startswith("signature-"))
        if img.oracle_flags:
            assert sig_files == []
        else:
            assert [files[n].read_bytes() for n in sig_files] == img.expected_signatures


@params
def test_awkward_layers_have_awkward_members(real_stores: StoreSet, driver: str) -> None:
    img = real_stores.image(driver, "awkward")
    assert len(img.diff_ids) >= 3
    members = [m for p in img.layer_paths() for m in _members(p)]
    by_name = {os.fsencode(m.name): m for m in members}
    long_name = by_name[LONG_NAME.encode()]
    assert "path" in long_name.pax_headers, "long name stored as a PAX path record"
    assert len(LONG_PATH.encode()) > 255
    assert by_name[LONG_PATH.encode()].isfile()
    for raw in NON_UTF8_NAMES:
        with pytest.raises(UnicodeDecodeError):
            raw.decode("utf-8")
        assert by_name[raw].isfile()
    assert any(m.islnk() for m in members), "hardlink"
    assert by_name[b"awkward/rel-link"].issym()
    assert by_name[b"awkward/rel-link"].linkname == "f512"
    assert by_name[b"awkward/abs-link"].linkname == "/awkward/f1024"
    assert by_name[b"awkward/fifo"].isfifo()
    assert by_name[b"awkward/chardev"].ischr()
    assert by_name[b"awkward/blockdev"].isblk()
    assert by_name[b"awkward/big.bin"].size == BIG_SIZE > 3 * 1024 * 1024
    assert by_name[b"awkward/f512"].size == 512
    assert by_name[b"awkward/f1024"].size == 1024
    assert by_name[b"awkward/empty"].size == 0
    assert by_name[b"awkward/suid"].mode & stat.S_ISUID
    assert stat.S_IMODE(by_name[b"awkward/mode0000"].mode) == 0
    assert by_name[b"awkward/biguid"].uid == 3_000_000
    assert by_name[b"awkward/xattr.txt"].pax_headers.get("SCHILY.xattr.user.imgfs") == "hello"
    names = [m.name for m in members]
    assert "awkward/.wh.gone.txt" in names, "whiteout of a lower file"
    assert "awkward/.wh.layer2.txt" in names, "whiteout of a layer-2 file in layer 3"
    if driver == "overlay":
        assert "awkward/opq/.wh..wh..opq" in names, "opaque dir"
    else:
        assert "awkward/opq/.wh.a.txt" in names, "vfs: per-file whiteouts for the recreated dir"


@params
def test_awkward_variants(real_stores: StoreSet, driver: str) -> None:
    awk = real_stores.image(driver, "awkward")
    wanted = {
        "awkward-gzip": ("tar+gzip", 2),
        "awkward-zstd": ("tar+zstd", 4),
        "awkward-v2s2": ("tar.gzip", 2),
    }
    ids = {awk.id}
    for kind, (media_suffix, compression) in wanted.items():
        img = real_stores.image(driver, kind)
        ids.add(img.id)
        assert img.diff_ids[1:] == awk.diff_ids, "marker layer + the awkward layers"
        manifest = json.loads(img.inspect_raw)
        assert all(ly["mediaType"].endswith(media_suffix) for ly in manifest["layers"])
        assert [ly["digest"] for ly in manifest["layers"]] != img.diff_ids, "compressed digests"
        chain = _chain(real_stores, img)
        assert [rec["diff-digest"] for rec in chain] == img.diff_ids
        assert all(rec.get("compression") == compression for rec in chain), kind
        awk_layer_ids = {rec["id"] for rec in _chain(real_stores, awk)}
        assert not awk_layer_ids & {rec["id"] for rec in chain}, "same diff-digests, other layers"
    v2s2 = json.loads(real_stores.image(driver, "awkward-v2s2").inspect_raw)
    assert v2s2["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert len(ids) == 4, "distinct images"


@params
def test_reimport_shares_one_record(real_stores: StoreSet, driver: str) -> None:
    img = real_stores.image(driver, "reimport-shared")
    rec = _record(real_stores, img)
    assert json.loads(img.inspect_raw)["layers"][0]["mediaType"].endswith("+gzip")
    (old_digest,) = img.other_manifests
    assert f"manifest-{old_digest}" in rec["big-data-names"]
    assert f"manifest-{img.manifest_digest}" in rec["big-data-names"]
    assert rec["digest"] == old_digest, "the record's digest field is the stale first one"


@params
def test_signed_images(real_stores: StoreSet, driver: str) -> None:
    img = real_stores.image(driver, "signed")
    assert len(img.expected_signatures) == 2
    assert img.oracle_dir is not None
    assert (img.oracle_dir / "signature-1").is_file()
    rec = _record(real_stores, img)
    meta = json.loads(rec["metadata"])
    assert meta["signature-sizes"] == [len(s) for s in img.expected_signatures]
    for sig in img.expected_signatures:
        assert sig[0] in (0xA3, 0xC8, 0x90, 0x91, 0x92, 0xC4, 0x88, 0x89, 0xC2), "raw OpenPGP"
    gz = real_stores.image(driver, "signed-gzip")
    assert gz.oracle_flags == ["--remove-signatures"]
    assert gz.oracle_note is not None
    assert "invalidate signatures" in gz.oracle_note
    assert len(gz.expected_signatures) == 1
    assert json.loads(_record(real_stores, gz)["metadata"])["signature-sizes"] == [
        len(gz.expected_signatures[0])
    ]
    assert real_stores.gpg_public_keys is not None
    assert real_stores.gpg_public_keys.is_file()


@params
def test_manifest_list_image(real_stores: StoreSet, driver: str) -> None:
    img = real_stores.image(driver, "mylist")
    rec = _record(real_stores, img)
    assert "layer" not in rec
    assert "instances.json" in rec["big-data-names"]
    store = real_stores.store(driver)
    instances = json.loads(
        (store.root / f"{driver}-images" / img.id / "instances.json").read_bytes()
    )
    index = json.loads(img.inspect_raw)
    listed = {m["digest"] for m in index["manifests"]}
    assert len(listed) == 2
    assert listed <= set(instances)
    by_manifest = {i.manifest_digest: i for i in real_stores.images[driver]}
    assert {by_manifest[d].kind for d in listed} == {"tiny", "awkward"}
    assert img.diff_ids == []
    assert img.config_digest is None


@params
def test_image_pulled_from_list(real_stores: StoreSet, driver: str) -> None:
    img = real_stores.image(driver, "fromlist")
    assert img.list_digest is not None
    rec = _record(real_stores, img)
    assert f"manifest-{img.list_digest}" in rec["big-data-names"]
    index = json.loads(img.other_manifests[img.list_digest])
    entry = next(m for m in index["manifests"] if m["digest"] == img.manifest_digest)
    assert img.config_raw is not None
    assert entry["platform"]["architecture"] == json.loads(img.config_raw)["architecture"]
    assert len(index["manifests"]) == 2


@params
def test_untagged_and_crafted(real_stores: StoreSet, driver: str) -> None:
    untagged = real_stores.image(driver, "untagged")
    assert untagged.name is None
    assert untagged.names == []
    assert not _record(real_stores, untagged).get("names")
    crafted = real_stores.image(driver, "crafted")
    assert crafted.crafted_tar is not None
    data = crafted.crafted_tar.read_bytes()
    assert crafted.diff_ids == ["sha256:" + hashlib.sha256(data).hexdigest()]
    assert crafted.layer_paths()[0].read_bytes() == data
    assert data.endswith(b"trailing garbage after the end\n")


@params
def test_schema1_image(real_stores: StoreSet, driver: str) -> None:
    img = real_stores.image(driver, "schema1")
    stored = json.loads(img.inspect_raw)
    assert stored["schemaVersion"] == 1
    assert stored["signatures"], "signed (prettyjws)"
    assert "mediaType" not in stored
    throwaway = [
        json.loads(h["v1Compatibility"]).get("throwaway") is True for h in stored["history"]
    ]
    assert throwaway == [True, False, True, True, False]  # top first: CMD, ADD two, ..., ADD one
    blob_sums = [ly["blobSum"] for ly in stored["fsLayers"]]
    assert [b for b, e in zip(blob_sums, throwaway, strict=True) if e] == [EMPTY_LAYER] * 3
    assert [b for b, e in zip(blob_sums, throwaway, strict=True) if not e][::-1] == img.diff_ids
    assert len(img.diff_ids) == 2
    assert img.config_digest is None
    assert img.config_raw is None
    assert img.expected_signatures == []
    # c/image's digest is the JWS payload's (storage-format 4.4), not the file's
    payload_digest = "sha256:" + hashlib.sha256(jws_payload(img.inspect_raw)).hexdigest()
    assert img.manifest_digest == payload_digest
    assert img.manifest_digest != "sha256:" + hashlib.sha256(img.inspect_raw).hexdigest()
    rec = _record(real_stores, img)
    assert not [k for k in rec["big-data-names"] if k.startswith("sha256:")], "no config blob"
    assert rec["big-data-digests"][f"manifest-{img.manifest_digest}"] == img.manifest_digest
    chain = _chain(real_stores, img)
    assert [r["diff-digest"] for r in chain] == img.diff_ids, "only the real layers are stored"
    # the dir: export: re-signed manifest with the same payload, the empty layer, the layer tars
    assert img.oracle_dir is not None
    files = img.oracle_files()
    exported = files["manifest.json"].read_bytes()
    assert exported != img.inspect_raw, "c/image rewrites (and re-signs) schema1 on export"
    assert jws_payload(exported) == jws_payload(img.inspect_raw)
    blobs = {name for name in files if len(name) == 64}
    assert blobs == {d.split(":")[1] for d in [EMPTY_LAYER, *img.diff_ids]}
    assert files[EMPTY_LAYER.split(":")[1]].read_bytes() == EMPTY_LAYER_BYTES
    for layer in img.layer_paths():
        assert sha256_file(layer) == layer.name
    assert not [n for n in files if n.startswith("signature-")]
    members = {m.name for p in img.layer_paths() for m in _members(p)}
    assert {"schema1/one.txt", "schema1/two.txt"} <= members


def test_cached_build_is_reused(real_stores: StoreSet) -> None:
    marker = real_stores.base / ".complete"
    assert marker.read_text().strip() == source_hash()
    before = (real_stores.base / "storeset.json").stat().st_mtime_ns
    started = time.monotonic()
    again = build_stores(real_stores.base)
    assert time.monotonic() - started < 5
    assert again == real_stores
    assert (real_stores.base / "storeset.json").stat().st_mtime_ns == before
