"""The mount lifecycle: init, daemonizing, main loop, signals.

Owns: ``pyfuse3.init``/``main``/``close``, detaching into the background once the mount
exists, signal handling. Options, preflight checks, the mount table and ``imgfs -u`` are in
``imgfs.fuse.mounting`` (no pyfuse3 there, so ``imgfs -u``/``--list`` never load it); the log
file is ``imgfs.fuse.logfile``'s.

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
import faulthandler
import gc
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import NoReturn

import pyfuse3
import trio

from imgfs.errors import MountError
from imgfs.fuse.logfile import LogFile
from imgfs.fuse.mounting import FUSERMOUNT, MountOptions, preflight

log = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_READY = b"ready\n"
_ERROR_PREFIX = b"error "

# --------------------------------------------------------------------------- serve


def serve(
    operations: pyfuse3.Operations,
    mountpoint: str,
    options: MountOptions,
    *,
    foreground: bool,
    background: Callable[[], Awaitable[None]] | None = None,
    cleanup: Callable[[], None] | None = None,
    log_file: LogFile | None = None,
    prepare: Callable[[], None] | None = None,
) -> int:
    """Mount ``operations`` on ``mountpoint`` and serve until unmounted or signalled.

    ``prepare`` runs in the serving process's main thread before any other thread starts and
    before the mount is reported ready (e.g. starting a helper process that must not exist
    before the daemon forks, by a fork of its own); an error there is logged, and the mount
    serves anyway.

    In daemon mode (``foreground=False``) the calling process never returns from here once
    the mount is ready: it exits 0 (``os._exit``) while the detached child serves. If the
    child fails before it is ready, the caller gets a MountError. In the serving process,
    the mount is always unmounted and ``cleanup`` always runs before this returns 0 or
    re-raises. A daemon's stdout/stderr become ``log_file`` (None: /dev/null) once detached.
    """
    try:
        real = preflight(mountpoint)
        if not foreground:
            _check_single_threaded()
        _init_fuse(operations, real, options)
    except BaseException:
        _run_cleanup(cleanup)
        raise
    return _serve_mounted(
        real, options, foreground, None if foreground else log_file, background, cleanup, prepare
    )


def _serve_mounted(
    mountpoint: str,
    options: MountOptions,
    foreground: bool,
    log_file: LogFile | None,
    background: Callable[[], Awaitable[None]] | None,
    cleanup: Callable[[], None] | None,
    prepare: Callable[[], None] | None = None,
) -> int:
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    readiness: _Readiness | None = None
    try:
        if not foreground:
            readiness = _daemonize(log_file, old_mask)
        log.info(
            "mounted %s on %s (pid %d)", _option_value(options, "fsname"), mountpoint, os.getpid()
        )
        _run_trio(background, readiness, prepare)
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


def _daemonize(log_file: LogFile | None, parent_mask: set[int | signal.Signals]) -> _Readiness:
    """Fork; in the parent wait for readiness and exit; in the child detach and return."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid != 0:
        os.close(write_fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, parent_mask)
        _wait_for_child(pid, read_fd)
    os.close(read_fd)
    _detach(log_file)
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


def _detach(log_file: LogFile | None) -> None:
    """New session, cwd /, stdin from /dev/null, stdout/stderr to the log (or /dev/null)."""
    os.setsid()
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    if log_file is None:
        os.dup2(null, 1)
        os.dup2(null, 2)
    else:
        log_file.attach_stderr()
    if null > 2:
        os.close(null)


# --------------------------------------------------------------------------- main loop


# The daemon's caches hold hundreds of thousands of long-lived, acyclic objects (a listing's
# nodes, keys and parsed members): a full collection walks every one of them, and at Python's
# default (every 10th second-generation pass) full collections were ~35 % of the CPU of a
# first ``ls -lR`` of a 100,000-file image (0.4 of 1.1 s in-process). Young cycles are still
# collected as before; a full collection comes after 100 second-generation passes (about every
# 700,000 net allocations) instead of 10.
FULL_GC_THRESHOLD = 100


def _run_trio(
    background: Callable[[], Awaitable[None]] | None,
    readiness: _Readiness | None,
    prepare: Callable[[], None] | None = None,
) -> None:
    """Run the FUSE loop under trio, with faulthandler dumping stacks on SIGUSR1 and the
    cyclic GC's full collections made rare (``FULL_GC_THRESHOLD``)."""
    was_enabled = faulthandler.is_enabled()
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0], thresholds[1], FULL_GC_THRESHOLD)
    try:
        if prepare is not None:
            _prepare(prepare)
        trio.run(_main, background, readiness)
    finally:
        gc.set_threshold(*thresholds)
        faulthandler.unregister(signal.SIGUSR1)
        if not was_enabled:
            faulthandler.disable()


async def _main(
    background: Callable[[], Awaitable[None]] | None,
    readiness: _Readiness | None,
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


def _prepare(prepare: Callable[[], None]) -> None:
    try:
        prepare()
    except Exception:
        log.exception("preparing the mount failed (serving anyway)")


async def _terminate_on_signal(signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        log.info("received %s; unmounting", signal.Signals(signum).name)
        pyfuse3.terminate()
