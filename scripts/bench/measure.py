"""Measuring tools for the benchmark: mounts, timed commands, RSS and disk samplers.

Owns: starting and always stopping imgfs, ratarmount, minimal pyfuse3 (``minimalfs.py``) and
``podman image mount`` mounts, dropping page caches, timing a command, sampling a daemon's RSS
and a filesystem's used bytes while a run lasts, medians.
Must not know: what the stores hold or which figures the table shows.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
SAMPLE_SECONDS = 0.02
DAEMON_EXIT_SECONDS = 120.0
IMGFS = ("imgfs",)
"""The imgfs command (``--imgfs-python``: ``PYTHON -m imgfs``, another checkout's code)."""
MINIMALFS = Path(__file__).with_name("minimalfs.py")


def drop_caches() -> None:
    """Write back dirty pages and drop the page cache, dentries and inodes (root only)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def drop_count() -> int:
    """How often anyone dropped the page caches since boot (``/proc/vmstat``): a run during
    which it grows was disturbed by another process's drop (the counter is machine-wide)."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("drop_pagecache "):
            return int(line.split()[1])
    return 0


def rss_bytes(pid: int) -> int:
    """Current resident set size of ``pid`` (0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else 0


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@dataclass
class Peaks:
    """Peak RSS of a process and peak extra used bytes of a filesystem during a run, how often
    another process dropped the page caches meanwhile, and the CPU seconds (user + system)
    the process and the run's finished commands used: on a shared machine CPU varies much less
    than wall time."""

    rss: int = 0
    disk: int = 0
    foreign_drops: int = 0
    cpu: float = 0.0
    command_cpu: float = 0.0


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds ``pid`` used so far, its finished threads included (None once
    it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


class Sampler:
    """Samples RSS of ``pid`` (if any) and used bytes under ``disk`` every SAMPLE_SECONDS."""

    def __init__(self, pid: int | None, disk: Path) -> None:
        self._pid = pid
        self._disk = disk
        self._base = used_bytes(disk)
        self._drops = drop_count()
        self._cpu0 = self._cpu = cpu_seconds(pid) if pid is not None else None
        self._children0 = _children_cpu()
        self.peaks = Peaks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        if self._pid is not None:
            self.peaks.rss = max(self.peaks.rss, rss_bytes(self._pid))
            self._cpu = cpu_seconds(self._pid) or self._cpu  # the last value while it lived
        self.peaks.disk = max(self.peaks.disk, used_bytes(self._disk) - self._base)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(SAMPLE_SECONDS)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.peaks.foreign_drops = drop_count() - self._drops
        if self._cpu is not None and self._cpu0 is not None:
            self.peaks.cpu = self._cpu - self._cpu0
        self.peaks.command_cpu = _children_cpu() - self._children0


def run(cmd: Sequence[str], **kw: object) -> float:
    """Run ``cmd`` (checked) and return its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run(list(cmd), check=True, **kw)  # type: ignore[call-overload]
    return time.perf_counter() - started


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class ImgfsMount:
    """A running imgfs daemon: mountpoint, pid, seconds until ``imgfs`` returned (ready)."""

    mountpoint: Path
    pid: int
    ready_seconds: float
    cache_dir: Path
    log_file: Path
    extra: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def imgfs_mount(
    store: Path,
    runroot: Path,
    work: Path,
    *,
    direct: bool = False,
    fresh_cache: bool = True,
    args: Sequence[str] = (),
    command: Sequence[str] = IMGFS,
) -> Iterator[ImgfsMount]:
    """Mount ``store`` with imgfs (daemon) under ``work``; always unmounted on exit."""
    mnt, cache, log = work / "mnt", work / "cache", work / "imgfs.log"
    mnt.mkdir(parents=True, exist_ok=True)
    if fresh_cache:
        shutil.rmtree(cache, ignore_errors=True)
    log.unlink(missing_ok=True)
    cmd = [
        *command,
        "--driver",
        "overlay",
        "--runroot",
        str(runroot),
        "--cache-dir",
        str(cache),
        "--log-file",
        str(log),
        *(["--direct"] if direct else []),
        *args,
        str(store),
        str(mnt),
    ]
    ready = run(cmd)
    try:
        yield ImgfsMount(mnt, _daemon_pid(log), ready, cache, log)
    finally:
        _unmount_imgfs(mnt, log, command)


def _daemon_pid(log: Path) -> int:
    for _ in range(100):
        m = re.search(r"\(pid (\d+)\)", log.read_text() if log.exists() else "")
        if m:
            return int(m.group(1))
        time.sleep(0.01)
    raise RuntimeError(f"no daemon pid in {log}")


def _unmount_imgfs(mnt: Path, log: Path, command: Sequence[str]) -> None:
    pid = _daemon_pid(log)
    subprocess.run([*command, "-u", str(mnt)], check=False)
    started = time.monotonic()
    while time.monotonic() - started < DAEMON_EXIT_SECONDS:
        if _exited(pid):
            if time.monotonic() - started > 1:
                print(f"(imgfs daemon took {time.monotonic() - started:.1f} s to exit)")
            return
        time.sleep(0.01)
    raise RuntimeError(f"imgfs daemon {pid} did not exit after unmounting {mnt}")


def _exited(pid: int) -> bool:
    """Whether ``pid`` has exited: gone, or a zombie. A daemon's parent is init, which may
    reap it late (this machine's PID 1 took up to 2 s after the daemon's exit_group, seen with
    strace); that wait is not imgfs's."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat_line.rpartition(")")[2].split()[0] in ("Z", "X")


def ratarmount_index(tar: Path, work: Path) -> Path:
    """Where ratarmount keeps its index of ``tar`` (one per tar, in ``work``)."""
    return work / f"ratarmount-{tar.name[:16]}.index.sqlite"


@contextlib.contextmanager
def ratarmount_mount(tar: Path, work: Path) -> Iterator[tuple[Path, int]]:
    """Mount ``tar`` with ratarmount (index kept next to it in ``work``); yields (mnt, pid)."""
    mnt = work / "rmnt"
    cmd = ["ratarmount", "-f", "--index-file", str(ratarmount_index(tar, work)), str(tar)]
    with _fuse_process(cmd, mnt) as pid:
        yield mnt, pid


@contextlib.contextmanager
def minimal_mount(
    work: Path, *, tree: Path | None = None, file: Path | None = None, file_cache: bool = False
) -> Iterator[tuple[Path, int]]:
    """Mount ``minimalfs.py`` (``tree`` as ``rootfs/``, ``file`` as ``blob``); (mnt, pid)."""
    cmd = [sys.executable, str(MINIMALFS)]
    cmd += ["--tree", str(tree)] if tree is not None else []
    cmd += ["--file", str(file)] if file is not None else []
    cmd += ["--file-cache"] if file_cache else []
    with _fuse_process(cmd, work / "minmnt") as pid:
        yield work / "minmnt", pid


@contextlib.contextmanager
def _fuse_process(cmd: list[str], mnt: Path) -> Iterator[int]:
    """Run a foreground FUSE daemon ``cmd + [mnt]`` until its mount exists; always unmounted
    (and the process waited for) on exit. Yields its pid."""
    mnt.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([*cmd, str(mnt)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_mounted(mnt, proc)
        yield proc.pid
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True)
        try:
            proc.wait(timeout=DAEMON_EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def podman_mount(podman: Callable[..., str], image: str) -> Iterator[Path]:
    """``podman image mount IMAGE`` (``podman`` runs podman on the bench store and returns its
    stdout); always ``podman image unmount`` on exit. Yields the merged directory."""
    merged = Path(podman("image", "mount", image))
    try:
        yield merged
    finally:
        podman("image", "unmount", image)


def _wait_mounted(mnt: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 600
    while not os.path.ismount(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args!r} did not mount {mnt}")
        time.sleep(0.01)


def read_first(path: Path, size: int = 128 << 10) -> float:
    """Seconds for open + one read of ``size`` bytes (time to first byte)."""
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.read(fd, size)
        return time.perf_counter() - started
    finally:
        os.close(fd)


def open_only(path: Path) -> float:
    """Seconds for open + close (what a --direct open costs: the layer's index)."""
    started = time.perf_counter()
    os.close(os.open(path, os.O_RDONLY))
    return time.perf_counter() - started


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started
