"""The ``imgfs`` command: parse the command line, wire store, operations and daemon, map errors.

Owns: argparse, defaults that depend on the user's environment (cache directory), logging
setup, the ``--list`` output and the exit codes. Must not know: how the store is read, how
requests are answered, or how mounting works (the store, views and fuse packages own those).

Exit codes (first matching class in an error's MRO wins):

    0    success
    1    any other imgfs error (corrupt store, invalid storage.conf, unknown driver, ...)
    2    usage error (bad arguments or mount options)
    3    store not found
    4    permission denied on the store
    5    FUSE unavailable (/dev/fuse or fusermount3 missing)
    6    mountpoint busy, missing, or any other mount/unmount failure
    130  interrupted (Ctrl-C)

Logging: with ``-f`` the log goes to stderr (and to ``--log-file`` too if given). A daemon
logs to stderr until it detaches, then to ``--log-file`` if given, else nowhere (/dev/null):
there is no syslog here.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
from importlib import metadata
from typing import TYPE_CHECKING, Final

from imgfs.errors import (
    FuseUnavailable,
    ImgfsError,
    MountError,
    StoreNotFound,
    StorePermissionError,
    UsageError,
)
from imgfs.fuse import daemon

if TYPE_CHECKING:
    from imgfs.fuse.ops import Operations
    from imgfs.store.image import Store

PROG: Final = "imgfs"

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

EXIT_CODES: Final[dict[type[BaseException], int]] = {
    ImgfsError: EXIT_FAILURE,
    UsageError: EXIT_USAGE,
    StoreNotFound: 3,
    StorePermissionError: 4,
    FuseUnavailable: 5,
    MountError: 6,
}

_SIZE_RE = re.compile(r"(?i)^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$")
_SIZE_UNITS: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_LOG_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger(__name__)


def exit_code_for(error: BaseException) -> int:
    """The exit code for ``error``: its most specific class listed in EXIT_CODES."""
    for cls in type(error).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return EXIT_FAILURE


def default_cache_dir(environ: dict[str, str] | None = None, uid: int | None = None) -> str:
    """``$XDG_CACHE_HOME/imgfs``, else ``~/.cache/imgfs``, else ``/var/tmp/imgfs-$UID``."""
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return os.path.join(xdg, "imgfs")
    home = env.get("HOME", "")
    if os.path.isabs(home):
        return os.path.join(home, ".cache", "imgfs")
    return f"/var/tmp/imgfs-{os.getuid() if uid is None else uid}"


def parse_size(text: str) -> int:
    """Parse ``10G``, ``512M``, ``1.5GiB``, ``4096`` (binary multiples) into bytes."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 512M, 10G)")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be positive")
    return size


def _version() -> str:
    try:
        return metadata.version("imgfs")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; positional arguments are checked per mode in ``main``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage="%(prog)s [OPTIONS] [STORE] MOUNTPOINT\n"
        "       %(prog)s -u MOUNTPOINT\n"
        "       %(prog)s --list [STORE]",
        description="Mount a containers/storage image store as a read-only FUSE file system. "
        "Without STORE, use the store podman would use.",
    )
    parser.add_argument("paths", nargs="*", metavar="[STORE] MOUNTPOINT", help=argparse.SUPPRESS)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("-u", "--unmount", action="store_true", help="unmount MOUNTPOINT")
    mode.add_argument(
        "--list", action="store_true", help="print the images and blobs of STORE; no mount"
    )
    _add_mount_arguments(parser)
    _add_store_arguments(parser)
    parser.add_argument(
        "--debug", action="store_true", help="log every request; show tracebacks for errors"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    return parser


def _add_mount_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground; log to stderr"
    )
    parser.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTS",
        help="comma-separated mount options (repeatable): allow_other, uid=, gid=, umask=, "
        "and other FUSE options; default_permissions, ro, nosuid, nodev are always on",
    )
    parser.add_argument(
        "--log-file",
        metavar="FILE",
        help="append the log to FILE; a daemon without it logs nowhere once detached",
    )


def _add_store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--driver", help="storage driver (default: from STORE or storage.conf)")
    parser.add_argument("--runroot", metavar="DIR", help="run root (default: storage.conf)")
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where generated layer blobs are kept (default: $XDG_CACHE_HOME/imgfs, "
        "~/.cache/imgfs, else /var/tmp/imgfs-$UID)",
    )
    parser.add_argument(
        "--cache-size", type=parse_size, metavar="SIZE", help="cache limit, e.g. 10G or 512M"
    )
    parser.add_argument(
        "--direct", action="store_true", help="direct I/O for layer blobs (no page cache)"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command; return its exit status (argparse exits 2 itself on bad syntax)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_paths(parser, args)
    _configure_logging(args)
    try:
        return _dispatch(args)
    except ImgfsError as exc:
        return _report(exc, args.debug)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    count = len(args.paths)
    if args.unmount and count != 1:
        parser.error("-u takes exactly one MOUNTPOINT")
    if args.list and count > 1:
        parser.error("--list takes at most one STORE")
    if not (args.unmount or args.list) and count not in (1, 2):
        parser.error("expected [STORE] MOUNTPOINT")


def _configure_logging(args: argparse.Namespace) -> None:
    root = logging.getLogger()
    quiet = args.unmount or args.list
    root.setLevel(logging.DEBUG if args.debug else logging.WARNING if quiet else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    root.addHandler(handler)
    if args.log_file and args.foreground:
        file_handler = logging.FileHandler(args.log_file)
        file_handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        root.addHandler(file_handler)


def _report(error: ImgfsError, debug: bool) -> int:
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"{PROG}: {message}", file=sys.stderr)
    return exit_code_for(error)


def _dispatch(args: argparse.Namespace) -> int:
    if args.unmount:
        daemon.unmount(args.paths[0])
        return EXIT_OK
    if args.list:
        return _list(_open_store(args, args.paths[0] if args.paths else None))
    return _mount(args)


def _absolute(path: str | None) -> str | None:
    """Absolute paths only: a daemon changes its directory to /."""
    return None if path is None else os.path.abspath(path)


def _open_store(args: argparse.Namespace, graphroot: str | None) -> Store:
    from imgfs.store.image import Store

    return Store.open(
        graphroot=_absolute(graphroot), runroot=_absolute(args.runroot), driver=args.driver
    )


def _mount(args: argparse.Namespace) -> int:
    store_path = args.paths[0] if len(args.paths) == 2 else None
    mountpoint = args.paths[-1]
    daemon.parse_mount_options(args.options, fsname=PROG)  # usage errors before any store I/O
    daemon.preflight(mountpoint)
    store = _open_store(args, store_path)
    _warn_if_rootless_unreadable(store)
    options = daemon.parse_mount_options(args.options, fsname=f"{PROG}:{store.graphroot}")
    operations = _make_operations(args, store, options)
    return daemon.serve(
        operations,
        mountpoint,
        options,
        foreground=args.foreground,
        background=operations.run_background,
        cleanup=operations.close,
        log_file=_absolute(args.log_file),
    )


def _warn_if_rootless_unreadable(store: Store) -> None:
    """Rootless store whose user-namespace opener cannot work: say so once, at mount time."""
    from imgfs.store.userns import rootless_warning

    warning = rootless_warning(store.graphroot)
    if warning is not None:
        log.warning("%s", warning)


def _make_operations(
    args: argparse.Namespace, store: Store, options: daemon.MountOptions
) -> Operations:
    from imgfs.fuse.ops import make_operations

    return make_operations(
        store,
        cache_dir=_absolute(args.cache_dir) or default_cache_dir(),
        cache_size=args.cache_size,
        direct=args.direct,
        uid=options.uid,
        gid=options.gid,
        umask=options.umask,
        debug=args.debug,
    )


def _list(store: Store) -> int:
    status = EXIT_OK
    try:
        for image in store.images():
            names = " ".join(image.names) or "<none>"
            print(f"{image.id}  {image.digest or '-'}  {names}")
            try:
                blobs = image.blobs()
            except ImgfsError as exc:
                status = _report(exc, debug=False)
                continue
            for blob in blobs:
                print(f"    {blob.digest}  {blob.size:>12}  {blob.kind:<11}  {blob.media_type}")
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return status
