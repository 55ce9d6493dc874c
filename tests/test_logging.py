"""The log: the default bounded log file of a daemon, safe opening, and ``--debug``'s line per
FUSE request (checked on a real mount, an EIO included: its cause must be in the log)."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_daemon import (
    FUSEHELLO,
    HelloMount,
    _private_state_home,
    hello,
    hello_env,
    is_listed_mount,
)

from imgfs.errors import UsageError
from imgfs.fuse import logfile, requestlog
from imgfs.views.keys import ROOT, SectionKey
from tests.mounting import mounted
from tests.smallstore import DRIVER, commit_image

__all__ = ["_private_state_home", "hello"]


# --------------------------------------------------------------------------- the log file


def test_default_log_path() -> None:
    assert logfile.default_log_path({"XDG_STATE_HOME": "/s", "HOME": "/h"}, euid=0) == (
        "/s/imgfs/imgfs.log"
    )
    assert logfile.default_log_path({"HOME": "/h"}, euid=0) == "/var/log/imgfs/imgfs.log"
    assert logfile.default_log_path({"HOME": "/h"}, euid=1000) == "/h/.local/state/imgfs/imgfs.log"
    assert logfile.default_log_path({"XDG_STATE_HOME": "rel"}, euid=1000) is None


def test_log_file_is_rotated_and_bounded(tmp_path: Path) -> None:
    path = tmp_path / "imgfs.log"
    log = logfile.LogFile(str(path), max_bytes=1000, backups=2)
    line = b"x" * 99 + b"\n"
    for _ in range(100):
        log.write(line)
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgfs.log", "imgfs.log.1", "imgfs.log.2"]
    for p in tmp_path.iterdir():
        assert 0 < p.stat().st_size <= 1000
        assert p.stat().st_mode & 0o777 == 0o600


def test_log_file_must_be_ours_and_regular(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="not a regular file"):
        logfile.open_log(str(fifo))
    (tmp_path / "target").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(UsageError, match="symbolic link"):
        logfile.open_log(str(tmp_path / "link"))
    if os.geteuid() == 0:
        other = tmp_path / "other"
        other.write_text("")
        os.chown(other, 65534, 65534)
        with pytest.raises(UsageError, match="owned by uid 65534"):
            logfile.open_log(str(other))


@pytest.mark.fuse_required
def test_daemon_logs_to_the_default_file(hello: HelloMount, tmp_path: Path) -> None:
    store = hello.state / "store"
    store.mkdir()
    state_home = tmp_path / "state"
    result = subprocess.run(
        [sys.executable, FUSEHELLO, "cli", str(store), str(hello.path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=hello_env(HELLO_STATE=str(hello.state), XDG_STATE_HOME=str(state_home)),
    )
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
    log_file = state_home / "imgfs" / "imgfs.log"
    assert f"mounted imgfs:{store} on {hello.path}" in log_file.read_text()
    assert (state_home / "imgfs").stat().st_mode & 0o777 == 0o700
    assert log_file.stat().st_mode & 0o777 == 0o600
    subprocess.run([sys.executable, "-m", "imgfs", "-u", str(hello.path)], check=True,
                   env=hello_env())  # fmt: skip
    assert not is_listed_mount(hello.path)
    assert "unmounted" in log_file.read_text().splitlines()[-1]


# --------------------------------------------------------------------------- --debug


def test_request_line_format() -> None:
    async def read(self: object, fh: int, off: int, size: int) -> bytes:
        return b""

    async def lookup(self: object, parent_inode: int, name: bytes, ctx: object) -> None:
        return None

    line = requestlog.describe_request(read, (7, 4096, 131072))
    assert line == "read fh=7 off=4096 size=131072"
    keys = {1: ROOT, 5: SectionKey("abc", "blobs")}
    line = requestlog.describe_request(lookup, (5, b"sha256:x", object()), keys.get)
    assert line == "lookup parent_inode=5 (/abc/blobs) name='sha256:x'"
    assert requestlog.describe_result(memoryview(b"abc")) == "3 bytes"
    assert requestlog._error(OSError(errno.EIO, "x")) == "EIO"


@pytest.fixture
def tiny_store(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("tiny stores are built with buildah as root")
    commit_image(tmp_path, "app", "hello from a layer\n" * 100)
    return tmp_path


@pytest.mark.fuse_required
def test_debug_logs_each_request_and_explains_eio(tiny_store: Path, tmp_path: Path) -> None:
    base = tiny_store
    with mounted(base / "root", base / "run", DRIVER, tmp_path / "work", "--debug") as m:
        image = next(p for p in m.path.iterdir() if len(p.name) == 64)
        config = (image / "config.json").read_bytes()
        layer = next(p for p in (image / "blobs").iterdir() if p.stat().st_size > len(config)
                     and p.stat().st_size % 512 == 0)  # fmt: skip
        # Break the layer: a file of the layer changes size, so its blob cannot be reproduced.
        victim = next((base / "root" / DRIVER).glob("*/diff/app.txt"))
        victim.write_text("changed\n")
        with pytest.raises(OSError) as failed, open(layer, "rb") as f:
            f.read()
        assert failed.value.errno == errno.EIO
        text = m.log()
    lines = text.splitlines()
    assert any("imgfs.fuse.requests: opendir inode=1 (/) -> " in line for line in lines), text
    lookup = rf"requests: lookup parent_inode=\d+ \(/{image.name}\) name='config.json' -> ino="
    assert any(re.search(lookup, line) for line in lines), text
    reads = [line for line in lines if "imgfs.fuse.requests: read fh=" in line]
    assert reads, text
    assert any(f"-> {len(config)} bytes (" in line and " off=0 size=" in line for line in reads)
    failed_at = next(i for i, line in enumerate(lines) if "-> EIO (" in line)
    cause = "\n".join(lines[max(0, failed_at - 20) : failed_at])
    assert "ERROR" in cause, cause
    assert "app.txt" in cause, cause


@pytest.mark.fuse_required
def test_the_kernel_sends_flush_once_per_mount_not_at_every_close(
    tiny_store: Path, tmp_path: Path
) -> None:
    """imgfs answers the first FLUSH with ENOSYS, and the kernel then sends none for the mount
    (one round trip less per close): several files opened and closed, one FLUSH request in
    ``--debug``'s log. With pyfuse3's default answer (0) every close sends one."""
    base = tiny_store
    with mounted(base / "root", base / "run", DRIVER, tmp_path / "work", "--debug") as m:
        image = next(p for p in m.path.iterdir() if len(p.name) == 64)
        names = ("config.json", "manifest.json") * 2
        for name in names:
            (image / name).read_bytes()
        text = m.log()
    opens = [line for line in text.splitlines() if "imgfs.fuse.requests: open inode=" in line]
    flushes = [line for line in text.splitlines() if "imgfs.fuse.requests: flush " in line]
    assert len(opens) >= len(names), text
    assert len(flushes) == 1, text
    assert "-> ENOSYS" in flushes[0], text
