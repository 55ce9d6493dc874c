"""imgfs through mount(8): ``mount -t fuse.imgfs``, an fstab entry (``mount -T FILE MNT``) and the
``mount.fuse.imgfs`` helper's translation of mount(8)'s command line.

The real mounts run in a private mount namespace (``unshare --mount``) whose ``/sbin`` is a
temporary directory holding this checkout's helper, so mount(8) finds it without anything
being installed on the host; the namespace (and with it the mount) is gone when the script
ends, and the script unmounts with umount(8) first, as a user would. The helper that
``scripts/setup.sh`` installs is checked too when it is installed (in CI it must be).
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
from test_cli import empty_store
from test_daemon import SRC_ROOT, _private_state_home, hello_env

from imgfs import cli
from imgfs.errors import UsageError

__all__ = ["_private_state_home"]

CHECKOUT_HELPER = Path(SRC_ROOT) / ".venv" / "bin" / "mount.fuse.imgfs"
INSTALLED_HELPER = Path("/sbin/mount.fuse.imgfs")


# --------------------------------------------------------------------------- translation


def test_helper_translates_mount8_command_line() -> None:
    argv = cli.helper_command_line(
        ["/store", "/mnt", "-o", "rw,allow_other,driver=vfs,cache_dir=/c,direct,_netdev", "-n"]
    )
    assert argv == ["--driver", "vfs", "--cache-dir", "/c", "--direct", "-o",
                    "rw,allow_other,_netdev", "--", "/store", "/mnt"]  # fmt: skip


def test_helper_default_store_and_fake_mount() -> None:
    assert cli.helper_command_line(["imgfs", "/mnt"]) == ["--", "/mnt"]
    assert cli.helper_command_line(["none", "/mnt", "-o", "log_file=/l"]) == [
        "--log-file", "/l", "--", "/mnt"
    ]  # fmt: skip
    assert cli.helper_command_line(["/s", "/mnt", "-f"]) is None


@pytest.mark.parametrize("argv", [["/mnt"], ["a", "b", "c"], ["a", "b", "--bogus"]])
def test_helper_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        cli.helper_command_line(argv)


def test_helper_reports_its_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.mount_helper(["/mnt"]) == 2
    assert capsys.readouterr().err.startswith("mount.fuse.imgfs: usage: mount.fuse.imgfs SOURCE")


def test_mount8_options_accepted_only_via_mount() -> None:
    from imgfs.fuse.mounting import parse_mount_options

    implicit = "rw,dev,suid,exec,defaults,auto,noauto,user,nouser,_netdev,nofail,x-systemd.idle"
    opts = parse_mount_options([implicit], fsname="imgfs:/s", via_mount=True)
    assert {"ro", "nodev", "nosuid"} <= opts.fuse_options
    assert not {"rw", "dev", "suid", "defaults", "_netdev"} & opts.fuse_options
    for explicit in ("rw", "dev", "suid", "defaults", "_netdev"):
        with pytest.raises(UsageError):
            parse_mount_options([explicit], fsname="imgfs:/s")


# --------------------------------------------------------------------------- real mount(8)


def _mount8_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "mount(8) of a FUSE type needs root here"
    missing = [t for t in ("mount", "umount", "unshare", "fusermount3") if not shutil.which(t)]
    if missing:
        return f"needs {', '.join(missing)}"
    return None


@pytest.fixture
def namespace_sbin() -> Iterator[tuple[Path, Path]]:
    """(a directory to bind over /sbin holding this checkout's helper, a world-readable base)."""
    reason = _mount8_unavailable()
    if reason is not None:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="imgfs-mount8-", dir="/tmp"))
    try:
        base.chmod(0o755)
        sbin = base / "sbin"
        sbin.mkdir()
        helper = sbin / "mount.fuse.imgfs"
        code = "import sys; from imgfs.cli import mount_helper; sys.exit(mount_helper())"
        helper.write_text(
            f"#!/bin/sh\nexec env PYTHONPATH={SRC_ROOT} {sys.executable} -c '{code}' \"$@\"\n"
        )
        helper.chmod(0o755)
        yield sbin, base
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


def run_in_namespace(sbin: Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (bash) in a private mount namespace whose /sbin is ``sbin``."""
    setup = f"set -eu\nmount --bind {sbin} /sbin\n"
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", setup + script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=hello_env(),
    )


CHECKS = """
fields=$(awk -v m="$MNT" '$5 == m' /proc/self/mountinfo)
echo "mountinfo: $fields"
ls -A "$MNT" | sed 's/^/entry: /'
umount "$MNT"
if awk -v m="$MNT" '$5 == m {found=1} END {exit !found}' /proc/self/mountinfo; then
  echo "still mounted"
fi
"""


def _assert_mounted_read_only(result: subprocess.CompletedProcess[str], store: Path) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    info = next(line for line in result.stdout.splitlines() if line.startswith("mountinfo: "))
    fields = info.split()[1:]
    assert fields, f"not mounted: {result.stdout}{result.stderr}"
    sep = fields.index("-")
    assert fields[sep + 1 : sep + 3] == ["fuse.imgfs", f"imgfs:{store}"]
    assert {"ro", "nosuid", "nodev"} <= set(fields[5].split(","))
    assert "entry: by-name" in result.stdout.splitlines()
    assert "still mounted" not in result.stdout


def _store_mnt_opts(base: Path) -> tuple[Path, Path, str]:
    """An empty store, a mountpoint, and the helper options that keep cache and log in ``base``."""
    store = empty_store(base / "store")
    mnt = base / "mnt"
    mnt.mkdir()
    return store, mnt, f"cache_dir={base}/cache,log_file={base}/imgfs.log"


def test_fstab_entry_with_mount_T(namespace_sbin: tuple[Path, Path]) -> None:
    sbin, base = namespace_sbin
    store, mnt, opts = _store_mnt_opts(base)
    fstab = base / "fstab"
    # What people write (and what mount(8) adds: rw, dev, suid): all accepted, mount stays ro.
    fstab.write_text(
        f"# imgfs test fstab\n{store}  {mnt}  fuse.imgfs  "
        f"defaults,rw,dev,suid,exec,noauto,nouser,_netdev,nofail,x-systemd.automount,"
        f"allow_other,{opts}  0  0\n"
    )
    result = run_in_namespace(sbin, f"MNT={mnt}\nmount -T {fstab} {mnt}\n{CHECKS}")
    _assert_mounted_read_only(result, store)
    assert "allow_other" in result.stdout
    assert "mounted" in (base / "imgfs.log").read_text()


def test_mount_t_fuse_imgfs(namespace_sbin: tuple[Path, Path]) -> None:
    sbin, base = namespace_sbin
    store, mnt, opts = _store_mnt_opts(base)
    script = f"MNT={mnt}\nmount -t fuse.imgfs -o {opts} {store} {mnt}\n{CHECKS}"
    _assert_mounted_read_only(run_in_namespace(sbin, script), store)


def test_mount_t_refuses_unknown_option_cleanly(namespace_sbin: tuple[Path, Path]) -> None:
    sbin, base = namespace_sbin
    store, mnt, opts = _store_mnt_opts(base)
    result = run_in_namespace(sbin, f"mount -t fuse.imgfs -o bogus,{opts} {store} {mnt}")
    assert result.returncode != 0
    assert "imgfs: unknown mount option 'bogus'" in result.stderr
    assert "Traceback" not in result.stderr


def test_installed_helper_is_this_checkouts() -> None:
    """scripts/setup.sh (as root) installs /sbin/mount.fuse.imgfs -> .venv/bin/ of the checkout."""
    if not INSTALLED_HELPER.exists():
        if os.environ.get("CI") and os.geteuid() == 0:
            pytest.fail("setup.sh did not install /sbin/mount.fuse.imgfs")
        pytest.skip("the mount helper is not installed (scripts/setup.sh as root installs it)")
    if os.path.realpath(INSTALLED_HELPER) != os.path.realpath(CHECKOUT_HELPER):
        if os.environ.get("CI"):
            pytest.fail(f"{INSTALLED_HELPER} is not this checkout's {CHECKOUT_HELPER}")
        pytest.skip(f"{INSTALLED_HELPER} belongs to another checkout")
    result = subprocess.run(
        [str(INSTALLED_HELPER), "/nonexistent-store", "/nonexistent-mnt", "-o", "rw"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},  # as mount(8) runs it
    )
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip().endswith("no store at /nonexistent-store: does not exist")


def test_readme_systemd_unit_verifies(tmp_path: Path) -> None:
    """The README's .mount unit passes ``systemd-analyze verify`` (no systemd runs here)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    readme = (Path(SRC_ROOT) / "README.md").read_text()
    unit = readme.split("```ini\n", 1)[1].split("```", 1)[0]
    assert "Type=fuse.imgfs" in unit
    assert "Where=/mnt/images" in unit
    path = tmp_path / "mnt-images.mount"  # the name systemd requires for Where=/mnt/images
    path.write_text(unit)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
