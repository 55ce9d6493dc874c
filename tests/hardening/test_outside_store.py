"""Area 9: nothing above the layer is followed (issue 10 class 1).

A victim store V (buildah-made, holding a secret file and an image of its own) and an
attacker store A: a copy of V made before V got its own image, whose copy of the secret file
is overwritten (so A holds no secret byte, but A's records and tar-splits still describe V's
layers exactly). Each attack replaces one component of A — a driver directory, a records file,
a lock file, a big-data directory or file, a tar-split, a layer directory — with a symlink to
V's same component, a symlink to a host directory or file, ``/proc/self``, a FIFO, or the wrong
kind of file. A is then mounted (default snapshot mode and ``--direct``) and everything it
shows is listed and read: not one byte of V's secret, no image only V has, no host byte; the
mount either starts (the broken image fails with EIO and a log line naming the component) or
refuses with one error line naming it; the untouched image of A keeps serving.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import crafted
from tests.hardening import harden
from tests.hardening.harden import Counts
from tests.mounting import mount_command, unmount

pytestmark = pytest.mark.usefixtures("fuse_required")

AREA = "9 outside the store"
DRIVER = harden.DRIVER
MARKER = b"VICTIM-SECRET-7f3a9c-"
SECRET = MARKER * 4000  # 84 KB
COMMON = b"common file of both stores\n" * 40
READ_TIMEOUT = 60.0
MAX_PATHS = 300
MAX_PEAK_RSS_MIB = 300.0


@dataclass(frozen=True)
class Stores:
    victim: Path
    attacker: Path  # the pristine attacker store (copied per attack)
    secret_image: str
    secret_layer: str
    common_image: str
    victim_only: str


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    base = tmp_path_factory.mktemp("outside")
    tools = harden.Tools.at(base / "victim")
    try:
        secret = tools.commit_files("localhost/secret:1", {"secret.txt": SECRET})
        common = tools.commit_files("localhost/common:1", {"common.txt": COMMON})
        attacker = base / "attacker"
        subprocess.run(["cp", "-a", str(tools.root), str(attacker)], check=True)
        only = tools.commit_files("localhost/victimonly:1", {"only.txt": SECRET[:5000]})
        layer = crafted.layer_of(attacker, DRIVER, secret)
        target = crafted.content_dir(attacker, DRIVER, layer) / "secret.txt"
        target.write_bytes(b"X" * len(SECRET))  # same size: only the CRC tells them apart
        yield Stores(tools.root, attacker, secret, layer, common, only)
    finally:
        harden.unmount_below(base)


def _components(s: Stores) -> dict[str, str]:
    """Component name -> its path relative to the graph root, and what it is ("d"/"f")."""
    big = next(
        n for n in os.listdir(s.attacker / f"{DRIVER}-images" / s.secret_image) if n != "manifest"
    )
    return {
        f"{DRIVER}-images": "d",
        f"{DRIVER}-layers": "d",
        DRIVER: "d",
        f"{DRIVER}-images/images.json": "f",
        f"{DRIVER}-layers/layers.json": "f",
        f"{DRIVER}-layers/volatile-layers.json": "f",
        f"{DRIVER}-images/images.lock": "f",
        f"{DRIVER}-layers/layers.lock": "f",
        f"{DRIVER}-images/{s.secret_image}": "d",
        f"{DRIVER}-images/{s.secret_image}/manifest": "f",
        f"{DRIVER}-images/{s.secret_image}/{big}": "f",
        f"{DRIVER}-layers/{s.secret_layer}.tar-split.gz": "f",
        f"{DRIVER}/{s.secret_layer}": "d",
        f"{DRIVER}/{s.secret_layer}/diff": "d",
    }


def _attacks(s: Stores) -> list[tuple[str, str, str]]:
    """(component, kind, replacement) for every component and each way of replacing it."""
    out = []
    for rel, kind in _components(s).items():
        victim_has = (s.victim / rel).exists() or rel.endswith("volatile-layers.json")
        if victim_has:
            out.append((rel, kind, "symlink to the victim's"))
        out.append((rel, kind, "symlink to /etc" if kind == "d" else "symlink to /etc/passwd"))
        out.append((rel, kind, "symlink to /proc/self"))
        out.append((rel, kind, "a regular file" if kind == "d" else "a FIFO"))
        if kind == "f":
            out.append((rel, kind, "a directory"))
    return out


def _replace(root: Path, victim: Path, rel: str, how: str) -> None:
    path = root / rel
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if how == "symlink to the victim's":
        target = victim / rel
        if rel.endswith("volatile-layers.json"):
            target = victim / f"{DRIVER}-layers" / "layers.json"  # V's layers, as extra records
        path.symlink_to(target)
    elif how.startswith("symlink to "):
        path.symlink_to(how.removeprefix("symlink to "))
    elif how == "a FIFO":
        os.mkfifo(path)
    elif how == "a regular file":
        path.write_bytes(b"{}")
    else:
        path.mkdir()


@dataclass
class Seen:
    names: set[str]
    data: list[bytes]
    errors: int


def _walk(mnt: Path) -> Seen:
    """List everything and read every regular file (capped)."""
    seen = Seen(set(), [], 0)
    pending = [mnt]
    count = 0
    while pending and count < MAX_PATHS:
        top = pending.pop()
        try:
            entries = os.listdir(top)
        except OSError:
            seen.errors += 1
            continue
        for name in entries:
            count += 1
            seen.names.add(name)
            path = top / name
            try:
                if path.is_symlink():
                    continue
                if path.is_dir():
                    pending.append(path)
                else:
                    seen.data.append(harden.read_capped(path))
            except OSError:
                seen.errors += 1
    return seen


def _walk_with_timeout(mnt: Path) -> Seen:
    box: list[Seen] = []
    thread = threading.Thread(target=lambda: box.append(_walk(mnt)), daemon=True)
    thread.start()
    thread.join(READ_TIMEOUT)
    assert box, "reading the mount hung"
    return box[0]


@contextlib.contextmanager
def _mounted(root: Path, work: Path, *extra: str) -> Iterator[harden.Daemon | str]:
    """The daemon, or the mount command's error text when it refused to start."""
    mnt, cache, log_file = work / "mnt", work / "cache", work / "imgfs.log"
    mnt.mkdir(parents=True, exist_ok=True)
    cmd = mount_command(root, work / "run", DRIVER, mnt, cache, log_file, *extra)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        unmount(mnt)
        yield result.stderr
        return
    pid = harden.daemon_pid(mnt)
    assert pid is not None
    d = harden.Daemon(mnt, cache, log_file, pid, result.stderr)
    try:
        yield d
    finally:
        harden.stop(d)


@pytest.mark.parametrize("mode", ["snapshots", "direct"])
def test_no_component_is_followed_out_of_the_store(
    stores: Stores, tmp_path: Path, counts: Counts, mode: str
) -> None:
    extra = ("--direct",) if mode == "direct" else ()
    host = harden.HostBytes(list(harden.HOST_FILES))
    failures = []
    for n, (rel, _kind, how) in enumerate(_attacks(stores)):
        attack = f"{rel} replaced by {how}"
        root = tmp_path / f"a{n}" / "root"
        root.parent.mkdir()
        crafted.copy_store(stores.attacker, root)
        _replace(root, stores.victim, rel, how)
        counts.add(AREA, f"attacks run ({mode})")
        with _mounted(root, tmp_path / f"a{n}", *extra) as d:
            if isinstance(d, str):
                counts.add(AREA, f"mount refused with an error line ({mode})")
                short = rel.rsplit("/", 1)[-1][:12]
                if short not in d and "symlink" not in d:
                    failures.append(f"{attack}: refused without naming it: {d.strip()!r:.300}")
                if "Traceback" in d:
                    failures.append(f"{attack}: traceback: {d!r:.300}")
                continue
            counts.add(AREA, f"mount starts ({mode})")
            seen = _walk_with_timeout(d.mnt)
            leaked = sum(blob.count(MARKER) * len(MARKER) for blob in seen.data)
            counts.add(AREA, f"bytes of the other store leaked ({mode})", leaked)
            if leaked:
                failures.append(f"{attack}: served {leaked} bytes of the victim's secret")
            if stores.victim_only in seen.names:
                failures.append(f"{attack}: lists the victim's own image")
                counts.add(AREA, f"bytes of the other store leaked ({mode})", 1)
            if any(host.found_in(blob) for blob in seen.data):
                failures.append(f"{attack}: served host bytes")
                counts.add(AREA, f"host bytes served ({mode})", 1)
            if not harden.alive(d.pid):
                failures.append(f"{attack}: the daemon died")
            rss = harden.peak_rss_mib(d.pid)
            counts.peak(AREA, f"daemon peak RSS MiB ({mode})", rss)
            assert rss < MAX_PEAK_RSS_MIB, attack
            if rel.endswith((".json", ".lock")) or rel.count("/") == 0:
                continue  # store-wide (records, locks): an error for the whole store
            common = d.mnt / stores.common_image / "rootfs" / "common.txt"
            try:
                if common.read_bytes() != COMMON:
                    failures.append(f"{attack}: the untouched image serves wrong bytes")
            except OSError as exc:
                failures.append(f"{attack}: the untouched image fails: {exc}")
            if stores.common_image not in seen.names:
                failures.append(f"{attack}: the untouched image is gone")
    counts.add(AREA, f"wrong bytes ({mode})", 0)
    assert not failures, "\n".join(failures)


def test_a_symlinked_images_dir_never_picks_the_driver(stores: Stores, tmp_path: Path) -> None:
    """Driver auto-detection looks at real directories only: a ``vfs-images`` symlink into
    the victim store beside the real overlay store does not make imgfs choose vfs."""
    from imgfs.store import config

    root = crafted.copy_store(stores.attacker, tmp_path / "root")
    (root / "vfs-images").symlink_to(stores.victim / f"{DRIVER}-images")
    assert config.drivers_in(str(root)) == [DRIVER]
    (root / "vfs-layers").symlink_to(stores.victim / f"{DRIVER}-layers")
    resolved = config.resolve(str(root), str(tmp_path / "run"), None)
    assert resolved.driver == DRIVER


def test_the_library_reads_nothing_through_a_symlinked_component(
    stores: Stores, tmp_path: Path
) -> None:
    """The library (no FUSE) under the same attacks: every image's blobs either fail with an
    imgfs error or are the attacker store's own bytes."""
    import imgfs

    for n, (rel, _kind, how) in enumerate(_attacks(stores)):
        if how != "symlink to the victim's":
            continue
        root = crafted.copy_store(stores.attacker, tmp_path / f"l{n}")
        _replace(root, stores.victim, rel, how)
        try:
            store = imgfs.Store.open(str(root), str(tmp_path / "run"), DRIVER)
            images = store.images()
        except imgfs.ImgfsError:
            continue
        assert stores.victim_only not in {i.id for i in images}, rel
        for image in images:
            with contextlib.suppress(imgfs.ImgfsError):
                for info in image.blobs():
                    with contextlib.suppress(imgfs.ImgfsError), image.open_blob(info.digest) as f:
                        assert MARKER not in f.read(), rel
