"""Sequential generation opens files ahead in a helper thread: through a ``BatchOpener`` (a
rootless store's helper) the next files in one ``open_many`` call, through a plain opener one
by one; the blob is the same, each error surfaces at its own file in tar order, nothing is
opened past a failure, and no descriptor opened ahead (nor any stage thread) is left."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from imgfs.errors import IntegrityError, LayerUnavailable, MalformedMetadata
from imgfs.layer import assemble
from imgfs.layer.assemble import LayerReader, generate
from imgfs.layer.index import LayerIndex
from imgfs.layer.tarsplit import FileEntry, Segment
from imgfs.store.layerfiles import LayerFiles
from tests.tarsplit_maker import make_tar
from tests.test_assemble import WHAT, RecordingSink, make_layer


class Batching:
    """LayerFiles with ``open_many``; records the batches; fails the names in ``broken``."""

    def __init__(self, directory: Path, broken: frozenset[bytes] = frozenset()) -> None:
        self.files = LayerFiles([str(directory)], WHAT)
        self.broken = broken
        self.batches: list[list[bytes]] = []
        self.single: list[bytes] = []
        self.handed: list[int] = []

    def open(self, name: bytes, size: int) -> int:
        self.single.append(name)
        return self.files.open(name, size)

    def open_many(
        self, items: Sequence[tuple[bytes, int]], advise: int = 0
    ) -> list[int | Exception]:
        self.batches.append([name for name, _ in items])
        out: list[int | Exception] = []
        for name, size in items:
            if name in self.broken:
                out.append(LayerUnavailable(f"{name!r} is broken"))
                continue
            fd = self.files.open(name, size)
            self.handed.append(fd)
            out.append(fd)
        return out

    def close(self) -> None:
        self.files.close()


def _members(count: int) -> list[tuple[str, bytes | str | None]]:
    members: list[tuple[str, bytes | str | None]] = [("d", None), ("d/empty", b"")]
    members += [(f"d/f{i}", f"file {i}\n".encode()) for i in range(count)]
    return members


def _open_fds() -> set[int]:
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the listing's own descriptor
            continue
        fds.add(int(name))
    return fds


_P = assemble.PREFETCH
_FILES = 2 * _P + 22  # two full batches and a part


def test_files_are_opened_ahead_in_batches_and_the_blob_is_the_same(tmp_path: Path) -> None:
    assert isinstance(Batching(tmp_path), assemble.BatchOpener)
    layer = make_layer(tmp_path, make_tar(_members(_FILES)))
    before = _open_fds()
    files = Batching(layer.dir)
    sink = RecordingSink(truth=layer.tar)
    generate(layer.entries, files, sink, layer.digest, len(layer.tar), WHAT)
    files.close()
    assert bytes(sink.data) == layer.tar
    assert [len(b) for b in files.batches] == [assemble.PREFETCH, assemble.PREFETCH, 22]
    assert b"d/empty" not in files.batches[0]  # nothing to read: never opened
    assert files.single == []
    assert _open_fds() == before


@pytest.mark.parametrize("bad", [0, 5, _P - 1, _P, _FILES - 1])
def test_an_error_surfaces_at_its_file_and_nothing_stays_open(tmp_path: Path, bad: int) -> None:
    layer = make_layer(tmp_path, make_tar(_members(_FILES)))
    before = _open_fds()
    files = Batching(layer.dir, frozenset({f"d/f{bad}".encode()}))
    sink = RecordingSink(truth=layer.tar)
    with pytest.raises(LayerUnavailable, match=f"d/f{bad}'"):
        generate(layer.entries, files, sink, layer.digest, len(layer.tar), WHAT)
    files.close()
    assert _open_fds() == before  # the fds opened ahead of the failure are closed
    good = layer.tar.index(f"file {bad}\n".encode())
    assert sink.high <= good  # nothing at or after the failed file was published
    assert len(files.batches) == bad // assemble.PREFETCH + 1  # no batch after the failing one


def test_a_wrong_file_fails_its_check_when_opened_ahead(tmp_path: Path) -> None:
    layer = make_layer(tmp_path, make_tar(_members(10)))
    (layer.dir / "d" / "f3").write_bytes(b"FILE 3\n")  # same size, other bytes
    before = _open_fds()
    files = Batching(layer.dir)
    with pytest.raises(IntegrityError, match="f3"):
        generate(layer.entries, files, RecordingSink(), layer.digest, len(layer.tar), WHAT)
    files.close()
    assert _open_fds() == before


class Recording:
    """A plain FileOpener (no ``open_many``): LayerFiles, recording which thread opened what
    and failing the names in ``broken``."""

    def __init__(self, directory: Path, broken: frozenset[bytes] = frozenset()) -> None:
        self.files = LayerFiles([str(directory)], WHAT)
        self.broken = broken
        self.opened: list[tuple[bytes, str]] = []

    def open(self, name: bytes, size: int) -> int:
        self.opened.append((name, threading.current_thread().name))
        if name in self.broken:
            raise LayerUnavailable(f"{name!r} is broken")
        return self.files.open(name, size)

    def close(self) -> None:
        self.files.close()


def _threads() -> set[int | None]:
    return {t.ident for t in threading.enumerate()}


def _stage_threads(before: set[int | None]) -> list[str]:
    """The ``imgfs-`` threads alive now that were not before the generation (its open-ahead,
    hash, write and gunzip stages; not a process-wide pool an earlier test started)."""
    return [
        t.name
        for t in threading.enumerate()
        if t.name.startswith("imgfs-") and t.ident not in before
    ]


def test_a_plain_opener_is_opened_ahead_in_a_helper_thread(tmp_path: Path) -> None:
    layer = make_layer(tmp_path, make_tar(_members(150)))
    before = _open_fds()
    threads = _threads()
    files = Recording(layer.dir)
    sink = RecordingSink(truth=layer.tar)
    generate(layer.entries, files, sink, layer.digest, len(layer.tar), WHAT)
    files.close()
    assert bytes(sink.data) == layer.tar
    assert [name for name, _ in files.opened] == [f"d/f{i}".encode() for i in range(150)]
    assert {thread for _, thread in files.opened} == {"imgfs-open-ahead"}
    assert _open_fds() == before
    assert _stage_threads(threads) == []  # open-ahead, hash and write threads all joined


@pytest.mark.parametrize("bad", [0, 70, 149])
def test_a_plain_opener_error_stops_the_opening_ahead(tmp_path: Path, bad: int) -> None:
    layer = make_layer(tmp_path, make_tar(_members(150)))
    before = _open_fds()
    threads = _threads()
    files = Recording(layer.dir, frozenset({f"d/f{bad}".encode()}))
    sink = RecordingSink(truth=layer.tar)
    with pytest.raises(LayerUnavailable, match=f"d/f{bad}'"):
        generate(layer.entries, files, sink, layer.digest, len(layer.tar), WHAT)
    files.close()
    assert files.opened[-1][0] == f"d/f{bad}".encode()  # nothing opened past the failure
    assert sink.high <= layer.tar.index(f"file {bad}\n".encode())
    assert _open_fds() == before
    assert _stage_threads(threads) == []


def test_a_corrupt_file_in_the_middle_fails_with_nothing_wrong_published(tmp_path: Path) -> None:
    """Through every stage (open-ahead, read + CRC, hash, write): the file's bytes are written
    but its last byte, and nothing after it, is never published; no thread is left behind."""
    big = [(f"d/big{i}", bytes([i]) * (3 << 20)) for i in range(4)]  # several buffers each
    layer = make_layer(tmp_path, make_tar([("d", None), *big, *_members(100)[2:]]))
    (layer.dir / "d" / "big2").write_bytes(b"\2" * ((3 << 20) - 1) + b"X")  # last byte wrong
    before = _open_fds()
    threads = _threads()
    files = Recording(layer.dir)
    sink = RecordingSink(truth=layer.tar)
    with pytest.raises(IntegrityError, match="big2"):
        generate(layer.entries, files, sink, layer.digest, len(layer.tar), WHAT)
    files.close()
    end_of_big2 = layer.tar.index(b"\3" * 4096) - 512 - (-(3 << 20) % 512)
    assert sink.high < end_of_big2  # its last byte never served
    assert sink.high > end_of_big2 - (4 << 20)  # (the check ran as the bytes streamed)
    assert _open_fds() == before
    assert _stage_threads(threads) == []


def test_a_tarsplit_error_comes_after_the_entries_before_it(tmp_path: Path) -> None:
    layer = make_layer(tmp_path, make_tar(_members(150)))
    cut = 2 * 40 + 7

    def entries() -> Iterator[Segment | FileEntry]:
        yield from layer.entries[:cut]
        raise MalformedMetadata("tar-split line 88: broken")

    before = _open_fds()
    threads = _threads()
    files = Recording(layer.dir)
    sink = RecordingSink(truth=layer.tar)
    with pytest.raises(MalformedMetadata, match="line 88"):
        generate(entries(), files, sink, layer.digest, len(layer.tar), WHAT)
    files.close()
    copied = [e for e in layer.entries[:cut] if isinstance(e, FileEntry) and e.size]
    assert [name for name, _ in files.opened] == [e.name for e in copied]  # all, no more
    assert _open_fds() == before
    assert _stage_threads(threads) == []


def test_a_direct_read_over_many_files_opens_them_ahead_and_leaks_nothing(
    tmp_path: Path,
) -> None:
    """``LayerReader.read_raw`` of a range over many files opens them ahead (and asks the disk
    for them at once); the bytes are the same, an error opening a later file surfaces only when
    the read reaches it (nothing is opened past it), and no descriptor opened ahead stays open
    past the reader."""
    layer = make_layer(tmp_path, make_tar(_members(150)))
    index = LayerIndex.build(iter(layer.entries), WHAT)
    before = _open_fds()
    files = Recording(layer.dir, frozenset({b"d/f90"}))
    reader = LayerReader(index, files, layer.digest, WHAT)
    bad_at = layer.tar.index(b"file 90\n")
    assert reader.read_raw(0, bad_at) == layer.tar[:bad_at]  # ends where f90 starts
    assert files.opened[-1][0] == b"d/f89"  # the range's files only
    with pytest.raises(LayerUnavailable, match="f90"):  # raised at f90, opened ahead with f80..
        reader.read_raw(bad_at - 10 * 1024, 20 * 1024)
    assert files.opened[-1][0] == b"d/f90"  # nothing opened past the failure
    rest = layer.tar.index(b"file 91\n") - 512
    assert reader.read_raw(rest, len(layer.tar) - rest) == layer.tar[rest:]
    reader.close()
    files.close()
    assert _open_fds() == before
