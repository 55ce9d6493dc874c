"""Unit tests of imgfs.store.layerfiles: safe resolution, type and size checks, lower dirs."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgfs.errors import IntegrityError, LayerUnavailable, UnsafePath
from imgfs.store.layerfiles import LayerFiles, openat2_available

MODES = [True, False]  # openat2, component walk


@pytest.fixture(params=MODES, ids=["openat2", "walk"])
def mode(request: pytest.FixtureRequest) -> bool:
    use = bool(request.param)
    if use:
        _need_openat2()
    return use


def _need_openat2() -> None:
    fd = os.open("/", os.O_PATH)
    try:
        if not openat2_available(fd):
            pytest.skip("openat2 unavailable here")
    finally:
        os.close(fd)


@pytest.fixture
def layer(tmp_path: Path) -> Path:
    root = tmp_path / "diff"
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "a.txt").write_bytes(b"hello")
    (root / "dir" / "sub" / "b").write_bytes(b"bee")
    (root / "top").write_bytes(b"top!")
    (root / "etc").symlink_to("/etc")  # an absolute symlink inside the layer
    (root / "rel").symlink_to("dir")  # an in-layer relative symlink
    (root / "link.txt").symlink_to("dir/a.txt")
    (root / "escape").symlink_to("../../..")
    os.mkfifo(root / "fifo")
    return root


@pytest.fixture
def files(layer: Path, mode: bool) -> Iterator[LayerFiles]:
    with LayerFiles([str(layer)], "layer L", use_openat2=mode) as lf:
        yield lf


def read_fd(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        (b"dir/a.txt", b"hello"),
        (b"./dir//sub/./b", b"bee"),
        (b"/top", b"top!"),  # absolute names stay inside the layer
        (b"dir/sub/b/", b"bee"),
    ],
)
def test_opens_regular_files(files: LayerFiles, name: bytes, content: bytes) -> None:
    assert read_fd(files.open(name, len(content))) == content


def test_size_mismatch(files: LayerFiles) -> None:
    with pytest.raises(IntegrityError, match=r"layer L: .*dir/a.txt.* 5 bytes.*records 6"):
        files.open(b"dir/a.txt", 6)


@pytest.mark.parametrize(
    "name",
    [
        b"missing",
        b"etc/passwd",  # symlink to /etc in an intermediate component
        b"etc/hostname",
        b"rel/a.txt",  # even in-layer symlinks are not followed
        b"link.txt",  # final component is a symlink
        b"escape/etc/passwd",
        b"top/x",  # a file used as a directory
    ],
)
def test_not_found_never_host_bytes(files: LayerFiles, name: bytes) -> None:
    with pytest.raises(LayerUnavailable, match=r"layer L: file .* not found"):
        files.open(name, os.path.getsize("/etc/passwd"))


@pytest.mark.parametrize("name", [b"../etc/passwd", b"dir/../../x", b"a\0b", b"dir/.."])
def test_unsafe_names(files: LayerFiles, name: bytes) -> None:
    with pytest.raises(UnsafePath):
        files.open(name, 1)


def test_fifo_does_not_block(files: LayerFiles) -> None:
    result: list[BaseException] = []

    def run() -> None:
        try:
            files.open(b"fifo", 0)
        except BaseException as exc:
            result.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "opening a FIFO blocked"
    assert isinstance(result[0], IntegrityError)
    assert "FIFO" in str(result[0])


@pytest.mark.parametrize("name", [b"dir", b".", b"/"])
def test_directory_is_not_a_file(files: LayerFiles, name: bytes) -> None:
    with pytest.raises(IntegrityError, match="directory, not a regular file"):
        files.open(name, 0)


def test_lower_dirs_in_order(tmp_path: Path, mode: bool) -> None:
    upper, lower1, lower2 = (tmp_path / n for n in ("upper", "l1", "l2"))
    for d in (upper, lower1, lower2):
        d.mkdir()
    (upper / "u").write_bytes(b"U")
    (lower1 / "x").write_bytes(b"1")
    (lower2 / "x").write_bytes(b"2")
    (lower2 / "only2").write_bytes(b"2")
    (upper / "d").symlink_to(str(lower2))  # a symlink in the upper does not shadow via host
    dirs = [str(upper), str(lower1), str(lower2)]
    with LayerFiles(dirs, "layer L", use_openat2=mode) as lf:
        assert read_fd(lf.open(b"u", 1)) == b"U"
        assert read_fd(lf.open(b"x", 1)) == b"1"
        assert read_fd(lf.open(b"only2", 1)) == b"2"
        with pytest.raises(LayerUnavailable):
            lf.open(b"d/only2", 1)


def test_missing_or_symlinked_layer_dir(tmp_path: Path) -> None:
    with pytest.raises(LayerUnavailable, match="layer L: layer directory"):
        LayerFiles([str(tmp_path / "nope")], "layer L")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    # lower directories are opened when a lookup reaches them: a symlinked one fails it
    with (
        LayerFiles([str(tmp_path / "real"), str(tmp_path / "link")], "layer L") as lf,
        pytest.raises(LayerUnavailable, match="layer L: layer directory"),
    ):
        lf.open(b"x", 1)
    with pytest.raises(LayerUnavailable):
        LayerFiles([], "layer L")


def test_close_is_idempotent_and_final(layer: Path) -> None:
    lf = LayerFiles([str(layer)], "layer L")
    lf.close()
    lf.close()
    with pytest.raises(LayerUnavailable, match="closed"):
        lf.open(b"top", 4)


def test_no_fd_leak(files: LayerFiles) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for name, size in [(b"missing", 1), (b"fifo", 0), (b"dir", 0), (b"top", 99), (b"etc/x", 1)]:
        with pytest.raises((LayerUnavailable, IntegrityError)):
            files.open(name, size)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_file_opens_with_one_openat2_and_a_swap_after_the_stat_is_refused(
    layer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-file open is one openat2 (the safety rules), not an O_PATH probe and a reopen;
    a regular file replaced by a FIFO or a symlink between the pre-check and that openat2 is
    still refused (the fstat checks the fd actually opened; openat2 never follows the link)."""
    _need_openat2()
    from imgfs.store import layerfiles

    calls: list[bytes] = []
    real = layerfiles._openat2

    def counting(dirfd: int, path: bytes, flags: int, resolve: int) -> int:
        calls.append(path)
        return real(dirfd, path, flags, resolve)

    monkeypatch.setattr(layerfiles, "_openat2", counting)
    with LayerFiles([str(layer)], "layer L", use_openat2=True) as lf:
        assert read_fd(lf.open(b"dir/sub/b", 3)) == b"bee"
        assert calls == [b"dir/sub/b"]

        def swap_to(make: str) -> object:
            def swapped(dirfd: int, path: bytes, flags: int, resolve: int) -> int:
                (layer / "top").unlink()
                if make == "fifo":
                    os.mkfifo(layer / "top")
                else:
                    (layer / "top").symlink_to("dir/a.txt")
                monkeypatch.setattr(layerfiles, "_openat2", real)
                return real(dirfd, path, flags, resolve)

            return swapped

        monkeypatch.setattr(layerfiles, "_openat2", swap_to("fifo"))
        with pytest.raises(IntegrityError, match="FIFO"):
            lf.open(b"top", 4)
        (layer / "top").unlink()
        (layer / "top").write_bytes(b"top!")
        monkeypatch.setattr(layerfiles, "_openat2", swap_to("link"))
        with pytest.raises(LayerUnavailable, match="not found"):
            lf.open(b"top", 4)
