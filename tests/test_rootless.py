"""Rootless, as a normal user would: the test user's own stores (built by buildah as them),
mounted by them without root and without ``podman unshare``, compared with skopeo's export run
as them (tests/rootless.py has the machinery; tests/rootless_probe.py runs as the user).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests import rootless
from tests.layer_oracle import apply_layers, tar_listing
from tests.mounting import sha256_file
from tests.rootless_probe import tree

PROBE = str(Path(__file__).with_name("rootless_probe.py"))


@pytest.fixture(scope="session")
def rootless_setup() -> tuple[rootless.TestUser, rootless.TestUser, dict[str, Any]]:
    reason = rootless.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    user, other = rootless.ensure_users()
    return user, other, rootless.build_stores(user)


@pytest.fixture(scope="session")
def ns(
    rootless_setup: tuple[rootless.TestUser, rootless.TestUser, dict[str, Any]],
) -> Iterator[rootless.Namespace]:
    user = rootless_setup[0]
    work = user.home / "imgfs-test-work" / str(os.getpid())
    with rootless.Namespace(user, work) as namespace:
        probe = namespace.run(namespace.python("-c", "import imgfs"), check=False)
        if probe.returncode != 0:  # e.g. a checkout below a directory only root may enter
            pytest.skip(f"the test user cannot import imgfs from {rootless.REPO}: {probe.stderr}")
        yield namespace


@pytest.fixture(scope="module", params=rootless.DRIVERS)
def user_mount(
    request: pytest.FixtureRequest,
    ns: rootless.Namespace,
    rootless_setup: tuple[rootless.TestUser, rootless.TestUser, dict[str, Any]],
) -> Iterator[tuple[Path, Path, rootless.RootlessStore]]:
    store = rootless_setup[2][request.param]
    # overlay lives at the user's default location: mount it as `imgfs MNT` (no STORE).
    with rootless.mounted_as_user(
        ns, store, f"mount-{store.driver}", default_store=store.default_location
    ) as (mnt, log):
        yield mnt, log, store


def _as_user(ns: rootless.Namespace, *cmd: str) -> subprocess.CompletedProcess[str]:
    """``cmd`` as the test user in the HOST's namespaces (no private namespace at all)."""
    return subprocess.run(
        rootless.as_user(ns.user, cmd), capture_output=True, text=True, timeout=300, check=False
    )


def _sha256_as_user(ns: rootless.Namespace, paths: list[Path]) -> dict[str, str]:
    done = _as_user(ns, "sha256sum", "--", *map(str, paths))
    assert done.returncode == 0, done.stderr
    return {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in done.stdout.splitlines()}


# -- blobs ----------------------------------------------------------------------------------


def test_every_blob_equals_skopeo_export_as_the_user(
    user_mount: tuple[Path, Path, rootless.RootlessStore], ns: rootless.Namespace
) -> None:
    mnt, log, store = user_mount
    paths, want = [], {}
    for img in store.images:
        for blob in img.blob_names():
            path = mnt / img.id / "blobs" / blob
            paths.append(path)
            want[str(path)] = sha256_file(img.oracle_dir / blob.split(":", 1)[1])
    assert len(paths) >= 5  # 2 configs + 1 + 2 layers (the first layer is shared)
    got = _sha256_as_user(ns, paths)  # read by the user outside any namespace
    assert got == want, log.read_text()[-3000:]
    assert "Permission denied" not in log.read_text()
    assert "user-namespace opener started" in log.read_text()


def test_store_files_really_need_the_opener(
    rootless_setup: tuple[rootless.TestUser, rootless.TestUser, dict[str, Any]],
    ns: rootless.Namespace,
) -> None:
    """The fixture is what it claims: the user cannot read some layer files directly."""
    store = rootless_setup[2]["vfs"]
    far = _vfs_layer_dir(store) / "far"
    assert far.stat().st_uid not in (0, ns.user.uid)
    assert stat.S_IMODE(far.stat().st_mode) == 0o600
    done = _as_user(ns, "cat", str(far))
    assert done.returncode != 0
    assert "Permission denied" in done.stderr


# -- the tree as the user ---------------------------------------------------------------------


def _tree_as_user(ns: rootless.Namespace, path: Path) -> dict[str, dict[str, Any]]:
    done = ns.run(ns.python(PROBE, "tree", str(path)), timeout=300)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def _oracle_tree(img: rootless.RootlessImage, tmp_path: Path) -> dict[str, dict[str, Any]]:
    dest = tmp_path / img.id
    apply_layers(img.layer_paths(), dest)
    return tree(os.fsencode(dest))


_COMPARED = ("mode", "uid", "gid", "size", "nlink", "mtime_ns", "link", "sha256", "xattrs")


def _differences(got: dict[str, dict[str, Any]], want: dict[str, dict[str, Any]]) -> list[str]:
    problems = [f"{p}: {e}" for p, e in got.items() if {"list_error", "read_error"} & set(e)]
    for path, ref in want.items():
        mine = got.get(path)
        if mine is None:
            problems.append(f"{path}: missing")
            continue
        for key in _COMPARED:
            if key in ("mtime_ns",) and stat.S_ISLNK(ref["mode"]):
                continue
            if mine.get(key) != ref.get(key):
                problems.append(f"{path}: {key} {mine.get(key)!r} != {ref.get(key)!r}")
    extra = set(got) - set(want) - {"."}
    problems += [f"{p}: not in the oracle" for p in sorted(extra)]
    return problems


def test_rootfs_everything_equals_the_oracle(
    user_mount: tuple[Path, Path, rootless.RootlessStore],
    ns: rootless.Namespace,
    tmp_path: Path,
) -> None:
    """The mount's owner, as the image's root, lists and reads every file of rootfs/: 0600,
    0700 and 0000 files and directories of other container uids included."""
    mnt, log, store = user_mount
    compared = 0
    for img in store.images:
        got = _tree_as_user(ns, mnt / img.id / "rootfs")
        want = _oracle_tree(img, tmp_path)
        assert _differences(got, want) == [], log.read_text()[-3000:]
        compared += sum(1 for e in got.values() if "sha256" in e)
        if img.name.endswith(":typical"):
            continue
        # numeric owners and modes as `podman unshare ls -ln` shows them
        assert (got["far"]["uid"], got["far"]["gid"]) == (70000, 70001)
        assert stat.S_IMODE(got["far"]["mode"]) == 0o600
        assert got["secret"]["uid"] == 1000
        assert stat.S_IMODE(got["zero"]["mode"]) == 0
        assert stat.S_IMODE(got["d000"]["mode"]) == 0
        assert stat.S_IMODE(got["many"]["mode"]) == 0o700
        assert got["many/f7"]["uid"] == 1000
        assert "sha256" in got["many/f7"]
        assert "sha256" in got["d000/in"]
    assert compared >= 3 * 1200


def test_layers_equal_the_tar_listing_and_its_contents(
    user_mount: tuple[Path, Path, rootless.RootlessStore],
    ns: rootless.Namespace,
) -> None:
    mnt, log, store = user_mount
    read = 0
    for img in store.images:
        layers = mnt / img.id / "layers"
        for n, (diff_id, tar) in enumerate(zip(img.diff_ids, img.layer_paths(), strict=True)):
            name = f"{n}-{diff_id.split(':', 1)[1]}"
            got = _tree_as_user(ns, layers / name)
            failed = {p: e for p, e in got.items() if {"list_error", "read_error"} & set(e)}
            assert failed == {}, log.read_text()[-3000:]
            read += _compare_with_tar(got, tar, f"{img.name}/{name}")
    assert read >= 3 * 1200


def _compare_with_tar(got: dict[str, dict[str, Any]], tar: Path, what: str) -> int:
    import hashlib
    import tarfile

    listed = {os.fsdecode(os.path.normpath(e.name)).lstrip("/"): e for e in tar_listing(tar)}
    listed.pop(".", None)
    assert sorted(got) == sorted(listed), what
    contents = {}
    with tarfile.open(tar) as tf:
        for member in tf:
            if member.isreg():
                data = tf.extractfile(member)
                assert data is not None
                contents[os.path.normpath(member.name)] = hashlib.sha256(data.read()).hexdigest()
    read = 0
    for rel, entry in listed.items():
        mine, where = got[rel], f"{what}: {rel}"
        assert (mine["uid"], mine["gid"]) == (entry.uid, entry.gid), where
        if entry.type == "h":
            assert entry.link is not None
            target = got[os.fsdecode(os.path.normpath(entry.link)).lstrip("/")]
            assert (mine["ino"], mine["nlink"]) == (target["ino"], target["nlink"]), where
            continue
        assert stat.filemode(mine["mode"]) == entry.type + entry.perms, where
        if entry.type == "l":
            assert mine["link"] == os.fsdecode(entry.link or b""), where
        elif entry.type == "-":
            assert str(mine["size"]) == entry.size, where
            assert mine["sha256"] == contents[rel], where
            read += 1
    return read


def test_the_owner_may_search_read_and_chdir_everything(
    user_mount: tuple[Path, Path, rootless.RootlessStore],
    ns: rootless.Namespace,
) -> None:
    """access(2) and chdir agree with reads (the kernel asks imgfs for both: no
    default_permissions): the image's root may read and search all, execute only x files."""
    mnt, _log, store = user_mount
    img = next(i for i in store.images if i.name.endswith(":v1"))
    base = [mnt / img.id / "rootfs", mnt / img.id / "layers" / f"0-{img.diff_ids[0][7:]}"]
    names = ["far", "zero", "secret", "d700", "d700/f", "d000", "d000/in", "many/f3"]
    paths = [str(b / n) for b in base for n in names] + [str(mnt / img.id / "config.json")]
    done = ns.run(ns.python(PROBE, "access", *paths))
    got = json.loads(done.stdout)
    for path in paths:
        entry, is_dir = got[path], path.endswith(("d700", "d000"))
        assert entry["R"], (path, entry)
        assert not entry["W"], (path, entry)
        assert entry["X"] == is_dir, (path, entry)  # no image file here has an x bit
        assert entry["chdir"] == (0 if is_dir else errno.ENOTDIR), (path, entry)
        assert isinstance(entry["read"], list if is_dir else str), (path, entry)
    assert got[str(base[0] / "zero")]["read"] == "z\n"
    assert got[str(base[1] / "d000")]["read"] == ["in"]
    fields = _mount_options(mnt)
    assert "default_permissions" not in fields
    assert "ro" in fields


def _mount_options(mnt: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == str(mnt):
                return parts[parts.index("-") + 3].split(",") + parts[5].split(",")
    raise AssertionError(f"{mnt} is not mounted")


# -- who sees it, and unmounting ----------------------------------------------------------------


def test_another_host_user_sees_nothing(
    user_mount: tuple[Path, Path, rootless.RootlessStore],
    rootless_setup: tuple[rootless.TestUser, rootless.TestUser, dict[str, Any]],
) -> None:
    mnt, _log, store = user_mount
    other = rootless_setup[1]
    for cmd in (["ls", str(mnt)], ["cat", str(mnt / store.images[0].id / "config.json")]):
        done = subprocess.run(
            rootless.as_user(other, cmd), capture_output=True, text=True, check=False
        )
        assert done.returncode != 0
        assert "Permission denied" in done.stderr


_DEV_FUSE_LINE = 'mount --bind "$node" /dev/fuse\n'
_FUSE_CONF_LINE = 'mount --bind "$IMGFS_TEST_FUSE_CONF" /etc/fuse.conf\n'


class AllowOtherNamespace(rootless.Namespace):
    """A Namespace whose /etc/fuse.conf says ``user_allow_other`` (a bind of a private copy:
    the host's file is untouched), so the test user may mount with ``-o allow_other``."""

    def __enter__(self) -> AllowOtherNamespace:
        super().__enter__()
        self.fuse_conf = self.node.with_name("fuse.conf")  # in the namespace's 0700 root dir
        self.fuse_conf.write_text("user_allow_other\n")
        return self

    def command(self, cmd: Sequence[str], **env: str) -> list[str]:
        base = super().command(cmd, **env)
        script = base.index(rootless._NS_SCRIPT)
        assert _DEV_FUSE_LINE in base[script]
        base[script] = base[script].replace(_DEV_FUSE_LINE, _DEV_FUSE_LINE + _FUSE_CONF_LINE)
        return ["env", f"IMGFS_TEST_FUSE_CONF={self.fuse_conf}", *base]


def test_another_user_with_allow_other_gets_other_bits_only(
    ns: rootless.Namespace,
    rootless_setup: tuple[rootless.TestUser, rootless.TestUser, dict[str, Any]],
) -> None:
    """``-o allow_other,umask=022``: the second host user reads what the image gives "other",
    never the 0600 files nor what is below a 0700 directory, not even right after the owner
    read them (nothing cached answers for imgfs). (A host uid that equals an image owner:
    tests/test_rootless_rule.py.)"""
    user, other, stores = rootless_setup
    store = stores["vfs"]
    if not os.path.isfile("/etc/fuse.conf"):
        pytest.skip("no /etc/fuse.conf to give user_allow_other in the test's namespace")
    img = next(i for i in store.images if i.name.endswith(":v1"))
    with (
        AllowOtherNamespace(user, ns.workdir / "allow-other-ns") as ao,
        rootless.mounted_as_user(ao, store, "allow-other", "-o", "allow_other,umask=022") as (
            mnt,
            log,
        ),
    ):
        root = mnt / img.id / "rootfs"
        denied = ["far", "secret", "zero", "d700/f", "d000/in", "many/f1", "big"]
        paths = [str(root / n) for n in denied]
        owner = _as_user(ns, "sh", "-c", 'cat "$@" >/dev/null', "sh", *paths)
        assert owner.returncode == 0, owner.stderr + log.read_text()[-2000:]

        def as_other(*cmd: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                rootless.as_user(other, cmd), capture_output=True, text=True, check=False
            )

        assert as_other("cat", str(root / "etc/hosts")).stdout == "hello\n"
        for name in denied:
            done = as_other("cat", str(root / name))
            assert "Permission denied" in done.stderr, name
            assert done.returncode != 0, name
        for name in ("d700", "d000", "many"):
            done = as_other("ls", str(root / name))
            assert "Permission denied" in done.stderr, name
            assert done.returncode != 0, name
        done = as_other("stat", str(root / "d700/f"))
        assert done.returncode != 0
        assert "Permission denied" in done.stderr
        done = as_other("sh", "-c", 'test -r "$0" || echo no; cd "$1" || echo nocd',
                        str(root / "far"), str(root / "d700"))  # fmt: skip
        assert done.stdout.split() == ["no", "nocd"], done.stderr
        blob = mnt / img.id / "blobs" / img.diff_ids[0]
        done = as_other("head", "-c", "1", str(blob))  # umask=022: imgfs's own files are 0444
        assert done.returncode == 0, done.stderr
        assert "default_permissions" not in _mount_options(mnt)
    with (
        AllowOtherNamespace(user, ns.workdir / "allow-other-ns2") as ao,
        rootless.mounted_as_user(ao, store, "allow-other-0500", "-o", "allow_other") as (mnt, _),
    ):
        done = subprocess.run(rootless.as_user(other, ["ls", str(mnt)]),
                              capture_output=True, text=True, check=False)  # fmt: skip
        assert done.returncode != 0
        assert "Permission denied" in done.stderr


def test_imgfs_u_unmounts(
    ns: rootless.Namespace,
    rootless_setup: tuple[rootless.TestUser, rootless.TestUser, dict[str, Any]],
) -> None:
    store = rootless_setup[2]["vfs"]
    with rootless.mounted_as_user(ns, store, "unmount") as (mnt, log):
        mounted = next(line for line in log.read_text().splitlines() if " mounted " in line)
        pid = int(mounted.rsplit("(pid ", 1)[1].split(")", 1)[0])
        assert os.path.exists(f"/proc/{pid}")
        ns.run(ns.python("-m", "imgfs", "-u", str(mnt)))
        assert not rootless.is_mounted(mnt)
        for _ in range(50):
            if not os.path.exists(f"/proc/{pid}") or _zombie(pid):
                break
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid), "the daemon is still running"


def _opener_pids(log: Path, daemon: int) -> list[int]:
    """The helper pids the daemon ``daemon`` logged as started, in order."""
    pids = []
    for line in log.read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == str(daemon) and "opener started (pid " in line:
            pids.append(int(line.split("opener started (pid ", 1)[1].split(",", 1)[0]))
    return pids


def test_mount_helper_runs_at_ready_restarts_and_dies_with_the_daemon(
    ns: rootless.Namespace,
    rootless_setup: tuple[rootless.TestUser, rootless.TestUser, dict[str, Any]],
) -> None:
    """The daemon's helper runs when the mount is reported ready (a cp right after mounting
    does not wait for its start), as a fork of the daemon (no second interpreter start); after
    kill -9 the next open starts a new one; kill -9 of the daemon ends it."""
    store = rootless_setup[2]["vfs"]
    img = store.images[0]  # v1: its layer's blob needs the helper
    with rootless.mounted_as_user(ns, store, "helper-life") as (mnt, log):
        mounted = next(line for line in log.read_text().splitlines() if " mounted " in line)
        daemon = int(mounted.rsplit("(pid ", 1)[1].split(")", 1)[0])
        started = _opener_pids(log, daemon)
        assert len(started) == 1, log.read_text()[-2000:]
        helper = started[0]
        assert not _zombie(helper)
        status = Path(f"/proc/{daemon}/status").read_text().splitlines()
        fd_size = int(next(line for line in status if line.startswith("FDSize:")).split()[1])
        assert fd_size >= 1024  # grown single-threaded: a helper batch never waits for it
        cmdline = Path(f"/proc/{helper}/cmdline").read_bytes()
        assert cmdline == Path(f"/proc/{daemon}/cmdline").read_bytes()
        os.kill(helper, signal.SIGKILL)
        blob = img.diff_ids[0]
        done = _as_user(ns, "sha256sum", str(mnt / img.id / "blobs" / blob))
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[0] == blob.split(":", 1)[1]
        assert f"opener (pid {helper}) died; restarting it" in log.read_text()
        restarted = _opener_pids(log, daemon)
        assert len(restarted) == 2
        assert not _zombie(restarted[1])
        os.kill(daemon, signal.SIGKILL)
        for _ in range(50):
            if _zombie(restarted[1]):
                break
            time.sleep(0.1)
        assert _zombie(restarted[1]), "the helper outlived its daemon"


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# -- the opener itself ------------------------------------------------------------------------


def _vfs_layer_dir(store: rootless.RootlessStore) -> Path:
    """The first layer's directory (vfs: the second layer's is a full copy, without d700/f)."""
    dirs = (store.root / "vfs" / "dir").iterdir()
    return next(p for p in dirs if (p / "far").exists() and not (p / "l2file").exists())


def test_opener_maps_like_podman_and_survives_bad_requests(
    ns: rootless.Namespace,
    rootless_setup: tuple[rootless.TestUser, rootless.TestUser, dict[str, Any]],
) -> None:
    store = rootless_setup[2]["vfs"]
    layer = _vfs_layer_dir(store)
    files = [["far", 4], ["d700/f", 2], ["zero", 2], ["d000/in", 3], ["etc/hosts", 6]]
    files += [["secret", 7], ["missing", 1]]
    done = ns.run(
        ns.python(PROBE, "opener", str(store.layers_dir() / "layers.lock"), str(layer)),
        PROBE_FILES=json.dumps(files),
        PROBE_COST_FILE=json.dumps(["etc/hosts", 6]),
    )
    out = json.loads(done.stdout)
    from imgfs.store.userns import id_mapping, subid_ranges

    uid = ns.user.uid
    mapping = id_mapping(uid, subid_ranges("/etc/subuid", ns.user.name, uid))
    assert len(mapping) >= 3  # 0 -> the user, then two subordinate ranges
    # prestart (the daemon's, before the mount is reported ready) returns with the helper
    # running: the first read does not wait for its start
    assert out["prestarted"]
    ping, _, imports = out["ping"].partition("; imports ")
    assert ping == "uid 0; uid_map " + " / ".join(" ".join(map(str, m)) for m in mapping)
    # the helper imports what opening needs, not the library (the start cost ~0.1 s more)
    assert "imgfs.store.layerfiles" in imports.split(",")
    assert not {"imgfs.store.image", "imgfs.store.source", "imgfs.layer.assemble"} & set(
        imports.split(",")
    )
    reads = out["reads"]
    assert reads["far"] == "far\n"  # container uid 70000: the second range
    assert reads["d700/f"] == "f\n"  # inside a 0700 directory of container uid 2000
    assert reads["zero"] == "z\n"  # mode 0000
    assert reads["d000/in"] == "in\n"  # inside a 0000 directory
    assert reads["etc/hosts"] == "hello\n"
    assert reads["secret"] == "secret\n"
    assert reads["missing"].startswith("LayerUnavailable")
    assert "not found" in reads["missing"]
    malformed = out["malformed"]
    assert "malformed request" in malformed[0]
    assert "unknown request 99" in malformed[1]
    assert "no layer handle 12345" in malformed[2]
    assert malformed[3].startswith("uid 0")  # the fd was dropped, the request served
    assert out["ping_after_malformed"] == out["ping"]
    assert out["after_kill"] == "far\n"
    assert out["restarted"]
    assert out["closed_pid_gone"]
    print(f"\nopen of a small file: direct {out['direct_us']:.1f} us, "
          f"through the helper {out['helper_us']:.1f} us")  # fmt: skip
    assert out["helper_us"] < 2000


def test_opener_opens_a_batch_in_one_round_trip(
    ns: rootless.Namespace,
    rootless_setup: tuple[rootless.TestUser, rootless.TestUser, dict[str, Any]],
) -> None:
    """``open_many`` (what blob generation uses): once a direct open was denied in a
    directory, its files are opened by the helper in ONE request per batch; the others are left
    to ``open`` at their turn; a file the helper cannot open is asked for alone and gets its
    own exact error."""
    store = rootless_setup[2]["vfs"]
    layer = _vfs_layer_dir(store)
    first = [["etc/hosts", 6], ["far", 4], ["d700/f", 2], ["zero", 2], ["d000/in", 3]]
    first += [["missing", 1], ["far", 5], ["hosts-link", 9]] + [[f"many/f{i}", 8] for i in range(9)]
    second = [[f"many/f{i}", 8 + (i >= 10)] for i in range(9, 73)]  # 64 files
    done = ns.run(
        ns.python(PROBE, "opener", str(store.layers_dir() / "layers.lock"), str(layer)),
        PROBE_FILES=json.dumps([["far", 4]]),  # denied at the top level: the helper's
        PROBE_COST_FILE=json.dumps(["etc/hosts", 6]),
        PROBE_BATCH=json.dumps([first, second]),
    )
    one, two = json.loads(done.stdout)["batches"]
    got = one["got"]
    assert got[:5] == ["hello\n", "far\n", "f\n", "z\n", "in\n"]
    assert got[5].startswith("LayerUnavailable")  # missing
    assert got[6].startswith("IntegrityError")  # far has 4 bytes
    assert "tar-split records 5" in got[6]
    assert got[7].startswith("LayerUnavailable")  # never follows a symlink
    assert got[8:] == [f"small {i}\n" for i in range(9)]
    # etc/hosts opened directly; the first file of each other directory denied directly, so
    # that directory's files join the one batch request (d700/f, d000/in, all of many/ too:
    # no round trip per file for a directory met for the first time); the three the helper
    # failed asked for alone, for their errors
    assert one["trips"] == ["_request_many", "_request", "_request", "_request"]
    # many/ is known now: 64 files, one round trip, nothing alone
    assert two["got"] == [f"small {i}\n" for i in range(9, 73)]
    assert two["trips"] == ["_request_many"]


def test_opener_checks_sizes_like_layerfiles(
    ns: rootless.Namespace,
    rootless_setup: tuple[rootless.TestUser, rootless.TestUser, dict[str, Any]],
) -> None:
    store = rootless_setup[2]["vfs"]
    layer = _vfs_layer_dir(store)
    files = [["far", 5], ["d700", 0], ["hosts-link", 9], ["../etc/passwd", 1]]
    done = ns.run(
        ns.python(PROBE, "opener", str(store.layers_dir() / "layers.lock"), str(layer)),
        PROBE_FILES=json.dumps(files),
        PROBE_COST_FILE=json.dumps(["etc/hosts", 6]),
    )
    reads = json.loads(done.stdout)["reads"]
    assert reads["far"].startswith("IntegrityError")
    assert "tar-split records 5" in reads["far"]
    assert reads["d700"].startswith("IntegrityError")
    assert "directory" in reads["d700"]
    assert reads["hosts-link"].startswith("LayerUnavailable")  # never follows a symlink
    assert reads["../etc/passwd"].startswith("UnsafePath")


def _pause_pid(user: rootless.TestUser) -> int | None:
    """The pid in the user's ``libpod/tmp/pause.pid`` when that process runs as them."""
    try:
        pid = int((user.runtime_dir / "libpod" / "tmp" / "pause.pid").read_text().strip())
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return pid if os.stat(f"/proc/{pid}").st_uid == user.uid and state != "Z" else None
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _pause_process(ns: rootless.Namespace) -> Iterator[int]:
    """Rootless podman's pause process of the test user (``podman unshare true`` makes one
    when none runs, with a scratch store: podman would otherwise add its default driver's
    directories to the user's default store, the overlay test store); stopped afterwards if
    made here, so the other tests keep the helper's own namespace."""
    before = _pause_pid(ns.user)
    pid = before
    if pid is None:
        if shutil.which("podman") is None:
            pytest.skip("podman is not installed: no pause process to join")
        scratch = Path(tempfile.mkdtemp(prefix="imgfs-podman."))  # a short runroot path
        os.chown(scratch, ns.user.uid, ns.user.gid)
        podman = ["podman", "--root", f"{scratch}/root", "--runroot", f"{scratch}/run"]
        try:
            done = ns.run([*podman, "--storage-driver", "vfs", "unshare", "true"], check=False)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        pid = _pause_pid(ns.user)
        if pid is None:
            pytest.skip(f"podman unshare made no pause process: {done.stderr[-500:]}")
    try:
        yield pid
    finally:
        if before is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            for _ in range(100):  # gone, not only a zombie: its user namespace lives on
                if not os.path.exists(f"/proc/{pid}"):
                    break
                time.sleep(0.1)


def test_opener_joins_podmans_pause_process(
    ns: rootless.Namespace,
    rootless_setup: tuple[rootless.TestUser, rootless.TestUser, dict[str, Any]],
) -> None:
    """When rootless podman's pause process runs, the helper enters ITS user namespace (no
    newuidmap), again after a kill -9, and a mount serves the blobs through it."""
    store = rootless_setup[2]["vfs"]
    layer = _vfs_layer_dir(store)
    with _pause_process(ns) as pause:
        done = ns.run(
            ns.python(PROBE, "opener", str(store.layers_dir() / "layers.lock"), str(layer)),
            PROBE_FILES=json.dumps([["far", 4], ["d700/f", 2], ["d000/in", 3]]),
            PROBE_COST_FILE=json.dumps(["etc/hosts", 6]),
        )
        out = json.loads(done.stdout)
        assert out["pause_pid"] == pause
        assert out["joined"] is True
        assert out["in_pause_userns"] is True
        uid_map = Path(f"/proc/{pause}/uid_map").read_text().splitlines()
        ping = out["ping"].partition("; imports ")[0]
        assert ping == "uid 0; uid_map " + " / ".join(" ".join(m.split()) for m in uid_map)
        assert out["reads"] == {"far": "far\n", "d700/f": "f\n", "d000/in": "in\n"}
        assert out["after_kill"] == "far\n"
        assert out["restarted"]
        assert out["joined_after_restart"] is True
        assert out["closed_pid_gone"]
        img = store.images[0]
        with rootless.mounted_as_user(ns, store, "pause") as (mnt, log):
            for blob in img.diff_ids:
                done = _as_user(ns, "sha256sum", str(mnt / img.id / "blobs" / blob))
                assert done.returncode == 0, done.stderr
                assert done.stdout.split()[0] == blob.split(":", 1)[1]
            assert f"joined podman's pause process {pause}" in log.read_text()


def test_helper_dies_with_its_parent(ns: rootless.Namespace) -> None:
    proc = subprocess.Popen(
        ns.command(ns.python(PROBE, "orphan")), stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        helper = info["helper"]
        assert os.path.exists(f"/proc/{helper}")
        os.kill(info["pid"], signal.SIGKILL)
        for _ in range(50):
            if _zombie(helper):
                break
            time.sleep(0.1)
        assert _zombie(helper), "the helper outlived its parent"
    finally:
        proc.kill()
        proc.wait()


# -- where the opener cannot work ---------------------------------------------------------------


def test_without_newuidmap_one_warning_and_explained_eio(
    ns: rootless.Namespace,
    rootless_setup: tuple[rootless.TestUser, rootless.TestUser, dict[str, Any]],
) -> None:

    store = rootless_setup[2]["vfs"]
    bin_dir = rootless.user_mkdir(ns.user, ns.workdir / "bin-without-uidmap")
    for tool in ("fusermount3", "sh", "env"):
        link = bin_dir / tool
        if not link.exists():
            link.symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    work = rootless.user_mkdir(ns.user, ns.workdir / "no-uidmap")
    mnt = rootless.user_mkdir(ns.user, work / "mnt")
    log = work / "imgfs.log"
    cmd = ns.python(
        "-m", "imgfs", "--log-file", str(log), "--cache-dir", str(work / "cache"),
        "--driver", "vfs", "--runroot", str(store.runroot), str(store.root), str(mnt),
    )  # fmt: skip
    done = ns.run(cmd, PATH=str(bin_dir))
    try:
        warnings = [line for line in done.stderr.splitlines() if "newuidmap" in line]
        assert len(warnings) == 1, done.stderr
        assert "apt-get install uidmap" in warnings[0]
        assert "rootless store" in warnings[0]
        img = store.images[0]
        layer = img.diff_ids[0]
        blob = mnt / img.id / "blobs" / layer
        cat = _as_user(ns, "cat", str(blob))
        assert cat.returncode != 0
        assert "Input/output error" in cat.stderr
        # the config is still served
        cfg = _as_user(ns, "cat", str(mnt / img.id / "config.json"))
        assert cfg.returncode == 0
        text = log.read_text()
        assert text.count("newuidmap is not installed") >= 2  # at mount, and in the EIO
        eio = [line for line in text.splitlines() if "permission denied:" in line]
        assert eio, text[-3000:]
        assert "owned by uid" in eio[0]
        assert "container uid" in eio[0]
        assert "apt-get install uidmap" in eio[0]
    finally:
        rootless.unmount_as_user(ns.user, mnt)
