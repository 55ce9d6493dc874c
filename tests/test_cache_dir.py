"""The cache directory is trusted only if it is ours (imgfs.cache.files): ownership, modes and
symlinks of the directory, its index/ and its key; the sealed envelope of persisted files."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from imgfs.cache import files as cachefiles
from imgfs.errors import UnsafeCacheDir

OTHER = 65533


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_new_cache_dir_is_ours_alone(tmp_path: Path) -> None:
    cache = tmp_path / "a" / "cache"
    index = cachefiles.open_cache_dir(str(cache))
    assert index == str(cache / "index")
    assert _mode(cache) == 0o700
    assert _mode(cache / "index") == 0o700
    key = cache / "index" / cachefiles.KEY_FILE
    assert _mode(key) == 0o600
    assert len(key.read_bytes()) == cachefiles.KEY_BYTES
    cachefiles.open_cache_dir(str(cache))  # again: the same key
    assert key.read_bytes() == (cache / "index" / cachefiles.KEY_FILE).read_bytes()


def _other_owner(path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    path.mkdir(mode=0o700)
    os.chown(path, OTHER, OTHER)


def _group_writable(path: Path) -> None:
    path.mkdir()
    path.chmod(0o770)


def _world_writable_sticky(path: Path) -> None:
    path.mkdir()
    path.chmod(0o1777)


def _symlink_to_ours(path: Path) -> None:
    real = path.parent / "real"
    real.mkdir(mode=0o700)
    path.symlink_to(real)


def _a_file(path: Path) -> None:
    path.write_text("not a directory")


REFUSED_DIRS: dict[str, tuple[Callable[[Path], None], str]] = {
    "owned by another user": (_other_owner, f"owned by uid {OTHER}"),
    "group-writable": (_group_writable, "writable by group or others"),
    "world-writable sticky": (_world_writable_sticky, "writable by group or others"),
    "a symlink": (_symlink_to_ours, "is not a directory"),
    "a file": (_a_file, "is not a directory"),
}


@pytest.mark.parametrize("case", list(REFUSED_DIRS))
@pytest.mark.parametrize("where", ["cache", "index"])
def test_a_cache_dir_not_ours_alone_is_refused(case: str, where: str, tmp_path: Path) -> None:
    make, message = REFUSED_DIRS[case]
    cache = tmp_path / "cache"
    if where == "index":
        cache.mkdir(mode=0o700)
    make(cache if where == "cache" else cache / "index")
    with pytest.raises(UnsafeCacheDir, match=message) as info:
        cachefiles.open_cache_dir(str(cache))
    assert str(cache) in str(info.value)


def test_an_index_readable_by_others_is_tightened(tmp_path: Path) -> None:
    index = tmp_path / "cache" / "index"
    index.mkdir(parents=True)
    index.chmod(0o755)
    cachefiles.open_cache_dir(str(tmp_path / "cache"))
    assert _mode(index) == 0o700


def _key_path(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "index" / cachefiles.KEY_FILE


def test_a_key_that_is_a_symlink_or_not_ours_is_refused(tmp_path: Path) -> None:
    key = _key_path(tmp_path)
    key.parent.mkdir(parents=True, mode=0o700)
    secret = tmp_path / "elsewhere"
    secret.write_bytes(b"k" * 32)
    key.symlink_to(secret)
    with pytest.raises(UnsafeCacheDir, match="cache key"):
        cachefiles.open_cache_dir(str(tmp_path / "cache"))
    if os.geteuid() == 0:
        key.unlink()
        key.write_bytes(b"k" * 32)
        key.chmod(0o600)
        os.chown(key, OTHER, OTHER)
        with pytest.raises(UnsafeCacheDir, match=f"owned by uid {OTHER}"):
            cachefiles.open_cache_dir(str(tmp_path / "cache"))


@pytest.mark.parametrize(("content", "mode"), [(b"k" * 32, 0o644), (b"short", 0o600)])
def test_a_key_others_may_read_or_damaged_is_replaced(
    content: bytes, mode: int, tmp_path: Path
) -> None:
    key = _key_path(tmp_path)
    key.parent.mkdir(parents=True, mode=0o700)
    key.write_bytes(content)
    key.chmod(mode)
    cachefiles.open_cache_dir(str(tmp_path / "cache"))
    assert _mode(key) == 0o600
    assert len(key.read_bytes()) == cachefiles.KEY_BYTES
    assert key.read_bytes() != content


def test_racing_daemons_agree_on_one_key(tmp_path: Path) -> None:
    index = tmp_path / "cache" / "index"
    index.mkdir(parents=True, mode=0o700)
    start = threading.Barrier(8)

    def prepare() -> None:
        start.wait()
        cachefiles.prepare_dir(str(index))

    threads = [threading.Thread(target=prepare) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    key = (index / cachefiles.KEY_FILE).read_bytes()
    assert len(key) == cachefiles.KEY_BYTES
    assert sorted(p.name for p in index.iterdir()) == [cachefiles.KEY_FILE]


# -- the envelope ------------------------------------------------------------------------------


def _prepared(tmp_path: Path) -> Path:
    return Path(cachefiles.open_cache_dir(str(tmp_path / "cache")))


def _load(path: Path) -> bytes | None:
    return cachefiles.load(str(path), lambda body: body)


def test_a_saved_file_loads_back(tmp_path: Path) -> None:
    path = _prepared(tmp_path) / "layer-1.tree"
    cachefiles.save(str(path), lambda: b"body bytes")
    assert _mode(path) == 0o600
    assert _load(path) == b"body bytes"


def _forge_with(key: bytes, name: str, body: bytes) -> bytes:
    return cachefiles.header_for(name, body, key) + body


FORGERIES: dict[str, Callable[[Path, bytes], bytes]] = {
    "another key": lambda p, good: _forge_with(os.urandom(32), p.name, b"planted"),
    "no key (zero MAC)": lambda p, good: good[:16] + bytes(32) + good[48:],
    "body edited": lambda p, good: good[:-1] + bytes([good[-1] ^ 1]),
    "body appended": lambda p, good: good + b"x",
    "truncated": lambda p, good: good[:-3],
    "old format": lambda p, good: b"IMGFSTRE" + good[8:],
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_forged_file_is_ignored_removed_and_rebuilt(
    forgery: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _prepared(tmp_path) / "layer-1.tree"
    cachefiles.save(str(path), lambda: b"the real body")
    path.write_bytes(FORGERIES[forgery](path, path.read_bytes()))
    assert _load(path) is None
    assert "ignoring cache file" in caplog.text
    assert not path.exists()
    cachefiles.save(str(path), lambda: b"the real body")
    assert _load(path) == b"the real body"


def test_a_file_sealed_for_another_name_is_refused(tmp_path: Path) -> None:
    index = _prepared(tmp_path)
    cachefiles.save(str(index / "a.tree"), lambda: b"tree of layer a")
    os.rename(index / "a.tree", index / "b.tree")
    assert _load(index / "b.tree") is None


def test_a_symlink_or_foreign_file_is_not_read(tmp_path: Path) -> None:
    index = _prepared(tmp_path)
    cachefiles.save(str(index / "real.tree"), lambda: b"body")
    target = tmp_path / "outside"
    target.write_bytes((index / "real.tree").read_bytes())
    (index / "link.tree").symlink_to(target)
    assert _load(index / "link.tree") is None
    assert target.exists()  # only the link was removed
    if os.geteuid() == 0:
        os.chown(index / "real.tree", OTHER, OTHER)
        assert _load(index / "real.tree") is None


def test_stale_temp_files_of_dead_daemons_are_removed(tmp_path: Path) -> None:
    index = _prepared(tmp_path)
    stale = index / "x.tree.tmp-999999999-1"
    stale.write_bytes(b"half")
    live = index / f"x.tree.tmp-{os.getpid()}-1"
    live.write_bytes(b"half")
    cachefiles.prepare_dir(str(index))
    assert not stale.exists()
    assert live.exists()
