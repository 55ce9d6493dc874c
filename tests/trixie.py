"""TEST-ONLY: a Debian 13 (trixie) root with podman 5's tools, built once and cached.

``trixie_root()`` returns the root directory, building it with ``debootstrap`` on first use:
a minbase trixie with ``podman buildah skopeo docker-registry`` (podman 5.4, buildah
1.39, skopeo 1.18: containers/storage 1.57, containers/image 5.34) installed by the root's own
apt. It lives in ``$IMGFS_TRIXIE_CACHE`` (default ``/var/tmp/imgfs-trixie``) under a directory
named by ``STAMP``: a root is complete when its ``.complete`` file holds the stamp, so it is
built once per machine and reused by every later run (CI included); changing the stamp builds a
new one. ``TrixieUnavailable`` carries the reason when it cannot be built (no debootstrap, not
root, no network): the tests that need it skip with that reason. A failed build is retried at
most once an hour (``.failed`` remembers why), so an offline machine does not pay for it on
every run.

``Chroot(root, work)`` runs commands in the root: each in its own private mount namespace
(``unshare --mount``) in which ``work`` (a host directory) is bound at ``/w``, ``/proc``,
``/dev`` and ``/sys`` are bound in, and ``/tmp``, ``/run``, ``/var/lib/containers`` are fresh
tmpfs — so nothing is mounted on the host, nothing is left in the cached root, and c/image's
blob-info cache starts empty every time. The host's network namespace is shared: the local
registry listens on 127.0.0.1 only.

Must not know: imgfs, what the stores hold (``tests/podman5.py`` builds those).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tests.realstores import _flocked

PACKAGES = ("podman", "buildah", "skopeo", "docker-registry", "ca-certificates")
MIRROR = os.environ.get("IMGFS_DEBIAN_MIRROR", "http://deb.debian.org/debian")
STAMP = "trixie-v1:" + ",".join(PACKAGES)
CACHE = Path(os.environ.get("IMGFS_TRIXIE_CACHE", "/var/tmp/imgfs-trixie"))
BUILD_TIMEOUT = 1800
RETRY_AFTER = 3600
INNER = "/w"


class TrixieUnavailable(Exception):
    """The trixie root cannot be built here; the message is the reason to skip with."""


def _root_dir() -> Path:
    import hashlib

    return CACHE / ("root-" + hashlib.sha256(STAMP.encode()).hexdigest()[:12])


def trixie_root() -> Path:
    """The cached trixie root, built now if it does not exist yet (may take minutes once)."""
    root = _root_dir()
    if _complete(root):
        return root
    if os.geteuid() != 0:
        raise TrixieUnavailable("the trixie root is built and used as root (debootstrap, chroot)")
    for tool in ("debootstrap", "unshare", "chroot"):
        if shutil.which(tool) is None:
            raise TrixieUnavailable(f"{tool} not found (apt-get install debootstrap util-linux)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with _flocked(CACHE / ".lock"):
        if _complete(root):
            return root
        failed = root.with_name(root.name + ".failed")
        if failed.exists() and time.time() - failed.stat().st_mtime < RETRY_AFTER:
            raise TrixieUnavailable(f"trixie root build failed recently: {failed.read_text()}")
        try:
            _build(root)
        except (OSError, subprocess.SubprocessError, TrixieUnavailable) as exc:
            failed.write_text(f"{exc}"[-2000:])
            shutil.rmtree(root, ignore_errors=True)
            raise TrixieUnavailable(f"cannot build the trixie root: {exc}"[-2000:]) from exc
        failed.unlink(missing_ok=True)
    return root


def _complete(root: Path) -> bool:
    try:
        return (root / ".complete").read_text().strip() == STAMP
    except OSError:
        return False


def _build(root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
    partial = root.with_name(root.name + ".partial")
    bootstrapped = partial / ".debootstrapped"  # a later failure keeps the base system
    if not bootstrapped.exists():
        shutil.rmtree(partial, ignore_errors=True)
    log = root.with_name(root.name + ".log")
    started = time.monotonic()
    with log.open("a") as out:
        if not bootstrapped.exists():
            _logged(["debootstrap", "--variant=minbase", "trixie", str(partial), MIRROR], out)
            bootstrapped.write_text(MIRROR + "\n")
        # No service may start inside the root (docker-registry's postinst would try).
        policy = partial / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        install = (
            "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "
            "--no-install-recommends " + " ".join(PACKAGES) + " && apt-get clean"
        )
        _logged(Chroot(partial, None).command(["sh", "-c", install]), out)
        versions = Chroot(partial, None).run(
            ["sh", "-c", "podman --version; buildah --version; skopeo --version"]
        )
        out.write(versions)
    partial.rename(root)
    (root / ".complete").write_text(
        f"{STAMP}\n# built in {time.monotonic() - started:.0f} s\n# {versions}"
    )


def _logged(cmd: Sequence[str], out: object) -> None:
    assert hasattr(out, "write")
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT, check=False
    )
    text = proc.stdout.decode(errors="replace")
    out.write(f"$ {' '.join(cmd)}\n{text}\n")
    if proc.returncode != 0:
        tail = text.strip().splitlines()[-3:]
        raise TrixieUnavailable(f"{cmd[0]} exited {proc.returncode}: {' | '.join(tail)}")


class ChrootError(RuntimeError):
    """A command in the root failed; the message has its stderr."""


class Chroot:
    """Runs commands inside ``root`` with ``work`` bound at ``/w`` (see the module doc)."""

    def __init__(self, root: Path, work: Path | None) -> None:
        self.root = root
        self.work = work

    def inner(self, host_path: Path | str) -> str:
        """The path inside the root of a path under ``work``."""
        assert self.work is not None
        rel = Path(host_path).resolve().relative_to(self.work.resolve())
        return f"{INNER}/{rel}" if str(rel) != "." else INNER

    def command(self, cmd: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
        r = str(self.root)
        mounts = [
            f"mount --bind {r} {r}",  # "/" must be a mount point (c/storage's chrootarchive)
            f"mount --rbind /dev {r}/dev",
            f"mount -t proc proc {r}/proc",
            f"mount --rbind /sys {r}/sys",
            f"mount -t tmpfs tmpfs {r}/tmp",
            f"mount -t tmpfs tmpfs {r}/run",
        ]
        if self.work is not None:
            mounts.insert(1, f"mkdir -p {r}{INNER} && mount --bind {self.work} {r}{INNER}")
            mounts.append(f"mkdir -p {r}/var/lib/containers")
            mounts.append(f"mount -t tmpfs tmpfs {r}/var/lib/containers")
        environment = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "TMPDIR": "/tmp",
            **(env or {}),
        }
        script = " && ".join(mounts) + ' && exec chroot "$0" /usr/bin/env -i "$@"'
        return [
            "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", script, r,
            *(f"{k}={v}" for k, v in environment.items()), *cmd,
        ]  # fmt: skip

    def run(
        self, cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float = 600
    ) -> str:
        """Run ``cmd`` in the root; its stdout (ChrootError with stderr when it fails)."""
        proc = subprocess.run(
            self.command(cmd, env), capture_output=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise ChrootError(
                f"{' '.join(cmd)} exited {proc.returncode}: "
                f"{proc.stderr.decode(errors='replace').strip()[-3000:]}"
            )
        return proc.stdout.decode(errors="replace")

    def start(self, cmd: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        """Start a long-running command in the root (the caller stops it by its pid)."""
        out = log.open("wb")
        try:
            return subprocess.Popen(
                self.command(cmd), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            out.close()


if __name__ == "__main__":
    print(trixie_root())
