"""TEST-ONLY machinery for rootless tests: a test user, their stores, and running as them.

- ``ensure_users()``: the host users ``imgfs-test`` (with two subordinate uid/gid ranges in
  /etc/subuid and /etc/subgid, so the second range's mapping is exercised too) and
  ``imgfs-test-other`` (another host user, for "sees nothing"). Idempotent; never removed.
- ``build_stores(user)``: rootless stores built by buildah AS that user, ``vfs`` (custom graph
  root) and ``overlay`` (at the user's default ``~/.local/share/containers/storage``, so
  ``imgfs MNT`` without STORE is exercised), each with ``localhost/rootless:v1`` (one layer:
  files owned by container uids 0, 1000, 2000 and 70000 -- the last in the second subordinate
  range --, modes 0600/0700/0000, a 0000 directory, a hardlink, a symlink, 1200 small 0600 files
  and a 24 MiB one) and ``localhost/rootless:v2`` (+ a layer: a whiteout, a replaced
  directory, a file of uid 3000), and ``localhost/rootless:typical`` (one layer as most images
  are: the same 24 MiB and 1200 small files owned by container root, mode 0644, and only a
  0700 directory of five 0600 files of uid 1000 that need the opener). The oracle:
  ``skopeo copy containers-storage:... dir:`` run as the user. Built once and reused while
  this file is unchanged (a stamp holds its hash).
- ``Namespace``: runs commands as the user inside a private mount namespace in which
  ``/dev/fuse`` is a 0666 copy of the device (made with mknod in a root-only directory; the
  host's node is never touched) and the Python install is reachable (a root-only ancestor such
  as ``/root`` is covered by a tmpfs that holds only a bind of the install). Every mount there is
  made private except the shared bind mount of the user's work dir, so a FUSE mount made inside
  propagates to the host: any process of the user sees it, with no namespace.

Needs root, useradd/usermod/runuser, unshare, mknod, buildah, skopeo, newuidmap/newgidmap
(``uidmap``), a setuid fusermount3 and /dev/fuse; ``unavailable_reason()`` says what is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

USER = "imgfs-test"
OTHER = "imgfs-test-other"
REPO = Path(__file__).resolve().parent.parent
# Two ranges per user: the first is whatever useradd gave (or this), then a second one.
CANDIDATE_RANGES = [(410000, 65536), (480000, 65536), (550000, 65536), (620000, 65536)]
DRIVERS = ("vfs", "overlay")
IMAGES = ("localhost/rootless:v1", "localhost/rootless:v2", "localhost/rootless:typical")
STAMP = ".imgfs-rootless-stores"
BIG_MIB = 24
SMALL_FILES = 1200


def unavailable_reason() -> str | None:
    """Why rootless tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "rootless tests create a test user and a private mount namespace: run as root"
    tools = ["useradd", "usermod", "runuser", "unshare", "mknod", "mount", "buildah", "skopeo"]
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return f"rootless tests need {', '.join(missing)}"
    for tool in ("newuidmap", "newgidmap"):
        if shutil.which(tool) is None:
            return f"rootless tests need {tool} (apt-get install uidmap)"
    fusermount = shutil.which("fusermount3")
    if fusermount is None:
        return "rootless tests need fusermount3 (apt-get install fuse3)"
    if not os.stat(fusermount).st_mode & stat.S_ISUID:
        return f"{fusermount} is not setuid: a normal user cannot mount"
    if not os.path.exists("/dev/fuse") or not stat.S_ISCHR(os.stat("/dev/fuse").st_mode):
        return "FUSE unavailable: /dev/fuse is missing"
    if not os.path.ismount("/dev"):
        return "/dev is not a mount of its own: the private /dev/fuse could leak to the host"
    return None


# --------------------------------------------------------------------------------------------
# users


@dataclass(frozen=True)
class TestUser:
    name: str
    uid: int
    gid: int
    home: Path

    @property
    def runtime_dir(self) -> Path:
        return self.home / ".imgfs-test-run"

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "LANG": "C.UTF-8",
        }
        env.update(extra)
        return env


def _run(cmd: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(cmd), capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: rc {done.returncode}: {done.stderr[-2000:]}")
    return done  # type: ignore[no-any-return]


def _ensure_user(name: str, comment: str) -> TestUser:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        _run(["useradd", "--create-home", "--shell", "/bin/bash", "--comment", comment, name])
        pw = pwd.getpwnam(name)
    home = Path(pw.pw_dir)
    if not home.is_dir():
        home.mkdir(mode=0o755, parents=True)
        os.chown(home, pw.pw_uid, pw.pw_gid)
    return TestUser(name, pw.pw_uid, pw.pw_gid, home)


def _ranges(path: str, name: str) -> list[tuple[int, int]]:
    found = []
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[0] == name:
                found.append((int(parts[1]), int(parts[2])))
    return found


def _all_ranges(path: str) -> list[tuple[int, int]]:
    found = []
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                found.append((int(parts[1]), int(parts[2])))
    return found


def _ensure_two_ranges(name: str) -> None:
    for path, flag in (("/etc/subuid", "--add-subuids"), ("/etc/subgid", "--add-subgids")):
        while len(_ranges(path, name)) < 2:
            taken = _all_ranges(path)
            free = next(
                (s, c)
                for s, c in CANDIDATE_RANGES
                if all(s + c <= ts or ts + tc <= s for ts, tc in taken)
            )
            _run(["usermod", flag, f"{free[0]}-{free[0] + free[1] - 1}", name])


def ensure_users() -> tuple[TestUser, TestUser]:
    """The test user (with two subordinate ranges) and the other host user."""
    user = _ensure_user(USER, "imgfs rootless tests")
    _ensure_two_ranges(USER)
    other = _ensure_user(OTHER, "imgfs rootless tests, another user")  # no ":" in a GECOS field
    user.runtime_dir.mkdir(mode=0o700, exist_ok=True)
    os.chown(user.runtime_dir, user.uid, user.gid)
    return user, other


def as_user(user: TestUser, cmd: Sequence[str], **env: str) -> list[str]:
    """``cmd`` run as ``user`` in the host's namespaces, with a clean environment."""
    pairs = [f"{k}={v}" for k, v in user.env(**env).items()]
    return ["runuser", "-u", user.name, "--", "env", "-i", *pairs, *cmd]


def user_mkdir(user: TestUser, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, user.uid, user.gid)
    return path


# --------------------------------------------------------------------------------------------
# stores


_BUILD = r"""
set -eu
D=$1 ROOT=$2 RUN=$3 BIG=$4 SMALL=$5
B="buildah --root $ROOT --runroot $RUN --storage-driver $D"
ctr=$($B from scratch)
$B unshare sh -eu -c '
B=$1 ctr=$2 BIG=$3 SMALL=$4
m=$($B mount $ctr)
mkdir $m/etc $m/d700 $m/d000 $m/many
echo hello > $m/etc/hosts
echo secret > $m/secret; chown 1000:1000 $m/secret; chmod 0600 $m/secret
ln $m/secret $m/secret-link
ln -s etc/hosts $m/hosts-link
echo f > $m/d700/f; echo g > $m/d700/readable; chmod 0644 $m/d700/readable
chown -R 2000:2000 $m/d700; chmod 0700 $m/d700; chmod 0600 $m/d700/f
echo in > $m/d000/in; chmod 0000 $m/d000
echo z > $m/zero; chmod 0000 $m/zero
echo far > $m/far; chown 70000:70001 $m/far; chmod 0600 $m/far
echo g > $m/gone
head -c $(($BIG * 1048576)) /dev/urandom > $m/big; chown 1000:1000 $m/big; chmod 0600 $m/big
i=0; while [ $i -lt $SMALL ]; do echo "small $i" > $m/many/f$i; i=$((i + 1)); done
chown -R 1000:1000 $m/many; chmod 0600 $m/many/*; chmod 0700 $m/many
$B umount $ctr
' sh "$B" "$ctr" "$BIG" "$SMALL"
$B commit --quiet $ctr localhost/rootless:v1 >/dev/null
$B rm $ctr >/dev/null
ctr=$($B from localhost/rootless:v1)
$B unshare sh -eu -c '
B=$1 ctr=$2
m=$($B mount $ctr)
rm $m/gone
rm -r $m/d700; mkdir $m/d700; echo new > $m/d700/new; chown -R 2000:2000 $m/d700
chmod 0700 $m/d700
echo l2 > $m/l2file; chown 3000:3000 $m/l2file; chmod 0600 $m/l2file
$B umount $ctr
' sh "$B" "$ctr"
$B commit --quiet $ctr localhost/rootless:v2 >/dev/null
$B rm $ctr >/dev/null
ctr=$($B from scratch)
$B unshare sh -eu -c '
B=$1 ctr=$2 BIG=$3 SMALL=$4
m=$($B mount $ctr)
mkdir -p $m/usr/share/many $m/var/lib/app
head -c $(($BIG * 1048576)) /dev/urandom > $m/usr/big
i=0; while [ $i -lt $SMALL ]; do echo "small $i" > $m/usr/share/many/f$i; i=$((i + 1)); done
for i in 1 2 3 4 5; do echo "app $i" > $m/var/lib/app/s$i; done
chown -R 1000:1000 $m/var/lib/app; chmod 0700 $m/var/lib/app; chmod 0600 $m/var/lib/app/*
$B umount $ctr
' sh "$B" "$ctr" "$BIG" "$SMALL"
$B commit --quiet $ctr localhost/rootless:typical >/dev/null
$B rm $ctr >/dev/null
"""


@dataclass(frozen=True)
class RootlessImage:
    name: str
    id: str
    oracle_dir: Path  # skopeo copy ... dir: as the user
    diff_ids: tuple[str, ...]

    def layer_paths(self) -> list[Path]:
        return [self.oracle_dir / d.split(":", 1)[1] for d in self.diff_ids]

    def blob_names(self) -> list[str]:
        """The dir: export's blobs (config and layers), as ``blobs/`` names."""
        return [
            f"sha256:{p.name}"
            for p in sorted(self.oracle_dir.iterdir())
            if len(p.name) == 64 and p.name != "manifest.json"
        ]


@dataclass(frozen=True)
class RootlessStore:
    driver: str
    root: Path
    runroot: Path
    images: tuple[RootlessImage, ...]
    default_location: bool  # the user's own ~/.local/share/containers/storage

    def layers_dir(self) -> Path:
        return self.root / f"{self.driver}-layers"


def _source_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _store_paths(user: TestUser, driver: str) -> tuple[Path, Path, bool]:
    if driver == "overlay":
        return user.home / ".local/share/containers/storage", user.runtime_dir / "containers", True
    base = user.home / "imgfs-test-stores"
    return base / f"{driver}-root", base / f"{driver}-run", False


def build_stores(user: TestUser) -> dict[str, RootlessStore]:
    """Both stores, built as ``user`` (or reused when built by this very file)."""
    stores = {}
    oracles = user_mkdir(user, user.home / "imgfs-test-oracles")
    for driver in DRIVERS:
        root, runroot, default = _store_paths(user, driver)
        stamp = root.parent / f"{root.name}{STAMP}.json"
        meta: dict[str, Any] | None = None
        if stamp.exists():
            meta = json.loads(stamp.read_text())
            if meta.get("hash") != _source_hash() or not root.is_dir():
                meta = None
        if meta is None:
            meta = _build(user, driver, root, runroot, oracles / driver)
            meta["hash"] = _source_hash()
            stamp.write_text(json.dumps(meta))
        images = tuple(
            RootlessImage(m["name"], m["id"], Path(m["oracle_dir"]), tuple(m["diff_ids"]))
            for m in meta["images"]
        )
        stores[driver] = RootlessStore(driver, root, runroot, images, default)
    return stores


def _build(user: TestUser, driver: str, root: Path, runroot: Path, oracles: Path) -> dict[str, Any]:
    for path in (root, runroot, oracles):
        if path.exists():
            shutil.rmtree(path)  # as root: subordinate uids' files too
    for path in (root.parent, runroot.parent):
        if not path.exists():
            path.mkdir(parents=True)
            os.chown(path, user.uid, user.gid)
    for parent in [*reversed(root.parents)]:
        if str(parent).startswith(str(user.home) + "/") and not parent.exists():
            user_mkdir(user, parent)
    user_mkdir(user, oracles)
    script = [
        "bash", "-c", _BUILD, "build", driver, str(root), str(runroot), str(BIG_MIB),
        str(SMALL_FILES),
    ]  # fmt: skip
    _run(as_user(user, script), timeout=900)
    images = []
    for name in IMAGES:
        out = oracles / name.rsplit(":", 1)[1]
        ref = f"containers-storage:[{driver}@{root}+{runroot}]{name}"
        _run(as_user(user, ["skopeo", "copy", "--quiet", ref, f"dir:{out}"]), timeout=600)
        manifest = json.loads((out / "manifest.json").read_text())
        config_hex = manifest["config"]["digest"].split(":", 1)[1]
        config = json.loads((out / config_hex).read_text())
        images.append(
            {
                "name": name,
                "id": config_hex,
                "oracle_dir": str(out),
                "diff_ids": config["rootfs"]["diff_ids"],
            }
        )
    return {"images": images}


# --------------------------------------------------------------------------------------------
# the private mount namespace


_NS_SCRIPT = r"""
set -eu
node=$1 shared=$2 hide=$3 keep=$4 user=$5; shift 5
# Only the shared work dir may propagate to the host: everything else becomes private here.
awk '$0 ~ / shared:/ {print $5}' /proc/self/mountinfo | while read -r mp; do
  case "$mp" in "$shared"|"$shared"/*) ;; *) mount --make-private "$mp" ;; esac
done
mount --bind "$node" /dev/fuse
if [ -n "$hide" ]; then
  tmp=$(mktemp -d /tmp/imgfs-ns-keep.XXXXXX)
  mount --bind "$keep" "$tmp"
  mount -t tmpfs -o mode=0755,size=1m imgfs-test-hide "$hide"
  mkdir -p "$keep"
  mount --bind "$tmp" "$keep"
  umount "$tmp"; rmdir "$tmp"
fi
exec runuser -u "$user" -- "$@"
"""


def _python_hiding() -> tuple[str, str]:
    """(ancestor to cover, install to keep) when the user cannot reach this Python, else ''."""
    keep = os.path.realpath(sys.base_prefix)
    parts = Path(keep).parts
    for i in range(1, len(parts)):
        ancestor = os.path.join(*parts[: i + 1])
        if not os.stat(ancestor).st_mode & stat.S_IXOTH:
            return ancestor, keep
    return "", keep


class Namespace:
    """Runs commands as the test user in private mount namespaces (one per command) that share
    ``workdir`` with the host. Use as a context manager: it makes ``workdir`` a shared bind
    mount and the 0666 device copy, and removes both (unmounting what is left) at exit."""

    def __init__(self, user: TestUser, workdir: Path) -> None:
        self.user = user
        self.workdir = user_mkdir(user, workdir)
        self._nodedir = Path(tempfile.mkdtemp(prefix="imgfs-fusenode."))  # 0700 root
        self.node = self._nodedir / "fuse"
        self._mounted = False
        self.hide, self.keep = _python_hiding()

    def __enter__(self) -> Namespace:
        dev = os.stat("/dev/fuse").st_rdev
        os.mknod(self.node, 0o666 | stat.S_IFCHR, dev)
        os.chmod(self.node, 0o666)
        _run(["mount", "--bind", str(self.workdir), str(self.workdir)])
        self._mounted = True
        _run(["mount", "--make-shared", str(self.workdir)])
        return self

    def __exit__(self, *exc: object) -> None:
        for mp in reversed(_mounts_below(self.workdir)):
            subprocess.run(as_user(self.user, ["fusermount3", "-u", mp]), capture_output=True)
            if os.path.ismount(mp):
                subprocess.run(["umount", "-l", mp], capture_output=True)
        if self._mounted:
            subprocess.run(["umount", "-l", str(self.workdir)], capture_output=True)
        shutil.rmtree(self._nodedir, ignore_errors=True)
        if not _mounts_below(self.workdir) and not os.path.ismount(self.workdir):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def command(self, cmd: Sequence[str], **env: str) -> list[str]:
        pairs = [f"{k}={v}" for k, v in self.user.env(**env).items()]
        return [
            "unshare", "--mount", "--propagation", "unchanged", "--", "sh", "-c", _NS_SCRIPT,
            "imgfs-ns", str(self.node), str(self.workdir), self.hide, self.keep, self.user.name,
            "env", "-i", *pairs, *cmd,
        ]  # fmt: skip

    def run(
        self, cmd: Sequence[str], timeout: float = 120, check: bool = True, **env: str
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.command(cmd, **env), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{cmd}: rc {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def python(self, *args: str) -> list[str]:
        """This interpreter, with this repository's imgfs first on the path."""
        return ["env", f"PYTHONPATH={REPO}", sys.executable, *args]


def _mounts_below(path: Path) -> list[str]:
    below = []
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp.startswith(prefix):
                below.append(mp)
    return below


def is_mounted(path: Path) -> bool:
    return str(path) in _mounts_below(path.parent)


@contextlib.contextmanager
def mounted_as_user(
    ns: Namespace, store: RootlessStore, name: str, *extra: str, default_store: bool = False
) -> Iterator[tuple[Path, Path]]:
    """Mount ``store`` as the test user (daemon, in the namespace); yields (mnt, log file)."""
    work = user_mkdir(ns.user, ns.workdir / name)
    mnt = user_mkdir(ns.user, work / "mnt")
    log = work / "imgfs.log"
    args = ["-m", "imgfs", "--log-file", str(log), "--cache-dir", str(work / "cache"), *extra]
    if not default_store:
        args += ["--driver", store.driver, "--runroot", str(store.runroot), str(store.root)]
    done = ns.run(ns.python(*args, str(mnt)), check=False, timeout=60)
    try:
        assert done.returncode == 0, f"imgfs failed: {done.stderr}"
        assert is_mounted(mnt), "the mount is not visible in the host's namespace"
        yield mnt, log
    finally:
        unmount_as_user(ns.user, mnt)


def unmount_as_user(user: TestUser, mnt: Path) -> None:
    if not is_mounted(mnt):
        return
    subprocess.run(as_user(user, ["fusermount3", "-u", str(mnt)]), capture_output=True)
    for _ in range(50):
        if not is_mounted(mnt):
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
