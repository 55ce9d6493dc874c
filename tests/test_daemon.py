"""Tests of imgfs.fuse.daemon: option parsing, preflight checks, and real mounts of fusehello.

The mount tests run ``tests/fusehello.py serve`` in a subprocess (daemonizing forks, which
must never happen inside pytest) and always unmount in teardown.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import fusehello
import pytest

from imgfs.errors import FuseUnavailable, MountError, MountpointBusy, UsageError
from imgfs.fuse import mounting
from imgfs.fuse.mounting import MountOptions, parse_mount_options

FUSEHELLO = str(Path(fusehello.__file__).resolve())
SRC_ROOT = str(Path(__file__).resolve().parent.parent)


# --------------------------------------------------------------------------- helpers


@dataclass
class HelloMount:
    """A mountpoint in a world-traversable directory plus the daemon's state directory."""

    path: Path
    state: Path

    @property
    def marker(self) -> Path:
        return self.state / "marker"

    def pid(self) -> int:
        """The serving process (its background task writes the file just after ready)."""
        pidfile = self.state / "pid"
        assert wait_for(pidfile.exists), "the background task never started"
        return int(pidfile.read_text())

    def serve(self, *args: str, mountpoint: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_hello("serve", "--state", str(self.state), *args, mountpoint or str(self.path))


def run_hello(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, FUSEHELLO, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=hello_env(),
    )


def hello_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC_ROOT, env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); a daemon is reaped by init, so check its state too.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    return True


def force_unmount(path: Path) -> None:
    """Teardown: never leave a mount behind, dead or alive."""
    if not is_listed_mount(path):
        return
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)


def is_listed_mount(path: Path) -> bool:
    return mounting.is_mount_point(os.path.realpath(path))


def mount_entry(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if fields[4] == str(path):
                return fields
    raise AssertionError(f"{path} is not in mountinfo")


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert lines[0].startswith("imgfs: ")
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(autouse=True)
def _private_state_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Daemons started without --log-file log to $XDG_STATE_HOME/imgfs: never the host's."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state-home")))


@pytest.fixture
def hello() -> Iterator[HelloMount]:
    base = Path(tempfile.mkdtemp(prefix="imgfs-test-", dir="/tmp"))
    base.chmod(0o755)
    mount = HelloMount(base / "mnt", base / "state")
    mount.path.mkdir()
    mount.path.chmod(0o755)
    mount.state.mkdir()
    try:
        yield mount
    finally:
        force_unmount(mount.path)
        _stop_leftover_daemon(mount)
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


def _stop_leftover_daemon(mount: HelloMount) -> None:
    try:
        pid = int((mount.state / "pid").read_text())
    except (FileNotFoundError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError):
        if not process_gone(pid):
            os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- options


def test_default_options() -> None:
    opts = parse_mount_options([], fsname="imgfs:/var/lib/containers/storage")
    assert opts == MountOptions(
        fuse_options=frozenset(
            {
                "default_permissions",
                "ro",
                "nosuid",
                "nodev",
                "subtype=imgfs",
                "fsname=imgfs:/var/lib/containers/storage",
            }
        )
    )
    assert "allow_other" not in opts.fuse_options


def test_fsname_escapes_commas_and_backslashes() -> None:
    opts = parse_mount_options([], fsname="imgfs:/st,ore\\x,y")
    assert "fsname=imgfs:/st\\,ore\\\\x\\,y" in opts.fuse_options


def test_fsname_non_ascii_is_replaced() -> None:
    opts = parse_mount_options([], fsname="imgfs:/störe\n")
    assert "fsname=imgfs:/st?re?" in opts.fuse_options


def test_allow_other_only_when_asked() -> None:
    opts = parse_mount_options(["allow_other"], fsname="imgfs:/s")
    assert "allow_other" in opts.fuse_options
    assert "default_permissions" in opts.fuse_options


def test_uid_gid_umask_are_parsed_and_not_passed_to_fuse() -> None:
    opts = parse_mount_options(["uid=1000,gid=100", "umask=027"], fsname="imgfs:/s")
    assert (opts.uid, opts.gid, opts.umask) == (1000, 100, 0o027)
    keys = {item.partition("=")[0] for item in opts.fuse_options}
    assert not keys & {"uid", "gid", "umask"}


def test_uid_gid_accept_names() -> None:
    opts = parse_mount_options(["uid=nobody,gid=root"], fsname="imgfs:/s")
    assert (opts.uid, opts.gid) == (65534, 0)


def test_unknown_options_pass_through_and_repeat() -> None:
    opts = parse_mount_options(["allow_other,max_read=131072", "noatime", ",,"], fsname="x")
    assert {"allow_other", "max_read=131072", "noatime"} <= opts.fuse_options


def test_escaped_comma_stays_in_one_option() -> None:
    assert mounting.split_options("a,b=c\\,d,,e") == ["a", "b=c\\,d", "e"]


def test_user_fsname_replaces_default() -> None:
    opts = parse_mount_options(["fsname=mine"], fsname="imgfs:/s")
    assert [o for o in opts.fuse_options if o.startswith("fsname=")] == ["fsname=mine"]


@pytest.mark.parametrize(
    "option",
    ["rw", "suid", "dev", "nodefault_permissions", "default_permissions=0", "subtype=other"],
)
def test_options_that_weaken_the_mount_are_refused(option: str) -> None:
    with pytest.raises(UsageError):
        parse_mount_options([f"allow_other,{option}"], fsname="imgfs:/s")


@pytest.mark.parametrize(
    "option",
    [
        "uid",
        "uid=",
        "uid=-1",
        "uid=4294967295",
        "uid=no-such-user-xyz",
        "gid=no-such-group-xyz",
        "umask=999",
        "umask=1000",
        "umask=abc",
        "fsname=é",
        "sé",
    ],
)
def test_bad_option_values_are_usage_errors(option: str) -> None:
    with pytest.raises(UsageError):
        parse_mount_options([option], fsname="imgfs:/s")


def test_mountinfo_unescape() -> None:
    assert mounting._unescape_mountinfo("/a\\040b\\134c\\x") == "/a b\\c\\x"


# --------------------------------------------------------------------------- preflight


def test_missing_fuse_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(mounting, "FUSE_DEVICE", str(tmp_path / "fuse"))
    with pytest.raises(FuseUnavailable, match=r"FUSE is not available: .*apt-get install fuse3"):
        mounting.check_fuse()


def test_unopenable_fuse_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(mounting, "FUSE_DEVICE", str(tmp_path))  # a directory: EISDIR
    with pytest.raises(FuseUnavailable, match=r"cannot open .*'fuse3' package"):
        mounting.check_fuse()


@pytest.mark.fuse_required
def test_missing_fusermount(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FuseUnavailable, match=r"fusermount3 was not found .*'fuse3' package"):
        mounting.check_fuse()
    with pytest.raises(FuseUnavailable, match="fusermount3"):
        mounting.unmount(str(tmp_path))


def test_mountpoint_missing(tmp_path: Path) -> None:
    with pytest.raises(MountError, match="mountpoint does not exist"):
        mounting.check_mountpoint(str(tmp_path / "nope"))


def test_mountpoint_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(MountError, match="not a directory"):
        mounting.check_mountpoint(str(tmp_path / "file"))


def test_mountpoint_already_mounted() -> None:
    with pytest.raises(MountpointBusy, match="mountpoint busy: /proc is already a mount point"):
        mounting.check_mountpoint("/proc")


def test_symlinked_mountpoint_resolves(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert mounting.check_mountpoint(str(tmp_path / "link")) == str((tmp_path / "real").resolve())


def test_unmount_not_mounted(tmp_path: Path) -> None:
    if shutil.which("fusermount3") is None:
        pytest.skip("fusermount3 not installed (apt-get install fuse3)")
    with pytest.raises(MountError, match="not mounted"):
        mounting.unmount(str(tmp_path))


# --------------------------------------------------------------------------- real mounts


pytestmark_fuse = pytest.mark.fuse_required


@pytestmark_fuse
def test_daemon_returns_once_ready(hello: HelloMount) -> None:
    result = hello.serve()
    assert result.returncode == 0, result.stderr
    assert os.path.ismount(hello.path)
    assert (result.stdout, result.stderr) == ("", "")
    assert (hello.path / "hello").read_bytes() == fusehello.CONTENT
    assert os.listdir(hello.path) == ["hello"]
    fields = mount_entry(hello.path)
    sep = fields.index("-")
    assert fields[sep + 1 : sep + 3] == ["fuse.imgfs", "imgfs:/test,store"]
    assert {"ro", "nosuid", "nodev"} <= set(fields[5].split(","))
    assert "default_permissions" in fields[sep + 3].split(",")
    assert "allow_other" not in fields[sep + 3]
    assert hello.marker.exists()
    assert hello.pid() != os.getpid()


@pytestmark_fuse
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_unmounts_and_cleans_up(hello: HelloMount, signum: int) -> None:
    assert hello.serve().returncode == 0
    pid = hello.pid()
    os.kill(pid, signum)
    assert wait_for(lambda: process_gone(pid)), "daemon did not exit"
    assert not is_listed_mount(hello.path)
    assert not hello.marker.exists(), "cleanup did not run"


@pytestmark_fuse
def test_unmount_function(hello: HelloMount) -> None:
    assert hello.serve().returncode == 0
    pid = hello.pid()
    mounting.unmount(str(hello.path))
    assert not is_listed_mount(hello.path)
    assert wait_for(lambda: process_gone(pid)), "daemon did not exit after unmount"
    assert wait_for(lambda: not hello.marker.exists()), "cleanup did not run"


@pytestmark_fuse
def test_unmount_busy_is_reported(hello: HelloMount) -> None:
    assert hello.serve().returncode == 0
    with (hello.path / "hello").open("rb"), pytest.raises(MountpointBusy, match="busy"):
        mounting.unmount(str(hello.path))
    mounting.unmount(str(hello.path))
    assert not is_listed_mount(hello.path)


@pytestmark_fuse
def test_background_crash_still_unmounts(hello: HelloMount) -> None:
    assert hello.serve("--crash-after", "0.3").returncode == 0
    pid = hello.pid()
    assert wait_for(lambda: process_gone(pid)), "daemon did not exit after the crash"
    assert not is_listed_mount(hello.path), "a dead mount was left behind"
    assert not hello.marker.exists()


@pytestmark_fuse
def test_foreground_serves_until_sigint(hello: HelloMount) -> None:
    cmd = [sys.executable, FUSEHELLO, "serve", "--foreground", "--state", str(hello.state)]
    with subprocess.Popen([*cmd, str(hello.path)], env=hello_env(), stderr=subprocess.PIPE) as proc:
        try:
            assert wait_for(lambda: (hello.state / "pid").exists()), "not serving"
            assert hello.pid() == proc.pid
            assert (hello.path / "hello").read_bytes() == fusehello.CONTENT
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert not is_listed_mount(hello.path)
    assert not hello.marker.exists()


@pytestmark_fuse
def test_other_users_need_allow_other(hello: HelloMount) -> None:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to act as another user")
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat"]
    target = str(hello.path / "hello")
    assert hello.serve().returncode == 0
    denied = subprocess.run([*as_nobody, target], capture_output=True, text=True, check=False)
    assert denied.returncode != 0
    assert "Permission denied" in denied.stderr
    mounting.unmount(str(hello.path))
    assert wait_for(lambda: not hello.marker.exists())
    assert hello.serve("-o", "allow_other").returncode == 0
    allowed = subprocess.run([*as_nobody, target], capture_output=True, check=False)
    assert allowed.returncode == 0
    assert allowed.stdout == fusehello.CONTENT


@pytestmark_fuse
def test_busy_mountpoint_is_one_line_exit_6(hello: HelloMount) -> None:
    assert hello.serve().returncode == 0
    second = run_hello("serve", str(hello.path))
    assert second.returncode == 6
    assert one_error_line(second.stderr).startswith("imgfs: mountpoint busy: ")
    assert (hello.path / "hello").read_bytes() == fusehello.CONTENT


@pytestmark_fuse
def test_dead_mount_is_reported_busy(hello: HelloMount) -> None:
    assert hello.serve().returncode == 0
    pid = hello.pid()
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: process_gone(pid))
    second = run_hello("serve", str(hello.path))
    assert second.returncode == 6
    line = one_error_line(second.stderr)
    assert "mountpoint busy" in line
    assert "fusermount3 -u" in line


@pytestmark_fuse
def test_missing_mountpoint_is_one_line_exit_6(hello: HelloMount) -> None:
    result = hello.serve(mountpoint=str(hello.path / "missing"))
    assert result.returncode == 6
    assert "mountpoint does not exist" in one_error_line(result.stderr)
    assert hello.marker.exists() is False, "cleanup must run when the mount fails"


@pytestmark_fuse
def test_libfuse_error_is_one_line_and_leaves_no_mount(hello: HelloMount) -> None:
    if Path("/sys/fs/selinux").is_dir():
        pytest.skip("SELinux is on: the kernel would take the context= option")
    result = hello.serve("-o", "context=imgfs_no_such_context")  # passes imgfs, kernel: EINVAL
    assert result.returncode == 6
    line = one_error_line(result.stderr)
    assert line.startswith(f"imgfs: cannot mount {hello.path}: ")
    assert "Invalid argument" in line
    assert not is_listed_mount(hello.path)


def test_unknown_option_is_imgfs_usage_error_before_init(hello: HelloMount) -> None:
    result = hello.serve("-o", "allow_other,no_such_fuse_option")
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert line.startswith("imgfs: unknown mount option 'no_such_fuse_option' (known: ")
    assert "allow_other" in line
    assert not hello.marker.exists(), "refused before the operations were even made"


@pytestmark_fuse
def test_imgfs_options_do_not_reach_libfuse(hello: HelloMount) -> None:
    result = hello.serve("-o", "uid=1000,gid=1000", "-o", "umask=022")
    assert result.returncode == 0, result.stderr
    assert (hello.path / "hello").read_bytes() == fusehello.CONTENT


@pytestmark_fuse
def test_symlinked_mountpoint_mounts_the_real_dir(hello: HelloMount) -> None:
    link = hello.state / "link"
    link.symlink_to(hello.path)
    assert hello.serve(mountpoint=str(link)).returncode == 0
    assert mount_entry(hello.path)


@pytestmark_fuse
def test_sigusr1_dumps_tracebacks_to_log(hello: HelloMount) -> None:
    log_file = hello.state / "log"
    assert hello.serve("--log-file", str(log_file)).returncode == 0
    os.kill(hello.pid(), signal.SIGUSR1)
    assert wait_for(lambda: "most recent call first" in log_file.read_text())
    assert (hello.path / "hello").read_bytes() == fusehello.CONTENT, "daemon must keep serving"


@pytestmark_fuse
def test_unwritable_log_file_fails_before_mounting(hello: HelloMount) -> None:
    result = hello.serve("--log-file", str(hello.state / "no" / "such" / "log"))
    assert result.returncode == 2
    assert "cannot open log file" in one_error_line(result.stderr)
    assert not is_listed_mount(hello.path)


class _Stop(BaseException):
    """Ends ``_run_trio`` from its ``prepare`` step (which swallows Exceptions)."""


def test_full_collections_are_rare_while_serving_and_restored_after() -> None:
    from imgfs.fuse import daemon

    seen: list[tuple[int, int, int]] = []

    def prepare() -> None:
        seen.append(gc.get_threshold())
        raise _Stop

    before = gc.get_threshold()
    assert before[2] < daemon.FULL_GC_THRESHOLD  # the precondition: Python's default is lower
    with pytest.raises(_Stop):
        daemon._run_trio(None, None, prepare)
    assert seen == [(before[0], before[1], daemon.FULL_GC_THRESHOLD)]
    assert gc.get_threshold() == before
