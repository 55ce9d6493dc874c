"""The ``imgfs`` command: parse the command line, wire store, operations and daemon, map errors.

Owns: argparse, defaults that depend on the user's environment (cache directory), logging
setup, the ``--list`` output and the exit codes. Must not know: how the store is read, how
requests are answered, or how mounting works (the store, views and fuse packages own those).

Exit codes (first matching class in an error's MRO wins):

    0    success
    1    any other imgfs error (corrupt store, invalid storage.conf, unknown driver, ...)
    2    usage error: bad arguments, an unknown or refused mount option, a cache directory or
         log file that cannot be used
    3    store not found (the STORE does not exist or is not a containers/storage store)
    4    permission denied on the store
    5    FUSE unavailable (/dev/fuse or fusermount3 missing)
    6    mountpoint busy, missing, or any other mount/unmount failure
    7    ``-u`` on a mount point that is not an imgfs mount (nothing is unmounted)
    130  interrupted (Ctrl-C)

Logging: with ``-f`` the log goes to stderr (and to ``--log-file`` too if given). A daemon
logs to stderr and its log file until it detaches, then to the log file only: ``--log-file``,
else ``imgfs.fuse.logfile.default_log_path()`` (``$XDG_STATE_HOME/imgfs/imgfs.log``; root:
``/var/log/imgfs/imgfs.log``; others: ``~/.local/state/imgfs/imgfs.log``), size-bounded.

``mount_helper`` is ``mount.fuse.imgfs``, the helper mount(8) runs for ``-t fuse.imgfs`` (fstab,
systemd ``.mount`` units): it turns mount(8)'s command line into imgfs's and marks the options
as coming from mount(8) (see ``imgfs.fuse.mounting`` on explicit and implicit options).

``imgfs -u``, ``--list``, ``--help`` and ``-V`` never import pyfuse3 or trio: the daemon (and
the operations) are imported only to mount.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import logging
import os
import re
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from imgfs.budget import MIN_MEMORY, Budget
from imgfs.cache import files as cachefiles
from imgfs.errors import (
    FuseUnavailable,
    ImgfsError,
    MountError,
    NotImgfsMount,
    StoreNotFound,
    StorePermissionError,
    UnsafeCacheDir,
    UsageError,
)
from imgfs.fuse import logfile, mounting
from imgfs.store.files import raise_fd_limit

if TYPE_CHECKING:
    from imgfs.fuse.ops import Operations
    from imgfs.store.image import Store

PROG: Final = "imgfs"

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_NOT_IMGFS: Final = 7
EXIT_INTERRUPTED: Final = 130

EXIT_CODES: Final[dict[type[BaseException], int]] = {
    ImgfsError: EXIT_FAILURE,
    UsageError: EXIT_USAGE,
    StoreNotFound: 3,
    StorePermissionError: 4,
    FuseUnavailable: 5,
    MountError: 6,
    NotImgfsMount: EXIT_NOT_IMGFS,
    UnsafeCacheDir: EXIT_USAGE,  # like an unwritable --cache-dir: choose or fix the directory
}

DIRECT_HELP: Final = "serve layers straight from the layer files, no temp files"
_SIZE_RE = re.compile(r"(?i)^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$")
_SIZE_UNITS: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_LOG_FORMAT: Final = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
# imgfs's own options in an fstab line (mount.fuse.imgfs turns them into these flags).
_HELPER_OPTIONS: Final = {
    "driver": "--driver",
    "runroot": "--runroot",
    "cache_dir": "--cache-dir",
    "cache_size": "--cache-size",
    "memory": "--memory",
    "log_file": "--log-file",
}
_HELPER_FLAGS: Final = {"direct": "--direct", "imgfs_debug": "--debug"}
_DEFAULT_STORE_SOURCES: Final = frozenset({"imgfs", "none", "default"})

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


# --------------------------------------------------------------------------- versions


def _version() -> str:
    return _package_version("imgfs")


def _package_version(name: str) -> str:
    from importlib import metadata  # only for -V: not on the way to a mount

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions() -> list[str]:
    """imgfs, pyfuse3, libfuse and kernel FUSE versions, one line each (nothing imported)."""
    lines = [f"imgfs {_version()}", f"pyfuse3 {_package_version('pyfuse3')}"]
    lines.append(f"libfuse {_libfuse_version()}")
    lines.append(f"fusermount3 {_fusermount_version()}")
    lines.append(f"kernel {_kernel_fuse_version()}")
    return lines


def _libfuse_version() -> str:
    """libfuse3.so.3's own version and the FUSE kernel interface it speaks, if it loads."""
    try:
        lib = ctypes.CDLL("libfuse3.so.3")
        lib.fuse_pkgversion.restype = ctypes.c_char_p
        version = lib.fuse_pkgversion().decode()
    except (OSError, AttributeError):
        return "not found (libfuse3.so.3 does not load; apt-get install fuse3)"
    interface = _captured_stdout(lib.fuse_lowlevel_version)
    match = re.search(r"interface version (\d+\.\d+)", interface)
    return f"{version} (FUSE kernel interface up to {match.group(1)})" if match else version


def _captured_stdout(function: Any) -> str:
    """What a C function prints on stdout (fd 1), flushed through libc."""
    libc = ctypes.CDLL(None)
    with tempfile.TemporaryFile() as capture:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(capture.fileno(), 1)
        try:
            function()
            libc.fflush(None)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        capture.seek(0)
        return capture.read().decode(errors="replace")


def _fusermount_version() -> str:
    try:
        result = subprocess.run(
            [mounting.fusermount(), "-V"], capture_output=True, text=True, timeout=10, check=False
        )
    except (FuseUnavailable, OSError, subprocess.TimeoutExpired):
        return "not found (apt-get install fuse3)"
    match = re.search(r"version:?\s*(\S+)", result.stdout + result.stderr)
    return match.group(1) if match else "unknown"


def _kernel_fuse_version() -> str:
    """The running kernel, and its FUSE API version where the kernel log still says it."""
    release = f"Linux {os.uname().release}"
    if not os.path.exists(mounting.FUSE_DEVICE):
        return f"{release}, no {mounting.FUSE_DEVICE} (FUSE not available)"
    try:
        result = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10, check=False)
        found = re.search(r"fuse: init \(API version (\d+\.\d+)\)", result.stdout)
    except (OSError, subprocess.TimeoutExpired):
        found = None
    if found is None:
        return f"{release} (FUSE API version not known: the kernel log is not readable here)"
    return f"{release}, FUSE API {found.group(1)}"


class _VersionAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(
            option_strings,
            dest,
            nargs=0,
            help="print the versions of imgfs, pyfuse3, libfuse and the kernel's FUSE, and exit",
        )

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print("\n".join(versions()))
        parser.exit()


# --------------------------------------------------------------------------- parser


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
    mode.add_argument(
        "-u", "--unmount", action="store_true", help="unmount MOUNTPOINT (imgfs mounts only)"
    )
    mode.add_argument(
        "--list", action="store_true", help="print the images and blobs of STORE; no mount"
    )
    _add_mount_arguments(parser)
    _add_store_arguments(parser)
    parser.add_argument(
        "--debug", action="store_true", help="log every FUSE request; show tracebacks for errors"
    )
    parser.add_argument(
        "-d", dest="debug_foreground", action="store_true", help="the same as --debug -f"
    )
    parser.add_argument("-V", "--version", action=_VersionAction)
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
        help="comma-separated mount options (repeatable): allow_other, allow_root, uid=, gid=, "
        "umask=, fsname=, max_read=, noexec, noatime, auto_unmount, debug; "
        "default_permissions (not for a rootless store: imgfs checks), ro, nosuid, nodev are "
        "always on; rw, dev, suid are refused",
    )
    parser.add_argument(
        "--log-file",
        metavar="FILE",
        help="the log file (a daemon's default: $XDG_STATE_HOME/imgfs/imgfs.log, root: "
        "/var/log/imgfs/imgfs.log, else ~/.local/state/imgfs/imgfs.log)",
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
        "--memory",
        type=parse_size,
        metavar="SIZE",
        help="the daemon's memory budget, e.g. 300M (default; at least 64M): every cache is "
        "bounded by its share, a file that alone needs more fails with EIO",
    )
    parser.add_argument("--direct", action="store_true", help=DIRECT_HELP)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None, *, via_mount: bool = False) -> int:
    """Run the command; return its exit status (argparse exits 2 itself on bad syntax).

    ``via_mount``: the command line came from mount(8) through ``mount_helper`` (its
    options are implicit; see imgfs.fuse.mounting).
    """
    args = parse_command_line(argv, via_mount=via_mount)
    _configure_terminal_logging(args)
    try:
        return _dispatch(args)
    except ImgfsError as exc:
        return _report(exc, args.debug)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def parse_command_line(argv: list[str] | None, *, via_mount: bool = False) -> argparse.Namespace:
    """The parsed arguments, ``-d`` expanded and positionals checked (argparse exits 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.debug_foreground:
        args.debug = args.foreground = True
    args.via_mount = via_mount
    _check_paths(parser, args)
    return args


def mount_helper(argv: list[str] | None = None) -> int:
    """``mount.fuse.imgfs SOURCE MOUNTPOINT [-o OPTS] [-n] [-s] [-f] [-v] [-t TYPE]`` (mount(8)).

    SOURCE is the store (``imgfs``, ``none`` or ``default``: the store podman would use).
    imgfs's own options in ``-o``: ``driver=``, ``runroot=``, ``cache_dir=``, ``cache_size=``,
    ``memory=``, ``log_file=``, ``direct``, ``imgfs_debug``; the rest are mount options.
    """
    try:
        imgfs_argv = helper_command_line(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"mount.fuse.imgfs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if imgfs_argv is None:  # mount -f: pretend
        return EXIT_OK
    return main(imgfs_argv, via_mount=True)


def helper_command_line(argv: list[str]) -> list[str] | None:
    """imgfs's argv for a mount(8) helper call (None for ``-f``, a fake mount)."""
    positional: list[str] = []
    options: list[str] = []
    fake = False
    items = iter(argv)
    for arg in items:
        if arg == "-o":
            options.extend(mounting.split_options(next(items, "")))
        elif arg.startswith("-o") and len(arg) > 2:
            options.extend(mounting.split_options(arg[2:]))
        elif arg == "-t":
            next(items, None)
        elif arg in ("-n", "-s", "-v", "-r", "-w") or arg.startswith("-t"):
            if arg == "-r":
                options.append("ro")
        elif arg == "-f":
            fake = True
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"unknown mount helper option {arg}")
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise UsageError("usage: mount.fuse.imgfs SOURCE MOUNTPOINT [-o OPTIONS]")
    if fake:
        return None
    source, mountpoint = positional
    out: list[str] = []
    rest: list[str] = []
    for item in options:
        key, has_value, value = item.partition("=")
        if has_value and key in _HELPER_OPTIONS:
            out += [_HELPER_OPTIONS[key], value]
        elif not has_value and key in _HELPER_FLAGS:
            out.append(_HELPER_FLAGS[key])
        else:
            rest.append(item)
    if rest:
        out += ["-o", ",".join(rest)]
    stores = [] if source in _DEFAULT_STORE_SOURCES else [source]
    return [*out, "--", *stores, mountpoint]


def _check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    count = len(args.paths)
    if args.unmount and count != 1:
        parser.error("-u takes exactly one MOUNTPOINT")
    if args.list and count > 1:
        parser.error("--list takes at most one STORE")
    if not (args.unmount or args.list) and count not in (1, 2):
        parser.error("expected [STORE] MOUNTPOINT")


def _configure_terminal_logging(args: argparse.Namespace) -> None:
    root = logging.getLogger()
    quiet = args.unmount or args.list
    root.setLevel(logging.DEBUG if args.debug else logging.WARNING if quiet else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    root.addHandler(handler)
    args.terminal_handler = handler


def _open_log_file(args: argparse.Namespace) -> logfile.LogFile | None:
    """The log file of a mount: ``--log-file`` (an error if unusable), else a daemon's default
    (a warning if unusable: the mount goes on, logging nowhere once detached)."""
    if args.log_file:
        opened = logfile.open_log(os.path.abspath(args.log_file))
    elif args.foreground:
        return None
    else:
        path = logfile.default_log_path()
        if path is None:
            log.warning("no log file: HOME is not set; pass --log-file to keep the log")
            return None
        try:
            opened = logfile.open_log(path, create_dir=True)
        except UsageError as exc:
            log.warning("%s; the daemon will log nowhere (pass --log-file)", exc)
            return None
    handler = logfile.LogFileHandler(opened)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    args.terminal_handler.addFilter(logfile.UntilDetached(opened))
    return opened


def _report(error: ImgfsError, debug: bool) -> int:
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"{PROG}: {message}", file=sys.stderr)
    return exit_code_for(error)


def _dispatch(args: argparse.Namespace) -> int:
    if args.unmount:
        mounting.unmount(args.paths[0])
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
        graphroot=_absolute(graphroot),
        runroot=_absolute(args.runroot),
        driver=args.driver,
        budget=_budget(args),
    )


def _budget(args: argparse.Namespace) -> Budget:
    memory = getattr(args, "memory", None)
    if memory is None:
        return Budget()
    if memory < MIN_MEMORY:
        raise UsageError(f"--memory {memory}: at least {MIN_MEMORY >> 20}M")
    return Budget(memory)


def check_cache_dir(path: str) -> str:
    """Create ``path`` (mode 0700) if needed and check that it is a writable directory."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UsageError(f"cache dir {path}: not a directory")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(f"cache dir {path}: not writable ({exc.strerror or exc})") from None
    cachefiles.open_cache_dir(path)  # UnsafeCacheDir unless it is ours alone
    return path


def _mount(args: argparse.Namespace) -> int:
    store_path = args.paths[0] if len(args.paths) == 2 else None
    mountpoint = args.paths[-1]
    via_mount = args.via_mount
    mounting.parse_mount_options(args.options, fsname=PROG, via_mount=via_mount)  # usage first
    log_file = _open_log_file(args)
    cache_dir = check_cache_dir(_absolute(args.cache_dir) or default_cache_dir())
    store = _open_store(args, store_path)
    mounting.preflight(mountpoint)
    _warn_if_rootless_unreadable(store)
    rootless = _rootless(store)
    options = mounting.parse_mount_options(
        args.options,
        fsname=f"{PROG}:{store.graphroot}",
        via_mount=via_mount,
        kernel_checks=not rootless,
    )
    raise_fd_limit()  # many readers hold many layer files open
    operations = _make_operations(args, store, options, cache_dir, rootless)
    from imgfs.fuse import daemon  # pyfuse3 and trio: only to mount

    return daemon.serve(
        operations,
        mountpoint,
        options,
        foreground=args.foreground,
        background=operations.run_background,
        cleanup=operations.close,
        log_file=log_file,
        prepare=_prestart(store) if rootless else None,
    )


def _warn_if_rootless_unreadable(store: Store) -> None:
    """Rootless store whose user-namespace opener cannot work: say so once, at mount time."""
    from imgfs.store.userns import rootless_warning

    warning = rootless_warning(store.graphroot)
    if warning is not None:
        log.warning("%s", warning)


def _prestart(store: Store) -> Callable[[], None]:
    """For a rootless store: start the user-namespace opener once the daemon serves (never
    before it forks) and before the mount is reported ready, so no read pays its start."""
    from imgfs.store.userns import prestart

    return functools.partial(prestart, store.graphroot)


def _rootless(store: Store) -> bool:
    """A rootless store mounted by its (non-root) owner: the rootless permission rule."""
    from imgfs.store.userns import is_rootless_store

    return is_rootless_store(store.graphroot)


def _make_operations(
    args: argparse.Namespace,
    store: Store,
    options: mounting.MountOptions,
    cache_dir: str,
    rootless: bool = False,
) -> Operations:
    """Wire the adapter: the caches, and ownership from the store's graph root unless
    ``-o uid=,gid=`` say otherwise. Rootless: the mount's owner is the image's root, and
    ``allow_root`` lets a second user in too."""
    from imgfs.fuse.ops import Operations
    from imgfs.views.content import Caches
    from imgfs.views.node import Ownership

    st = os.stat(store.graphroot)
    ownership = Ownership(
        uid=st.st_uid if options.uid is None else options.uid,
        gid=st.st_gid if options.gid is None else options.gid,
        umask=options.umask,
        shared=bool({"allow_other", "allow_root"} & options.fuse_options)
        if rootless
        else "allow_other" in options.fuse_options,
        image_root=os.geteuid() if rootless else None,
    )
    caches = Caches.build(cache_dir, args.cache_size, direct=args.direct, budget=store.budget)
    return Operations(store, caches, ownership, debug=args.debug)


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
