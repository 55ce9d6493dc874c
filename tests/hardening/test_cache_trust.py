"""Area 8: the cache directory is trusted only if it is ours.

A cache dir (or its ``index/``) that another user owns, that is group-writable, or that is a
symlink makes the mount refuse to start with a clear error. A persisted layer tree or index that
another user planted (the tree of another layer, whose ``secret.txt`` is 0644 where the real
one is 0600) is ignored and rebuilt after a remount: the mode stays 0600 and the blob bytes stay
right; the same planted file sealed with the directory's own key IS used (the control: the
check is what stops it). Both serving modes.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import imgfs
from imgfs.cache import files as cachefiles
from tests.hardening import harden
from tests.hardening.harden import Counts
from tests.mounting import mount_command, sha256_file

pytestmark = pytest.mark.usefixtures("fuse_required")

AREA = "8 cache trust"
DRIVER = harden.DRIVER
OTHER = 65533
MANY = 600  # above the persistence thresholds of trees and indexes (512)
SECRET = b"the root-only secret\n"


@dataclass
class Images:
    root: Path
    runroot: Path
    private: str  # secret.txt 0600
    public: str  # the same names, secret.txt 0644
    private_blob: str
    public_blob: str


def _commit(tools: harden.Tools, name: str, secret_mode: int) -> str:
    src = tools.base / "src" / name.replace("/", "_").replace(":", "_")
    src.mkdir(parents=True)
    (src / "secret.txt").write_bytes(SECRET)
    (src / "secret.txt").chmod(secret_mode)
    files = {f"many/{i:04d}.txt": f"{i}\n".encode() for i in range(MANY)}
    return tools.commit_files(name, {**files, "secret.txt": SECRET})


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    if os.geteuid() != 0:
        pytest.skip("needs root (cache dirs of another user)")
    base = tmp_path_factory.mktemp("cachetrust")
    tools = harden.Tools.at(base)
    private = _commit(tools, "localhost/private:1", 0o600)
    public = _commit(tools, "localhost/public:1", 0o644)
    store = imgfs.Store.open(str(base / "root"), str(base / "run"), DRIVER)
    blobs = [
        next(b.digest for b in store.image(i).blobs() if b.kind == "layer")
        for i in (private, public)
    ]
    return Images(base / "root", base / "run", private, public, *blobs)


def _mode(mnt: Path, image_id: str) -> int:
    return stat.S_IMODE(os.stat(mnt / image_id / "rootfs" / "secret.txt").st_mode)


# -- refusals ----------------------------------------------------------------------------------


def _owned_by_other(cache: Path) -> None:
    cache.mkdir(mode=0o700)
    os.chown(cache, OTHER, OTHER)


def _group_writable(cache: Path) -> None:
    cache.mkdir()
    cache.chmod(0o770)


def _symlink(cache: Path) -> None:
    (cache.parent / "elsewhere").mkdir(mode=0o700)
    cache.symlink_to(cache.parent / "elsewhere")


def _index_owned_by_other(cache: Path) -> None:
    (cache / "index").mkdir(parents=True, mode=0o700)
    os.chown(cache / "index", OTHER, OTHER)


def _index_symlink(cache: Path) -> None:
    cache.mkdir(mode=0o700)
    (cache.parent / "planted").mkdir(mode=0o700)
    (cache / "index").symlink_to(cache.parent / "planted")


def _key_owned_by_other(cache: Path) -> None:
    (cache / "index").mkdir(parents=True, mode=0o700)
    key = cache / "index" / cachefiles.KEY_FILE
    key.write_bytes(os.urandom(cachefiles.KEY_BYTES))
    key.chmod(0o600)
    os.chown(key, OTHER, OTHER)


REFUSED: dict[str, Callable[[Path], None]] = {
    "cache dir owned by another user": _owned_by_other,
    "cache dir group-writable": _group_writable,
    "cache dir a symlink": _symlink,
    "index owned by another user": _index_owned_by_other,
    "index a symlink": _index_symlink,
    "key owned by another user": _key_owned_by_other,
}


@pytest.mark.parametrize("mode", ["snapshot", "direct"])
@pytest.mark.parametrize("case", list(REFUSED))
def test_a_cache_dir_not_ours_refuses_the_mount(
    case: str, mode: str, images: Images, tmp_path: Path, counts: Counts
) -> None:
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    mnt.mkdir()
    REFUSED[case](cache)
    extra = ("--direct",) if mode == "direct" else ()
    cmd = mount_command(
        images.root, images.runroot, DRIVER, mnt, cache, tmp_path / "imgfs.log", *extra
    )
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    try:
        assert result.returncode != 0, f"{case}: mounted"
        assert not os.path.ismount(mnt)
        assert "Traceback" not in result.stderr, result.stderr
        assert "cache" in result.stderr, result.stderr
        assert str(cache) in result.stderr, result.stderr
    finally:
        harden.unmount_below(tmp_path)
    counts.add(AREA, f"mounts refused with a clear error ({mode})")


# -- planted files -----------------------------------------------------------------------------


def _persisted(cache: Path, layer_id: str, suffix: str) -> Path:
    found = [
        p
        for p in (cache / "index").iterdir()
        if p.name.startswith(layer_id) and p.name.endswith(suffix)
    ]
    assert len(found) == 1, sorted(p.name for p in (cache / "index").iterdir())
    return found[0]


def _layer_id(images: Images, image_id: str) -> str:
    store = imgfs.Store.open(str(images.root), str(images.runroot), DRIVER)
    return store.image(image_id).layer_chain()[-1].id


def _plant(target: Path, body: bytes, key: bytes) -> None:
    target.write_bytes(cachefiles.header_for(target.name, body, key) + body)


@pytest.mark.parametrize("mode", ["snapshot", "direct"])
def test_a_planted_tree_or_index_is_ignored_and_rebuilt(
    mode: str, images: Images, tmp_path: Path, counts: Counts
) -> None:
    extra = ("--direct",) if mode == "direct" else ()
    work = tmp_path / "work"
    with harden.daemon(images.root, images.runroot, work, *extra) as d:
        assert _mode(d.mnt, images.private) == 0o600
        assert _mode(d.mnt, images.public) == 0o644
        if mode == "direct":  # the indexes are built (and persisted) by reads
            for image_id, blob in ((images.private, images.private_blob),
                                   (images.public, images.public_blob)):  # fmt: skip
                assert "sha256:" + sha256_file(d.mnt / image_id / "blobs" / blob) == blob
    cache = work / "cache"
    private_layer = _layer_id(images, images.private)
    public_layer = _layer_id(images, images.public)
    suffixes = [".tree", ".idx.zst"] if mode == "direct" else [".tree"]
    key = (cache / "index" / cachefiles.KEY_FILE).read_bytes()
    bodies = {}
    for suffix in suffixes:
        real = _persisted(cache, private_layer, suffix)
        planted = _persisted(cache, public_layer, suffix).read_bytes()[48:]  # the body
        bodies[suffix] = (real, planted)
        _plant(real, planted, os.urandom(cachefiles.KEY_BYTES))  # another user's forgery
    with harden.daemon(images.root, images.runroot, work, *extra) as d:
        assert _mode(d.mnt, images.private) == 0o600, "a planted tree was used"
        blob = d.mnt / images.private / "blobs" / images.private_blob
        assert "sha256:" + sha256_file(blob) == images.private_blob
        ignored = d.log().count("ignoring cache file")
        assert ignored >= len(suffixes), d.log()[-3000:]
    counts.add(AREA, f"planted cache files ignored and rebuilt ({mode})", len(suffixes))
    counts.add(AREA, "planted files used (must be 0)", 0)
    counts.add(AREA, "wrong bytes served (must be 0)", 0)
    real, planted = bodies[".tree"]
    _plant(real, planted, key)  # the control: sealed with our key, the same body is used
    with harden.daemon(images.root, images.runroot, work, *extra) as d:
        assert _mode(d.mnt, images.private) == 0o644, "control: the planted tree was not read"
    counts.add(AREA, f"control: the same file sealed with our key is used ({mode})")
