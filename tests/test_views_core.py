"""Core of ``layers/``, ``rootfs/`` and ``oci/`` without FUSE: tar headers, layer trees, the merge
rules and the layout manifest, on tars made here (tests/tarsplit_maker.py disassembles them)."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgfs.cache import files as cachefiles
from imgfs.errors import IntegrityError, MalformedMetadata, NotFound
from imgfs.layer import tree as layer_tree
from imgfs.layer.tarheader import HARDLINK, parse_header
from imgfs.layer.tarsplit import FileEntry, Segment, iter_entries
from imgfs.layer.tree import MAX_DEPTH, FileData, LayerTree, Member
from imgfs.views.node import Ownership
from imgfs.views.oci import index_json, layout_manifest
from imgfs.views.rootfs import RootFS
from tests.realstores import awkward_tar
from tests.tarsplit_maker import disassemble, make_tar

_TYPES = {
    tarfile.REGTYPE: "0", tarfile.LNKTYPE: "1", tarfile.SYMTYPE: "2", tarfile.CHRTYPE: "3",
    tarfile.BLKTYPE: "4", tarfile.DIRTYPE: "5", tarfile.FIFOTYPE: "6",
}  # fmt: skip


def _tree(tar: bytes, what: str = "test layer") -> LayerTree:
    return LayerTree.build(iter_entries(io.BytesIO(disassemble(tar).gz()), what), what)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_members_equal_what_tarfile_reads(fmt: int) -> None:
    if fmt == tarfile.USTAR_FORMAT:
        tar = make_tar([("a", None), ("a/b.txt", b"bee"), ("a/l", "->b.txt"), ("a/h", "=>a/b.txt")])
    else:
        tar = awkward_tar(fmt)
    tree = _tree(tar)
    checked = 0
    with tarfile.open(fileobj=io.BytesIO(tar), encoding="utf-8", errors="surrogateescape") as tf:
        for info in tf:
            path = info.name.encode("utf-8", "surrogateescape").strip(b"/")
            m = tree.member(tree.ref(path))
            assert m.typeflag == _TYPES[info.type], path
            assert (m.mode, m.uid, m.gid) == (info.mode, info.uid, info.gid), path
            assert m.mtime_ns == int(info.mtime) * 10**9, path
            assert m.size == (info.size if info.isreg() else 0), path
            if info.issym():
                assert m.linkname == info.linkname.encode("utf-8", "surrogateescape")
            if info.isdev():
                assert (m.devmajor, m.devminor) == (info.devmajor, info.devminor)
            xattrs = {k[13:]: v for k, v in info.pax_headers.items() if k.startswith("SCHILY.")}
            assert {k: v.decode() for k, v in m.xattrs} == xattrs, path
            checked += 1
    assert checked == tree.member_count


def _old_style_regulars() -> bytes:
    """A tar whose regular files have the type bytes ``'\\0'`` (pre-POSIX) and ``'7'``
    (contiguous), next to two ``'\\0'`` members whose names end in ``/`` (directories), one
    of them too long for its header block (a GNU long name)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, type_ in (("old", tarfile.AREGTYPE), ("contig", tarfile.CONTTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.size = type_, 5
            tf.addfile(info, io.BytesIO(b"bytes"))
        for name in ("olddir/", "d" * 120 + "/"):  # the second: in a GNU long name only
            info = tarfile.TarInfo(name)
            info.type = tarfile.AREGTYPE
            tf.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["pax", "gnu", "old-style"])
def test_a_regular_members_file_data_from_the_columns_equals_its_parsed_member(fmt: str) -> None:
    """``LayerTree.file`` (what a known node's open uses, no header parse) says what
    ``member`` says for every regular file: PAX and GNU long names (the tar-split name, not
    the header block's), empty files (no CRC), the type bytes '\\0' and '7'; every other
    member (directories, links, the '\\0' directory, implied ones) is refused."""
    tar = {
        "pax": lambda: awkward_tar(tarfile.PAX_FORMAT),
        "gnu": lambda: awkward_tar(tarfile.GNU_FORMAT),
        "old-style": _old_style_regulars,
    }[fmt]()
    tree = _tree(tar)
    refs = [ref for children in tree.dirs.values() for ref in children.values()]
    regular = [ref for ref in refs if tree.member(ref).typeflag == "0"]
    for ref in regular:
        m = tree.member(ref)
        assert tree.file(ref) == FileData(m.data_name, m.size, m.crc), m.path
    others = [ref for ref in refs if ref not in regular]
    for ref in others:
        with pytest.raises(MalformedMetadata, match="not a regular file"):
            tree.file(ref)
    data = [tree.file(ref) for ref in regular]
    assert any(f.size == 0 and f.crc is None for f in data) or fmt == "old-style"
    assert any(f.crc is not None for f in data)
    if fmt == "old-style":
        assert sorted(f.data_name for f in data) == [b"contig", b"old"]
        # Go's rule goes by the final name: a '\\0' member whose GNU long name ends in '/'
        # is a directory, though its header block's own (cut) name does not
        assert sorted(tree.member(ref).path for ref in others) == [b"d" * 120, b"olddir"]
        assert all(tree.member(ref).typeflag == "5" for ref in others)
    else:  # the long names are the tar-split's, which the header blocks do not hold whole
        assert any(len(f.data_name) > 100 for f in data)
        assert any(tree.member(ref).typeflag == HARDLINK for ref in others)


def test_a_member_whose_header_type_differs_from_its_tree_column_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The directory model and ``LayerTree.file`` go by the columns' type byte, the nodes by
    the parsed header: a parse that disagrees (a header parser bug, as the ``'\\0'`` rule
    applied to a cut name was) is refused, so a node never says "file" for a member the
    columns hold as a directory (or the reverse)."""
    tree = _tree(make_tar([("d", None), ("d/f", b"data")]))
    real = layer_tree.parse_member

    def parse_member(*args: Any) -> Member:
        found = real(*args)
        return dataclasses.replace(found, typeflag="5" if found.typeflag == "0" else "0")

    monkeypatch.setattr(layer_tree, "FAST_MEMBER", None)
    monkeypatch.setattr(layer_tree, "parse_member", parse_member)
    for path in (b"d", b"d/f"):
        with pytest.raises(MalformedMetadata, match="its tar header and its type"):
            tree.member(tree.ref(path))


def test_pax_fractional_mtime_and_long_names() -> None:
    info = tarfile.TarInfo("x" * 300)
    info.mtime = 1
    info.pax_headers = {"mtime": "-1.25", "SCHILY.xattr.user.k": "v"}
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    parsed = parse_header(b"\0" * 100 + header, "t")  # previous member's padding first
    assert parsed.name == b"x" * 300
    assert parsed.mtime_ns == -1_250_000_000
    assert parsed.xattrs == (("user.k", b"v"),)
    with pytest.raises(MalformedMetadata):
        parse_header(header[:-512], "t")


_FIELDS = {"mode": (100, 8), "uid": (108, 8), "size": (124, 12), "mtime": (136, 12)}


@pytest.mark.parametrize(
    ("field", "raw", "want"),
    [
        ("uid", b"0001750\x00", 1000),
        ("uid", b"  1750  ", 1000),  # spaces and NULs around the digits are trimmed
        ("uid", b"\x00\x00\x00\x00\x00\x00\x00\x00", 0),
        ("uid", b"       \x00", 0),
        ("size", b"\x80" + b"\x00" * 6 + (1 << 33).to_bytes(5, "big"), 1 << 33),  # GNU base-256
        ("mtime", b"\xff" * 11 + b"\xfe", -2),  # negative base-256: only mtime
        ("mode", b"0000755\x00", 0o755),
        # Python's int() takes these, Go's parseNumeric does not:
        ("uid", b"000_750\x00", None),
        ("uid", b"0o00750\x00", None),
        ("uid", b"  +1750 ", None),
        ("uid", b"\t001750\x00", None),
        ("uid", b"0017 50\x00", None),  # a space between digits
        ("uid", b"0017\x0050\x00", None),
        ("size", b"00000000008\x00", None),
        ("uid", b"\xff" * 8, None),  # negative base-256 elsewhere
    ],
)
def test_numeric_fields_parse_as_go_does(field: str, raw: bytes, want: int | None) -> None:
    """The plain-octal fast path and the field-by-field rules give the same numbers and the
    same errors (each case would differ if the fast path took what int() takes)."""
    info = tarfile.TarInfo("f")
    info.mtime, info.uid, info.mode = 7, 5, 0o644
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
    pos, length = _FIELDS[field]
    assert len(raw) == length
    block[pos : pos + length] = raw
    if want is None:
        with pytest.raises(MalformedMetadata):
            parse_header(bytes(block), "t")
        return
    header = parse_header(bytes(block), "t")
    got = {"mode": header.mode, "uid": header.uid, "size": header.size}
    got["mtime"] = header.mtime_ns // 10**9
    assert got[field] == want
    assert (header.uid if field != "uid" else header.mode) == (5 if field != "uid" else 0o644)


def test_persisted_tree_round_trips_and_rejects_corruption(tmp_path: Path) -> None:
    tree = _tree(awkward_tar())
    copy = LayerTree.from_bytes(tree.to_bytes(), "copy")
    assert copy.dirs == tree.dirs
    for ref in range(tree.member_count):
        assert copy.member(ref) == tree.member(ref)
    with pytest.raises(MalformedMetadata):
        LayerTree.from_bytes(tree.to_bytes()[:-5], "bad")
    path = tmp_path / "index" / "x.tree"  # a flipped bit anywhere: the cache envelope
    cachefiles.save(str(path), tree.to_bytes)
    damaged = bytearray(path.read_bytes())
    damaged[-5] ^= 1
    path.write_bytes(bytes(damaged))
    assert cachefiles.load(str(path), lambda data: LayerTree.from_bytes(data, "bad")) is None


def test_hardlinks_share_a_member_in_a_layer() -> None:
    tree = _tree(make_tar([("t", b"data"), ("l1", "=>t"), ("d", None), ("d/l2", "=>t")]))
    target = tree.ref(b"t")
    link = tree.ref(b"d/l2")
    assert tree.typeflag(link) == HARDLINK
    assert tree.link_target(link) == target
    assert tree.link_count(target) == 3


def _rootfs(*layers: list[tuple[str | bytes, bytes | str | None]]) -> RootFS:
    return RootFS([_tree(make_tar(members)) for members in layers], "test image")


def test_whiteouts_opaque_dirs_and_replacement() -> None:
    fs = _rootfs(
        [("a", None), ("a/x", b"1"), ("a/y", b"2"), ("o", None), ("o/old", b"3"), ("f", b"4")],
        [("a/.wh.x", b""), ("o", None), ("o/.wh..wh..opq", b""), ("o/new", b"5"), ("f", None)],
        [("a/x", b"again"), ("f/inside", b"6"), ("f/.wh.inside", b"")],
    )
    assert sorted(fs.children(b"")) == [b"a", b"f", b"o"]
    assert sorted(fs.children(b"a")) == [b"x", b"y"]
    assert fs.member(fs.entry(b"a/x")).size == 5  # deleted, then recreated by layer 3
    assert sorted(fs.children(b"o")) == [b"new"]
    assert sorted(fs.children(b"f")) == []  # a later whiteout in the same layer wins
    with pytest.raises(NotFound):
        fs.entry(b"a/x/deeper")


def test_implied_directories_keep_lower_attributes() -> None:
    lower = io.BytesIO()
    with tarfile.open(fileobj=lower, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("d")
        info.type, info.mode, info.uid = tarfile.DIRTYPE, 0o711, 42
        tf.addfile(info)
    upper = make_tar([("d/new", b"x")])
    fs = RootFS([_tree(lower.getvalue()), _tree(upper)], "test image")
    d = fs.member(fs.entry(b"d"))
    assert (d.mode, d.uid) == (0o711, 42)
    assert fs.entry(b"d").sources == (0, 1)


def test_hardlink_to_a_lower_layer_and_link_counts() -> None:
    fs = _rootfs(
        [("t", b"target"), ("gone", "=>t")],
        [("l", "=>t"), (".wh.gone", b"")],
    )
    t, link = fs.entry(b"t"), fs.entry(b"l")
    assert link.identity == t.identity
    assert fs.hardlinked(t)
    assert fs.nlink(t) == 2  # t and l; "gone" was deleted
    assert fs.member(link).size == 6


def test_layout_manifest_rewrites_as_go_does() -> None:
    stored = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + "c" * 64, "size": 7,
                   "annotations": {"b": "<&>", "a": "1"}},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
                    "digest": "sha256:" + "1" * 64, "size": 3, "urls": ["u"],
                    "annotations": {"io.github.containers.zstd-chunked.manifest-position": "1"}}],
        "subject": {"mediaType": "m", "digest": "sha256:" + "5" * 64, "size": 1},
        "annotations": {"z": "\u2028\n"},
        "unknown": True,
    }).encode()  # fmt: skip
    out = layout_manifest(stored, [("sha256:" + "2" * 64, 10)], "t")
    assert out == (
        b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        b'"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'
        + b"c" * 64 + b'","size":7,"annotations":{"a":"1","b":"\\u003c\\u0026\\u003e"}},'
        b'"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:'
        + b"2" * 64 + b'","size":10}],"subject":{"mediaType":"m","digest":"sha256:'
        + b"5" * 64 + b'","size":1},"annotations":{"z":"\\u2028\\n"}}'
    )  # fmt: skip
    unchanged = layout_manifest(out, [("sha256:" + "2" * 64, 10)], "t")
    assert unchanged is out
    index = json.loads(index_json("sha256:" + "9" * 64, 5))
    assert index["manifests"] == [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json",
         "digest": "sha256:" + "9" * 64, "size": 5}
    ]  # fmt: skip


def test_docker_manifest_becomes_oci_with_the_stored_config() -> None:
    stored = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "size": 9, "digest": "sha256:" + "c" * 64},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "size": 3, "digest": "sha256:" + "1" * 64}],
    }).encode()  # fmt: skip
    out = json.loads(layout_manifest(stored, [("sha256:" + "2" * 64, 10)], "t"))
    assert out["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert out["config"] == {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": "sha256:" + "c" * 64, "size": 9,
    }  # fmt: skip
    assert out["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    bad = stored.replace(b"rootfs.diff.tar.gzip", b"unknown")
    with pytest.raises(MalformedMetadata):
        layout_manifest(bad, [("sha256:" + "2" * 64, 10)], "t")


# -- bounds: size against diff-size, depth -------------------------------------------------------


def _counted(entries: list[Segment | FileEntry], seen: list[int]) -> Iterator[Segment | FileEntry]:
    """Yield ``entries`` forever (a bomb), counting how many were taken."""
    while True:
        for entry in entries:
            seen[0] += 1
            yield entry


def test_layer_tree_stops_once_the_tar_exceeds_diff_size() -> None:
    tar = make_tar([("a", b"x" * 1000), ("b", b"y" * 1000)])
    entries = list(iter_entries(io.BytesIO(disassemble(tar).gz()), "t"))
    assert LayerTree.build(iter(entries), "t", len(tar)).member_count == 2
    seen = [0]
    with pytest.raises(IntegrityError, match=r"layer L: .*diff-size of 2000"):
        LayerTree.build(
            _counted([Segment(b"\0" * 512), FileEntry(b"f", 0, None)], seen), "layer L", 2000
        )
    assert seen[0] <= 10  # stopped at once, not at the decoder's 1 GiB cap
    with pytest.raises(IntegrityError):
        LayerTree.build(iter(entries), "t", len(tar) - 1)


def _deep_tar(depth: int) -> bytes:
    return make_tar([("d/" * depth + "a.txt", b"deep")])


def test_deep_paths_work_without_recursion_up_to_the_cap() -> None:
    depth = MAX_DEPTH - 1
    tree = _tree(_deep_tar(depth))
    path = b"d/" * depth + b"a.txt"
    assert tree.member(tree.ref(path)).size == 4
    fs = RootFS([tree, _tree(make_tar([("top", b"t")]))], "test image")
    assert fs.member(fs.entry(path)).size == 4
    assert list(fs.children(path.rpartition(b"/")[0])) == [b"a.txt"]
    with pytest.raises(NotFound):
        fs.entry(b"d/" * (MAX_DEPTH + 10) + b"x")


def test_paths_deeper_than_the_cap_are_malformed() -> None:
    with pytest.raises(MalformedMetadata, match="deeper than 4096 components"):
        _tree(_deep_tar(30_000))


# -- who may open view nodes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ownership", "caller", "image_mode", "allowed"),
    [
        (Ownership(1000, 1000), 0, 0o600, True),  # root: the kernel checks the image's modes
        (Ownership(1000, 1000), 1000, 0o600, True),  # the mount's owner
        (Ownership(1000, 1000), 2000, 0o644, False),  # 0400 policy: others never
        (Ownership(0, 0, umask=0o022), 2000, 0o644, True),  # widened, image grants other read
        (Ownership(0, 0, umask=0o022), 2000, 0o640, False),  # image grants owner/group only
        (Ownership(0, 0, umask=0o022), 65534, 0o600, False),  # never by matching image owners
        (Ownership(0, 0, umask=0o027), 2000, 0o644, False),  # policy grants group, not others
        (Ownership(65534, 65534), 65534, 0o600, True),  # uid= makes nobody the owner
        (Ownership(65534, 65534), 2000, 0o644, False),
    ],
)
def test_may_open_view(ownership: Ownership, caller: int, image_mode: int, allowed: bool) -> None:
    assert ownership.may_open_view(caller, image_mode) is allowed
