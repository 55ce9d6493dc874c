"""Tests of imgfs.cli: argument handling, exit codes, --list, and real mounts through ``main``.

Mounts go through ``tests/fusehello.py cli``, which runs ``imgfs.cli.main`` in a subprocess
with the store and the operations replaced by fakes (one file ``hello``), so the wiring,
daemonizing and ``-u`` are exercised for real without a container store. The test against
the real store and operations skips while ``imgfs.fuse.ops`` does not import.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import fusehello
import pytest
from test_daemon import (
    FUSEHELLO,
    HelloMount,
    _private_state_home,
    hello,
    hello_env,
    is_listed_mount,
    mount_entry,
    one_error_line,
    process_gone,
    wait_for,
)

from imgfs import cli, errors
from imgfs.errors import (
    ConfigError,
    CorruptStore,
    ImgfsError,
    StoreNotFound,
    StorePermissionError,
)
from imgfs.fuse import mounting

__all__ = ["_private_state_home", "hello"]  # fixtures re-used from test_daemon


def empty_store(path: Path) -> Path:
    """An overlay graph root with no images (what ``podman`` leaves on a fresh machine)."""
    for sub in ("overlay-images", "overlay-layers", "overlay"):
        (path / sub).mkdir(parents=True)
    return path


def run_imgfs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imgfs", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env or hello_env(),
    )


def run_fake_cli(mount: HelloMount, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, FUSEHELLO, "cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=hello_env(HELLO_STATE=str(mount.state)),
    )


# --------------------------------------------------------------------------- parsing


def test_help_and_version() -> None:
    result = run_imgfs("--help")
    assert result.returncode == 0
    for word in ("-u MOUNTPOINT", "--list [STORE]", "--cache-size", "--log-file", "-o OPTS"):
        assert word in result.stdout
    version = run_imgfs("--version")
    assert version.returncode == 0
    assert version.stdout.startswith("imgfs ")


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["-u"],
        ["-u", "a", "b"],
        ["--list", "a", "b"],
        ["a", "b", "c"],
        ["-u", "--list", "a"],
        ["--cache-size", "lots", "m"],
        ["--cache-size", "0", "m"],
        ["--no-such-flag", "m"],
    ],
)
def test_usage_errors_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    assert "usage: imgfs" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("512M", 512 << 20), ("10G", 10 << 30), ("1.5GiB", 3 << 29), ("2kb", 2048)],
)
def test_parse_size(text: str, size: int) -> None:
    assert cli.parse_size(text) == size


def test_default_cache_dir() -> None:
    assert cli.default_cache_dir({"XDG_CACHE_HOME": "/x", "HOME": "/h"}) == "/x/imgfs"
    assert cli.default_cache_dir({"XDG_CACHE_HOME": "rel", "HOME": "/h"}) == "/h/.cache/imgfs"
    assert cli.default_cache_dir({}, uid=1234) == "/var/tmp/imgfs-1234"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ImgfsError("x"), 1),
        (CorruptStore("x"), 1),
        (ConfigError("x"), 1),
        (errors.UsageError("x"), 2),
        (StoreNotFound("x"), 3),
        (StorePermissionError("x"), 4),
        (errors.FuseUnavailable("x"), 5),
        (errors.MountError("x"), 6),
        (errors.MountpointBusy("x"), 6),
    ],
)
def test_exit_codes(error: ImgfsError, code: int) -> None:
    assert cli.exit_code_for(error) == code


# --------------------------------------------------------------------------- errors


def test_mount_option_usage_error_is_one_line(tmp_path: Path) -> None:
    result = run_imgfs("-o", "rw", str(tmp_path))
    assert result.returncode == 2
    assert one_error_line(result.stderr) == "imgfs: imgfs is read-only; -o rw is not supported"


@pytest.mark.fuse_required
def test_missing_mountpoint_is_one_line(tmp_path: Path) -> None:
    store = empty_store(tmp_path / "store")
    result = run_imgfs(
        "--cache-dir", str(tmp_path / "cache"), str(store), str(tmp_path / "missing")
    )
    assert result.returncode == 6
    assert one_error_line(result.stderr) == f"imgfs: mountpoint does not exist: {tmp_path}/missing"


@pytest.mark.fuse_required
def test_unmount_not_mounted(tmp_path: Path) -> None:
    result = run_imgfs("-u", str(tmp_path))
    assert result.returncode == 6
    assert one_error_line(result.stderr) == f"imgfs: not mounted: {tmp_path}"


def test_debug_shows_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--debug", "-o", "rw", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.rstrip().endswith("imgfs: imgfs is read-only; -o rw is not supported")


def test_keyboard_interrupt_is_130(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def interrupted(mountpoint: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(mounting, "unmount", interrupted)
    assert cli.main(["-u", str(tmp_path)]) == 130


def _store_module_or_skip() -> types.ModuleType:
    try:
        return importlib.import_module("imgfs.store.image")
    except Exception as exc:
        pytest.skip(f"imgfs.store.image does not import yet: {exc}")


@pytest.mark.fuse_required
def test_store_not_found_exit_3(tmp_path: Path) -> None:
    _store_module_or_skip()
    (tmp_path / "mnt").mkdir()
    result = run_imgfs(str(tmp_path / "no-store"), str(tmp_path / "mnt"))
    assert result.returncode == 3
    assert one_error_line(result.stderr).startswith("imgfs: ")
    assert not is_listed_mount(tmp_path / "mnt")


# --------------------------------------------------------------------------- --list


@dataclass
class FakeBlob:
    digest: str
    size: int
    media_type: str
    kind: str


class FakeImage:
    def __init__(self, image_id: str, names: tuple[str, ...], broken: bool = False) -> None:
        self.id = image_id
        self.names = names
        self.digest = f"sha256:{'d' * 64}" if not broken else None
        self.broken = broken

    def blobs(self) -> list[FakeBlob]:
        if self.broken:
            raise CorruptStore(f"image {self.id}: layers.json is truncated")
        return [
            FakeBlob(
                f"sha256:{'c' * 64}", 1469, "application/vnd.oci.image.config.v1+json", "config"
            ),
            FakeBlob(
                f"sha256:{'e' * 64}", 7_000_000, "application/vnd.oci.image.layer.v1.tar", "layer"
            ),
        ]


class FakeListStore:
    opened: dict[str, str | None] = {}
    fail: ImgfsError | None = None

    @classmethod
    def open(
        cls,
        graphroot: str | None = None,
        runroot: str | None = None,
        driver: str | None = None,
        budget: object = None,
    ) -> FakeListStore:
        if cls.fail is not None:
            raise cls.fail
        cls.opened = {"graphroot": graphroot, "runroot": runroot, "driver": driver}
        return cls()

    def images(self) -> list[FakeImage]:
        return [
            FakeImage("a" * 64, ("docker.io/library/alpine:latest", "localhost/a:1")),
            FakeImage("b" * 64, (), broken=True),
        ]


@pytest.fixture
def fake_store(monkeypatch: pytest.MonkeyPatch) -> type[FakeListStore]:
    module = types.ModuleType("imgfs.store.image")
    module.Store = FakeListStore  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "imgfs.store.image", module)
    monkeypatch.setattr(FakeListStore, "fail", None)
    monkeypatch.setattr(FakeListStore, "opened", {})
    return FakeListStore


def test_list_prints_images_and_blobs(
    fake_store: type[FakeListStore],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # (restored afterwards: later tests start `python -m imgfs`, which must find this checkout)
    monkeypatch.chdir(tmp_path)
    status = cli.main(["--list", "store", "--driver", "overlay", "--runroot", "run"])
    out, err = capsys.readouterr()
    assert status == 1, "a broken image makes the listing fail at the end"
    assert fake_store.opened == {
        "graphroot": str(tmp_path / "store"),
        "runroot": str(tmp_path / "run"),
        "driver": "overlay",
    }
    lines = out.splitlines()
    assert lines[0].split() == [
        "a" * 64,
        f"sha256:{'d' * 64}",
        "docker.io/library/alpine:latest",
        "localhost/a:1",
    ]
    assert lines[1].split() == [
        f"sha256:{'c' * 64}",
        "1469",
        "config",
        "application/vnd.oci.image.config.v1+json",
    ]
    assert lines[2].split()[1:3] == ["7000000", "layer"]
    assert lines[3].split() == ["b" * 64, "-", "<none>"]
    assert err == f"imgfs: image {'b' * 64}: layers.json is truncated\n"


@pytest.mark.parametrize(
    ("error", "code"),
    [(StoreNotFound("no store at /x"), 3), (StorePermissionError("cannot read /x"), 4)],
)
def test_list_store_errors(
    fake_store: type[FakeListStore],
    capsys: pytest.CaptureFixture[str],
    error: ImgfsError,
    code: int,
) -> None:
    fake_store.fail = error
    assert cli.main(["--list"]) == code
    assert capsys.readouterr().err == f"imgfs: {error}\n"
    assert fake_store.opened.get("graphroot") is None


# --------------------------------------------------------------------------- real mounts


@pytest.mark.fuse_required
def test_cli_mount_wiring_and_unmount(hello: HelloMount) -> None:
    store = hello.state / "store,1"
    store.mkdir()
    log_file = hello.state / "imgfs.log"
    result = run_fake_cli(
        hello,
        "-o", "uid=1000,gid=nogroup",
        "-o", "umask=027",
        "--cache-size", "512M",
        "--memory", "256M",
        "--cache-dir", str(hello.state / "cache"),
        "--log-file", str(log_file),
        "--direct",
        str(store),
        str(hello.path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
    assert os.path.ismount(hello.path)
    assert (hello.path / "hello").read_bytes() == fusehello.CONTENT
    wiring = json.loads((hello.state / "wiring.json").read_text())
    assert wiring == {
        "graphroot": str(store),
        "cache_dir": str(hello.state / "cache"),
        "cache_size": 512 << 20,
        "memory": 256 << 20,
        "direct": True,
        "uid": 1000,
        "gid": 65534,
        "umask": 0o027,
        "debug": False,
    }
    fields = mount_entry(hello.path)
    sep = fields.index("-")
    assert fields[sep + 1 : sep + 3] == ["fuse.imgfs", f"imgfs:{store}"]
    pid = hello.pid()
    assert "mounted" in log_file.read_text()

    unmounted = run_imgfs("-u", str(hello.path))
    assert unmounted.returncode == 0, unmounted.stderr
    assert (unmounted.stdout, unmounted.stderr) == ("", "")
    assert not is_listed_mount(hello.path)
    assert wait_for(lambda: process_gone(pid))
    assert not hello.marker.exists(), "cleanup (operations.close) did not run"
    assert "unmounted" in log_file.read_text()


@pytest.mark.fuse_required
def test_cli_default_cache_dir(hello: HelloMount) -> None:
    store = hello.state / "store"
    store.mkdir()
    env = {"XDG_CACHE_HOME": str(hello.state / "xdg")}
    result = subprocess.run(
        [sys.executable, FUSEHELLO, "cli", str(store), str(hello.path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=hello_env(HELLO_STATE=str(hello.state), **env),
    )
    assert result.returncode == 0, result.stderr
    wiring = json.loads((hello.state / "wiring.json").read_text())
    assert wiring["cache_dir"] == str(hello.state / "xdg" / "imgfs")
    assert wiring["cache_size"] is None
    owner = os.stat(store)  # without -o uid=,gid= the store's owner owns the tree
    assert (wiring["uid"], wiring["gid"], wiring["umask"]) == (owner.st_uid, owner.st_gid, None)


@pytest.mark.fuse_required
def test_cli_busy_mountpoint(hello: HelloMount) -> None:
    store = hello.state / "store"
    store.mkdir()
    assert run_fake_cli(hello, str(store), str(hello.path)).returncode == 0
    second = run_fake_cli(hello, str(store), str(hello.path))
    assert second.returncode == 6
    assert one_error_line(second.stderr).startswith("imgfs: mountpoint busy: ")


@pytest.mark.fuse_required
def test_cli_real_store_and_operations(hello: HelloMount) -> None:
    """Wiring against the real Store and Operations: an empty store mounts empty."""
    try:
        importlib.import_module("imgfs.fuse.ops")
    except Exception as exc:
        pytest.skip(f"imgfs.fuse.ops does not import yet: {exc}")
    store = empty_store(hello.state / "storage")
    result = run_imgfs(
        "--driver", "overlay",
        "--runroot", str(hello.state / "run"),
        "--cache-dir", str(hello.state / "cache"),
        "--log-file", str(hello.state / "imgfs.log"),
        str(store),
        str(hello.path),
    )  # fmt: skip
    if result.returncode in (1, 3):
        pytest.skip(f"the real store refuses an empty graph root here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert os.path.ismount(hello.path)
    assert fields_type(hello.path) == "fuse.imgfs"
    unmounted = run_imgfs("-u", str(hello.path))
    assert unmounted.returncode == 0, unmounted.stderr
    assert not is_listed_mount(hello.path)


def fields_type(path: Path) -> str:
    fields = mount_entry(path)
    return fields[fields.index("-") + 1]


# --------------------------------------------------------------------------- conventions


README = Path(__file__).resolve().parent.parent / "README.md"
MAN_PAGE = Path(__file__).resolve().parent.parent / "docs" / "imgfs.1"


def test_version_names_every_component() -> None:
    result = run_imgfs("-V")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [
        "imgfs", "pyfuse3", "libfuse", "fusermount3", "kernel"
    ]  # fmt: skip
    assert lines[0] == f"imgfs {cli._version()}"
    import pyfuse3

    assert lines[1] == f"pyfuse3 {pyfuse3.__version__}"
    assert lines[2].startswith("libfuse 3.")
    assert "FUSE kernel interface up to 7." in lines[2]
    assert lines[4].startswith(f"kernel Linux {os.uname().release}")
    assert run_imgfs("--version").stdout == result.stdout


def test_d_is_debug_and_foreground() -> None:
    args = cli.parse_command_line(["-d", "mnt"])
    assert (args.debug, args.foreground) == (True, True)
    args = cli.parse_command_line(["mnt"])
    assert (args.debug, args.foreground) == (False, False)


def _help_options(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w$/-])(--?[A-Za-z][\w-]*)", text))


def test_man_page_has_every_option_of_help() -> None:
    help_text = run_imgfs("--help").stdout
    options = _help_options(help_text)
    assert {"-u", "--list", "-o", "--direct", "-V", "--version", "-d", "--log-file"} <= options
    man = MAN_PAGE.read_text().replace("\\-", "-")
    missing = sorted(
        o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", man)
    )
    assert missing == [], f"options in --help but not in docs/imgfs.1: {missing}"


def test_readme_and_help_agree_on_direct() -> None:
    row = next(line for line in README.read_text().splitlines() if line.startswith("| `--direct`"))
    assert cli.DIRECT_HELP in row
    assert cli.DIRECT_HELP in " ".join(run_imgfs("--help").stdout.split())


_NO_FUSE_IMPORTS = (
    "import sys\n"
    "from imgfs import cli\n"
    "status = cli.main(sys.argv[1:])\n"
    "loaded = sorted(m for m in ('pyfuse3', 'trio') if m in sys.modules)\n"
    "print('loaded:', ','.join(loaded))\n"
    "raise SystemExit(status)\n"
)


def run_without_fuse(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _NO_FUSE_IMPORTS, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=hello_env(),
    )


def test_list_loads_neither_pyfuse3_nor_trio(tmp_path: Path) -> None:
    result = run_without_fuse("--list", str(empty_store(tmp_path / "store")))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "loaded: "


@pytest.mark.fuse_required
def test_unmount_loads_neither_pyfuse3_nor_trio(hello: HelloMount) -> None:
    assert hello.serve().returncode == 0
    result = run_without_fuse("-u", str(hello.path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "loaded: "
    assert not is_listed_mount(hello.path)


def test_unmount_refuses_a_tmpfs(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to mount a tmpfs in a private namespace")
    target = tmp_path / "tmpfs"
    target.mkdir()
    script = (
        f"set -u\nmount -t tmpfs imgfs-test {target}\n"
        f"{sys.executable} -m imgfs -u {target}\necho rc=$?\n"
        f"mountpoint -q {target} && echo still-mounted\n"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=hello_env(),
    )
    assert result.stdout.split() == ["rc=7", "still-mounted"], result.stdout + result.stderr
    assert one_error_line(result.stderr) == f"imgfs: not an imgfs mount (tmpfs): {target}"


def test_bash_completion_offers_every_option_of_help() -> None:
    completion = Path(__file__).resolve().parent.parent / "scripts" / "imgfs.bash-completion"
    script = (
        f"source {completion}\nCOMP_WORDS=(imgfs -)\nCOMP_CWORD=1\n_imgfs\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    offered = set(result.stdout.split())
    assert _help_options(run_imgfs("--help").stdout) <= offered
