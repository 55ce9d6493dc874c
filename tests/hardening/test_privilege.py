"""Area 6: privilege — a root mount read by an unprivileged user (``nobody``).

Without ``-o allow_other`` the kernel denies every other user; with it, the modes imgfs
reports are enforced (``default_permissions``): 0500/0400 owned by the store's owner, so a
root-only store stays root-only, and only ``umask=``/``uid=`` widen access, explicitly.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hardening import harden
from tests.hardening.harden import Counts

pytestmark = pytest.mark.usefixtures("fuse_required")

AREA = "6 privilege"
NOBODY = 65534
OTHER = 65533


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[harden.Tools, str]:
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts as root, reads as nobody)")
    tools = harden.Tools.at(tmp_path_factory.mktemp("priv"))
    image = tools.commit_files("localhost/priv:1", {"etc/shadow": b"root:secret-hash:1::::::\n"})
    os.chmod(tools.root, 0o700)  # a root-only store
    return tools, image


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory nobody can traverse (pytest's own temp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="imgfs-priv-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        harden.unmount_below(path)
        shutil.rmtree(path, ignore_errors=True)


def _as(uid: int, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *cmd],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _mount(tools: harden.Tools, where: Path, *options: str) -> harden.Daemon:
    extra = ["-o", ",".join(options)] if options else []
    return harden.start(
        tools.root, tools.runroot, where / "mnt", where / "cache", where / "log", *extra
    )


def _open_to_others(mnt: Path) -> tuple[int, int]:
    """(nodes with any group/other bit, nodes another user could actually read).

    default_permissions checks every path component: a node is readable by "other" only if
    every directory above it has o+x and the node itself o+r (the mount root included).
    """
    bits = reachable = 0
    open_dirs = {str(mnt)} if os.stat(mnt).st_mode & 0o001 else set()
    for dirpath, dirnames, filenames in os.walk(mnt):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                continue
            bits += bool(mode & 0o077)
            if dirpath in open_dirs and mode & 0o004:
                reachable += 1
                if stat.S_ISDIR(mode) and mode & 0o001:
                    open_dirs.add(path)
    return bits, reachable


CASES = {
    # options: (nobody may list the root, nobody may read a blob)
    "": (False, False),
    "allow_other": (False, False),
    "allow_other,umask=022": (True, True),
    f"allow_other,uid={NOBODY},gid={NOBODY}": (True, True),
}


@pytest.mark.parametrize("options", list(CASES))
def test_unprivileged_reader(
    options: str, store: tuple[harden.Tools, str], public_dir: Path, counts: Counts
) -> None:
    tools, image = store
    may_list, may_read = CASES[options]
    d = _mount(tools, public_dir, *([options] if options else []))
    try:
        blobs = sorted(os.listdir(d.mnt / image / "blobs"))
        blob = (
            d.mnt
            / image
            / "blobs"
            / max(blobs, key=lambda b: (d.mnt / image / "blobs" / b).stat().st_size)
        )
        listed = _as(NOBODY, "ls", str(d.mnt)).returncode == 0
        read = _as(NOBODY, "cat", str(blob))
        wrote = _as(NOBODY, "touch", str(d.mnt / image / "x")).returncode == 0
        root_ok = blob.read_bytes() != b""
        bits, reachable = _open_to_others(d.mnt)
        label = options or "(no options)"
        counts.add(AREA, f"{label}: nobody may list (expected {may_list})", int(listed))
        counts.add(
            AREA,
            f"{label}: nobody may read a blob (expected {may_read})",
            int(read.returncode == 0),
        )
        counts.add(AREA, "writes by nobody that succeeded (must be 0)", int(wrote))
        assert root_ok
        assert listed == may_list, options
        assert (read.returncode == 0) == may_read, (options, read.stderr)
        assert not wrote
        if may_read:
            assert (
                b"secret-hash" in read.stdout.encode(errors="surrogateescape")
                or "secret-hash" in read.stdout
            )
        if options in ("", "allow_other"):
            counts.add(AREA, "root-only store: nodes with group/other mode bits (info)", bits)
            counts.add(AREA, "root-only store: nodes other users could read (must be 0)", reachable)
            assert reachable == 0
            if not options:
                denied = _as(NOBODY, "stat", str(d.mnt))
                assert denied.returncode != 0
                assert "ermission denied" in denied.stderr
        if options.startswith(f"allow_other,uid={NOBODY}"):
            other = _as(OTHER, "cat", str(blob))
            counts.add(
                AREA,
                "uid=nobody mount: a third user may read (must be 0)",
                int(other.returncode == 0),
            )
            assert other.returncode != 0
    finally:
        harden.stop(d)


# -- layers/ and rootfs/: image owners never map to host users -----------------------------------


@pytest.fixture(scope="module")
def view_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[harden.Tools, str]:
    """An image with /pub/open.txt (0644, root) and /pub/private.txt (0600, owned by 65534
    inside the image), and /priv/ (0700, owned by 65534 inside the image)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts as root, reads as nobody)")
    tools = harden.Tools.at(tmp_path_factory.mktemp("privviews"))
    src = tools.base / "src"
    for sub in ("owned/pub", "owned/priv"):
        (src / sub).mkdir(parents=True)
    for name, data, mode in (
        ("open.txt", b"open to all\n", 0o644),
        ("owned/pub/private.txt", b"nobody-in-the-image only\n", 0o600),
        ("owned/priv/inside.txt", b"inside\n", 0o644),
    ):
        (src / name).write_bytes(data)
        (src / name).chmod(mode)
    (src / "owned" / "pub").chmod(0o755)
    (src / "owned" / "priv").chmod(0o700)
    ctr = tools.buildah("from", "scratch").stdout.strip()
    tools.buildah("copy", ctr, str(src / "open.txt"), "/pub/open.txt")
    tools.buildah("copy", "--chown", f"{NOBODY}:{NOBODY}", ctr, f"{src}/owned/.", "/")
    image = tools.buildah("commit", "-q", ctr, "localhost/privviews:1").stdout.strip()
    tools.buildah("rm", ctr)
    return tools, image


def test_view_modes_never_grant_host_users_image_owners_rights(
    view_store: tuple[harden.Tools, str], public_dir: Path, counts: Counts
) -> None:
    tools, image = view_store
    d = _mount(tools, public_dir, "allow_other", "umask=022")
    try:
        (layer,) = os.listdir(d.mnt / image / "layers")
        for top in (d.mnt / image / "rootfs", d.mnt / image / "layers" / layer):
            private, priv = top / "pub" / "private.txt", top / "priv"
            for path, mode in ((private, 0o600), (priv, 0o700)):
                st = os.stat(path)
                assert (stat.S_IMODE(st.st_mode), st.st_uid) == (mode, NOBODY), path
            assert private.read_bytes() == b"nobody-in-the-image only\n"  # root may
            opened = _as(NOBODY, "cat", str(top / "pub" / "open.txt"))
            assert opened.returncode == 0, opened.stderr
            assert opened.stdout == "open to all\n"
            denied = _as(NOBODY, "cat", str(private))
            listed = _as(NOBODY, "ls", str(priv))
            counts.add(AREA, "image-owner-only view nodes nobody opened (must be 0)",
                       int(denied.returncode == 0) + int(listed.returncode == 0))  # fmt: skip
            assert denied.returncode != 0
            assert "ermission denied" in denied.stderr
            assert listed.returncode != 0
            assert "ermission denied" in listed.stderr
    finally:
        harden.stop(d)
