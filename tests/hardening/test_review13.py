"""Review of round 13's changes: inline reads, open-ahead, the fd table, inode numbers.

Each test is a finding of the review (docs in the closing note): it failed on the code merged
in that round and passes with its fix.
"""

from __future__ import annotations

import fcntl
import os
import resource
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

import imgfs
from imgfs.fuse.inodes import ROOT_INODE
from imgfs.fuse.ops import Operations
from imgfs.layer.tarsplit import FileEntry, Segment
from imgfs.store import locks
from imgfs.store.source import LayerSource
from imgfs.views.content import Caches
from imgfs.views.node import Ownership
from tests import storemaker
from tests.tarsplit_maker import make_tar
from tests.test_ops_offline import _lookup_path, _ops, _run

FILE = bytes(range(256)) * 256
LAYER = make_tar([("dir", None), ("dir/file", FILE)])
ROOT_CTX = SimpleNamespace(uid=0, gid=0, pid=1, umask=0o022)
SAFETY = 5.0  # seconds after which a blocked writer is let go (so a failing test ends)


@pytest.fixture
def made(tmp_path: Path) -> storemaker.StoreMaker:
    maker = storemaker.StoreMaker(tmp_path / "root")
    maker.add_image("localhost/app:v1", [LAYER])
    maker.write()
    return maker


def test_an_inline_read_never_waits_for_a_reader_in_a_thread(
    made: storemaker.StoreMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 1: a read of a small layer file tried inline took the file's verifier lock
    with a blocking acquire. Another reader of the same file, sent to a worker thread because
    a writer held layers.lock, holds that lock while it waits for the store lock: the inline
    read then froze the event loop, i.e. every request of the mount, until the writer let go
    (here: ``podman pull`` holding layers.lock while two ``cat``s read one file)."""
    ops = _ops(made, tmp_path)
    path = made.images[0].id.encode() + b"/rootfs/dir/file"
    writer_done = threading.Event()  # the writer lets go of layers.lock
    waiting = threading.Event()  # the first reader waits for it in its worker thread
    real_open = LayerSource.open_file

    def open_file(self: LayerSource, name: bytes, size: int) -> int:
        if getattr(locks._mode, "no_wait", False):
            raise imgfs.errors.LockBusy("layers.lock: held by a writer")
        waiting.set()
        writer_done.wait(SAFETY)
        return real_open(self, name, size)

    monkeypatch.setattr(LayerSource, "open_file", open_file)
    safety = threading.Timer(SAFETY, writer_done.set)
    safety.start()
    served_while_held: list[bool] = []

    async def main() -> None:
        attrs = await _lookup_path(ops, path)
        first = await ops.open(attrs.st_ino, os.O_RDONLY, ROOT_CTX)
        second = await ops.open(attrs.st_ino, os.O_RDONLY, ROOT_CTX)
        got: dict[int, bytes] = {}

        async def read(fh: int) -> None:
            got[fh] = bytes(await ops.read(fh, 0, len(FILE)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, first.fh)
            await trio.to_thread.run_sync(waiting.wait, SAFETY)
            nursery.start_soon(read, second.fh)
            await trio.sleep(0.05)  # the second read is tried inline now
            await ops.getattr(ROOT_INODE, ROOT_CTX)  # another request of the mount
            served_while_held.append(not writer_done.is_set())
            writer_done.set()
        assert got == {first.fh: FILE, second.fh: FILE}
        await ops.release(first.fh)
        await ops.release(second.fh)

    try:
        _run(main)
    finally:
        writer_done.set()
        safety.cancel()
    assert served_while_held == [True], "the event loop waited for the writer"


def _write_lock(path: Path) -> int:
    """An fd holding a writer's lock on ``path`` (as podman's ``fcntl`` write lock would)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
    return fd


def test_opening_a_toc_only_layers_file_never_waits_in_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 2: the open of a known ``rootfs/`` file is answered in the event loop
    (``open_known``: "without I/O"), but for a layer known only by its TOC it looked the
    file's sha256 up in the TOC: under layers.lock, waiting for a writer, and reading and
    parsing the whole TOC the first time. A writer holding layers.lock froze every request
    of the mount."""
    from tests.test_toc_layers import BASE, DUP, TOP, _make_toc_only

    maker = storemaker.StoreMaker(tmp_path / "store")
    made = maker.add_image("localhost/toc:v1", [BASE, TOP])
    root = maker.write()
    _make_toc_only(root, made.layers[1], TOP, made.diff_ids[1])
    lock = root / "overlay-layers" / "layers.lock"
    lock.touch()
    store = imgfs.Store.open(str(root), str(tmp_path / "run"), "overlay")
    ops = Operations(store, Caches.build(str(tmp_path / "cache"), direct=True), Ownership(0, 0))
    released = threading.Event()
    held: list[int] = []

    def release() -> None:
        released.set()
        if held:
            os.close(held.pop())

    safety = threading.Timer(SAFETY, release)
    served_while_held: list[bool] = []

    async def main() -> None:
        attrs = await _lookup_path(ops, made.id.encode() + b"/rootfs/etc/c.conf")
        info = await ops.open(attrs.st_ino, os.O_RDONLY, ROOT_CTX)  # the tree is in memory now
        assert bytes(await ops.read(info.fh, 0, 1 << 16)) == DUP + b"!"
        await ops.release(info.fh)
        held.append(_write_lock(lock))
        safety.start()
        got: list[bytes] = []

        async def cat() -> None:
            fh = (await ops.open(attrs.st_ino, os.O_RDONLY, ROOT_CTX)).fh
            got.append(bytes(await ops.read(fh, 0, 1 << 16)))
            await ops.release(fh)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cat)
            await trio.sleep(0.05)
            await ops.getattr(ROOT_INODE, ROOT_CTX)  # another request of the mount
            served_while_held.append(not released.is_set())
            release()
        assert got == [DUP + b"!"]

    try:
        _run(main)
    finally:
        release()
        safety.cancel()
    assert served_while_held == [True], "the event loop waited for the writer"


def test_growing_the_fd_table_keeps_every_open_descriptor() -> None:
    """Finding 3: ``grow_fd_table`` (the daemon of a rootless store, at start) made the table
    big by ``dup2(0, top - 1)`` and closing that: a descriptor the process had open at
    ``top - 1`` (min(1024, RLIMIT_NOFILE) - 1: a low ``ulimit -n`` and a busy daemon) was
    silently closed."""
    from imgfs.store import userns

    r, w = os.pipe()
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        top = min(1024, soft)
        assert top > 8
        os.dup2(r, top - 1)  # the daemon has a descriptor open at top - 1
        before = os.fstat(top - 1)
        userns.grow_fd_table(top)
        after = os.fstat(top - 1)  # EBADF on the old code
        assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
        os.close(top - 1)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("xattr", ["user.a=b", "user.a\0b", ""])
def test_a_toc_xattr_name_a_pax_record_cannot_carry_is_refused(xattr: str) -> None:
    """Finding 4: a TOC-only layer's xattrs become PAX records ``SCHILY.xattr.<name>=<value>``
    for the one tree builder; a name with ``=`` was read back as another xattr (``user.a=b``
    = ``c`` served as ``user.a`` = ``b=c``), one with NUL as a name listxattr splits in two,
    an empty one dropped: metadata the TOC never said. Refused with the entry's name."""
    import json

    from imgfs.errors import MalformedMetadata
    from imgfs.layer.tree import LayerTree
    from imgfs.store.toc import toc_tar_entries

    entry = {"type": "reg", "name": "f", "xattrs": {xattr: "Yw==", "user.ok": "Yw=="}}
    toc = json.dumps({"version": 1, "entries": [entry]}).encode()
    with pytest.raises(MalformedMetadata, match="'f': xattr name"):
        LayerTree.build(toc_tar_entries(toc, "layer x"), "layer x")


def test_generation_under_a_low_descriptor_limit_opens_at_each_files_turn(
    tmp_path: Path,
) -> None:
    """Finding 5: generation's open-ahead holds up to PREFETCH x (AHEAD_BATCHES + 1) files
    open; when the process ran out of descriptors (EMFILE) opening ahead, that error was handed
    to the file and failed the whole generation (an EIO), where opening each file at its turn
    (one descriptor at a time, as before open-ahead) works. Out of descriptors, open-ahead now
    stops and leaves the files to their turn; ``--direct`` reads' open-ahead likewise."""
    from imgfs.layer.assemble import LayerReader, generate
    from tests.test_assemble import RecordingSink, make_layer

    members: list[tuple[str | bytes, bytes | str | None]] = [("d", None)]
    members += [(f"d/f{i:03d}", b"%d\n" % i * 50) for i in range(300)]
    layer = make_layer(tmp_path, make_tar(members))
    sink = RecordingSink(truth=layer.tar)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    locks.close_kept()  # earlier tests' kept lock descriptors: not this test's to count
    with layer.files() as files:
        probe = os.open(os.devnull, os.O_RDONLY)
        os.close(probe)
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe + 24, hard))  # ~24 free descriptors
        try:
            generate(layer.entries, files, sink, layer.digest, len(layer.tar), "layer L")
            reader = LayerReader(layer.index(), files, layer.digest, "layer L")  # --direct
            try:
                got = reader.read(0, len(layer.tar))
            finally:
                reader.close()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert bytes(sink.data) == layer.tar
    assert got == layer.tar


@pytest.mark.parametrize("held_read", [True, False], ids=["held-read", "held-unread"])
def test_a_failed_file_drops_the_cached_pages_of_every_open_name_of_it(
    made: storemaker.StoreMaker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    held_read: bool,
) -> None:
    """Finding 6: one layer file has several inodes (``rootfs/`` and ``layers/`` of each image
    that has the layer) sharing one verifier. A failed check dropped the kernel's pages of the
    inode read only: a process holding another name of the file open (``keep_cache``) went on
    reading the pages cached before the failure, no EIO. Now every open name's are dropped.

    ``held-unread``: a handle finds its verifier at its first read, so a name opened but not
    yet read through this handle (its pages cached by an earlier open) has no verifier yet;
    its pages are dropped all the same, found by the file's identity."""
    image = made.images[0]
    invalidated: list[int] = []
    monkeypatch.setattr(pyfuse3, "invalidate_inode", lambda ino, *a: invalidated.append(ino))
    ops = _ops(made, tmp_path)

    async def main() -> None:
        rootfs = await _lookup_path(ops, image.id.encode() + b"/rootfs/dir/file")
        layers = await _lookup_path(ops, image.id.encode() + b"/layers")
        key = ops.inodes.key(layers.st_ino)
        (name,) = [n for n, _ in ops.view.children(key) if n not in (b".", b"..")]
        other = await _lookup_path(ops, image.id.encode() + b"/layers/" + name + b"/dir/file")
        assert other.st_ino != rootfs.st_ino
        held = await ops.open(other.st_ino, os.O_RDONLY, ROOT_CTX)
        if held_read:
            assert bytes(await ops.read(held.fh, 0, 4096)) == FILE[:4096]  # kernel-cached
        diff = made.root / "overlay" / image.layers[0] / "diff" / "dir" / "file"
        data = bytearray(diff.read_bytes())
        data[-5] ^= 0xFF
        diff.write_bytes(data)
        info = await ops.open(rootfs.st_ino, os.O_RDONLY, ROOT_CTX)
        with pytest.raises(pyfuse3.FUSEError):
            await ops.read(info.fh, 0, len(FILE))
        await ops.release(info.fh)
        await trio.sleep(0.2)  # the invalidations run in system tasks after the reply
        assert set(invalidated) == {rootfs.st_ino, other.st_ino}
        await ops.release(held.fh)

    _run(main)


def test_hash_behind_without_a_thread_hashes_inline_and_passes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finding 7: ``--direct`` hashes a blob behind the reads in a helper thread; when no
    thread could be started (RuntimeError: the process is at its thread limit), it hashed the
    bytes inline and then raised anyway: the read failed, and the next read fed the same bytes
    again, so a good blob failed its digest for good (a sticky IntegrityError)."""
    import hashlib

    from imgfs.layer import verify

    data = os.urandom(3 << 20)
    digest = hashlib.sha256(data).hexdigest()

    class Source:
        size = len(data)

        def read_raw(self, offset: int, n: int) -> bytes:
            return data[offset : offset + n]

    _thread_cannot_start(monkeypatch, "imgfs-hash-behind")
    verifier = verify.Verifier(
        len(data), lambda: verify.DigestChecker(digest, "blob b", behind=True), "blob b"
    )
    got = b"".join(verifier.read(Source(), k, 1 << 20) for k in range(0, len(data), 1 << 20))
    assert got == data
    assert verifier.passed
    assert verifier.failure is None


def test_generation_without_an_open_ahead_thread_fails_with_its_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 8: when the ``imgfs-open-ahead`` thread could not start, generation's cleanup
    joined the thread never started: "cannot join thread before it is started" replaced the
    cause, and the rest of the cleanup (closing the entries and the write pipeline) was
    skipped. Now the cause is raised and everything is closed."""
    from imgfs.layer.assemble import generate
    from tests.test_assemble import RecordingSink, make_layer

    layer = make_layer(tmp_path, make_tar([("a", b"A" * 3000), ("b", b"B" * 10)]))
    closed: list[bool] = []

    class Entries:
        def __iter__(self) -> Iterator[Segment | FileEntry]:
            return iter(layer.entries)

        def close(self) -> None:
            closed.append(True)

    _thread_cannot_start(monkeypatch, "imgfs-open-ahead")
    with layer.files() as files, pytest.raises(RuntimeError, match="can't start new thread"):
        generate(Entries(), files, RecordingSink(), layer.digest, len(layer.tar), "layer L")
    assert closed == [True]


def _thread_cannot_start(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Starting a thread called ``name`` fails as it does when the process is out of threads."""
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if self.name == name:
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)


def test_a_handle_finds_its_verifier_at_its_first_read_and_a_failed_file_fails_at_open(
    made: storemaker.StoreMaker, tmp_path: Path
) -> None:
    """An open the kernel serves from its page cache (no read) makes no verifier, so a second
    pass over many files does not churn the verifier cache; the first read makes it, and once
    the file failed its check a new open fails at once (the failure is kept by identity)."""
    image = made.images[0]
    ops = _ops(made, tmp_path)
    live = ops.view.verifiers._live

    async def main() -> None:
        attr = await _lookup_path(ops, image.id.encode() + b"/rootfs/dir/file")
        info = await ops.open(attr.st_ino, os.O_RDONLY, ROOT_CTX)
        await ops.release(info.fh)
        assert len(live) == 0
        diff = made.root / "overlay" / image.layers[0] / "diff" / "dir" / "file"
        data = bytearray(diff.read_bytes())
        data[7] ^= 0xFF
        diff.write_bytes(data)
        info = await ops.open(attr.st_ino, os.O_RDONLY, ROOT_CTX)
        with pytest.raises(pyfuse3.FUSEError):
            await ops.read(info.fh, 0, len(FILE))
        assert len(live) == 1
        await ops.release(info.fh)
        with pytest.raises(pyfuse3.FUSEError):
            await ops.open(attr.st_ino, os.O_RDONLY, ROOT_CTX)

    _run(main)
