"""imgfs.store.userns without a test user: the subordinate ranges, podman's mapping, what is
missing and how it is said, and the root path (no opener at all). The opener itself runs as a
real user in tests/test_rootless.py."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from imgfs.errors import LayerUnavailable
from imgfs.store import userns
from imgfs.store.layerfiles import LayerFiles


def _identity(uid_ranges: tuple[userns.IdRange, ...] = (), user: str = "alice") -> userns.Identity:
    gid_ranges = uid_ranges
    return userns.Identity(1000, 1000, user, uid_ranges, gid_ranges)


def test_subid_ranges_by_name_or_uid_in_file_order(tmp_path: Path) -> None:
    f = tmp_path / "subuid"
    f.write_text(
        "# comment\n\nbob:100000:65536\nalice:200000:65536\n1000:300000:10\n"
        "alice:bad:1\nalice:1:2:3\nalice:400000:0\n alice:500000:5 \n"
    )
    got = userns.subid_ranges(str(f), "alice", 1000)
    assert got == [
        userns.IdRange(200000, 65536),
        userns.IdRange(300000, 10),
        userns.IdRange(500000, 5),
    ]
    assert userns.subid_ranges(str(tmp_path / "absent"), "alice", 1000) == []


def test_mapping_is_podmans_and_maps_back() -> None:
    ranges = (userns.IdRange(100000, 65536), userns.IdRange(410000, 65536))
    mapping = userns.id_mapping(1001, ranges)
    assert mapping == [(0, 1001, 1), (1, 100000, 65536), (65537, 410000, 65536)]
    assert userns.inside_id(1001, mapping) == 0
    assert userns.inside_id(100999, mapping) == 1000
    assert userns.inside_id(414463, mapping) == 70000
    assert userns.inside_id(5, mapping) is None
    assert userns.inside_id(165536, mapping) is None


def _fake_tool(directory: Path, name: str, setuid: bool) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o4755 if setuid else 0o755)


def test_setup_problem_names_what_is_missing_and_the_fix(tmp_path: Path) -> None:
    ranges = (userns.IdRange(100000, 65536),)
    empty = tmp_path / "empty"
    empty.mkdir()
    problem = userns.setup_problem(_identity(ranges), search_path=str(empty))
    assert problem == "newuidmap is not installed (apt-get install uidmap)"

    plain = tmp_path / "plain"
    plain.mkdir()
    _fake_tool(plain, "newuidmap", setuid=False)
    _fake_tool(plain, "newgidmap", setuid=False)
    problem = userns.setup_problem(_identity(ranges), search_path=str(plain))
    assert problem is not None
    assert "not setuid" in problem
    assert "uidmap" in problem

    good = tmp_path / "good"
    good.mkdir()
    _fake_tool(good, "newuidmap", setuid=True)
    _fake_tool(good, "newgidmap", setuid=True)
    assert userns.setup_problem(_identity(ranges), search_path=str(good)) is None
    problem = userns.setup_problem(_identity(()), search_path=str(good))
    assert problem is not None
    assert "user alice has no subordinate uid range in /etc/subuid" in problem
    assert "usermod --add-subuids" in problem
    assert "alice" in problem


def test_mount_warning_is_one_line_with_the_fix() -> None:
    text = userns.mount_warning("/home/a/.local/share/containers/storage", "newuidmap is x (y)")
    assert "\n" not in text
    assert text.startswith("rootless store /home/a/.local/share/containers/storage:")
    assert "EIO" in text
    assert text.endswith("newuidmap is x (y)")


def test_explain_denied_names_file_owner_container_uid_and_fix(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    (layer / "d").mkdir(parents=True)
    (layer / "d" / "f").write_text("x")
    uid = os.stat(layer / "d" / "f").st_uid
    ident = userns.Identity(
        uid + 1, 0, "alice", (userns.IdRange(uid - 5, 10),) if uid >= 5 else (), ()
    )
    text = userns.explain_denied([str(layer)], b"d/f", "layer abc", "PROBLEM (FIX)", ident)
    assert text.startswith("layer abc: file b'd/f': permission denied: ")
    assert f"{layer}/d/f" in text
    assert f"owned by uid {uid}" in text
    if uid >= 5:
        assert "container uid 6" in text
    assert text.endswith("which is unavailable: PROBLEM (FIX)")
    assert "\n" not in text


def test_root_keeps_plain_layerfiles(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the root path is checked as root")
    (tmp_path / "layers").mkdir()
    lock = tmp_path / "layers" / "layers.lock"
    os.chown(tmp_path / "layers", 1000, 1000)  # a store owned by someone else, mounted by root
    assert not userns.is_rootless_store(str(tmp_path / "layers"))
    files = userns.open_layer_files([str(tmp_path)], "layer x", [str(lock)])
    try:
        assert type(files) is LayerFiles
    finally:
        files.close()
    assert userns.rootless_warning(str(tmp_path / "layers")) is None


def test_denied_recognises_only_permission_errors(tmp_path: Path) -> None:
    files = LayerFiles([str(tmp_path)], "layer x")
    try:
        with pytest.raises(LayerUnavailable) as missing:
            files.open(b"nope", 1)
    finally:
        files.close()
    assert not userns.denied(missing.value)
    err = LayerUnavailable("x")
    err.__cause__ = PermissionError(13, "Permission denied")
    assert userns.denied(err)


def test_helper_entry_is_importable_without_fuse() -> None:
    """The helper imports imgfs.store.userns only: never pyfuse3 or trio."""
    import subprocess
    import sys

    root = str(Path(userns.__file__).resolve().parents[2])
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import imgfs.store.userns; "
        "print(sorted(m for m in ('pyfuse3', 'trio') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code, root], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
    assert stat.S_ISREG(os.stat(userns.__file__).st_mode)


def test_grow_fd_table_grows_the_table_before_threads_need_it() -> None:
    """A helper batch brings up to MAX_BATCH descriptors at once; growing the table then, in a
    threaded daemon, waits for RCU grace periods (the first cold blob paid ~40 ms): the daemon
    grows it at start, single-threaded (``FDSize`` in /proc/PID/status is the table's size)."""
    import subprocess
    import sys

    root = str(Path(userns.__file__).resolve().parents[2])
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from imgfs.store import userns\n"
        "def size(): return next(l.split()[1] for l in open('/proc/self/status')"
        " if l.startswith('FDSize:'))\n"
        "before = size(); userns.grow_fd_table(); print(before, size())"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code, root], capture_output=True, text=True, check=True
    )
    before, after = map(int, done.stdout.split())
    assert before < userns.FD_TABLE <= after
    assert userns.FD_TABLE >= 2 * userns.MAX_BATCH


def test_the_helpers_directories_are_opened_under_every_layers_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An imagestore layer is read under the graph root's and the image store's layers.lock
    (c/storage's order); the helper's directory opens hold both, not only the first."""
    import contextlib
    from collections.abc import Iterator, Sequence

    held: list[list[str]] = []

    @contextlib.contextmanager
    def recording(paths: Sequence[str]) -> Iterator[None]:
        held.append(list(paths))
        yield

    class _Opener:
        identity = _identity()

        def open_dirs(self, dirs: Sequence[str], what: str) -> str:
            assert held, "directories opened without the locks"
            return "remote"

        def release(self, remote: object) -> None:
            pass

    monkeypatch.setattr(userns, "read_locked", recording)
    locks = [str(tmp_path / "graph" / "layers.lock"), str(tmp_path / "images" / "layers.lock")]
    files = userns.UsernsLayerFiles([str(tmp_path)], "layer x", locks, _Opener())  # type: ignore[arg-type]
    try:
        assert files._remote_handle(None, b"f") == "remote"
    finally:
        files.close()
    assert held == [locks]
