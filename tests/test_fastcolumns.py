"""The compiled build loop of a layer tree (``_fastparse.columns``, ``LayerTree.from_tarsplit``)
against the Python code.

The Python code (``LayerTree.build`` over ``tarsplit.iter_entries``) is the reference: the tree
``from_tarsplit`` builds must be the same tree, column for column, and wherever the reference
raises, the same error (type and message) must come at the same line. Real tar-splits (the
awkward test layer in PAX and GNU form, and every tar-split of the bench stores when they
exist) and hypothesis-mutated ones (lines dropped, repeated, swapped, blank, edited bytes;
small bounds), cut into chunks at arbitrary line boundaries. Another process with
``IMGFS_PURE_PYTHON=1`` builds the same trees.
"""

from __future__ import annotations

import base64
import glob
import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgfs.errors import ImgfsError
from imgfs.layer import tarsplit, tree
from imgfs.layer.tree import LayerTree
from tests.realstores import awkward_tar
from tests.tarsplit_maker import disassemble

needs_ext = pytest.mark.skipif(tree.FAST_COLUMNS is None, reason="_fastparse not built")
_BENCH = "/var/tmp/imgfs-bench/*/overlay-layers/*.tar-split.gz"


def _snapshot(layer: LayerTree) -> tuple[object, ...]:
    cols = layer._cols
    return (
        bytes(cols.types), cols.sizes.tobytes(), cols.crcs.tobytes(), cols.head_pos.tobytes(),
        cols.head_len.tobytes(), cols.name_pos.tobytes(), cols.names,
        cols.headers.read(0, cols.headers.length), cols.headers.length, layer.dirs,
        layer.hardlinks, layer._implied, layer._implied_order, layer.root_ref(),
    )  # fmt: skip


def _outcome(build: object) -> tuple[object, ...] | str:
    """The tree's snapshot, or its error as type and message."""
    try:
        assert callable(build)
        return _snapshot(build())
    except ImgfsError as exc:
        return f"{type(exc).__name__}: {exc}"


def _reference(data: bytes, limit: int | None, max_bytes: int | None) -> tuple[object, ...] | str:
    def build() -> LayerTree:
        gz = io.BytesIO(gzip.compress(data))
        return LayerTree.build(tarsplit.iter_entries(gz, "t"), "t", limit, max_bytes)

    return _outcome(build)


def _chunks(data: bytes, cuts: list[int]) -> Iterator[tuple[int, bytes, int]]:
    """``tarsplit.iter_chunks``'s shape: whole lines, cut after the lines in ``cuts``."""
    lines = data.split(b"\n")
    last = lines.pop()  # after the last newline (iter_chunks: only when not blank)
    at, lineno = 0, 1
    for cut in sorted({c for c in cuts if 0 < c < len(lines)} | {len(lines)}):
        chunk = b"".join(line + b"\n" for line in lines[at:cut])
        if chunk:
            yield lineno, chunk, chunk.count(b"\n")
        lineno += cut - at
        at = cut
    if last.strip():
        yield lineno, last, 0


def _fast(
    data: bytes, limit: int | None, max_bytes: int | None, cuts: list[int]
) -> tuple[object, ...] | str:
    """``from_tarsplit``'s loop over the chunks of ``data`` cut at ``cuts``."""
    columns = tree.FAST_COLUMNS
    assert columns is not None

    def build() -> LayerTree:
        collector = tree._Collector("t", limit, max_bytes)
        state = tarsplit.State("t")
        for first, chunk, newlines in _chunks(data, cuts):
            collector.add_chunk(chunk, first, newlines, state, columns)
        return LayerTree(collector.finish(), "t", max_bytes)

    return _outcome(build)


def _check(
    data: bytes, limit: int | None = None, max_bytes: int | None = None, cuts: list[int] = ()
) -> tuple[object, ...] | str:
    want = _reference(data, limit, max_bytes)
    assert _fast(data, limit, max_bytes, list(cuts)) == want
    return want


def _ndjson(tar: bytes) -> bytes:
    return disassemble(tar).ndjson()


_TARS = [
    _ndjson(awkward_tar(tarfile.PAX_FORMAT)),
    _ndjson(awkward_tar(tarfile.GNU_FORMAT, b"\0" * 3000)),
    _ndjson(awkward_tar(tarfile.GNU_FORMAT)),
]


@needs_ext
@pytest.mark.parametrize("index", range(len(_TARS)))
def test_real_tar_splits_build_the_same_tree(index: int) -> None:
    data = _TARS[index]
    assert not isinstance(_check(data), str)
    lines = data.count(b"\n")
    for cuts in ([1], [2, 3], list(range(lines)), [lines // 2]):
        _check(data, cuts=cuts)


@needs_ext
def test_the_bench_stores_tar_splits_build_the_same_tree() -> None:
    files = sorted(glob.glob(_BENCH), key=os.path.getsize)
    if not files:
        pytest.skip("no bench stores on this machine (scripts/bench/stores.py)")
    for path in files[:: max(1, len(files) // 40)] + files[-1:]:
        with open(path, "rb") as gz:
            want = _snapshot(LayerTree.build(tarsplit.iter_entries(gz, "t"), "t"))
        with open(path, "rb") as gz:
            assert _snapshot(LayerTree.from_tarsplit(gz, "t")) == want, path


def _line(name: bytes, size: int = 0, kind: int = 1) -> bytes:
    if kind == 2:
        return b'{"type":2,"payload":"%s","position":0}' % name
    if size:
        return b'{"type":1,"name":"%s","size":%d,"payload":"AAAAAAAAAAE=","position":1}' % (
            name,
            size,
        )
    return b'{"type":1,"name":"%s","payload":null,"position":1}' % name


def _header_b64(name: bytes, flag: bytes = b"0", size: int = 0) -> bytes:
    info = tarfile.TarInfo(name.decode())
    info.type = flag
    info.size = size
    return base64.b64encode(info.tobuf(tarfile.USTAR_FORMAT))


def _member(name: bytes, flag: bytes = b"0", size: int = 0) -> bytes:
    return _line(_header_b64(name, flag, size), kind=2) + b"\n" + _line(name, size) + b"\n"


_CASES = {
    "plain": _member(b"a") + _member(b"b/", b"5") + _member(b"b/c", size=3),
    "file then dir of the same key": _member(b"a") + _member(b"a/", b"5"),
    "dir then file of the same key": _member(b"a/", b"5") + _member(b"a"),
    "exact duplicate": _member(b"a/b") * 2,
    "cleaned duplicate": _member(b"a/b") + _member(b"./a//b"),
    "root slash": _member(b"/", b"5") + _member(b"x"),
    "rooted names": _member(b"/abc/", b"5") + _member(b"/abc") + _member(b"abc"),
    "dot names": _member(b".hidden") + _member(b"./a") + _member(b"a/.b") + _member(b"a/..b"),
    "dotdot": _member(b"../x"),
    "no header": _line(b"a") + b"\n",
    "short header": _line(b"QUJD", kind=2) + b"\n" + _line(b"a") + b"\n",
    "blank lines": b"\n\n" + _member(b"a") + b"  \n\n" + _member(b"b") + b"\n\n",
    "whitespace only": b"   \n\t\n",
    "escaped name": _member(b"a").replace(b'"name":"a"', b'"name":"\\u0061"'),
    "no trailing newline": (_member(b"a") + _member(b"b")).rstrip(b"\n"),
    "v7 directory": _member(b"d/", b"\0") + _member(b"d/f"),
    "contiguous type": _member(b"f", b"7") + _member(b"g", b"1"),
}


@needs_ext
@pytest.mark.parametrize("case", sorted(_CASES))
def test_crafted_tar_splits(case: str) -> None:
    data = _CASES[case]
    lines = data.count(b"\n")
    for cuts in ([], list(range(lines + 1)), [1], [3]):
        _check(data, cuts=cuts)


@needs_ext
def test_bounds_give_the_same_errors_at_the_same_line(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _TARS[0]
    total = sum(
        len(e.payload) if isinstance(e, tarsplit.Segment) else e.size
        for e in tarsplit.iter_entries(io.BytesIO(gzip.compress(data)), "t")
    )
    assert "diff-size of -1 bytes" in str(_check(data, limit=-1))  # a hostile record's
    assert "diff-size of -1 bytes" in str(_check(b"\n" + data, limit=-1))
    for limit in (0, 1, 511, 512, 1500, total // 2, total - 1, total):
        got = _check(data, limit=limit)
        assert isinstance(got, str) == (limit < total), limit
    for max_bytes in (0, 1000, 1 << 20):
        _check(data, max_bytes=max_bytes)
    monkeypatch.setattr(tree, "MAX_HEADER_BYTES", 600)
    assert "bytes of tar headers" in str(_check(data))
    monkeypatch.setattr(tree, "MAX_HEADER_BYTES", 1 << 20)
    monkeypatch.setattr(tarsplit, "MAX_SEGMENT_BYTES", 5000)
    assert "segments exceed" in str(_check(data))


@needs_ext
def test_the_budget_is_checked_every_4096_members_as_in_python() -> None:
    data = b"".join(_member(b"d%05d" % i) for i in range(9000))
    per_member = tree._estimate(1, 6)
    expected = {4095: 4096, 4096: 8192, 4097: 8192, 8191: 8192, 8192: 9000, 8999: 9000}
    for members, at in expected.items():
        got = _check(data, max_bytes=members * per_member, cuts=[5000, 9001])
        assert f"more than {at} members" in str(got), members
    assert not isinstance(_check(data, max_bytes=9000 * per_member), str)


_EDITS = [b"", b'"', b"\\", b"=", b"A", b"/", b".", b"0", b" ", b",", b"}", b"\x00", b"\xc3\xbc",
          b"\xff", b"null", b'"size":1,', b"\n", b"./", b"//"]  # fmt: skip


@needs_ext
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from([*_TARS, *_CASES.values()]),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["drop", "repeat", "swap", "blank", "edit"]),
            st.integers(0, 400),
            st.integers(0, 400),
            st.integers(0, 3),
            st.sampled_from(_EDITS),
        ),
        max_size=4,
    ),
    cuts=st.lists(st.integers(0, 400), max_size=4),
    limit=st.one_of(st.none(), st.integers(0, 40_000)),
    max_bytes=st.one_of(st.none(), st.integers(0, 1 << 16)),
)
def test_mutated_tar_splits_build_the_same_tree_or_error(
    base: bytes,
    ops: list[tuple[str, int, int, int, bytes]],
    cuts: list[int],
    limit: int | None,
    max_bytes: int | None,
) -> None:
    lines = base.split(b"\n")
    for op, i, j, cut, value in ops:
        i, j = i % len(lines), j % len(lines)
        if op == "drop" and len(lines) > 1:
            del lines[i]
        elif op == "repeat":
            lines.insert(j, lines[i])
        elif op == "swap":
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "blank":
            lines.insert(i, value.strip(b"\n") if value.isspace() else b"")
        else:
            at = j % (len(lines[i]) + 1)
            lines[i] = lines[i][:at] + value + lines[i][at + cut :]
    _check(b"\n".join(lines), limit, max_bytes, cuts)


_PURE = """
import glob, hashlib, io, sys
from imgfs.layer import tarsplit, tree
assert tree.FAST_COLUMNS is None and tarsplit.FAST_ENTRY is None
from tests.test_fastcolumns import _snapshot
for path in sys.argv[1:]:
    with open(path, "rb") as gz:
        snap = _snapshot(tree.LayerTree.from_tarsplit(gz, "t"))
    print(hashlib.sha256(repr(snap).encode()).hexdigest())
"""


@needs_ext
def test_pure_python_builds_the_same_trees(tmp_path: Path) -> None:
    paths = []
    for i, data in enumerate([*_TARS, _CASES["plain"]]):
        path = tmp_path / f"{i}.tar-split.gz"
        path.write_bytes(gzip.compress(data))
        paths.append(str(path))
    bench = sorted(glob.glob(_BENCH), key=os.path.getsize)
    paths += bench[-1:]  # the 100,000-file layer, when the bench stores exist
    env = {**os.environ, "IMGFS_PURE_PYTHON": "1"}
    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run(
        [sys.executable, "-c", _PURE, *paths], env=env, cwd=root, capture_output=True,
        text=True, check=True,
    ).stdout.split()  # fmt: skip
    here = []
    for path in paths:
        with open(path, "rb") as gz:
            snap = _snapshot(LayerTree.from_tarsplit(gz, "t"))
        here.append(hashlib.sha256(repr(snap).encode()).hexdigest())
    assert out == here
