"""The FUSE adapter's handlers under ``trio.run``, without a kernel (tests/storemaker stores).

Checks what only the adapter decides: errno values (the one mapping), ``..``, readdir offsets,
lookup counts and ``forget``, ENODATA, EROFS, EISDIR, access, and that a file failing its check
answers EIO to every reader and has the kernel's pages dropped.
"""

from __future__ import annotations

import errno
import io
import os
import tarfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pyfuse3
import pytest
import trio

import imgfs
from imgfs.budget import LISTING_ENTRY_BYTES
from imgfs.fuse import ops as ops_module
from imgfs.fuse.inodes import ROOT_INODE
from imgfs.fuse.ops import Operations
from imgfs.store import locks
from imgfs.store.source import LayerSource
from imgfs.views import sections
from imgfs.views.content import Caches, Streamed
from imgfs.views.keys import RootfsKey
from imgfs.views.node import Ownership
from imgfs.views.tree import TreeView
from tests import storemaker
from tests.tarsplit_maker import make_tar

T = TypeVar("T")
FILE = bytes(range(256)) * 1024
LAYER = make_tar([("dir", None), ("dir/file", FILE), ("dir/small", b"small\n")])
ROOT_CTX = SimpleNamespace(uid=0, gid=0, pid=1, umask=0o022)


@pytest.fixture
def made(tmp_path: Path) -> storemaker.StoreMaker:
    maker = storemaker.StoreMaker(tmp_path / "root")
    maker.add_image("localhost/app:v1", [LAYER])
    maker.write()
    return maker


def _ops(made: storemaker.StoreMaker, tmp: Path, *, direct: bool = True) -> Operations:
    store = imgfs.Store.open(str(made.root), str(tmp / "run"), storemaker.DRIVER)
    caches = Caches.build(str(tmp / "cache"), direct=direct)
    return Operations(store, caches, Ownership(0, 0))


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    return trio.run(fn)


async def _lookup_path(ops: Operations, path: bytes) -> pyfuse3.EntryAttributes:
    attrs = await ops.getattr(ROOT_INODE, ROOT_CTX)
    for name in filter(None, path.split(b"/")):
        attrs = await ops.lookup(attrs.st_ino, name, ROOT_CTX)
        assert attrs.st_ino != 0, f"{name!r} not found"
    return attrs


async def _read_all(ops: Operations, ino: int, step: int = 1 << 16) -> bytes:
    info = await ops.open(ino, os.O_RDONLY, ROOT_CTX)
    out = bytearray()
    try:
        while chunk := await ops.read(info.fh, len(out), step):
            out += chunk
    finally:
        await ops.release(info.fh)
    return bytes(out)


async def _errno_of(call: Awaitable[Any]) -> int:
    try:
        await call
    except pyfuse3.FUSEError as exc:
        return exc.errno
    return 0


def test_dotdot_of_an_image_directory(made: storemaker.StoreMaker, tmp_path: Path) -> None:
    ops = _ops(made, tmp_path)
    image = made.images[0].id.encode()

    async def main() -> None:
        img = await _lookup_path(ops, image)
        up = await ops.lookup(img.st_ino, b"..", ROOT_CTX)
        assert up.st_ino == ROOT_INODE
        layer = await _lookup_path(ops, image + b"/rootfs/dir")
        up = await ops.lookup(layer.st_ino, b"..", ROOT_CTX)
        rootfs = await _lookup_path(ops, image + b"/rootfs")
        assert up.st_ino == rootfs.st_ino
        assert (await ops.lookup(rootfs.st_ino, b"..", ROOT_CTX)).st_ino == img.st_ino

    _run(main)


def test_negative_lookup_errnos_and_write_refusal(
    made: storemaker.StoreMaker, tmp_path: Path
) -> None:
    ops = _ops(made, tmp_path)
    image = made.images[0].id.encode()

    async def main() -> None:
        missing = await ops.lookup(ROOT_INODE, b"no-such-image", ROOT_CTX)
        assert missing.st_ino == 0  # a cacheable negative entry, not an error
        manifest = await _lookup_path(ops, image + b"/manifest.json")
        assert await _errno_of(ops.open(manifest.st_ino, os.O_WRONLY, ROOT_CTX)) == errno.EROFS
        assert await _errno_of(ops.open(manifest.st_ino, os.O_RDWR, ROOT_CTX)) == errno.EROFS
        directory = await _lookup_path(ops, image + b"/blobs")
        assert await _errno_of(ops.open(directory.st_ino, os.O_RDONLY, ROOT_CTX)) == errno.EISDIR
        assert await _errno_of(ops.getattr(999_999, ROOT_CTX)) == errno.ENOENT
        assert await _errno_of(ops.getxattr(manifest.st_ino, b"user.nope", ROOT_CTX)) == (
            errno.ENODATA
        )
        for name in (b"security.selinux", b"system.posix_acl_access"):  # ls -l asks these
            assert await _errno_of(ops.getxattr(manifest.st_ino, name, ROOT_CTX)) == (errno.ENOTSUP)
        assert await _errno_of(ops.readlink(manifest.st_ino, ROOT_CTX)) == errno.EINVAL
        assert not await ops.access(manifest.st_ino, os.W_OK, ROOT_CTX)
        assert await ops.access(manifest.st_ino, os.R_OK, ROOT_CTX)

    _run(main)


def test_errno_mapping_is_one_table() -> None:
    cases = {
        imgfs.NotFound("x"): errno.ENOENT,
        imgfs.AmbiguousName("x"): errno.ENOENT,
        imgfs.StorePermissionError("x"): errno.EACCES,
        imgfs.CorruptStore("x"): errno.EIO,
        imgfs.IntegrityError("x"): errno.EIO,
        imgfs.LayerUnavailable("x"): errno.EIO,
        RuntimeError("bug"): errno.EIO,
        pyfuse3.FUSEError(errno.ELOOP): errno.ELOOP,
    }
    for exc, code in cases.items():
        assert ops_module._errno_for(exc) == code, exc


@pytest.mark.parametrize("debug", [False, True])
def test_a_handler_error_becomes_its_errno_and_one_log_line_with_or_without_debug(
    made: storemaker.StoreMaker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    debug: bool,
) -> None:
    """Both ways through ``_boundary`` (``--debug``'s request log, and without it) map an
    exception to the one errno table and log it once, naming the handler: a bug with its
    traceback, an imgfs error as its message."""
    ops = _ops(made, tmp_path)
    ops.debug = debug

    def failing(key: object) -> None:
        raise errors.pop(0)

    errors: list[Exception] = [RuntimeError("a bug"), imgfs.StorePermissionError("refused")]
    monkeypatch.setattr(ops.view, "peek", failing)

    async def main() -> None:
        with caplog.at_level("DEBUG", logger="imgfs.fuse.ops"):
            assert await _errno_of(ops.getattr(ROOT_INODE, ROOT_CTX)) == errno.EIO
            assert await _errno_of(ops.getattr(ROOT_INODE, ROOT_CTX)) == errno.EACCES

    _run(main)
    lines = [r for r in caplog.records if r.name == "imgfs.fuse.ops"]
    assert [r.getMessage() for r in lines] == ["getattr failed unexpectedly", "getattr: refused"]
    assert lines[0].exc_info is not None
    assert lines[1].levelname == "ERROR"


def test_readdir_offsets_resume_and_lookup_counts(
    made: storemaker.StoreMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = _ops(made, tmp_path)
    image = made.images[0].id.encode()
    replies: list[tuple[bytes, int, int]] = []
    room = [2]

    def reply(token: object, name: bytes, attrs: pyfuse3.EntryAttributes, offset: int) -> bool:
        if room[0] == 0:
            return False
        room[0] -= 1
        replies.append((name, attrs.st_ino, offset))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)

    async def main() -> None:
        img = await _lookup_path(ops, image)
        fh = await ops.opendir(img.st_ino, ROOT_CTX)
        await ops.readdir(fh, 0, None)
        assert [n for n, _, _ in replies] == [b"manifest.json", b"config.json"]
        room[0] = 100
        await ops.readdir(fh, replies[-1][2], None)  # resume after the last offset returned
        await ops.releasedir(fh)
        names = [n for n, _, _ in replies]
        assert names == [
            b"manifest.json", b"config.json", b"signatures", b"blobs", b"layers", b"rootfs", b"oci"
        ]  # fmt: skip
        assert [o for _, _, o in replies] == list(range(1, 8))
        blobs_ino = next(i for n, i, _ in replies if n == b"blobs")
        again = await ops.lookup(img.st_ino, b"blobs", ROOT_CTX)
        assert again.st_ino == blobs_ino  # one inode per key
        await ops.forget([(blobs_ino, 2)])  # readdir's reference and the lookup's
        assert ops.inodes.key(blobs_ino) is None  # the forgotten key is not held
        fresh = await ops.lookup(img.st_ino, b"blobs", ROOT_CTX)
        assert fresh.st_ino == blobs_ino  # ... and keeps its number when looked up again

    _run(main)


@pytest.mark.parametrize("direct", [True, False])
def test_reads_equal_the_layer_and_a_corrupt_file_fails_every_reader(
    made: storemaker.StoreMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    image = made.images[0]
    invalidated: list[int] = []
    monkeypatch.setattr(pyfuse3, "invalidate_inode", lambda ino, *a: invalidated.append(ino))
    ops = _ops(made, tmp_path, direct=direct)
    path = image.id.encode() + b"/rootfs/dir/file"

    async def main() -> None:
        attrs = await _lookup_path(ops, path)
        assert await _read_all(ops, attrs.st_ino) == FILE
        blob = await _lookup_path(ops, f"{image.id}/blobs/{image.diff_ids[0]}".encode())
        assert await _read_all(ops, blob.st_ino, 1 << 20) == LAYER

    _run(main)
    _flip_a_byte_of_dir_file(made)
    ops = _ops(made, tmp_path / "again", direct=direct)

    async def corrupt() -> None:
        attrs = await _lookup_path(ops, path)
        info = await ops.open(attrs.st_ino, os.O_RDONLY, ROOT_CTX)
        assert await ops.read(info.fh, 2000, 100) == FILE[2000:2100]  # the middle: size-checked
        assert await _errno_of(ops.read(info.fh, len(FILE) - 10, 10)) == errno.EIO  # the end
        await trio.sleep(0.2)  # the invalidation runs in a system task after the reply
        assert invalidated == [attrs.st_ino]
        assert await _errno_of(ops.read(info.fh, 0, 100)) == errno.EIO  # failed stays failed
        await ops.release(info.fh)
        assert await _errno_of(ops.open(attrs.st_ino, os.O_RDONLY, ROOT_CTX)) == errno.EIO

    _run(corrupt)


def _flip_a_byte_of_dir_file(made: storemaker.StoreMaker) -> None:
    diff = made.root / "overlay" / made.images[0].layers[0] / "diff" / "dir" / "file"
    data = bytearray(diff.read_bytes())
    data[1000] ^= 0xFF
    diff.write_bytes(data)


def _tar_with_modes() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, mode, uid, data in (
            ("secret", 0o700, 1234, None),
            ("secret/f", 0o644, 1234, b"secret\n"),
            ("pub", 0o755, 1234, None),
            ("pub/g", 0o644, 1234, b"public\n"),
        ):
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid, info.mtime = mode, uid, uid, 1_700_000_000
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_view_access_rule_holds_on_the_whole_path(tmp_path: Path) -> None:
    """With allow_other, a host user whose uid equals an image owner gets no owner rights:
    not through lookup, getattr, xattrs, readlink, opendir or open, and never from a cache."""
    maker = storemaker.StoreMaker(tmp_path / "root")
    image = maker.add_image("localhost/modes:1", [_tar_with_modes()])
    maker.write()
    store = imgfs.Store.open(str(maker.root), str(tmp_path / "run"), storemaker.DRIVER)
    ops = Operations(store, Caches.build(None), Ownership(0, 0, umask=0o022, shared=True))
    owner_match = SimpleNamespace(uid=1234, gid=1234, pid=2, umask=0o022)
    base = f"{image.id}/rootfs".encode()

    async def main() -> None:
        secret = await _lookup_path(ops, base + b"/secret")
        inner = await _lookup_path(ops, base + b"/secret/f")  # root may
        assert inner.entry_timeout == 0
        assert inner.attr_timeout == 0
        for call in (
            ops.lookup(secret.st_ino, b"f", owner_match),
            ops.getattr(inner.st_ino, owner_match),
            ops.getxattr(inner.st_ino, b"user.x", owner_match),
            ops.listxattr(inner.st_ino, owner_match),
            ops.open(inner.st_ino, os.O_RDONLY, owner_match),
            ops.opendir(secret.st_ino, owner_match),
        ):
            assert await _errno_of(call) == errno.EACCES
        public = await _lookup_path(ops, base + b"/pub")
        g = await ops.lookup(public.st_ino, b"g", owner_match)
        assert g.st_ino != 0
        info = await ops.open(g.st_ino, os.O_RDONLY, owner_match)
        assert await ops.read(info.fh, 0, 100) == b"public\n"
        await ops.release(info.fh)

    _run(main)


def test_open_small_files_hold_a_bounded_number_of_bytes(
    made: storemaker.StoreMaker, tmp_path: Path
) -> None:
    """The bytes open handles of small files hold count against the memory budget: an open
    that would exceed it fails with EIO (forty opens of one 60 MiB manifest would be 2.4 GB)."""
    ops = _ops(made, tmp_path)
    manifest = made.images[0].manifest
    ops.inline_limit = len(manifest) + 10

    async def main() -> None:
        attrs = await _lookup_path(ops, made.images[0].id.encode() + b"/manifest.json")
        first = await ops.open(attrs.st_ino, os.O_RDONLY, ROOT_CTX)
        assert await _errno_of(ops.open(attrs.st_ino, os.O_RDONLY, ROOT_CTX)) == errno.EIO
        assert await ops.read(first.fh, 0, len(manifest)) == manifest
        await ops.release(first.fh)
        again = await ops.open(attrs.st_ino, os.O_RDONLY, ROOT_CTX)  # released: room again
        await ops.release(again.fh)

    _run(main)


def test_a_listing_is_built_once_per_view_and_opendir_then_needs_no_hop(
    made: storemaker.StoreMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = _ops(made, tmp_path)
    image = made.images[0].id.encode()
    built: list[object] = []
    hops = _count_hops(ops, monkeypatch)
    rootfs_section = type(sections.section_of(RootfsKey(made.images[0].id, b"")))
    original = rootfs_section.children

    def counting(self: Any, view: Any, key: Any) -> Any:
        built.append(key)
        return original(self, view, key)

    monkeypatch.setattr(rootfs_section, "children", counting)
    names: list[list[bytes]] = []
    monkeypatch.setattr(
        pyfuse3, "readdir_reply", lambda token, name, attrs, offset: names[-1].append(name) or True
    )

    async def main() -> None:
        attrs = await _lookup_path(ops, image + b"/rootfs/dir")
        for _ in range(2):
            hops.clear()
            names.append([])
            fh = await ops.opendir(attrs.st_ino, ROOT_CTX)
            await ops.readdir(fh, 0, None)
            await ops.releasedir(fh)
        assert hops == []  # the second opendir: the listing and the node are known
        assert names == [[b"file", b"small"]] * 2

    _run(main)
    assert built == [RootfsKey(made.images[0].id, b"dir")]


def test_a_provisional_rootfs_entry_is_listed_with_timeouts_zero_and_looked_up_for_real(
    made: storemaker.StoreMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = _ops(made, tmp_path)
    image = made.images[0].id.encode()
    listed: dict[bytes, pyfuse3.EntryAttributes] = {}
    monkeypatch.setattr(
        pyfuse3, "readdir_reply", lambda _t, name, attrs, _o: not listed.update({name: attrs})
    )

    async def main() -> None:
        image_dir = await _lookup_path(ops, image)
        fh = await ops.opendir(image_dir.st_ino, ROOT_CTX)
        await ops.readdir(fh, 0, None)
        await ops.releasedir(fh)
        entry = listed[b"rootfs"]
        assert (entry.entry_timeout, entry.attr_timeout) == (0, 0)  # the kernel asks again
        assert listed[b"blobs"].entry_timeout > 0
        real = await ops.lookup(image_dir.st_ino, b"rootfs", ROOT_CTX)
        assert real.st_ino == entry.st_ino  # the same inode, its real attributes
        assert real.entry_timeout > 0
        assert real.attr_timeout > 0
        root = ops.view.node(RootfsKey(made.images[0].id, b""))
        assert real.st_mode == root.mode != ops.ownership.mode("dir")  # the image's, not 0500
        assert (await ops.getattr(entry.st_ino, ROOT_CTX)).st_mode == real.st_mode

    _run(main)


def test_a_listing_over_its_share_is_built_again(
    made: storemaker.StoreMaker, tmp_path: Path
) -> None:
    store = imgfs.Store.open(str(made.root), str(tmp_path / "run"), storemaker.DRIVER)
    view = TreeView(store.images(), 0, Caches.build(None))
    key = RootfsKey(made.images[0].id, b"dir")
    first = view.children(key)
    assert view.peek_children(key) is first
    assert view.children(key) is first
    view = TreeView(store.images(), 0, Caches.build(None))
    view._listings.max_cost = LISTING_ENTRY_BYTES * 2  # less than these 2 entries (+1) cost
    assert [n for n, _ in view.children(key)] == [b"file", b"small"]
    assert view.peek_children(key) is None


def test_a_listed_file_opens_without_a_hop_its_file_opened_at_the_first_read(
    made: storemaker.StoreMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = _ops(made, tmp_path)
    image = made.images[0].id.encode()
    hops = _count_hops(ops, monkeypatch)
    monkeypatch.setattr(
        pyfuse3, "readdir_reply", lambda token, name, attrs, offset: name == b"" or True
    )

    async def main() -> None:
        directory = await _lookup_path(ops, image + b"/rootfs/dir")
        fh = await ops.opendir(directory.st_ino, ROOT_CTX)
        await ops.readdir(fh, 0, None)
        await ops.releasedir(fh)
        ops.view._nodes.clear()  # only the listing knows the file's node now
        ops.view._nodes.max_cost = 0
        attrs = await ops.lookup(directory.st_ino, b"file", ROOT_CTX)
        hops.clear()
        info = await ops.open(attrs.st_ino, os.O_RDONLY, ROOT_CTX)
        assert hops == []  # node from the listing, content without I/O
        content = ops.handles[info.fh].content
        assert isinstance(content, Streamed)
        assert content.reader._source._fd is None  # type: ignore[attr-defined]
        out = bytearray()
        while chunk := await ops.read(info.fh, len(out), 1 << 16):
            out += chunk
        assert bytes(out) == FILE
        hops.clear()
        await ops.release(info.fh)
        assert hops == []

    _run(main)


def test_inline_reads_that_would_wait_go_to_a_thread(
    made: storemaker.StoreMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = _ops(made, tmp_path)
    path = made.images[0].id.encode() + b"/rootfs/dir/file"
    hops = _count_hops(ops, monkeypatch)

    def not_cached(*args: Any) -> int:
        raise BlockingIOError(errno.EAGAIN, "not in the page cache")

    async def main() -> None:
        attrs = await _lookup_path(ops, path)
        hops.clear()
        with monkeypatch.context() as patch:
            patch.setattr(os, "preadv", not_cached)  # RWF_NOWAIT finds no cached page
            assert await _read_all(ops, attrs.st_ino) == FILE
        assert len(hops) == len(FILE) // (1 << 16)  # each read, in a thread
        hops.clear()
        with monkeypatch.context() as patch:
            patch.setattr(LayerSource, "open_file", _busy)  # a writer holds layers.lock
            assert await _read_all(ops, attrs.st_ino) == FILE
        assert hops  # read behind lock_waits, in a thread

    _run(main)


def _busy(self: LayerSource, name: bytes, size: int) -> int:
    if getattr(locks._mode, "no_wait", False):
        raise imgfs.errors.LockBusy("layers.lock: held by a writer")
    return _open_file(self, name, size)


_open_file = LayerSource.open_file


def test_a_corrupt_file_read_inline_fails_every_later_read(
    made: storemaker.StoreMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = made.images[0]
    invalidated: list[int] = []
    monkeypatch.setattr(pyfuse3, "invalidate_inode", lambda ino, *a: invalidated.append(ino))
    diff = made.root / "overlay" / image.layers[0] / "diff" / "dir" / "file"
    data = bytearray(diff.read_bytes())
    data[5] ^= 0xFF
    diff.write_bytes(data)
    ops = _ops(made, tmp_path)
    hops = _count_hops(ops, monkeypatch)

    async def main() -> None:
        attrs = await _lookup_path(ops, image.id.encode() + b"/rootfs/dir/file")
        hops.clear()
        info = await ops.open(attrs.st_ino, os.O_RDONLY, ROOT_CTX)
        assert await _errno_of(ops.read(info.fh, 0, len(FILE))) == errno.EIO
        assert await _errno_of(ops.read(info.fh, 0, 100)) == errno.EIO  # failed stays failed
        await ops.release(info.fh)
        await trio.sleep(0.2)  # the invalidation runs in a system task after the reply
        assert set(invalidated) == {attrs.st_ino}  # after each failed read
        assert await _errno_of(ops.open(attrs.st_ino, os.O_RDONLY, ROOT_CTX)) == errno.EIO
        assert hops == []  # every one of these answered inline

    _run(main)


def _count_hops(ops: Operations, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The functions ``ops`` runs in worker threads from now on (``Operations._run``)."""
    hops: list[object] = []
    run = ops._run

    async def counting_run(fn: Callable[..., Any], *args: Any) -> Any:
        hops.append(fn)
        return await run(fn, *args)

    monkeypatch.setattr(ops, "_run", counting_run)
    return hops


def test_a_snapshot_read_waits_for_the_producer_without_a_thread(
    made: storemaker.StoreMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read of a range not yet published waits in the event loop, woken by the producer, and
    reads inline; a reader waiting on a generation that fails is woken and gets EIO."""
    from imgfs.cache.snapshots import Sink, SnapshotCache
    from imgfs.errors import IntegrityError

    ops = _ops(made, tmp_path)
    hops: list[object] = []
    real_run = Operations._run

    async def counted(self: Operations, fn: Callable[..., Any], *args: Any) -> Any:
        hops.append(fn)
        return await real_run(self, fn, *args)

    monkeypatch.setattr(Operations, "_run", counted)
    cache = SnapshotCache(str(tmp_path / "snaps"), max_bytes=1 << 20)
    data = os.urandom(8192)
    gates = {"publish": threading.Event(), "fail": threading.Event()}

    def produce(sink: Sink) -> None:
        gates["publish"].wait(10)
        sink.write(data)
        sink.publish(4096)
        gates["fail"].wait(10)
        raise IntegrityError("layer L: file 'x' fails its CRC-64")

    snap = cache.acquire("k", len(data), produce)

    async def main() -> tuple[bytes, int]:
        got: list[bytes] = []

        async def reader() -> None:
            got.append(bytes(await ops._read_snapshot(snap, 0, 4096)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.sleep(0.2)
            assert not got  # still waiting for the producer
            gates["publish"].set()
        assert hops == []  # waited in the event loop and read inline: no worker thread
        code = 0
        async with trio.open_nursery() as nursery:

            async def late_reader() -> None:
                nonlocal code
                try:
                    await ops._read_snapshot(snap, 4096, 4096)
                except IntegrityError:
                    code = errno.EIO

            nursery.start_soon(late_reader)
            await trio.sleep(0.2)
            assert code == 0  # waits: the rest is not published
            gates["fail"].set()
        return got[0], code

    first, code = trio.run(main)
    assert first == data[:4096]
    assert code == errno.EIO  # woken by the failure, not left waiting
    assert hops == [snap.read]  # only the failed range, whose read raises the producer's error
    cache.release(snap)
    cache.close()


class _Colliding:
    """A key whose hash is fixed: every instance collides with every other."""

    def __init__(self, name: str, home: int) -> None:
        self.name, self.home = name, home

    def __hash__(self) -> int:
        return self.home

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Colliding) and other.name == self.name


def test_inode_numbers_survive_forget_and_collisions_probe_to_a_free_number() -> None:
    from imgfs.fuse.inodes import InodeTable

    table = InodeTable("root")
    a, b, c = (_Colliding(n, 5000) for n in "abc")
    ino_a, ino_b = table.remember(a), table.remember(b)
    assert ino_a == 5000
    assert ino_b == 5001  # b collides with a live key: the next number
    table.forget(ino_a, 1)
    assert table.key(ino_a) is None
    assert len(table) == 2  # only live keys are held
    assert table.remember(b) == ino_b  # a live key keeps its number
    assert table.remember(a) == ino_a  # a forgotten key gets its own number back
    assert table.remember(c) == 5002
    assert table.ino(_Colliding("d", 1)) == 2  # never 0 or the root's number
    table.forget(ino_b, 2)
    assert table.ino(b) == ino_b  # computed, not held: a readdir entry the kernel did not take
    assert table.key(ino_b) is None
    assert table.remember(_Colliding("e", -3)) == (1 << 63) - 3  # sign bit cleared


def test_snapshot_blobs_use_direct_io_generating_or_complete(
    made: storemaker.StoreMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob opened while its snapshot generates is direct I/O (no kernel pages of a blob that
    may still fail), and so is one opened once it is complete (keep_cache was measured slower
    for a cp right after the first); a failed generation gives EIO on every later open."""
    from imgfs.views import content as content_module

    image = made.images[0]
    ops = _ops(made, tmp_path, direct=False)
    gate = threading.Event()
    real = content_module._produce

    def gated(*args: Any) -> None:
        gate.wait(10)
        real(*args)

    monkeypatch.setattr(content_module, "_produce", gated)

    async def main() -> None:
        blob = await _lookup_path(ops, f"{image.id}/blobs/{image.diff_ids[0]}".encode())
        first = await ops.open(blob.st_ino, os.O_RDONLY, ROOT_CTX)
        assert (first.direct_io, first.keep_cache) == (True, False)  # still generating
        gate.set()
        out = bytearray()
        while chunk := await ops.read(first.fh, len(out), 1 << 20):
            out += chunk
        assert bytes(out) == LAYER
        again = await ops.open(blob.st_ino, os.O_RDONLY, ROOT_CTX)
        assert (again.direct_io, again.keep_cache) == (True, False)  # complete: still direct
        assert await ops.read(again.fh, 0, 512) == LAYER[:512]
        await ops.release(again.fh)
        await ops.release(first.fh)

    _run(main)
    _flip_a_byte_of_dir_file(made)
    ops = _ops(made, tmp_path / "again", direct=False)

    async def corrupt() -> None:
        blob = await _lookup_path(ops, f"{image.id}/blobs/{image.diff_ids[0]}".encode())
        info = await ops.open(blob.st_ino, os.O_RDONLY, ROOT_CTX)
        assert info.direct_io
        assert await _errno_of(ops.read(info.fh, 0, len(LAYER))) == errno.EIO
        await ops.release(info.fh)
        assert await _errno_of(ops.open(blob.st_ino, os.O_RDONLY, ROOT_CTX)) == errno.EIO

    _run(corrupt)


def test_complete_snapshot_reads_fill_one_reused_buffer_with_the_right_bytes(
    made: storemaker.StoreMaker, tmp_path: Path
) -> None:
    """Inline reads of a published snapshot range go into the adapter's one scratch buffer
    (pyfuse3 copies the reply before another request runs), not a fresh zeroed buffer per
    request; each read has the right bytes, and a read larger than the buffer gets its own."""
    image = made.images[0]
    ops = _ops(made, tmp_path, direct=False)
    ops._scratch = bytearray(4096)

    async def main() -> None:
        blob = await _lookup_path(ops, f"{image.id}/blobs/{image.diff_ids[0]}".encode())
        assert await _read_all(ops, blob.st_ino, 1 << 20) == LAYER  # generates
        info = await ops.open(blob.st_ino, os.O_RDONLY, ROOT_CTX)
        views = []
        for off in (0, 4096, 512, len(LAYER) - 100):
            got = await ops.read(info.fh, off, 4096)
            assert bytes(got) == LAYER[off : off + 4096]
            views.append(got)
        assert all(isinstance(v, memoryview) and v.obj is ops._scratch for v in views)
        big = await ops.read(info.fh, 0, 8192)
        assert bytes(big) == LAYER[:8192]
        assert not (isinstance(big, memoryview) and big.obj is ops._scratch)
        await ops.release(info.fh)

    _run(main)


def test_flush_answers_enosys_and_leaves_the_handle_as_it_was(
    made: storemaker.StoreMaker, tmp_path: Path
) -> None:
    """A close sends FLUSH, then RELEASE; a read-only filesystem has nothing to flush: ENOSYS
    (not pyfuse3's default 0; what the kernel does with it: ``test_logging``). The handle is
    untouched by it: it reads on and is released as usual."""
    ops = _ops(made, tmp_path)
    image = made.images[0].id.encode()

    async def main() -> None:
        attrs = await _lookup_path(ops, image + b"/rootfs/dir/file")
        info = await ops.open(attrs.st_ino, os.O_RDONLY, ROOT_CTX)
        assert await _errno_of(ops.flush(info.fh)) == errno.ENOSYS
        assert bytes(await ops.read(info.fh, 0, 16)) == FILE[:16]
        await ops.release(info.fh)
        assert info.fh not in ops.handles

    _run(main)
