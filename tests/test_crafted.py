"""Corrupt and hostile stores: a clear error naming the image or layer, never wrong or host bytes.

Each test copies a small store made by buildah and breaks it the way only a crafted store can
be broken; the library must raise the documented error, and a mount must fail only the
affected file with EIO while serving everything else.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

import imgfs
from imgfs.cache.layers import LayerBlobs
from imgfs.cache.trees import FileViews
from imgfs.views import oci as ocilayout
from imgfs.views.content import Inline, Streamed, release
from imgfs.views.tree import TreeView, build_view
from tests import crafted, smallstore
from tests.mounting import mounted

DRIVER = smallstore.DRIVER


@pytest.fixture(scope="session")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A buildah store with two one-layer images: ``localhost/a:1`` and ``localhost/b:1``."""
    base = tmp_path_factory.mktemp("small")
    for name, text in (("a", "alpha\n" * 100), ("b", "bravo\n" * 100)):
        smallstore.commit_image(base, name, text)
    return base


@pytest.fixture
def store(small_store: Path, tmp_path: Path) -> Path:
    return crafted.copy_store(small_store / "root", tmp_path / "root")


def _image_id(root: Path, name: str) -> str:
    images = json.loads((root / f"{DRIVER}-images" / "images.json").read_bytes())
    return str(next(i["id"] for i in images if f"localhost/{name}:1" in i["names"]))


def _open(root: Path) -> imgfs.Store:
    return imgfs.Store.open(str(root), str(root.parent / "run"), DRIVER)


def _layer_digest(root: Path, name: str) -> str:
    image = _open(root).image(f"localhost/{name}:1")
    return next(b.digest for b in image.blobs() if b.kind == "layer")


def _read_layer(root: Path, name: str) -> bytes:
    image = _open(root).image(f"localhost/{name}:1")
    with image.open_blob(_layer_digest(root, name)) as f:
        return f.read()


def _mutate_tarsplit(root: Path, name: str, change: object) -> None:
    layer = crafted.layer_of(root, DRIVER, _image_id(root, name))
    path = crafted.tarsplit_path(root, DRIVER, layer)
    entries = crafted.read_entries(path)
    assert callable(change)
    change(entries, crafted.content_dir(root, DRIVER, layer))
    crafted.write_entries(path, entries)


HOST_FILE = Path("/etc/passwd")


def _point_at_host(name: str) -> object:
    def change(entries: list[dict[str, object]], _content: Path) -> None:
        host = HOST_FILE.read_bytes()
        entry = crafted.first_file_entry(entries)
        entry.update(name=name, size=len(host), payload=crafted.crc_payload(host))

    return change


def test_unchanged_copy_reads_fine(store: Path) -> None:
    data = _read_layer(store, "a")
    assert b"alpha\n" * 100 in data


def test_missing_tarsplit_is_layer_unavailable(store: Path) -> None:
    layer = crafted.layer_of(store, DRIVER, _image_id(store, "a"))
    crafted.tarsplit_path(store, DRIVER, layer).unlink()
    with pytest.raises(imgfs.LayerUnavailable, match="tar-split"):
        _read_layer(store, "a")
    assert b"bravo" in _read_layer(store, "b")


def test_changed_file_content_fails_its_crc(store: Path) -> None:
    layer = crafted.layer_of(store, DRIVER, _image_id(store, "a"))
    target = crafted.content_dir(store, DRIVER, layer) / "a.txt"
    target.write_text("ALPHA\n" * 100)  # same size, other bytes
    with pytest.raises(imgfs.IntegrityError, match=layer[:12]):
        _read_layer(store, "a")


def test_changed_file_size_is_an_integrity_error(store: Path) -> None:
    layer = crafted.layer_of(store, DRIVER, _image_id(store, "a"))
    (crafted.content_dir(store, DRIVER, layer) / "a.txt").write_text("short")
    with pytest.raises(imgfs.IntegrityError):
        _read_layer(store, "a")


@pytest.mark.parametrize(
    "hostile",
    ["../../../../../../etc/passwd", "/etc/passwd", "a/../../../../../../../etc/passwd"],
)
def test_escaping_names_never_serve_host_bytes(store: Path, hostile: str) -> None:
    _mutate_tarsplit(store, "a", _point_at_host(hostile))
    with pytest.raises(imgfs.CorruptStore):
        _read_layer(store, "a")


def test_name_through_in_layer_symlink_to_host_is_refused(store: Path) -> None:
    def change(entries: list[dict[str, object]], content: Path) -> None:
        (content / "evil").symlink_to("/etc")
        _point_at_host("evil/passwd")(entries, content)

    _mutate_tarsplit(store, "a", change)
    with pytest.raises(imgfs.CorruptStore):
        _read_layer(store, "a")


def test_fifo_where_a_file_is_expected(store: Path) -> None:
    layer = crafted.layer_of(store, DRIVER, _image_id(store, "a"))
    target = crafted.content_dir(store, DRIVER, layer) / "a.txt"
    target.unlink()
    os.mkfifo(target)
    with pytest.raises(imgfs.CorruptStore):
        _read_layer(store, "a")


def test_truncated_images_json_keeps_the_intact_records(
    store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = store / f"{DRIVER}-images" / "images.json"
    records = json.loads(path.read_bytes())
    path.write_bytes(path.read_bytes()[:-20])
    ids = {image.id for image in _open(store).images()}
    assert ids == {r["id"] for r in records[:-1]}
    assert f"entry {len(records) - 1} is not JSON" in caplog.text


def test_invalid_layers_json_is_malformed(store: Path) -> None:
    (store / f"{DRIVER}-layers" / "layers.json").write_text('{"not": "a list"}')
    with pytest.raises(imgfs.MalformedMetadata, match=r"layers\.json"):
        _open(store).images()


def test_hostile_image_id_is_skipped(store: Path) -> None:
    path = store / f"{DRIVER}-images" / "images.json"
    crafted.edit_json(path, lambda items: [*items, {**items[0], "id": "../../etc"}])
    ids = {image.id for image in _open(store).images()}
    assert "../../etc" not in ids
    assert len(ids) == 2


def test_changed_manifest_fails_its_digest(store: Path) -> None:
    image_id = _image_id(store, "a")
    manifest = store / f"{DRIVER}-images" / image_id / "manifest"
    data = manifest.read_bytes()
    manifest.write_bytes(data.replace(b'"schemaVersion":2', b'"schemaVersion":3'))
    with pytest.raises(imgfs.IntegrityError, match=image_id[:12]):
        _open(store).image(image_id).manifest()


def test_signature_sizes_that_do_not_add_up(store: Path) -> None:
    image_id = _image_id(store, "a")
    path = store / f"{DRIVER}-images" / "images.json"

    def change(items: list[dict[str, object]]) -> list[dict[str, object]]:
        for item in items:
            if item["id"] == image_id:
                item["metadata"] = json.dumps({"signature-sizes": [10, 20]})
        return items

    crafted.edit_json(path, change)
    with pytest.raises(imgfs.CorruptStore, match=image_id[:12]):
        _open(store).image(image_id).signatures()


def test_mount_serves_other_images_when_one_is_broken(store: Path, tmp_path: Path) -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("FUSE is not available (/dev/fuse missing)")
    good = _layer_digest(store, "b")
    bad = _layer_digest(store, "a")
    _mutate_tarsplit(store, "a", _point_at_host("../../../../../../../etc/passwd"))
    with mounted(store, store.parent / "run", DRIVER, tmp_path / "m") as m:
        a, b = _image_id(store, "a"), _image_id(store, "b")
        with pytest.raises(OSError) as info:
            (m.path / a / "blobs" / bad).read_bytes()
        assert info.value.errno == errno.EIO
        assert HOST_FILE.read_bytes()[:64] not in (m.path / a / "manifest.json").read_bytes()
        assert b"bravo" in (m.path / b / "blobs" / good).read_bytes()
        assert (m.path / a / "manifest.json").read_bytes()  # the image itself still browses
        assert "etc/passwd" in m.log()


def test_tarsplit_longer_than_diff_size_stops_every_parser(store: Path) -> None:
    """Blob index (library, --direct), snapshot generation and the file views all refuse a
    tar-split that describes more than ``diff-size`` as soon as they get past it."""
    image_id = _image_id(store, "a")
    layer = crafted.layer_of(store, DRIVER, image_id)
    crafted.edit_json(
        store / f"{DRIVER}-layers" / "layers.json",
        lambda items: [{**i, "diff-size": 1536} if i["id"] == layer else i for i in items],
    )
    longer = f"{layer[:12]}.*more than the layer's diff-size of 1536 bytes"
    with pytest.raises(imgfs.IntegrityError, match=longer):
        _read_layer(store, "a")
    source = _open(store).image(image_id).layer_sources()[0]
    with pytest.raises(imgfs.IntegrityError, match=longer):
        FileViews().layer_tree(source)
    with pytest.raises(imgfs.IntegrityError, match=layer[:12]):
        LayerBlobs().produce(source, _NullSink())
    assert b"bravo" in _read_layer(store, "b")


class _NullSink:
    def write(self, data: bytes | memoryview) -> None:
        pass

    def publish(self, upto: int) -> None:
        pass


def _set_signature_sizes(store: Path, image_id: str, sizes: list[int]) -> None:
    crafted.edit_json(
        store / f"{DRIVER}-images" / "images.json",
        lambda items: [
            {**i, "metadata": json.dumps({"signature-sizes": sizes})} if i["id"] == image_id else i
            for i in items
        ],
    )


def _read(view: TreeView, path: str) -> bytes:
    """The whole content of the file at ``path`` (below the mount's root) through the view."""
    key = view.resolve(path.encode()).key
    content = view.open(key)
    try:
        if isinstance(content, Inline):
            return content.data
        assert isinstance(content, Streamed)
        return content.reader.read(0, content.reader.size)
    finally:
        release(view.caches, content)


def _names(view: TreeView, path: str) -> list[bytes]:
    return [name for name, _ in view.children(view.resolve(path.encode()).key)]


def _check_image_serves(view: TreeView, image: str, *, skip: str) -> None:
    """Everything of ``image`` outside ``skip`` lists and reads."""
    names = set(_names(view, image))
    assert {
        b"manifest.json",
        b"config.json",
        b"signatures",
        b"blobs",
        b"layers",
        b"rootfs",
        b"oci",
    } <= names
    assert _read(view, f"{image}/manifest.json")
    assert _read(view, f"{image}/config.json")
    assert _names(view, f"{image}/blobs")
    layer, *_ = _names(view, f"{image}/layers")
    assert _names(view, f"{image}/layers/{layer.decode()}") == [b"a.txt"]
    assert _read(view, f"{image}/rootfs/a.txt") == b"alpha\n" * 100
    if skip != "oci":
        assert _read(view, f"{image}/oci/index.json")
        assert _names(view, f"{image}/oci/blobs/sha256")
    if skip != "signatures":
        assert _names(view, f"{image}/signatures") == []


def test_bad_signature_sizes_fail_only_signatures(store: Path) -> None:
    image_id = _image_id(store, "a")
    _set_signature_sizes(store, image_id, [10, 20])
    view = build_view(_open(store).images, 0)
    _check_image_serves(view, image_id, skip="signatures")
    with pytest.raises(imgfs.CorruptStore, match=image_id[:12]):
        _names(view, f"{image_id}/signatures")
    with pytest.raises(imgfs.CorruptStore):
        view.resolve(f"{image_id}/signatures/signature-1".encode())
    assert view.resolve(f"{image_id}/signatures".encode()).kind == "dir"


def test_failing_layout_manifest_fails_only_oci(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_args: object) -> bytes:
        raise imgfs.MalformedMetadata("cannot rewrite the manifest")

    monkeypatch.setattr(ocilayout, "layout_manifest", fail)
    view = build_view(_open(store).images, 0)
    image = _image_id(store, "a")
    _check_image_serves(view, image, skip="oci")
    with pytest.raises(imgfs.MalformedMetadata):
        _read(view, f"{image}/oci/index.json")
    with pytest.raises(imgfs.MalformedMetadata):
        _names(view, f"{image}/oci/blobs/sha256")
    assert _read(view, f"{image}/oci/oci-layout")
