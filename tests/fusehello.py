"""Test-only helpers: a one-file pyfuse3 file system and a driver that serves it.

Owns: ``HelloOperations`` (a root directory holding one read-only file ``hello``) and a
command line to run it through ``imgfs.fuse.daemon.serve`` or through ``imgfs.cli.main`` with
the store and the operations replaced by fakes. Must not know: the real store or the real
operations; tests use it to exercise mounting, daemonizing, signals and unmounting only.

    python tests/fusehello.py serve [--foreground] [--state DIR] [--crash-after S]
                                    [--log-file F] [-o OPTS]... MOUNTPOINT
    python tests/fusehello.py cli [imgfs arguments...]      (state dir from $HELLO_STATE)

The state directory receives ``pid`` (the serving process, written by the background
task), ``marker`` (created at start, removed by cleanup) and, in cli mode, ``wiring.json``
(what the CLI's wiring passed to ``Caches.build`` and ``Operations``).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import sys
import types
from typing import Any

import pyfuse3
import trio

from imgfs import cli
from imgfs.errors import ImgfsError, StoreNotFound
from imgfs.fuse import daemon, logfile, mounting

CONTENT = b"hello world\n"
HELLO_INODE = pyfuse3.ROOT_INODE + 1
HELLO_NAME = b"hello"


class HelloOperations(pyfuse3.Operations):
    """``/hello`` with CONTENT; records its pid and removes a marker file on close."""

    def __init__(self, state: str | None = None, crash_after: float | None = None) -> None:
        super().__init__()
        self.state = state
        self.crash_after = crash_after
        if state is not None:
            with open(os.path.join(state, "marker"), "w"):
                pass

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2
        else:
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            attr.st_size = len(CONTENT)
        attr.st_uid = os.getuid()
        attr.st_gid = os.getgid()
        return attr

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, HELLO_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name == HELLO_NAME:
            return self._attr(HELLO_INODE)
        if name in (b".", b".."):
            return self._attr(pyfuse3.ROOT_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, HELLO_NAME, self._attr(HELLO_INODE), 1)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != HELLO_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return CONTENT[off : off + size]

    async def run_background(self) -> None:
        if self.state is not None:
            tmp = trio.Path(self.state, "pid.tmp")  # rename: readers never see a partial file
            await tmp.write_text(str(os.getpid()))
            await tmp.rename(trio.Path(self.state, "pid"))
        if self.crash_after is not None:
            await trio.sleep(self.crash_after)
            raise RuntimeError("background task crashed on purpose")
        await trio.sleep_forever()

    def close(self) -> None:
        if self.state is not None:
            os.unlink(os.path.join(self.state, "marker"))


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mountpoint")
    parser.add_argument("--foreground", action="store_true")
    parser.add_argument("--state")
    parser.add_argument("--crash-after", type=float)
    parser.add_argument("--log-file")
    parser.add_argument("-o", dest="options", action="append", default=[])
    args = parser.parse_args(argv)
    try:
        options = mounting.parse_mount_options(args.options, fsname="imgfs:/test,store")
        log_file = None if args.log_file is None else logfile.open_log(args.log_file)
        ops = HelloOperations(args.state, args.crash_after)
        return daemon.serve(
            ops,
            args.mountpoint,
            options,
            foreground=args.foreground,
            background=ops.run_background,
            cleanup=ops.close,
            log_file=log_file,
        )
    except ImgfsError as exc:
        print(f"imgfs: {exc}", file=sys.stderr)
        return cli.exit_code_for(exc)


class FakeStore:
    """Stands in for imgfs.store.image.Store: any existing directory is a store."""

    def __init__(self, graphroot: str, budget: Any = None) -> None:
        self.graphroot = graphroot
        self.budget = budget

    @classmethod
    def open(
        cls,
        graphroot: str | None = None,
        runroot: str | None = None,
        driver: str | None = None,
        budget: Any = None,
    ) -> FakeStore:
        root = graphroot or "/var/lib/containers/storage"
        if not os.path.isdir(root):
            raise StoreNotFound(f"no store at {root}: not a directory")
        return cls(root, budget)


class FakeCaches:
    """Stands in for imgfs.views.content.Caches: records how the CLI built them."""

    def __init__(self, **built: Any) -> None:
        self.built = built

    @classmethod
    def build(
        cls,
        cache_dir: str | None = None,
        cache_size: int | None = None,
        direct: bool = True,
        budget: Any = None,
    ) -> FakeCaches:
        memory = None if budget is None else budget.total
        return cls(cache_dir=cache_dir, cache_size=cache_size, direct=direct, memory=memory)


def _fake_operations(
    store: FakeStore, caches: FakeCaches, ownership: Any, debug: bool = False
) -> HelloOperations:
    state = os.environ["HELLO_STATE"]
    owner = {"uid": ownership.uid, "gid": ownership.gid, "umask": ownership.umask}
    with open(os.path.join(state, "wiring.json"), "w") as wiring:
        json.dump({"graphroot": store.graphroot, **caches.built, **owner, "debug": debug}, wiring)
    return HelloOperations(state)


def _cli(argv: list[str]) -> int:
    store_module = types.ModuleType("imgfs.store.image")
    store_module.Store = FakeStore  # type: ignore[attr-defined]
    ops_module = types.ModuleType("imgfs.fuse.ops")
    ops_module.Operations = _fake_operations  # type: ignore[attr-defined]
    content_module = types.ModuleType("imgfs.views.content")
    content_module.Caches = FakeCaches  # type: ignore[attr-defined]
    sys.modules["imgfs.store.image"] = store_module
    sys.modules["imgfs.fuse.ops"] = ops_module
    sys.modules["imgfs.views.content"] = content_module
    return cli.main(argv)


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    raise SystemExit(_serve(rest) if command == "serve" else _cli(rest))
