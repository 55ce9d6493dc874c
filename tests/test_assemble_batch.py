"""Sequential generation through a ``BatchOpener`` (a rootless store's helper): the next files
are opened ahead in one ``open_many`` call, the blob is the same, each error surfaces at its own
file in tar order, and no descriptor opened ahead is left open."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from imgfs.errors import IntegrityError, LayerUnavailable
from imgfs.layer import assemble
from imgfs.layer.assemble import generate
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

    def open_many(self, items: Sequence[tuple[bytes, int]]) -> list[int | Exception]:
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
