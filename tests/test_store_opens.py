"""How the core opens and reads store files: lock files (every kind of wrong file is an error
naming the path, never a hang or a skipped lock; the images lock of big-data reads kept open
between them), O_NOATIME (and its EPERM fallback), the fd limit, whole-file reads."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import imgfs
from imgfs.errors import ImgfsError, LockUnusable, OutOfResources, StorePermissionError
from imgfs.store import files, locks
from tests import storemaker
from tests.tarsplit_maker import make_tar

NOBODY = 65534
_ROOT = str(Path(__file__).resolve().parent.parent)


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.mkdir()


def _symlink(path: Path) -> None:
    target = path.parent / "real.lock"
    target.write_bytes(b"t" * 64)
    path.symlink_to(target)


def _dangling_symlink(path: Path) -> None:
    path.symlink_to(path.parent / "nowhere")


def _socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()


def _device(path: Path) -> None:
    os.mknod(path, 0o600 | 0o020000, os.makedev(1, 3))  # /dev/null's numbers


BAD_LOCKS: dict[str, tuple[Callable[[Path], None], str]] = {
    "fifo": (_fifo, "is a FIFO"),
    "directory": (_directory, "is a directory"),
    "symlink": (_symlink, "is a symlink"),
    "dangling symlink": (_dangling_symlink, "is a symlink"),
    "socket": (_socket, "is a socket"),
    "device": (_device, "is a character device"),
}


def _locked_in_thread(paths: list[str], timeout: float = 10.0) -> BaseException | None:
    """Run read_locked in a thread; the exception it raised (None: it worked). Fails on a hang."""
    box: list[BaseException | None] = []

    def run() -> None:
        try:
            with locks.read_locked(paths):
                box.append(None)
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert box, f"read_locked hung on {paths}"
    return box[0]


@pytest.mark.parametrize("kind", list(BAD_LOCKS))
def test_a_lock_file_of_the_wrong_kind_is_an_error_naming_it(kind: str, tmp_path: Path) -> None:
    make, message = BAD_LOCKS[kind]
    good = tmp_path / "layers.lock"
    good.write_bytes(b"g" * 64)
    bad = tmp_path / "images.lock"
    make(bad)
    error = _locked_in_thread([str(good), str(bad)])
    assert isinstance(error, LockUnusable), error
    assert str(bad) in str(error)
    assert message in str(error)


def test_missing_lock_file_reads_unlocked_with_an_empty_token(tmp_path: Path) -> None:
    present = tmp_path / "layers.lock"
    present.write_bytes(b"x" * 70)
    with locks.read_locked([str(present), str(tmp_path / "images.lock")]) as tokens:
        assert tokens == (b"x" * 64, b"")


def test_lock_file_below_a_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "overlay-images").write_text("not a directory")
    error = _locked_in_thread([str(tmp_path / "overlay-images" / "images.lock")])
    assert isinstance(error, LockUnusable)
    assert "overlay-images" in str(error)


def _run_python(code: str, *, unprivileged: bool = False) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter; ``unprivileged``: as root without the capabilities that
    bypass file permissions and ownership (DAC override/read-search, FOWNER)."""
    cmd = [sys.executable, "-c", textwrap.dedent(code)]
    if unprivileged:
        drop = "-dac_override,-dac_read_search,-fowner"
        cmd = ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", "--", *cmd]
    env = {**os.environ, "PYTHONPATH": _ROOT}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, check=False)


def test_lock_file_we_may_not_open_is_a_permission_error(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (a file of another owner)")
    tmp_path.chmod(0o755)
    lock = tmp_path / "images.lock"
    lock.write_bytes(b"t" * 64)
    os.chown(lock, NOBODY, NOBODY)
    lock.chmod(0o600)
    result = _run_python(
        f"""
        from imgfs.store import locks
        from imgfs.errors import StorePermissionError
        try:
            with locks.read_locked([{str(lock)!r}]):
                print("read unlocked")
        except StorePermissionError as exc:
            print("refused:", exc)
        """,
        unprivileged=True,
    )
    assert result.stdout.startswith("refused:"), result.stdout + result.stderr
    assert str(lock) in result.stdout


def test_no_descriptors_left_is_out_of_resources_not_a_skipped_lock(tmp_path: Path) -> None:
    lock = tmp_path / "layers.lock"
    lock.write_bytes(b"t" * 64)
    data = tmp_path / "images.json"
    data.write_text("[]")
    result = _run_python(
        f"""
        import os, resource
        from imgfs.store import files, locks
        from imgfs.errors import OutOfResources
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        held = []
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        for call in (
            lambda: locks.read_locked([{str(lock)!r}]).__enter__(),
            lambda: files.read_file({str(data)!r}, 100, "images.json"),
        ):
            try:
                call()
                print("opened")
            except OutOfResources as exc:
                print("out:", exc)
        """
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout + result.stderr
    assert lines[0].startswith("out:"), lines
    assert str(lock) in lines[0], lines
    assert lines[1].startswith("out:"), lines
    assert "images.json" in lines[1], lines


def test_errors_are_imgfs_errors() -> None:
    for cls in (LockUnusable, OutOfResources, StorePermissionError):
        assert issubclass(cls, ImgfsError)


# -- O_NOATIME ---------------------------------------------------------------------------------


def _fd_flags(fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError("no flags in fdinfo")


def test_store_files_are_opened_noatime_when_we_own_them(tmp_path: Path) -> None:
    path = tmp_path / "images.json"
    path.write_text("[]")
    fd = files.open_regular(str(path), "images.json")
    try:
        assert _fd_flags(fd) & os.O_NOATIME
    finally:
        os.close(fd)


def test_noatime_falls_back_where_the_kernel_refuses_it(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (a file of another owner)")
    tmp_path.chmod(0o755)
    path = tmp_path / "images.json"
    path.write_text("[1]")
    os.chown(path, NOBODY, NOBODY)
    path.chmod(0o644)
    result = _run_python(
        f"""
        import os
        from imgfs.store import files
        try:
            os.close(os.open({str(path)!r}, os.O_RDONLY | os.O_NOATIME))
            print("kernel allowed O_NOATIME")
        except PermissionError:
            print("kernel refused O_NOATIME")
        print(files.read_file({str(path)!r}, 100, "images.json"))
        """,
        unprivileged=True,
    )
    assert result.stdout.splitlines() == ["kernel refused O_NOATIME", "b'[1]'"], (
        result.stdout + result.stderr
    )


def test_raise_fd_limit_lifts_the_soft_limit_to_the_hard_one() -> None:
    result = _run_python(
        """
        import resource
        from imgfs.store import files
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        got = files.raise_fd_limit()
        now = resource.getrlimit(resource.RLIMIT_NOFILE)
        print(got == now[0], now[0] == min(hard, 1 << 20), now[1] == hard)
        """
    )
    assert result.stdout.split() == ["True", "True", "True"], result.stdout + result.stderr


def test_a_whole_file_is_read_in_one_pread_and_a_changing_one_to_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"m" * 889)
    reads: list[int] = []
    real_pread = os.pread

    def counted(fd: int, length: int, offset: int) -> bytes:
        reads.append(length)
        return real_pread(fd, length, offset)

    monkeypatch.setattr(os, "pread", counted)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert files.read_bounded(fd, 4096, "f") == b"m" * 889
        assert reads == [890]  # short of the byte asked past the size: the end
        reads.clear()
        assert files.read_bounded(fd, 4096, "f", size=900) == b"m" * 889  # it shrank
        assert reads == [901, 12]
        reads.clear()
        with open(path, "ab") as grow:  # it grew after its size was taken
            grow.write(b"n" * 20)
        assert files.read_bounded(fd, 4096, "f", size=889) == b"m" * 889 + b"n" * 20
        assert reads == [890, 4096 - 890 + 1]  # the rest, up to a byte past the limit
        reads.clear()
        with pytest.raises(ImgfsError, match="grew beyond the limit of 900"):
            files.read_bounded(fd, 900, "f", size=889)
        assert reads == [890, 11]  # never more than a byte past the limit
    finally:
        os.close(fd)


def _three_images(tmp_path: Path) -> tuple[storemaker.StoreMaker, Path]:
    """A store of three images and its images lock file."""
    maker = storemaker.StoreMaker(tmp_path / "root")
    for n in range(3):
        maker.add_image(f"localhost/img{n}:v1", [make_tar([(f"f{n}", b"x")])])
    maker.write()
    lock = maker.root / f"{storemaker.DRIVER}-images" / "images.lock"
    lock.write_bytes(b"t" * 64)
    return maker, lock


def test_big_data_reads_keep_the_images_lock_open_and_lock_it_each_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    maker, lock = _three_images(tmp_path)
    opened: list[str] = []
    real_open = locks._open_lock

    def counted(where: object) -> int | None:
        opened.append(str(where))
        return real_open(where)  # type: ignore[arg-type]

    locks.close_kept()
    monkeypatch.setattr(locks, "_open_lock", counted)
    try:
        store = imgfs.Store.open(str(maker.root), str(tmp_path / "run"), storemaker.DRIVER)
        images = store.images()
        opened.clear()
        for image in images:
            assert image.manifest()
            writer = os.open(lock, os.O_RDWR)  # not held between reads: a writer may lock it
            try:
                fcntl.fcntl(
                    writer, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0)
                )
            finally:
                os.close(writer)
        assert [p for p in opened if p.endswith("images.lock")] == [str(lock)]  # opened once
    finally:
        locks.close_kept()


def test_a_big_data_read_opens_its_file_in_one_openat2_and_stats_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    maker, _ = _three_images(tmp_path)
    store = imgfs.Store.open(str(maker.root), str(tmp_path / "run"), storemaker.DRIVER)
    images = sorted(store.images(), key=lambda image: image.id)
    opens: list[bytes] = []
    stats: list[int] = []
    real_openat2, real_fstat = files.openat2, os.fstat

    def counted_openat2(dirfd: int, path: bytes, flags: int, resolve: int) -> int:
        opens.append(path)
        return real_openat2(dirfd, path, flags, resolve)

    def counted_fstat(fd: int) -> os.stat_result:
        stats.append(fd)
        return real_fstat(fd)

    locks.close_kept()
    try:
        images[0].manifest()  # the images lock opened and kept
        monkeypatch.setattr(files, "openat2", counted_openat2)
        monkeypatch.setattr(os, "fstat", counted_fstat)
        manifest = maker.root / _image_dir(images[1].id) / "manifest"
        assert images[1].manifest() == manifest.read_bytes()
        assert opens == [f"{_image_dir(images[1].id)}/manifest".encode()]  # not its directory
        assert len(stats) == 1  # the check that it is a regular file gave its size
        monkeypatch.undo()
        (maker.root / _image_dir(images[2].id) / "manifest").unlink()
        missing = f"image {images[2].id[:12]}.*file manifest is missing"
        with pytest.raises(ImgfsError, match=missing):
            images[2].manifest()
        for path in (maker.root / _image_dir(images[2].id)).iterdir():
            path.unlink()
        (maker.root / _image_dir(images[2].id)).rmdir()
        with pytest.raises(imgfs.ImageNotFound, match="removed from the store"):
            images[2].manifest()
    finally:
        locks.close_kept()


def _image_dir(image_id: str) -> str:
    return f"{storemaker.DRIVER}-images/{image_id}"
