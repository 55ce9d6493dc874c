"""The image directories' cheap answers equal the full ones (issue 13, the 1000-image store).

A listing already built answers lookups and readlinks without its section; an image's listing
builds its small subdirectories' listings at once; a layer shared by several images is looked
up once per view; the config is read only when it is read, not when blobs are listed; the
``oci/`` layout is computed once per image. Each shortcut is compared with what a fresh view
(nothing cached) computes the long way, and with what the same view says after the content has
been read. Stores are made with buildah.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

import imgfs
from imgfs.store.image import Image
from imgfs.store.source import LayerSource
from imgfs.views.keys import ROOT, ByNameKey, ImageKey, Key, OciKey, RootfsKey, SectionKey
from imgfs.views.tree import TreeView, build_view
from tests import crafted, smallstore
from tests.test_crafted import _read

DRIVER = smallstore.DRIVER


@pytest.fixture(scope="session")
def shared_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``localhost/base:1`` (one layer) and ``localhost/top1:1``, ``localhost/top2:1`` on it
    (one more layer each): a base layer shared by two images, as in the 1000-image store."""
    base = tmp_path_factory.mktemp("shared")
    smallstore.commit_image(base, "base", "base\n" * 50)
    for name in ("top1", "top2"):
        src = base / f"{name}.txt"
        src.write_text(f"{name}\n")
        ctr = smallstore.buildah(base, "from", "localhost/base:1")
        smallstore.buildah(base, "copy", ctr, str(src), f"/{name}.txt")
        smallstore.buildah(base, "config", "--label", f"name={name}", ctr)
        smallstore.buildah(base, "commit", "-q", ctr, f"localhost/{name}:1")
        smallstore.buildah(base, "rm", ctr)
    return base / "root"


@pytest.fixture
def store(shared_base: Path, tmp_path: Path) -> Path:
    return crafted.copy_store(shared_base, tmp_path / "root")


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The layer IDs whose tar-split is opened, in order."""
    found: list[str] = []
    real = LayerSource.open_tarsplit

    def counting(self: LayerSource) -> int:
        found.append(self.layer_id)
        return real(self)

    monkeypatch.setattr(LayerSource, "open_tarsplit", counting)
    return found


def _view(root: Path) -> TreeView:
    return build_view(imgfs.Store.open(str(root), str(root.parent / "run"), DRIVER).images, 0)


def _id(view: TreeView, name: str) -> str:
    return next(i.id for i in view.images.values() if f"localhost/{name}:1" in i.names)


def _small_dirs(image: str) -> list[Key]:
    return [
        SectionKey(image, "signatures"),
        SectionKey(image, "blobs"),
        OciKey(image, ()),
        OciKey(image, (b"blobs",)),
        OciKey(image, (b"blobs", b"sha256")),
    ]


def _walk_keys(view: TreeView) -> list[Key]:
    """Every directory ``ls -lR -I layers -I rootfs`` lists, parents first."""
    found: list[Key] = []
    todo: list[Key] = [ROOT]
    while todo:
        key = todo.pop(0)
        found.append(key)
        for name, node in view.children(key):
            if node.kind == "dir" and name not in (b"layers", b"rootfs"):
                todo.append(node.key)
    return found


def test_a_listed_name_is_answered_as_its_section_would(store: Path) -> None:
    view = _view(store)
    dirs = _walk_keys(view)
    assert ByNameKey((b"localhost",)) in dirs
    assert ROOT in dirs
    checked = 0
    for parent in dirs:
        fresh = _view(store)  # nothing listed: every lookup goes to the section
        for name, listed in view.children(parent):
            peeked = view.peek_child(parent, name)
            if listed.provisional:  # rootfs/: only its key and kind are known, no peek
                assert (name, peeked) == (b"rootfs", None), parent
                real = fresh.lookup(parent, name)
                assert (real.key, real.kind, real.provisional) == (listed.key, "dir", False)
                assert view.peek(listed.key) is None  # a getattr computes the real node
                continue
            assert peeked is not None, (parent, name)
            assert peeked == listed == fresh.lookup(parent, name), (parent, name)
            # found in the listing by its key (getattr, opendir: no thread hop), not remembered
            assert view.peek(listed.key) == fresh.node(listed.key), (parent, name)
            if listed.kind == "link":  # readlink asks peek(key)
                assert view.peek(listed.key) == fresh.node(listed.key)
            checked += 1
    assert checked > 20
    assert view.peek_child(ROOT, b"no-such-image") is None  # unlisted: the section decides


def test_an_image_listing_builds_its_small_directories_once(store: Path) -> None:
    view = _view(store)
    image = _id(view, "top1")
    for key in _small_dirs(image):
        assert view.peek_children(key) is None
    view.children(ImageKey(image))
    for key in _small_dirs(image):
        built = view.peek_children(key)
        assert built is not None, key
        assert built == _view(store).children(key), key
        assert view.children(key) is built  # not built again
    assert view.peek_children(RootfsKey(image)) is None  # opened only when entered


def test_the_oci_layout_is_computed_once_and_matches_its_bytes(store: Path) -> None:
    view = _view(store)
    image = _id(view, "top2")
    listing = dict(view.children(OciKey(image, (b"blobs", b"sha256"))))
    layout = view.layout(view.image(image))
    assert view.layout(view.image(image)) is layout
    assert listing[layout.digest.encode()].size == len(layout.manifest)
    index = json.loads(_read(view, f"{image}/oci/index.json"))
    assert index["manifests"][0]["digest"] == f"sha256:{layout.digest}"
    assert index["manifests"][0]["size"] == len(layout.manifest)
    for name, node in listing.items():
        data = _read(view, f"{image}/oci/blobs/sha256/{name.decode()}")
        assert len(data) == node.size, name
    assert _view(store).layout(view.image(image)) == layout


def test_a_shared_base_layer_is_opened_once_per_view(store: Path, opened: list[str]) -> None:
    view = _view(store)
    tops = [_id(view, "top1"), _id(view, "top2")]
    for image in tops:
        view.lookup(ImageKey(image), b"rootfs")  # its attributes need the merged root
    base = view.content(view.image(tops[0])).sources[0].layer_id
    assert opened.count(base) == 1
    assert len(opened) == 3  # the base, and each top layer


def test_image_listings_are_built_ahead_in_root_order(store: Path) -> None:
    view = _view(store)
    order = sorted(view.images)
    first, rest = ImageKey(order[0]), [ImageKey(i) for i in order[1:]]
    assert all(view.peek_children(key) is None for key in rest)
    view.children(first)
    deadline = time.monotonic() + 30
    while any(view.peek_children(key) is None for key in rest) and time.monotonic() < deadline:
        time.sleep(0.05)
    for key in rest:
        assert view.peek_children(key) == _view(store).children(key), key


def test_rootfs_entry_is_the_same_before_and_after_its_content_is_read(store: Path) -> None:
    view = _view(store)
    image = _id(view, "top1")
    before = view.lookup(ImageKey(image), b"rootfs")
    names = [name for name, _ in view.children(RootfsKey(image))]
    assert b"top1.txt" in names
    assert b"base.txt" in names
    assert _read(view, f"{image}/rootfs/top1.txt") == b"top1\n"
    fresh = _view(store)
    fresh.children(RootfsKey(image))
    _read(fresh, f"{image}/rootfs/base.txt")
    assert before == view.node(RootfsKey(image)) == fresh.node(RootfsKey(image))
    assert before.mode is not None
    assert before.kind == "dir"


def test_an_image_listing_parses_no_layer_tree_and_its_rootfs_entry_is_provisional(
    store: Path, opened: list[str]
) -> None:
    view = _view(store)
    image = _id(view, "top1")
    listed = dict(view.children(ImageKey(image)))[b"rootfs"]
    assert opened == []  # an ls -lR that leaves rootfs/ out parses no layer
    assert listed.provisional
    assert listed.kind == "dir"
    assert listed.key == RootfsKey(image)
    assert view.peek_child(ImageKey(image), b"rootfs") is None  # a lookup must compute it
    looked_up = view.lookup(ImageKey(image), b"rootfs")
    assert not looked_up.provisional
    assert looked_up.mode is not None
    assert opened  # the lookup merged the image's root
    assert looked_up == _view(store).node(RootfsKey(image))
    assert view.peek_child(ImageKey(image), b"rootfs") == looked_up  # now known: no hop
    fresh = _view(store)  # (view may have listed top2 ahead already, provisionally)
    fresh.lookup(ImageKey(image), b"rootfs")
    assert dict(fresh.children(ImageKey(image)))[b"rootfs"] == looked_up  # merged: listed


def test_listing_blobs_reads_no_config_and_reading_it_checks_diff_ids(
    store: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    view = _view(store)
    image_id = _id(view, "top2")
    top_layer = crafted.layer_of(store, DRIVER, image_id)

    def other_diff_digest(layers: list[dict[str, object]]) -> list[dict[str, object]]:
        for layer in layers:
            if layer["id"] == top_layer:
                layer["diff-digest"] = "sha256:" + "e" * 64
        return layers

    crafted.edit_json(store / f"{DRIVER}-layers" / "layers.json", other_diff_digest)
    read: list[str] = []
    real = Image._read_big_data

    view = _view(store)
    image = view.images[image_id]

    def counting(self: Image, key: str) -> bytes:
        # Only this view's image: other views (earlier tests', on copies of this store with the
        # same IDs) may still be listing ahead in other threads.
        if self is image:
            read.append(key)
        return real(self, key)

    monkeypatch.setattr(Image, "_read_big_data", counting)
    with caplog.at_level(logging.WARNING, logger="imgfs.store.image"):
        for key in (ImageKey(image_id), *_small_dirs(image_id)):
            view.children(key)
        assert read == ["manifest"]
        assert "diff_ids differ" not in caplog.text
        config = _read(view, f"{image_id}/config.json")
    assert json.loads(config)["rootfs"]["diff_ids"]
    assert "diff_ids differ" in caplog.text
    assert image_id[:12] in caplog.text
