"""The daemon's log file: where it is by default, opened safely, bounded by rotation.

Owns: the default log path (``$XDG_STATE_HOME/imgfs/imgfs.log``; else root:
``/var/log/imgfs/imgfs.log``, others: ``~/.local/state/imgfs/imgfs.log``), opening a log file
without following a symlink and only if it is a regular file owned by us, size-bounded
rotation (``imgfs.log`` → ``imgfs.log.1`` → ``imgfs.log.2``), and the logging handler that
writes there. Must not know: pyfuse3/trio (``imgfs -u``/``--list`` import the CLI without
them), the store, or exit codes; it raises UsageError for a log file that cannot be used.

A daemon points its stdout/stderr at the log file once it detaches (faulthandler dumps and
libfuse's own messages land there too); ``attach_stderr`` records that, so a rotation moves
fd 1 and 2 to the new file and the terminal handler of the CLI goes quiet.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Mapping
from typing import Final

from imgfs.errors import UsageError

LOG_NAME: Final = "imgfs.log"
ROOT_LOG_DIR: Final = "/var/log/imgfs"
MAX_BYTES: Final = 10 << 20  # per file; with BACKUPS at most 30 MiB in all
BACKUPS: Final = 2
_OPEN_FLAGS: Final = (
    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
)


def default_log_path(
    environ: Mapping[str, str] | None = None, euid: int | None = None
) -> str | None:
    """Where a daemon logs without ``--log-file``; None when there is no sensible place."""
    env = os.environ if environ is None else environ
    state = env.get("XDG_STATE_HOME", "")
    if os.path.isabs(state):
        return os.path.join(state, "imgfs", LOG_NAME)
    if (os.geteuid() if euid is None else euid) == 0:
        return os.path.join(ROOT_LOG_DIR, LOG_NAME)
    home = env.get("HOME", "")
    if os.path.isabs(home):
        return os.path.join(home, ".local", "state", "imgfs", LOG_NAME)
    return None


class LogFile:
    """An append-only log file of ours, rotated once it grows past ``max_bytes``."""

    def __init__(self, path: str, *, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.attached_to_stderr = False
        self.fd, self.size = _open_ours(path)

    def write(self, data: bytes) -> None:
        """Append ``data`` (one or more whole lines), rotating first if the file is full."""
        if self.size + len(data) > self.max_bytes and self.size > 0:
            self.rotate()
        os.write(self.fd, data)
        self.size += len(data)

    def attach_stderr(self) -> None:
        """Point stdout and stderr at the log file (a daemon, once detached)."""
        for target in (1, 2):
            os.dup2(self.fd, target)
        self.attached_to_stderr = True

    def rotate(self) -> None:
        """``imgfs.log`` becomes ``imgfs.log.1`` (and so on); continue in a fresh file."""
        with contextlib.suppress(OSError):  # another daemon may have rotated it already
            for index in range(self.backups - 1, 0, -1):
                older = f"{self.path}.{index}"
                if os.path.lexists(older):
                    os.replace(older, f"{self.path}.{index + 1}")
            os.replace(self.path, f"{self.path}.1")
        try:
            fd, size = _open_ours(self.path)
        except UsageError:
            self.size = 0  # keep writing to the renamed file rather than lose the log
            return
        os.close(self.fd)
        self.fd, self.size = fd, size
        if self.attached_to_stderr:
            self.attach_stderr()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_log(path: str, *, create_dir: bool = False) -> LogFile:
    """Open ``path`` as a LogFile (creating its directory, mode 0700, if asked)."""
    if create_dir:
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot open log file {path}: {_reason(exc)}") from None
    return LogFile(path)


def _open_ours(path: str) -> tuple[int, int]:
    try:
        fd = os.open(path, _OPEN_FLAGS, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot open log file {path}: {_reason(exc)}") from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "not a regular file"
    elif st.st_uid != os.geteuid():
        problem = f"owned by uid {st.st_uid}, not by you"
    if problem is not None:
        os.close(fd)
        raise UsageError(f"cannot open log file {path}: {problem}")
    return fd, st.st_size


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link (log files are opened without following symlinks)"
    if exc.errno == errno.ENXIO:  # a FIFO nobody reads (opened without blocking)
        return "not a regular file"
    return exc.strerror or str(exc)


class LogFileHandler(logging.Handler):
    """A logging handler that appends formatted records to a LogFile."""

    def __init__(self, log_file: LogFile) -> None:
        super().__init__()
        self.log_file = log_file

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            self.log_file.write(line.encode("utf-8", "backslashreplace"))
        except Exception:
            self.handleError(record)


class UntilDetached(logging.Filter):
    """Lets records through until the daemon's stderr is the log file itself."""

    def __init__(self, log_file: LogFile) -> None:
        super().__init__()
        self.log_file = log_file

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.log_file.attached_to_stderr
