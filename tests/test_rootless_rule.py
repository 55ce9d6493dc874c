"""The rootless permission rule in the adapter, without a kernel (tests/storemaker stores).

A rootless store mounted by its owner has no ``default_permissions``: nothing but the adapter
checks, so every handler of the access path (lookup, getattr, readlink, xattrs, opendir, open,
access) must refuse what the rule refuses, for every caller, and nothing may be cached for the
kernel to answer a second user with. The real-mount side is tests/test_rootless.py.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import tarfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pyfuse3
import pytest
import trio

import imgfs
from imgfs.fuse.inodes import ROOT_INODE
from imgfs.fuse.mounting import parse_mount_options
from imgfs.fuse.ops import Operations
from imgfs.views.content import Caches
from imgfs.views.keys import ROOT
from imgfs.views.node import Node, Ownership
from tests import storemaker
from tests.test_ops_offline import _errno_of

T = TypeVar("T")
OWNER, OTHER = 1001, 1002  # the mount's owner; a second host user (== an image owner below)
OWNER_CTX = SimpleNamespace(uid=OWNER, gid=OWNER, pid=os.getpid(), umask=0o022)
OTHER_CTX = SimpleNamespace(uid=OTHER, gid=OTHER, pid=os.getpid(), umask=0o022)
ROOT_CTX = SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0o022)

# name, type, mode, uid, gid, content or link target
_MEMBERS: list[tuple[str, bytes, int, int, int, bytes]] = [
    ("d700", tarfile.DIRTYPE, 0o700, 2000, 2000, b""),
    ("d700/f", tarfile.REGTYPE, 0o600, 2000, 2000, b"f\n"),
    ("d000", tarfile.DIRTYPE, 0o000, 0, 0, b""),
    ("d000/in", tarfile.REGTYPE, 0o644, 0, 0, b"in\n"),
    ("secret", tarfile.REGTYPE, 0o600, OTHER, OTHER, b"secret\n"),  # owned by OTHER's uid
    ("group", tarfile.REGTYPE, 0o040, 0, OTHER, b"group\n"),  # only OTHER's group may read
    ("zero", tarfile.REGTYPE, 0o000, 0, 0, b"z\n"),
    ("pub", tarfile.REGTYPE, 0o644, 0, 0, b"pub\n"),
    ("exe", tarfile.REGTYPE, 0o755, 0, 0, b"#!/bin/sh\n"),
    ("pubdir", tarfile.DIRTYPE, 0o755, 0, 0, b""),
    ("pubdir/link", tarfile.SYMTYPE, 0o777, 0, 0, b"../secret"),
]


def _tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, mode, uid, gid, data in _MEMBERS:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, 1.7e9
            if kind == tarfile.SYMTYPE:
                info.linkname = data.decode()
                tf.addfile(info)
            elif kind == tarfile.REGTYPE:
                info.size = len(data)
                info.pax_headers = {"SCHILY.xattr.user.note": "x"} if name == "secret" else {}
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return buf.getvalue()


@pytest.fixture
def made(tmp_path: Path) -> storemaker.StoreMaker:
    maker = storemaker.StoreMaker(tmp_path / "root")
    maker.add_image("localhost/app:v1", [_tar()])
    maker.write()
    return maker


def _ops(made: storemaker.StoreMaker, tmp: Path, ownership: Ownership) -> Operations:
    store = imgfs.Store.open(str(made.root), str(tmp / "run"), storemaker.DRIVER)
    return Operations(store, Caches.build(str(tmp / "cache"), direct=True), ownership)


def _rootless(**kw: Any) -> Ownership:
    return Ownership(OWNER, OWNER, image_root=OWNER, **kw)


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    return trio.run(fn)


async def _walk(ops: Operations, path: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
    attrs = await ops.getattr(ROOT_INODE, ctx)
    for name in filter(None, path.split(b"/")):
        attrs = await ops.lookup(attrs.st_ino, name, ctx)
        assert attrs.st_ino != 0, f"{name!r} not found"
    return attrs


async def _read(ops: Operations, ino: int, ctx: Any) -> bytes:
    info = await ops.open(ino, os.O_RDONLY, ctx)
    try:
        return bytes(await ops.read(info.fh, 0, 1 << 16))
    finally:
        await ops.release(info.fh)


async def _list(ops: Operations, ino: int, ctx: Any, monkeypatch: pytest.MonkeyPatch) -> set[bytes]:
    names: set[bytes] = set()
    monkeypatch.setattr(pyfuse3, "readdir_reply", lambda _t, name, _a, _o: names.add(name) or True)
    fh = await ops.opendir(ino, ctx)
    await ops.readdir(fh, 0, None)
    await ops.releasedir(fh)
    return names


def test_the_owner_is_the_images_root(
    made: storemaker.StoreMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = _ops(made, tmp_path, _rootless())
    image = made.images[0]
    views = [b"rootfs", f"layers/0-{image.diff_ids[0].split(':')[1]}".encode()]

    async def main() -> None:
        for view in views:
            base = image.id.encode() + b"/" + view
            for name, kind, mode, uid, gid, data in _MEMBERS:
                attrs = await _walk(ops, base + b"/" + name.encode(), OWNER_CTX)
                # shown exactly as the image has them
                assert stat.S_IMODE(attrs.st_mode) == mode, name
                assert (attrs.st_uid, attrs.st_gid) == (uid, gid), name
                if kind == tarfile.REGTYPE:
                    assert await _read(ops, attrs.st_ino, OWNER_CTX) == data, name
                    assert await ops.access(attrs.st_ino, os.R_OK, OWNER_CTX), name
                    assert not await ops.access(attrs.st_ino, os.W_OK, OWNER_CTX), name
                    # executing needs an x bit, as for root
                    assert await ops.access(attrs.st_ino, os.X_OK, OWNER_CTX) == bool(mode & 0o111)
                elif kind == tarfile.DIRTYPE:
                    assert await ops.access(attrs.st_ino, os.R_OK | os.X_OK, OWNER_CTX), name
                    assert await _list(ops, attrs.st_ino, OWNER_CTX, monkeypatch), name
                else:
                    assert await ops.readlink(attrs.st_ino, OWNER_CTX) == data
            secret = await _walk(ops, base + b"/secret", OWNER_CTX)
            assert await ops.getxattr(secret.st_ino, b"user.note", OWNER_CTX) == b"x"

    _run(main)


def test_another_user_gets_other_bits_only_never_by_uid_match(
    made: storemaker.StoreMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """allow_other and a umask that lets others into imgfs's own tree: the image's "other"
    bits decide, never its owners; and what the owner looked up first is no way in."""
    ops = _ops(made, tmp_path, _rootless(umask=0o022, shared=True))
    base = made.images[0].id.encode() + b"/rootfs/"

    async def main() -> None:
        known = {m[0]: await _walk(ops, base + m[0].encode(), OWNER_CTX) for m in _MEMBERS}
        for attrs in known.values():  # nothing cached for the kernel to answer others with
            assert attrs.entry_timeout == attrs.attr_timeout == 0
        image_dir = await _walk(ops, made.images[0].id.encode(), OWNER_CTX)
        assert image_dir.entry_timeout == image_dir.attr_timeout == 0  # imgfs's own nodes too
        negative = await ops.lookup(image_dir.st_ino, b"nope", OTHER_CTX)
        assert negative.st_ino == 0
        assert negative.entry_timeout == 0

        assert await _read(ops, known["pub"].st_ino, OTHER_CTX) == b"pub\n"
        assert await ops.access(known["pub"].st_ino, os.R_OK, OTHER_CTX)
        assert await ops.access(known["exe"].st_ino, os.X_OK, OTHER_CTX)
        for name in ("secret", "group", "zero"):  # secret is OTHER's uid, group OTHER's gid
            ino = known[name].st_ino
            assert await _errno_of(ops.open(ino, os.O_RDONLY, OTHER_CTX)) == errno.EACCES, name
            assert not await ops.access(ino, os.R_OK, OTHER_CTX), name
        assert await _errno_of(ops.getxattr(known["secret"].st_ino, b"user.note", OTHER_CTX)) == (
            errno.EACCES
        )
        for name in ("d700", "d000"):
            ino = known[name].st_ino
            assert await _errno_of(ops.opendir(ino, OTHER_CTX)) == errno.EACCES, name
            assert not await ops.access(ino, os.X_OK, OTHER_CTX), name  # chdir
            assert await _errno_of(ops.lookup(ino, b"f", OTHER_CTX)) == errno.EACCES
        for name in ("d700/f", "d000/in"):  # inodes the owner made known: still no way in
            ino = known[name].st_ino
            assert await _errno_of(ops.getattr(ino, OTHER_CTX)) == errno.EACCES, name
            assert await _errno_of(ops.open(ino, os.O_RDONLY, OTHER_CTX)) == errno.EACCES, name
            assert await _errno_of(ops.listxattr(ino, OTHER_CTX)) == errno.EACCES, name
            assert not await ops.access(ino, os.R_OK, OTHER_CTX), name
        # a symlink is readable; following it ends at a file the rule checks
        assert await ops.readlink(known["pubdir/link"].st_ino, OTHER_CTX) == b"../secret"
        assert await _list(ops, known["pubdir"].st_ino, OTHER_CTX, monkeypatch) == {b"link"}
        # root reads everything, as the image's root could
        assert await _read(ops, known["d700/f"].st_ino, ROOT_CTX) == b"f\n"

    _run(main)


def test_imgfs_own_nodes_are_checked_without_the_kernel(
    made: storemaker.StoreMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = made.images[0]
    blob = f"{image.id}/blobs/{image.diff_ids[0]}".encode()

    async def main() -> None:
        ops = _ops(made, tmp_path, _rootless(shared=True))  # 0500/0400, owned by the owner
        attrs = await _walk(ops, blob, OWNER_CTX)
        assert await ops.access(attrs.st_ino, os.R_OK, OWNER_CTX)
        assert not await ops.access(attrs.st_ino, os.X_OK, OWNER_CTX)  # 0400
        assert await _errno_of(ops.lookup(ROOT_INODE, image.id.encode(), OTHER_CTX)) == (
            errno.EACCES  # the 0500 root keeps everyone else out
        )
        assert await _errno_of(ops.getattr(attrs.st_ino, OTHER_CTX)) == errno.EACCES
        assert await _errno_of(ops.open(attrs.st_ino, os.O_RDONLY, OTHER_CTX)) == errno.EACCES
        assert await _errno_of(ops.opendir(ROOT_INODE, OTHER_CTX)) == errno.EACCES
        assert (await ops.getattr(ROOT_INODE, OTHER_CTX)).st_ino == ROOT_INODE  # stat(mnt)
        rootfs = await _walk(ops, image.id.encode() + b"/rootfs/d700/f", OWNER_CTX)
        assert await _errno_of(ops.open(rootfs.st_ino, os.O_RDONLY, OTHER_CTX)) == errno.EACCES

        ops = _ops(made, tmp_path / "umask777", _rootless(umask=0o777))  # mode 0000 for all
        assert await _errno_of(ops.lookup(ROOT_INODE, image.id.encode(), OWNER_CTX)) == (
            errno.EACCES
        )
        assert await _walk(ops, blob, ROOT_CTX)  # root: DAC override

        # -o gid= and a umask that opens the group: the group's members, not others
        ops = _ops(made, tmp_path / "group", Ownership(OWNER, 3000, umask=0o027, image_root=OWNER))
        member = SimpleNamespace(uid=OTHER, gid=3000, pid=os.getpid())
        assert await _read(ops, (await _walk(ops, blob, member)).st_ino, member)
        assert await _errno_of(ops.lookup(ROOT_INODE, image.id.encode(), OTHER_CTX)) == (
            errno.EACCES
        )

    _run(main)


def test_supplementary_groups_count_and_the_class_never_falls_through() -> None:
    own = Ownership(OWNER, 3000, umask=0o027, image_root=OWNER)
    blob = Node(ROOT, "file", 1, 0)  # imgfs's own: 0440 owner OWNER group 3000
    assert own.allows(blob, os.R_OK, OTHER, OTHER, lambda: {3000})
    assert not own.allows(blob, os.R_OK, OTHER, OTHER, lambda: {4000})
    asked: list[int] = []
    narrow = Ownership(OWNER, 3000, umask=0o077, image_root=OWNER)  # 0400: group bits = other's
    assert not narrow.allows(blob, os.R_OK, OTHER, OTHER, lambda: asked.append(1) or {3000})
    assert asked == []  # groups are read only when they decide
    # the owner class gets the owner bits only, never a wider class's
    shown = Ownership(OWNER, OWNER, umask=0o733, image_root=OWNER)  # own files 0044
    assert not shown.allows(blob, os.R_OK, OWNER, OWNER)
    assert shown.allows(blob, os.R_OK, OTHER, OTHER)


def test_root_store_mounts_keep_the_kernels_check() -> None:
    """No image_root: default_permissions stays on and the adapter adds only the view rule."""
    opts = parse_mount_options(["allow_other"], fsname="imgfs:/x")
    assert "default_permissions" in opts.fuse_options
    rootless = parse_mount_options(["allow_other,default_permissions"], "imgfs:/x",
                                   kernel_checks=False)  # fmt: skip
    assert "default_permissions" not in rootless.fuse_options
    assert {"ro", "nosuid", "nodev", "allow_other"} <= rootless.fuse_options
    assert not Ownership(0, 0).self_checked


def test_root_store_adapter_answers_as_before(made: storemaker.StoreMaker, tmp_path: Path) -> None:
    ops = _ops(made, tmp_path, Ownership(OWNER, OWNER, umask=0o022, shared=True))
    base = made.images[0].id.encode() + b"/rootfs/"

    async def main() -> None:
        image_dir = await _walk(ops, made.images[0].id.encode(), OWNER_CTX)
        assert image_dir.entry_timeout > 0  # the kernel checks imgfs's own nodes
        zero = await _walk(ops, base + b"zero", OWNER_CTX)
        assert zero.entry_timeout == 0
        assert await ops.access(zero.st_ino, os.R_OK, OWNER_CTX)  # the kernel decided already
        secret = await _walk(ops, base + b"secret", OWNER_CTX)
        # the view rule on top of the kernel's: OTHER is no owner of the image's files
        assert await _errno_of(ops.open(secret.st_ino, os.O_RDONLY, OTHER_CTX)) == errno.EACCES
        f = await _walk(ops, base + b"d700/f", OWNER_CTX)
        assert await _errno_of(ops.getattr(f.st_ino, OTHER_CTX)) == errno.EACCES

    _run(main)
