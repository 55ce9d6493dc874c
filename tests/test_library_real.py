"""The library (DESIGN.md §4) against real buildah/skopeo stores, skopeo as the oracle."""

from __future__ import annotations

import hashlib
import random

import pytest

import imgfs
import imgfs.store.manifest
from tests import realstores


def _open(stores: realstores.StoreSet, driver: str) -> imgfs.Store:
    s = stores.store(driver)
    return imgfs.Store.open(str(s.root), str(s.runroot), driver)


def _cases(stores: realstores.StoreSet) -> list[tuple[str, realstores.Image]]:
    return [(d, img) for d in stores.stores for img in stores.images[d]]


def test_every_image_is_listed_with_its_names(real_stores: realstores.StoreSet) -> None:
    for driver in real_stores.stores:
        store = _open(real_stores, driver)
        listed = {image.id: image for image in store.images()}
        for expected in real_stores.images[driver]:
            assert expected.id in listed, expected.kind
            assert list(listed[expected.id].names) == expected.names


def test_manifest_digest_config_and_signatures_equal_skopeo(
    real_stores: realstores.StoreSet,
) -> None:
    for driver, expected in _cases(real_stores):
        image = _open(real_stores, driver).image(expected.id)
        assert image.manifest() == expected.inspect_raw, expected.kind
        assert image.digest == expected.manifest_digest, expected.kind
        assert image.config() == expected.config_raw, expected.kind
        assert image.signatures() == expected.expected_signatures, expected.kind


def test_layer_blobs_equal_skopeo_dir_export(real_stores: realstores.StoreSet) -> None:
    checked = 0
    for driver, expected in _cases(real_stores):
        if expected.oracle_dir is None:
            continue
        image = _open(real_stores, driver).image(expected.id)
        blobs = {b.digest: b for b in image.blobs()}
        for diff_id, path in zip(expected.diff_ids, expected.layer_paths(), strict=True):
            want = path.read_bytes()
            assert blobs[diff_id].kind == "layer"
            assert blobs[diff_id].size == len(want)
            with image.open_blob(diff_id) as f:
                got = f.read()
            assert hashlib.sha256(got).hexdigest() == hashlib.sha256(want).hexdigest(), (
                expected.kind,
                diff_id,
            )
            checked += 1
    assert checked >= 10


def test_blob_list_names_config_layers_and_manifest(real_stores: realstores.StoreSet) -> None:
    for driver, expected in _cases(real_stores):
        image = _open(real_stores, driver).image(expected.id)
        kinds = {b.digest: b.kind for b in image.blobs()}
        assert kinds[expected.manifest_digest] == "manifest"
        if expected.config_digest is not None:
            assert kinds[expected.config_digest] == "config"
        for diff_id in expected.diff_ids:
            assert kinds[diff_id] == "layer"
        for digest in expected.other_manifests:
            assert kinds.get(digest) == "manifest", (expected.kind, digest)


def test_small_blobs_read_back_exactly(real_stores: realstores.StoreSet) -> None:
    for driver, expected in _cases(real_stores):
        image = _open(real_stores, driver).image(expected.id)
        for info in image.blobs():
            if info.kind == "layer":
                continue
            with image.open_blob(info.digest) as f:
                data = f.read()
            assert len(data) == info.size
            assert "sha256:" + hashlib.sha256(data).hexdigest() == info.digest or (
                info.kind == "manifest" and imgfs.store.manifest.digest_of(data) == info.digest
            )


def test_random_reads_equal_slices(real_stores: realstores.StoreSet) -> None:
    expected = real_stores.image("overlay", "awkward")
    image = _open(real_stores, "overlay").image(expected.id)
    rng = random.Random(7)
    for diff_id, path in zip(expected.diff_ids, expected.layer_paths(), strict=True):
        want = path.read_bytes()
        with image.open_blob(diff_id) as f:
            for _ in range(200):
                offset = rng.randrange(0, len(want) + 10)
                size = rng.choice([1, 511, 512, 513, 4096, 65536, 1 << 20])
                f.seek(offset)
                assert f.read(size) == want[offset : offset + size]


def test_lookup_by_name_prefix_and_digest(real_stores: realstores.StoreSet) -> None:
    store = _open(real_stores, "overlay")
    tiny = real_stores.image("overlay", "tiny")
    assert store.image("localhost/tiny:v1").id == tiny.id
    assert store.image(tiny.id[:12]).id == tiny.id
    assert store.image(f"localhost/tiny@{tiny.manifest_digest}").id == tiny.id
    with pytest.raises(imgfs.ImageNotFound):
        store.image("localhost/nope:v1")


def test_list_image_has_no_layers_but_its_manifests(real_stores: realstores.StoreSet) -> None:
    expected = real_stores.image("overlay", "mylist")
    image = _open(real_stores, "overlay").image(expected.id)
    kinds = [b.kind for b in image.blobs()]
    assert "layer" not in kinds
    assert kinds.count("manifest") >= 2  # the list and at least one instance manifest
    holders = dict(image.instances())
    assert real_stores.image("overlay", "tiny").id in holders.values()


def test_schema1_image_digest_layers_and_empty_layer(real_stores: realstores.StoreSet) -> None:
    """Signed schema1 (storage-format 4.4, 5.3, 11.14): JWS payload digest, no config, the
    throwaway entries served as the 32-byte gzipped empty layer exactly as skopeo exports it."""
    empty = imgfs.store.manifest.EMPTY_LAYER_DIGEST
    for driver in real_stores.stores:
        expected = real_stores.image(driver, "schema1")
        assert expected.oracle_dir is not None
        store = _open(real_stores, driver)
        image = store.image("localhost/schema1:v1")
        assert image.id == expected.id
        raw = image.manifest()
        assert raw == expected.inspect_raw
        payload_digest = "sha256:" + hashlib.sha256(realstores.jws_payload(raw)).hexdigest()
        assert image.digest == expected.manifest_digest == payload_digest
        assert image.digest != "sha256:" + hashlib.sha256(raw).hexdigest()
        assert store.image(f"localhost/schema1@{payload_digest}").id == expected.id
        assert image.parsed_manifest().media_type == imgfs.store.manifest.DOCKER_V2S1_SIGNED
        assert image.config() is None
        assert image.signatures() == []
        first, second = expected.diff_ids
        infos = image.layer_infos()
        assert [i.digest for i in infos] == [first, empty, empty, second, empty]
        assert [i.kind for i in infos] == [
            "layer",
            "empty-layer",
            "empty-layer",
            "layer",
            "empty-layer",
        ]
        blobs = {b.digest: b for b in image.blobs()}
        assert sorted(blobs) == sorted({empty, first, second, payload_digest})
        assert (blobs[empty].kind, blobs[empty].size) == ("empty-layer", 32)
        assert blobs[payload_digest].kind == "manifest"
        exported = expected.oracle_files()
        with image.open_blob(empty) as f:
            assert f.read() == exported[empty.split(":")[1]].read_bytes()
        with image.open_blob(payload_digest) as f:
            assert f.read() == raw
        for diff_id, path in zip(expected.diff_ids, expected.layer_paths(), strict=True):
            with image.open_blob(diff_id) as f:
                assert f.read() == path.read_bytes()
