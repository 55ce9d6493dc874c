"""Every command-line mistake gets one ``imgfs: …`` line and its exit code, never a traceback.

Cases that only an unprivileged user can hit (a root-only store, a cache dir or log file it may
not write) run ``imgfs`` as ``nobody`` with ``setpriv``; they need an interpreter that nobody
may run (the checkout's .venv made from /usr/bin/python3 is; pyenv's under /root is not), and
skip without one (in CI they fail instead).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import empty_store, run_imgfs
from test_daemon import _private_state_home, hello_env, one_error_line

__all__ = ["_private_state_home"]

NOBODY = 65534


@pytest.fixture
def world() -> Iterator[Path]:
    """A temp directory everyone may traverse (pytest's own are 0700)."""
    base = Path(tempfile.mkdtemp(prefix="imgfs-errors-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run imgfs as nobody")
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    probe = subprocess.run([*as_nobody, sys.executable, "-c", "import imgfs"], check=False,
                           capture_output=True, env=hello_env())  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"nobody cannot run {sys.executable} with imgfs here: {probe.stderr!r:.200}")
    env = hello_env(HOME="/nonexistent")
    env.pop("XDG_CACHE_HOME", None)
    return subprocess.run(
        [*as_nobody, sys.executable, "-m", "imgfs", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def expect(result: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    assert result.returncode == code, result.stderr
    assert one_error_line(result.stderr) == f"imgfs: {message}"


def test_store_does_not_exist(world: Path) -> None:
    (world / "mnt").mkdir()
    result = run_imgfs("--cache-dir", str(world / "c"), str(world / "nope"), str(world / "mnt"))
    expect(result, 3, f"no store at {world}/nope: does not exist")


def test_store_is_a_file(world: Path) -> None:
    (world / "file").write_text("x")
    (world / "mnt").mkdir()
    result = run_imgfs("--cache-dir", str(world / "c"), str(world / "file"), str(world / "mnt"))
    expect(result, 3, f"no store at {world}/file: not a directory")


def test_list_store_does_not_exist(world: Path) -> None:
    expect(run_imgfs("--list", str(world / "nope")), 3, f"no store at {world}/nope: does not exist")


def test_unknown_mount_option(world: Path) -> None:
    result = run_imgfs("-o", "allow_other,bogus", str(world / "store"), str(world / "mnt"))
    assert result.returncode == 2
    assert one_error_line(result.stderr).startswith("imgfs: unknown mount option 'bogus' (known: ")


def test_cache_dir_is_a_file(world: Path) -> None:
    (world / "cache").write_text("x")
    store = empty_store(world / "store")
    result = run_imgfs("-f", "--cache-dir", str(world / "cache"), str(store), str(world / "mnt"))
    expect(result, 2, f"cache dir {world}/cache: not a directory")


def test_unwritable_log_file_in_foreground(world: Path) -> None:
    store = empty_store(world / "store")
    log_file = world / "no-such-dir" / "imgfs.log"
    result = run_imgfs("-f", "--log-file", str(log_file), str(store), str(world / "mnt"))
    expect(result, 2, f"cannot open log file {log_file}: No such file or directory")


def test_log_file_symlink_is_not_followed(world: Path) -> None:
    store = empty_store(world / "store")
    target = world / "elsewhere"
    target.write_text("")
    (world / "imgfs.log").symlink_to(target)
    result = run_imgfs("-f", "--log-file", str(world / "imgfs.log"), str(store), str(world / "m"))
    assert result.returncode == 2
    assert "is a symbolic link" in one_error_line(result.stderr)
    assert target.read_text() == ""


def _nobodys_cache(world: Path) -> None:
    """A cache dir nobody may use: its own and nobody else's (imgfs refuses any other)."""
    (world / "cache").mkdir(mode=0o700)
    os.chown(world / "cache", NOBODY, NOBODY)


def test_root_only_store_as_nobody(world: Path) -> None:
    store = empty_store(world / "store")
    store.chmod(0o700)
    _nobodys_cache(world)
    result = run_as_nobody("-f", "--cache-dir", str(world / "cache"), str(store), str(world / "m"))
    expect(result, 4, f"store {store}: permission denied")


def test_store_under_a_root_only_directory_as_nobody(world: Path) -> None:
    (world / "private").mkdir(mode=0o700)
    store = empty_store(world / "private" / "store")
    _nobodys_cache(world)
    result = run_as_nobody("-f", "--cache-dir", str(world / "cache"), str(store), str(world / "m"))
    expect(result, 4, f"store {store}: permission denied")


def test_cache_dir_not_writable_as_nobody(world: Path) -> None:
    store = empty_store(world / "store")
    (world / "cache").mkdir(mode=0o755)  # root's
    result = run_as_nobody("-f", "--cache-dir", str(world / "cache"), str(store), str(world / "m"))
    expect(result, 2, f"cache dir {world}/cache: not writable (Permission denied)")


def test_log_file_not_writable_as_nobody(world: Path) -> None:
    store = empty_store(world / "store")
    log_file = world / "imgfs.log"
    result = run_as_nobody("-f", "--log-file", str(log_file), str(store), str(world / "m"))
    expect(result, 2, f"cannot open log file {log_file}: Permission denied")
