"""Test helper: mount a store with the real ``imgfs`` command and always unmount."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Mount:
    path: Path
    cache_dir: Path
    log_file: Path

    def log(self) -> str:
        try:
            return self.log_file.read_text()
        except FileNotFoundError:
            return ""


def sha256_file(path: bytes | str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (through the mount: 1 MiB requests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def imgfs_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "imgfs", *args]


def unmount(path: Path) -> None:
    if not os.path.ismount(path):
        return
    subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, check=False)
    for _ in range(50):
        if not os.path.ismount(path):
            return
        time.sleep(0.1)
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)


def mount_command(
    root: Path, runroot: Path, driver: str, mnt: Path, cache: Path, log_file: Path, *extra: str
) -> list[str]:
    """The ``imgfs`` command line that mounts ``root`` on ``mnt`` as the tests do."""
    return imgfs_command(
        "--driver", driver, "--runroot", str(runroot), "--cache-dir", str(cache),
        "--log-file", str(log_file), *extra, str(root), str(mnt),
    )  # fmt: skip


@contextlib.contextmanager
def mounted(root: Path, runroot: Path, driver: str, workdir: Path, *extra: str) -> Iterator[Mount]:
    """Mount ``root`` (daemonized: the command returns once the mount is ready)."""
    mnt = workdir / "mnt"
    cache = workdir / "cache"
    mnt.mkdir(parents=True, exist_ok=True)
    log_file = workdir / "imgfs.log"
    cmd = mount_command(root, runroot, driver, mnt, cache, log_file, *extra)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    try:
        assert result.returncode == 0, f"imgfs failed: {result.stderr}"
        assert os.path.ismount(mnt), "imgfs returned before the mount was ready"
        yield Mount(mnt, cache, log_file)
    finally:
        unmount(mnt)
