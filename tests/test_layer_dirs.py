"""The kept directory fds of layers (imgfs.store.source.LayerDirsCache): reused while the
store's write tokens stay, opened again after a store change, never for a store without
tokens, bounded in fds and closed (never under a reader)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import imgfs
from imgfs.store import locks
from imgfs.store import source as source_module
from imgfs.store.source import LayerDirsCache, LayerSource
from tests import storemaker
from tests.tarsplit_maker import make_tar

LAYERS = [make_tar([("f", b"one\n")]), make_tar([("g", b"two\n")]), make_tar([("h", b"3\n")])]


def _fds() -> int:
    """Open fds, without the lock file this thread keeps (``read_locked(keep=True)``)."""
    locks.close_kept()
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def made(tmp_path: Path) -> storemaker.StoreMaker:
    maker = storemaker.StoreMaker(tmp_path / "root")
    maker.add_image("localhost/app:v1", LAYERS)
    maker.write()
    return maker


def _sources(made: storemaker.StoreMaker) -> list[LayerSource]:
    store = imgfs.Store.open(str(made.root), str(made.root.parent / "run"), storemaker.DRIVER)
    return list(store.image("localhost/app:v1").layer_sources())


def _token(made: storemaker.StoreMaker, token: bytes) -> None:
    (made.root / f"{storemaker.DRIVER}-layers" / "layers.lock").write_bytes(token.ljust(64, b"-"))


def _read(source: LayerSource, name: bytes, size: int) -> bytes:
    fd = source.open_file(name, size)
    try:
        return os.read(fd, 100)
    finally:
        os.close(fd)


@pytest.fixture
def dir_opens(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Each open of a layer's directory below the store root, and a cache of our own."""
    opened: list[int] = []
    real = source_module._ChainDirs.open

    def counting(self: source_module._ChainDirs, i: int) -> int:
        opened.append(i)
        return real(self, i)

    monkeypatch.setattr(source_module._ChainDirs, "open", counting)
    cache = LayerDirsCache(source_module.LAYER_DIRS_MAX_FDS)
    monkeypatch.setattr(source_module, "LAYER_DIRS", cache)
    yield opened
    cache.close()


def test_directories_are_kept_while_the_tokens_stay_and_opened_again_after_a_change(
    made: storemaker.StoreMaker, dir_opens: list[int]
) -> None:
    _token(made, b"a")
    base = _sources(made)[0]
    assert _read(base, b"f", 4) == b"one\n"
    assert _read(base, b"f", 4) == b"one\n"
    assert dir_opens == [0]  # the second open used the kept directory
    # The store changes: the layer's directory is replaced (as by a removal and a new pull).
    diff = made.root / storemaker.DRIVER / made.images[0].layers[0] / "diff"
    os.rename(diff, diff.with_name("old"))
    diff.mkdir()
    (diff / "f").write_bytes(b"new\n")
    _token(made, b"b")
    assert _read(base, b"f", 4) == b"new\n"  # never the removed directory's file
    assert dir_opens == [0, 0]


def test_a_store_without_tokens_keeps_no_directories(
    made: storemaker.StoreMaker, dir_opens: list[int]
) -> None:
    base = _sources(made)[0]
    before = _fds()
    for _ in range(3):
        assert _read(base, b"f", 4) == b"one\n"
    assert dir_opens == [0, 0, 0]
    assert _fds() == before


def test_kept_directories_are_bounded_in_fds_and_closed_never_under_a_reader(
    made: storemaker.StoreMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    _token(made, b"a")
    sources = _sources(made)
    cache = LayerDirsCache(2)  # fds: the top layer alone counts 3 (its chain of directories)
    monkeypatch.setattr(source_module, "LAYER_DIRS", cache)
    before = _fds()
    assert _read(sources[0], b"f", 4) == b"one\n"
    assert _read(sources[1], b"f", 4) == b"one\n"  # from its parent's directory (overlay)
    assert _fds() - before == 2  # layer 1: its own and its parent's (layer 0 evicted)
    held = cache.hold(sources[0]._dirs_key(), ("a".ljust(64, "-").encode(),), sources[0]._own_files)
    assert _read(sources[2], b"h", 2) == b"3\n"  # evicts the rest, not the one held
    fd = held.files.open(b"f", 4)  # still usable: held
    os.close(fd)
    cache.let_go(held)  # its last user: closed now
    assert _fds() - before == 1  # layer 2's own directory only (its lower dirs never needed)
    cache.close()
    assert _fds() == before
