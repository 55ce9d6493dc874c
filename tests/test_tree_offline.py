"""The mounted tree and the content API on a store written without buildah (tests/storemaker).

Kernel-free: names, ``..`` of every node, links, hardlinks, whiteouts, the colon-free by-name
twin, and every file's bytes through ``TreeView.open`` equal what went into the store.
"""

from __future__ import annotations

import hashlib
import stat
from datetime import datetime
from pathlib import Path

import pytest

import imgfs
from imgfs.layer import tree as layer_tree
from imgfs.views.content import Caches, Inline, Streamed, release
from imgfs.views.keys import ROOT, ImageKey, Key, RootfsKey
from imgfs.views.node import Node
from imgfs.views.rootfs import RootFS
from imgfs.views.tree import TreeView, build_view
from tests import storemaker
from tests.tarsplit_maker import make_tar

BASE = make_tar(
    [
        ("etc", None),
        ("etc/hostname", b"base\n"),
        ("etc/gone", b"to be deleted\n"),
        ("opt", None),
        ("opt/keep", b"kept\n"),
        ("link", "->etc/hostname"),
        ("big", bytes(range(256)) * 4096),
    ]
)
TOP = make_tar(
    [
        ("etc", None),
        ("etc/.wh.gone", b""),
        ("etc/hostname", b"top\n"),
        ("etc/hard", "=>etc/hostname"),
        ("opt", None),
        ("opt/.wh..wh..opq", b""),
        ("opt/new", b"new\n"),
    ]
)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> storemaker.StoreMaker:
    maker = storemaker.StoreMaker(tmp_path_factory.mktemp("offline") / "root")
    maker.add_image("localhost/app:v2", [BASE, TOP])
    maker.add_image("localhost:5000/other/thing:latest", [BASE])
    maker.write()
    return maker


@pytest.fixture
def view(made: storemaker.StoreMaker, tmp_path: Path) -> TreeView:
    store = imgfs.Store.open(str(made.root), str(tmp_path / "run"), storemaker.DRIVER)
    return build_view(store.images, 0, Caches.build(None))


def _read(view: TreeView, path: str) -> bytes:
    content = view.open(view.resolve(path.encode()).key)
    try:
        if isinstance(content, Inline):
            return content.data
        assert isinstance(content, Streamed)
        return content.reader.read(0, content.reader.size + 1)
    finally:
        release(view.caches, content)


def _names(view: TreeView, path: str) -> list[bytes]:
    return [name for name, _ in view.children(view.resolve(path.encode()).key)]


def _walk(view: TreeView, key: Key, seen: list[tuple[Key, Node]]) -> None:
    for _, child in view.children(key):
        seen.append((key, child))
        if child.kind == "dir":
            _walk(view, child.key, seen)


def test_root_and_image_listing(view: TreeView, made: storemaker.StoreMaker) -> None:
    app, other = made.images
    assert sorted(_names(view, "")) == sorted([app.id.encode(), other.id.encode(), b"by-name"])
    names = _names(view, app.id)
    assert names == [
        b"manifest.json", b"config.json", b"signatures", b"blobs", b"layers", b"rootfs", b"oci"
    ]  # fmt: skip
    assert _read(view, f"{app.id}/manifest.json") == app.manifest
    assert _read(view, f"{app.id}/config.json") == app.config
    assert _names(view, f"{app.id}/signatures") == []


def test_dotdot_of_every_directory_is_its_parent(
    view: TreeView, made: storemaker.StoreMaker
) -> None:
    seen: list[tuple[Key, Node]] = []
    _walk(view, ROOT, seen)
    dirs = [(parent, node) for parent, node in seen if node.kind == "dir"]
    assert len(dirs) > 30
    for parent, node in dirs:
        assert view.lookup(node.key, b"..").key == parent, node.key
        assert view.lookup(node.key, b".").key == node.key
    assert view.lookup(ROOT, b"..").key == ROOT
    assert view.lookup(ImageKey(made.images[0].id), b"..").key == ROOT


def test_every_file_reads_what_went_in(view: TreeView, made: storemaker.StoreMaker) -> None:
    app, _ = made.images
    blobs = _names(view, f"{app.id}/blobs")
    for digest in blobs:
        data = _read(view, f"{app.id}/blobs/{digest.decode()}")
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest.decode()
    assert {f"sha256:{hashlib.sha256(t).hexdigest()}".encode() for t in (BASE, TOP)} <= set(blobs)
    assert _read(view, f"{app.id}/rootfs/etc/hostname") == b"top\n"
    assert _read(view, f"{app.id}/rootfs/big") == bytes(range(256)) * 4096
    assert _read(view, f"{app.id}/rootfs/opt/new") == b"new\n"
    layer0, layer1 = _names(view, f"{app.id}/layers")
    assert _read(view, f"{app.id}/layers/{layer0.decode()}/etc/gone") == b"to be deleted\n"
    assert b".wh.gone" in _names(view, f"{app.id}/layers/{layer1.decode()}/etc")


def test_whiteouts_opaque_dirs_links_and_hardlinks(
    view: TreeView, made: storemaker.StoreMaker
) -> None:
    app, _ = made.images
    assert sorted(_names(view, f"{app.id}/rootfs/etc")) == [b"hard", b"hostname"]
    assert _names(view, f"{app.id}/rootfs/opt") == [b"new"]
    link = view.resolve(f"{app.id}/rootfs/link".encode())
    assert (link.kind, link.target) == ("link", b"etc/hostname")
    hard = view.resolve(f"{app.id}/rootfs/etc/hard".encode())
    host = view.resolve(f"{app.id}/rootfs/etc/hostname".encode())
    assert hard.key == host.key
    assert hard.nlink == 2


def test_by_name_links_and_their_colon_free_twins(
    view: TreeView, made: storemaker.StoreMaker
) -> None:
    app, other = made.images
    assert _names(view, "by-name") == [b"localhost", b"localhost:5000"]
    assert _names(view, "by-name/localhost") == [b"app:v2"]
    for path in ("by-name/localhost/app:v2", "by-name/localhost/app=v2"):
        node = view.resolve(path.encode())
        assert (node.kind, node.target) == ("link", f"../../{app.id}".encode())
    twin = view.resolve(b"by-name/localhost=5000/other/thing=latest")
    assert twin.target == f"../../../{other.id}".encode()
    with pytest.raises(imgfs.NotFound):
        view.resolve(b"by-name/localhost/app=v3")


def test_unique_prefix_is_a_link_and_unknown_names_are_not_found(
    view: TreeView, made: storemaker.StoreMaker
) -> None:
    app, _ = made.images
    node = view.lookup(ROOT, app.id[:12].encode())
    assert (node.kind, node.target) == ("link", app.id.encode())
    for bad in (b"nope", b"..x", app.id[:12].upper().encode()):
        with pytest.raises(imgfs.NotFound):
            view.lookup(ROOT, bad)
    with pytest.raises(imgfs.NotFound):
        view.resolve(f"{app.id}/rootfs/etc/nothing".encode())
    with pytest.raises(imgfs.NotFound):
        view.resolve(f"{app.id}/layers/9-abc".encode())


def test_directory_links_and_the_roots_the_tars_do_not_name(
    view: TreeView, made: storemaker.StoreMaker
) -> None:
    """``layers/`` directories count 2 + their subdirectories, ``rootfs/`` directories show 1
    (subdirectories not counted: no merge of each subdirectory of a listing); a layer root no
    tar names shows 0555 and the layer's creation time, as ``podman image mount`` does."""
    app, _ = made.images
    created = datetime.fromisoformat(storemaker.CREATED.replace("Z", "+00:00").replace(
        ".123456789", ".123456"
    ))  # fmt: skip
    for path, nlink in (
        (f"{app.id}/rootfs", 1),
        (f"{app.id}/layers/{_names(view, f'{app.id}/layers')[0].decode()}", 2 + 2),  # etc/, opt/
    ):
        root = view.resolve(path.encode())
        assert root.mode == stat.S_IFDIR | 0o555, path
        assert abs(root.mtime_ns - created.timestamp() * 1e9) < 1e6, path
        assert root.nlink == nlink, path
    assert view.resolve(f"{app.id}/rootfs/etc".encode()).nlink == 1
    assert view.resolve(f"{app.id}/rootfs/etc/hostname".encode()).nlink == 2  # + etc/hard
    assert view.resolve(f"{app.id}/rootfs/big".encode()).nlink == 1


def test_listings_merge_only_the_directory_listed(
    view: TreeView, made: storemaker.StoreMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image directory's listing merges nothing (its ``rootfs/`` entry needs no merged
    root), and a ``rootfs/`` listing merges that directory, not each of its subdirectories."""
    app, _ = made.images
    merged: list[bytes] = []
    merge = RootFS._merge

    def counted(fs: RootFS, path: bytes, sources: tuple[int, ...]) -> dict[bytes, object]:
        merged.append(path)
        return merge(fs, path, sources)  # type: ignore[return-value]

    monkeypatch.setattr(RootFS, "_merge", counted)
    names = [name for name, _ in view.children(ImageKey(app.id))]
    assert b"rootfs" in names
    assert merged == []
    listing = dict(view.children(RootfsKey(app.id, b"")))
    assert {b"etc", b"opt"} <= set(listing)
    assert listing[b"etc"].kind == "dir"
    assert merged == [b""]
    view.children(RootfsKey(app.id, b"etc"))
    assert merged == [b"", b"etc"]


def _listed(view: TreeView, path: bytes, out: dict[bytes, Node]) -> None:
    for name, child in view.children(view.resolve(path).key):
        out[path + b"/" + name] = child
        if child.kind == "dir":
            _listed(view, path + b"/" + name, out)


def _shown(node: Node) -> tuple[object, ...]:
    where = node.origin
    return (
        node.key, node.kind, node.size, node.mtime_ns, node.target, node.stable, node.xattrs,
        node.mode, node.uid, node.gid, node.nlink, node.rdev,
        None if where is None else (where.layer, where.ref, where.tree() is not None),
    )  # fmt: skip


@pytest.mark.parametrize("span", [1, 700, 1 << 20])
def test_listed_nodes_equal_the_nodes_of_lookups(
    made: storemaker.StoreMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, span: int
) -> None:
    """A listing builds its nodes in one pass (members parsed in tar order, their headers read
    in spans of SPAN_BYTES): each equals the node a lookup of its path builds in a new view."""
    monkeypatch.setattr(layer_tree, "SPAN_BYTES", span)
    store = imgfs.Store.open(str(made.root), str(tmp_path / "run"), storemaker.DRIVER)
    app, _ = made.images
    listed: dict[bytes, Node] = {}
    for section in (b"rootfs", b"layers"):
        _listed(build_view(store.images, 0, Caches.build(None)), f"{app.id}/".encode() + section,
                listed)  # fmt: skip
    assert len(listed) > 20
    assert any(node.nlink == 2 for node in listed.values())  # the hardlink pair
    assert any(node.origin is not None for node in listed.values())
    for path, node in listed.items():
        looked_up = build_view(store.images, 0, Caches.build(None)).resolve(path)
        assert _shown(looked_up) == _shown(node), path


def test_a_rootfs_listing_keeps_its_nodes_once(made: storemaker.StoreMaker, tmp_path: Path) -> None:
    """A rootfs/ listing's nodes are found through the listing the view keeps (``peek`` of
    each path, and of a hardlinked file's own key), and its members are not also kept in the
    layer trees' member caches (they would only evict others)."""
    store = imgfs.Store.open(str(made.root), str(tmp_path / "run"), storemaker.DRIVER)
    app, _ = made.images
    view = build_view(store.images, 0, Caches.build(None))
    fs = view.rootfs(view.image(app.id))
    listed: dict[bytes, Node] = {}
    _listed(view, f"{app.id}/rootfs".encode(), listed)
    assert any(node.nlink == 2 for node in listed.values())  # the hardlink pair
    for path, node in listed.items():
        key = RootfsKey(app.id, path.split(b"/", 2)[2])
        assert view.peek(key) == node, path  # the listed one (a directory: its lookup's)
        assert view.peek(node.key) == node, path  # the hardlinked ones' RootfsInodeKey too
        if node.kind != "dir":
            assert view.peek(key) is node, path
    # in the member caches: only the directories the walk looked up (resolve) and the
    # hardlinks with their targets (the link groups)
    files = 0
    for tree in fs.layers:
        links = {*tree.hardlinks, *(tree.link_target(link) for link in tree.hardlinks)}
        cached = list(tree._members._items)
        assert all(tree.is_dir(ref) or ref in links for ref in cached)
        files += sum(tree.typeflag(ref) == "0" for ref in tree.child_refs(b"etc").values())
    assert files > 0  # the precondition: the listings had regular files


def test_members_of_a_listing_equal_members_parsed_one_by_one(
    view: TreeView, made: storemaker.StoreMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, _ = made.images
    tree = view.rootfs(view.image(app.id)).layers[0]
    refs = [ref for children in tree.dirs.values() for ref in children.values()]
    assert len(refs) > 3  # the members of several directories
    monkeypatch.setattr(layer_tree, "SPAN_BYTES", 900)
    batch = tree.members([*reversed(refs), refs[0]])  # any order, repeats: each once
    assert sorted(batch) == sorted(set(refs))
    for ref in refs:
        assert batch[ref] == tree._parse(ref) if ref >= 0 else batch[ref] == tree.member(ref)


def test_a_known_files_open_parses_no_tar_header(
    made: storemaker.StoreMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``layers/`` or ``rootfs/`` file whose node the view made (its ``Origin``) opens from
    the layer tree's columns (``LayerTree.file``): its member, parsed when the node was made,
    is not parsed again at each open once the tree's member cache has let it go (a walk over
    more files than ``MEMBER_CACHE``). Checked here with a one-member cache and a header
    parse that fails: every known file still opens and reads its own bytes."""
    monkeypatch.setattr(layer_tree, "MEMBER_CACHE", 1)
    store = imgfs.Store.open(str(made.root), str(tmp_path / "run"), storemaker.DRIVER)
    view = build_view(store.images, 0, Caches.build(None))
    app, _ = made.images
    layer0 = _names(view, f"{app.id}/layers")[0].decode()
    want = {
        f"{app.id}/rootfs/etc/hostname": b"top\n",
        f"{app.id}/rootfs/etc/hard": b"top\n",
        f"{app.id}/rootfs/opt/new": b"new\n",
        f"{app.id}/rootfs/big": bytes(range(256)) * 4096,
        f"{app.id}/layers/{layer0}/etc/gone": b"to be deleted\n",
        f"{app.id}/layers/{layer0}/opt/keep": b"kept\n",
    }
    nodes = {path: view.resolve(path.encode()) for path in want}

    def parse(*args: object) -> None:
        raise AssertionError("a tar header parsed at open")

    monkeypatch.setattr(layer_tree.LayerTree, "_parse", parse)
    for path, data in want.items():
        content = view.open_known(nodes[path].key, nodes[path])
        assert isinstance(content, Streamed), path
        try:
            assert content.reader.read(0, len(data) + 1) == data, path
        finally:
            release(view.caches, content)
