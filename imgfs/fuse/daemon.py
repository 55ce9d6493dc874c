"""The mount lifecycle: options, preflight checks, init, daemonizing, main loop, unmount.

Owns: the FUSE mount options imgfs insists on, the checks that run before mounting
(/dev/fuse, fusermount3, the mountpoint), ``pyfuse3.init``/``main``/``close``, detaching
into the background once the mount exists, signal handling and ``fusermount3 -u``.

Must not know: the store, images, the virtual tree or the operations' internals. It gets
an opaque ``pyfuse3.Operations`` plus two callbacks (a background task and a cleanup) and
runs them; it also knows nothing of exit codes (the CLI maps its errors to those).

Daemon mode, in order (peers-and-practice.md §d.12):

1. preflight checks and ``pyfuse3.init`` run in the calling process, so every mount error
   reaches the user's terminal;
2. ``fork()`` while the process still has a single thread; the parent blocks on a readiness
   pipe and exits 0 once the child writes ``ready`` (or reports the child's error);
3. the child calls ``setsid()``, ``chdir('/')``, points stdin at /dev/null and stdout/stderr
   at the log file (or /dev/null), starts trio and writes ``ready`` once the FUSE loop runs.

SIGTERM, SIGINT and SIGHUP are blocked from before the fork until trio's signal receiver is
in place, so an early signal is handled (clean unmount) instead of killing the process and
leaving a dead mount behind.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import grp
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import NoReturn

import pyfuse3
import trio

from imgfs.errors import FuseUnavailable, MountError, MountpointBusy, UsageError

log = logging.getLogger(__name__)

FUSE_DEVICE = "/dev/fuse"
FUSERMOUNT = "fusermount3"
MOUNTINFO = "/proc/self/mountinfo"
FUSE_PACKAGE_HINT = "install the 'fuse3' package (apt-get install fuse3)"

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_READY = b"ready\n"
_ERROR_PREFIX = b"error "

# Options imgfs always sets; the user cannot remove them.
_FIXED_OPTIONS = frozenset({"default_permissions", "ro", "nosuid", "nodev", "subtype=imgfs"})
# Options that would undo a fixed one, with the reason shown to the user.
_REFUSED_OPTIONS = {
    "rw": "imgfs is read-only; -o rw is not supported",
    "suid": "imgfs never honours set-user-ID bits; -o suid is not supported",
    "dev": "imgfs never serves device files; -o dev is not supported",
    "nodefault_permissions": "default_permissions is always on and cannot be turned off",
    "no_default_permissions": "default_permissions is always on and cannot be turned off",
}
_IMGFS_KEYS = frozenset({"uid", "gid", "umask"})


@dataclass(frozen=True)
class MountOptions:
    """FUSE options to pass to ``pyfuse3.init`` plus imgfs's own ``uid``/``gid``/``umask``.

    ``uid``, ``gid`` and ``umask`` are for the operations (ownership and modes of the
    tree); they are never part of ``fuse_options``.
    """

    fuse_options: frozenset[str]
    uid: int | None = None
    gid: int | None = None
    umask: int | None = None


# --------------------------------------------------------------------------- options


def escape_option_value(value: str) -> str:
    """Escape ``value`` for one libfuse ``-o`` item: backslashes and commas get a backslash.

    libfuse passes options as ASCII, so other characters become ``?`` (the file system
    name is informational only; the mountpoint itself is passed separately).
    """
    escaped = value.replace("\\", "\\\\").replace(",", "\\,")
    return "".join(ch if " " <= ch <= "~" else "?" for ch in escaped)


def split_options(value: str) -> list[str]:
    """Split one ``-o`` argument on commas that are not escaped with a backslash."""
    items: list[str] = []
    current: list[str] = []
    chars = iter(value)
    for ch in chars:
        if ch == "\\":
            current.append(ch + next(chars, ""))
        elif ch == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [item for item in items if item]


def parse_mount_options(values: list[str], fsname: str) -> MountOptions:
    """Parse repeated ``-o`` arguments into the options for a mount named ``fsname``.

    ``fsname`` is the unescaped file system name shown in the mount table (the CLI passes
    ``imgfs:<store path>``). Unknown options are passed to FUSE unchanged; a user's own
    ``fsname=`` replaces the default one.
    """
    fuse = set(_FIXED_OPTIONS)
    own: dict[str, int] = {}
    user_fsname: str | None = None
    for item in (item for value in values for item in split_options(value)):
        key, has_value, text = item.partition("=")
        _refuse(item, key, has_value)
        if key in _IMGFS_KEYS:
            own[key] = _parse_own_option(key, text, has_value)
        elif key == "fsname" and has_value:
            user_fsname = _ascii_option(item)
        else:
            fuse.add(_ascii_option(item))
    fuse.add(user_fsname or f"fsname={escape_option_value(fsname)}")
    return MountOptions(
        fuse_options=frozenset(fuse), uid=own.get("uid"), gid=own.get("gid"), umask=own.get("umask")
    )


def _refuse(item: str, key: str, has_value: str) -> None:
    reason = _REFUSED_OPTIONS.get(item)
    if reason is None and key == "default_permissions" and has_value:
        reason = _REFUSED_OPTIONS["nodefault_permissions"]
    if reason is None and key == "subtype" and item != "subtype=imgfs":
        reason = "the file system type is always fuse.imgfs; -o subtype is not supported"
    if reason is not None:
        raise UsageError(reason)


def _ascii_option(item: str) -> str:
    if not item.isascii():
        raise UsageError(f"mount option {item!r} is not ASCII")
    return item


def _parse_own_option(key: str, text: str, has_value: str) -> int:
    if not has_value or not text:
        raise UsageError(f"mount option {key}= needs a value")
    if key == "umask":
        return _parse_umask(text)
    return _parse_id(key, text)


def _parse_umask(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise UsageError(f"umask={text}: not an octal number") from None
    if not 0 <= value <= 0o777:
        raise UsageError(f"umask={text}: must be between 000 and 777")
    return value


def _parse_id(key: str, text: str) -> int:
    if text.isdigit():
        value = int(text)
        if value >= 2**32 - 1:
            raise UsageError(f"{key}={text}: out of range")
        return value
    try:
        if key == "uid":
            return pwd.getpwnam(text).pw_uid
        return grp.getgrnam(text).gr_gid
    except KeyError:
        kind = "user" if key == "uid" else "group"
        raise UsageError(f"{key}={text}: no such {kind}") from None


# --------------------------------------------------------------------------- preflight


def preflight(mountpoint: str) -> str:
    """Check that FUSE works and ``mountpoint`` can take a mount; return its real path."""
    check_fuse()
    return check_mountpoint(mountpoint)


def check_fuse() -> None:
    """Raise FuseUnavailable unless /dev/fuse opens and fusermount3 is on PATH."""
    try:
        fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FuseUnavailable(
            f"FUSE is not available: {FUSE_DEVICE} does not exist; load the fuse kernel module "
            f"(modprobe fuse), pass the device into containers (--device {FUSE_DEVICE}) and "
            f"{FUSE_PACKAGE_HINT}"
        ) from None
    except OSError as exc:
        raise FuseUnavailable(
            f"FUSE is not available: cannot open {FUSE_DEVICE}: {exc.strerror}; "
            f"{FUSE_PACKAGE_HINT} and make sure this user may open the device"
        ) from None
    os.close(fd)
    if shutil.which(FUSERMOUNT) is None:
        raise FuseUnavailable(
            f"FUSE is not available: {FUSERMOUNT} was not found on PATH; {FUSE_PACKAGE_HINT}"
        )


def check_mountpoint(mountpoint: str) -> str:
    """Return the real path of ``mountpoint`` (symlinks resolved) if a mount can go there."""
    real = os.path.realpath(mountpoint)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise MountError(f"mountpoint does not exist: {mountpoint}") from None
    except OSError as exc:
        raise _stat_error(mountpoint, exc) from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint is not a directory: {mountpoint}")
    if is_mount_point(real):
        raise MountpointBusy(f"mountpoint busy: {mountpoint} is already a mount point")
    return real


def _stat_error(mountpoint: str, exc: OSError) -> MountError:
    if exc.errno == errno.ENOTCONN:
        return MountpointBusy(
            f"mountpoint busy: {mountpoint} is a dead FUSE mount ({exc.strerror}); "
            f"remove it with '{FUSERMOUNT} -u {mountpoint}'"
        )
    return MountError(f"cannot use mountpoint {mountpoint}: {exc.strerror}")


def is_mount_point(path: str) -> bool:
    """True if ``path`` (a real path) is a mount point in this mount namespace."""
    try:
        return path in _mount_points()
    except OSError:
        return os.path.ismount(path)


def _mount_points() -> set[str]:
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as mountinfo:
        return {_unescape_mountinfo(line.split(" ")[4]) for line in mountinfo if line.strip()}


def _unescape_mountinfo(field: str) -> str:
    """Undo the kernel's octal escapes (``\\040`` for a space) in a mountinfo field."""
    parts = field.split("\\")
    out = [parts[0]]
    for part in parts[1:]:
        code, rest = part[:3], part[3:]
        if len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)) + rest)
        else:
            out.append("\\" + part)
    return "".join(out)


# --------------------------------------------------------------------------- serve


def serve(
    operations: pyfuse3.Operations,
    mountpoint: str,
    options: MountOptions,
    *,
    foreground: bool,
    background: Callable[[], Awaitable[None]] | None = None,
    cleanup: Callable[[], None] | None = None,
    log_file: str | None = None,
) -> int:
    """Mount ``operations`` on ``mountpoint`` and serve until unmounted or signalled.

    In daemon mode (``foreground=False``) the calling process never returns from here once
    the mount is ready: it exits 0 (``os._exit``) while the detached child serves. If the
    child fails before it is ready, the caller gets a MountError. In the serving process,
    the mount is always unmounted and ``cleanup`` always runs before this returns 0 or
    re-raises.
    """
    log_fd: int | None = None
    try:
        real = preflight(mountpoint)
        if not foreground:
            _check_single_threaded()
            log_fd = _open_log(log_file)
        _init_fuse(operations, real, options)
    except BaseException:
        if log_fd is not None:
            os.close(log_fd)
        _run_cleanup(cleanup)
        raise
    return _serve_mounted(real, options, foreground, log_fd, background, cleanup)


def _serve_mounted(
    mountpoint: str,
    options: MountOptions,
    foreground: bool,
    log_fd: int | None,
    background: Callable[[], Awaitable[None]] | None,
    cleanup: Callable[[], None] | None,
) -> int:
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    readiness: _Readiness | None = None
    try:
        if not foreground:
            readiness = _daemonize(log_fd, old_mask)
        log.info(
            "mounted %s on %s (pid %d)", _option_value(options, "fsname"), mountpoint, os.getpid()
        )
        _run_trio(background, readiness)
    except BaseException as exc:
        if readiness is not None:
            readiness.failed(str(exc) or type(exc).__name__)
        log.debug("main loop ended with %r", exc)
        raise
    finally:
        _close_session(mountpoint)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        _run_cleanup(cleanup)
    log.info("unmounted %s", mountpoint)
    return 0


def _option_value(options: MountOptions, key: str) -> str:
    for item in options.fuse_options:
        name, _, value = item.partition("=")
        if name == key:
            return value
    return ""


def _open_log(log_file: str | None) -> int | None:
    if log_file is None:
        return None
    try:
        return os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise MountError(f"cannot open log file {log_file}: {exc.strerror}") from None


def _check_single_threaded() -> None:
    count = threading.active_count()
    if count != 1:
        raise MountError(
            f"cannot detach into the background: {count} threads are running; use --foreground"
        )


def _init_fuse(operations: pyfuse3.Operations, mountpoint: str, options: MountOptions) -> None:
    """Call ``pyfuse3.init``; libfuse's own stderr lines become the error message."""
    with tempfile.TemporaryFile() as capture:
        with _stderr_to(capture.fileno()):
            error = _try_init(operations, mountpoint, options)
        capture.seek(0)
        text = capture.read().decode(errors="replace")
    if error is None:
        sys.stderr.write(text)
        return
    details = [line.removeprefix("fuse: ").strip() for line in text.splitlines()]
    reason = "; ".join(line for line in details if line) or str(error)
    raise MountError(f"cannot mount {mountpoint}: {reason}")


def _try_init(
    operations: pyfuse3.Operations, mountpoint: str, options: MountOptions
) -> RuntimeError | None:
    try:
        pyfuse3.init(operations, mountpoint, set(options.fuse_options))
    except RuntimeError as exc:
        return exc
    return None


@contextlib.contextmanager
def _stderr_to(fd: int) -> Iterator[None]:
    """Point file descriptor 2 at ``fd`` for the duration (libfuse reports errors there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(fd, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _close_session(mountpoint: str) -> None:
    """Unmount and free the FUSE session; after a crash too, so no dead mount stays."""
    try:
        pyfuse3.close(unmount=True)
    except Exception:
        log.exception("could not unmount %s; run '%s -u %s'", mountpoint, FUSERMOUNT, mountpoint)


def _run_cleanup(cleanup: Callable[[], None] | None) -> None:
    if cleanup is None:
        return
    try:
        cleanup()
    except Exception:
        log.exception("cleanup failed")


# --------------------------------------------------------------------------- daemonizing


class _Readiness:
    """The child's end of the readiness pipe: report ``ready`` or an error, exactly once."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def ready(self) -> None:
        self._send(_READY)

    def failed(self, message: str) -> None:
        self._send(_ERROR_PREFIX + message.replace("\n", " ").encode(errors="replace") + b"\n")

    def _send(self, line: bytes) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.write(fd, line)
        except OSError:
            pass  # the parent is gone; nobody is waiting any more
        finally:
            os.close(fd)


def _daemonize(log_fd: int | None, parent_mask: set[int | signal.Signals]) -> _Readiness:
    """Fork; in the parent wait for readiness and exit; in the child detach and return."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid != 0:
        os.close(write_fd)
        if log_fd is not None:
            os.close(log_fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, parent_mask)
        _wait_for_child(pid, read_fd)
    os.close(read_fd)
    _detach(log_fd)
    return _Readiness(write_fd)


def _wait_for_child(pid: int, read_fd: int) -> NoReturn:
    """Exit 0 once the child is ready; raise MountError if it fails or dies first."""
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            line = pipe.readline()
    except KeyboardInterrupt:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        raise
    if line == _READY:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if line.startswith(_ERROR_PREFIX):
        raise MountError(line[len(_ERROR_PREFIX) :].decode(errors="replace").strip())
    raise MountError(f"the imgfs daemon ended before the mount was ready ({_describe(status)})")


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _detach(log_fd: int | None) -> None:
    """New session, cwd /, stdin from /dev/null, stdout/stderr to the log (or /dev/null)."""
    os.setsid()
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    out = null if log_fd is None else log_fd
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {null, out}:
        if fd > 2:
            os.close(fd)


# --------------------------------------------------------------------------- main loop


def _run_trio(
    background: Callable[[], Awaitable[None]] | None, readiness: _Readiness | None
) -> None:
    """Run the FUSE loop under trio, with faulthandler dumping stacks on SIGUSR1."""
    was_enabled = faulthandler.is_enabled()
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        trio.run(_main, background, readiness)
    finally:
        faulthandler.unregister(signal.SIGUSR1)
        if not was_enabled:
            faulthandler.disable()


async def _main(
    background: Callable[[], Awaitable[None]] | None, readiness: _Readiness | None
) -> None:
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_terminate_on_signal, signals)
            if background is not None:
                nursery.start_soon(background)
            if readiness is not None:
                readiness.ready()
            await pyfuse3.main()
            nursery.cancel_scope.cancel()


async def _terminate_on_signal(signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        log.info("received %s; unmounting", signal.Signals(signum).name)
        pyfuse3.terminate()


# --------------------------------------------------------------------------- unmount


def unmount(mountpoint: str) -> None:
    """Unmount an imgfs (any FUSE) mount with ``fusermount3 -u``; report errors clearly."""
    exe = shutil.which(FUSERMOUNT)
    if exe is None:
        raise FuseUnavailable(
            f"FUSE is not available: {FUSERMOUNT} was not found on PATH; {FUSE_PACKAGE_HINT}"
        )
    path = os.path.realpath(mountpoint)
    if not is_mount_point(path):
        raise MountError(f"not mounted: {mountpoint}")
    result = subprocess.run([exe, "-u", path], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise _unmount_error(mountpoint, result.stderr)
    log.info("unmounted %s", path)


def _strip_program(line: str) -> str:
    program, sep, rest = line.partition(": ")
    return rest if sep and program.endswith(FUSERMOUNT) else line


def _unmount_error(mountpoint: str, stderr: str) -> MountError:
    lines = [_strip_program(line).strip() for line in stderr.splitlines()]
    reason = "; ".join(line for line in lines if line) or "fusermount3 failed"
    if "busy" in reason.lower():
        return MountpointBusy(
            f"mountpoint busy: cannot unmount {mountpoint}: {reason}; close the files and "
            f"directories still open under it (or detach lazily: {FUSERMOUNT} -u -z {mountpoint})"
        )
    return MountError(f"cannot unmount {mountpoint}: {reason}")
