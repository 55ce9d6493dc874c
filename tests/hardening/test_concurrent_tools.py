"""Area 3: copies from the mount while podman/buildah/skopeo write to the same store.

For a bounded time a writer thread "pulls" (``skopeo copy`` from a local OCI layout), tags
(``podman tag``), commits (``buildah from``/``copy``/``commit``) and removes (``podman rmi``,
``buildah rmi``) images in the mounted store, while ``cp`` loops copy blobs out of the mount.
Blobs are content-addressed, so a copy is correct iff its sha256 equals its file name.

Measured: copies correct / failed cleanly / wrong (must be 0); every interval in which imgfs
held an OFD read lock on a store lock file (a writer waits at most that long; must never reach
1 s); and afterwards the store itself: ``podman images`` and ``skopeo inspect`` of the
untouched images equal what they were, and no store file whose metadata says it was not
rewritten changed content (must be 0).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.hardening import harden
from tests.hardening.harden import Counts
from tests.mounting import sha256_file

pytestmark = pytest.mark.usefixtures("fuse_required")

AREA = "3 concurrency"
WRITER_SECONDS = 20.0
READERS = 2
MAX_LOCK_HOLD = 1.0
STABLE = ("localhost/stable1:1", "localhost/stable2:1")
SOURCES = ("pull0", "pull1", "pull2")


@dataclass
class World:
    tools: harden.Tools
    layout: Path
    stable_ids: dict[str, str]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("concurrent")
    run_dir = Path(tempfile.mkdtemp(prefix="imgfs-h-"))
    try:
        yield _build_world(base, run_dir)
    finally:
        harden.unmount_below(base)  # c/storage's overlay driver bind-mounts its home
        harden.unmount_below(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)


def _build_world(base: Path, run_dir: Path) -> World:
    tools = harden.Tools.at(base / "store", run_dir)
    ids = {}
    for n, name in enumerate(STABLE):
        files = {"data.bin": harden.pseudo_random(10 + n, 2_000_000), "etc/hello": b"hi\n"}
        ids[name] = tools.commit_files(name, files)
    source = harden.Tools.at(base / "source")
    layout = base / "layout"
    for n, name in enumerate(SOURCES):
        files = {f"{name}.bin": harden.pseudo_random(20 + n, 1_500_000)}
        source.commit_files(f"localhost/{name}:1", files)
        source.skopeo("copy", source.ref(f"localhost/{name}:1"), f"oci:{layout}:{name}")
    return World(tools, layout, ids)


# -- lock monitor ------------------------------------------------------------------------------

_FLOCK = "hhqqi"


def _ofd_holder(fd: int) -> str | None:
    """'ofd' / 'posix' if someone holds a lock conflicting with a write lock, else None."""
    request = struct.pack(_FLOCK, fcntl.F_WRLCK, 0, 0, 0, 0)
    reply = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, request)
    ltype, _, _, _, pid = struct.unpack(_FLOCK, reply)
    if ltype == fcntl.F_UNLCK:
        return None
    return "ofd" if pid == -1 else "posix"


@dataclass
class LockWatch:
    paths: list[Path]
    holds: list[float] = field(default_factory=list)  # durations of imgfs (OFD) holds
    samples: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in self.paths]
        since: list[float | None] = [None] * len(fds)
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                for i, fd in enumerate(fds):
                    held = _ofd_holder(fd) == "ofd"
                    if held and since[i] is None:
                        since[i] = now
                    elif not held and since[i] is not None:
                        self.holds.append(now - since[i])  # type: ignore[operator]
                        since[i] = None
                self.samples += 1
                time.sleep(0.005)
            for start in since:
                if start is not None:
                    self.holds.append(time.monotonic() - start)
        finally:
            for fd in fds:
                os.close(fd)


# -- writer and readers --------------------------------------------------------------------------


@dataclass
class WriterLog:
    commands: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    slowest: dict[str, float] = field(default_factory=dict)


def _writer(world: World, deadline: float, log: WriterLog) -> None:
    t = world.tools
    k = 0

    def step(kind: str, fn: object, *args: str) -> None:
        started = time.monotonic()
        result = fn(*args, check=False)  # type: ignore[operator]
        took = time.monotonic() - started
        log.commands[kind] += 1
        log.slowest[kind] = max(log.slowest.get(kind, 0.0), took)
        if result.returncode != 0:
            log.failures.append(f"{kind} {' '.join(args)}: {result.stderr.strip()[-300:]}")

    while time.monotonic() < deadline:
        src = SOURCES[k % len(SOURCES)]
        pulled, tagged, committed = (
            f"localhost/{x}:{k}" for x in ("pulled", "tagged", "committed")
        )
        step(
            "skopeo copy (pull)", t.skopeo, "copy", "-q", f"oci:{world.layout}:{src}", t.ref(pulled)
        )
        step("podman tag", t.podman, "tag", pulled, tagged)
        started = time.monotonic()
        ctr = t.buildah("from", "--pull-never", pulled, check=False).stdout.strip()
        log.commands["buildah from"] += 1
        log.slowest["buildah from"] = max(
            log.slowest.get("buildah from", 0.0), time.monotonic() - started
        )
        if ctr:
            step(
                "buildah copy", t.buildah, "copy", ctr, str(world.layout / "index.json"), "/i.json"
            )
            step("buildah commit", t.buildah, "commit", "-q", ctr, committed)
            step("buildah rm", t.buildah, "rm", ctr)
        step("podman rmi", t.podman, "rmi", tagged, pulled)
        step("buildah rmi", t.buildah, "rmi", committed)
        k += 1


@dataclass
class CopyLog:
    correct: int = 0
    failed_clean: int = 0
    wrong: int = 0
    other_failures: list[str] = field(default_factory=list)
    bytes_ok: int = 0


def _reader(
    mnt: Path,
    out: Path,
    stop: threading.Event,
    log: CopyLog,
    lock: threading.Lock,
    seed: int,
    stable: list[str],
) -> None:
    rng = random.Random(seed)
    dst = out / f"copy-{seed}"
    while not stop.is_set():
        try:
            images = [i for i in os.listdir(mnt) if len(i) == 64]
            image = rng.choice(images if rng.random() < 0.5 else stable)
            blob = rng.choice(os.listdir(mnt / image / "blobs"))
        except (OSError, IndexError):
            continue  # an image vanished between the two listings
        result = subprocess.run(
            ["cp", str(mnt / image / "blobs" / blob), str(dst)],
            capture_output=True,
            text=True,
            check=False,
        )
        with lock:
            if result.returncode == 0:
                if sha256_file(dst) == blob.removeprefix("sha256:"):
                    log.correct += 1
                    log.bytes_ok += dst.stat().st_size
                else:
                    log.wrong += 1
            elif "Input/output error" in result.stderr or "No such file" in result.stderr:
                log.failed_clean += 1
            else:
                log.other_failures.append(result.stderr.strip())


def _podman_images(t: harden.Tools) -> list[tuple[str, tuple[str, ...]]]:
    rows = json.loads(t.podman("images", "--format", "json").stdout or "[]")
    return sorted((r["Id"], tuple(sorted(r.get("Names") or []))) for r in rows)


def _inspect(t: harden.Tools, name: str) -> dict[str, object]:
    doc = json.loads(t.skopeo("inspect", t.ref(name)).stdout)
    return {k: doc[k] for k in ("Digest", "Layers", "Labels")}


def _untouched_changes(
    before: dict[str, tuple[object, ...]], after: dict[str, tuple[object, ...]]
) -> list[str]:
    """Files whose (size, mtime, ctime, inode) are unchanged but whose content differs."""
    bad = []
    for path, old in before.items():
        new = after.get(path)
        if new is not None and old[3:7] == new[3:7] and old[7] != new[7]:
            bad.append(path)
    return bad


def test_copies_while_tools_write(world: World, tmp_path: Path, counts: Counts) -> None:
    t = world.tools
    images_before = _podman_images(t)
    inspect_before = {n: _inspect(t, n) for n in STABLE}
    inventory_before = harden.inventory(t.root)
    stable_files = {
        p for p in inventory_before if any(w in p for w in (*world.stable_ids.values(),))
    }
    locks = [t.root / "overlay-layers" / "layers.lock", t.root / "overlay-images" / "images.lock"]
    watch = LockWatch(locks)
    writer_log, copy_log = WriterLog(), CopyLog()
    out = tmp_path / "copies"
    out.mkdir()
    with harden.daemon(t.root, t.runroot, tmp_path / "imgfs") as d:
        stop = threading.Event()
        lock = threading.Lock()
        stable = list(world.stable_ids.values())
        threads = [threading.Thread(target=watch.run)]
        threads += [
            threading.Thread(target=_reader, args=(d.mnt, out, stop, copy_log, lock, n, stable))
            for n in range(READERS)
        ]
        for th in threads:
            th.start()
        try:
            _writer(world, time.monotonic() + WRITER_SECONDS, writer_log)
        finally:
            stop.set()
            watch.stop.set()
            for th in threads:
                th.join(60)
        alive = harden.alive(d.pid)
        log_text = d.log()
    images_after = _podman_images(t)
    inspect_after = {n: _inspect(t, n) for n in STABLE}
    inventory_after = harden.inventory(t.root)
    silent = _untouched_changes(inventory_before, inventory_after)
    stable_diff = [
        p
        for p in harden.differences(
            {k: v for k, v in inventory_before.items() if k in stable_files},
            {k: v for k, v in inventory_after.items() if k in stable_files},
        )
        if not p.endswith(".lock")
    ]

    long_holds = [h for h in watch.holds if h >= MAX_LOCK_HOLD]
    for kind, n in sorted(writer_log.commands.items()):
        counts.add(AREA, f"writer: {kind} commands", n)
        counts.peak(AREA, f"writer: slowest {kind} s", round(writer_log.slowest.get(kind, 0.0), 2))
    counts.add(AREA, "writer: commands that failed", len(writer_log.failures))
    counts.add(AREA, "copies completed with correct bytes", copy_log.correct)
    counts.add(AREA, "copies failed cleanly (EIO/ENOENT)", copy_log.failed_clean)
    counts.add(AREA, "copies with wrong bytes (must be 0)", copy_log.wrong)
    counts.add(AREA, "copies failed otherwise (must be 0)", len(copy_log.other_failures))
    counts.add(AREA, "MiB copied correctly", copy_log.bytes_ok >> 20)
    counts.add(AREA, "imgfs lock holds observed", len(watch.holds))
    counts.peak(AREA, "longest imgfs lock hold ms", round(max(watch.holds, default=0.0) * 1000, 1))
    counts.add(AREA, "writers blocked >1 s by imgfs (must be 0)", len(long_holds))
    counts.add(AREA, "store: files compared", len(inventory_before))
    counts.add(
        AREA,
        "store corruption: podman images differences (must be 0)",
        int(images_after != images_before),
    )
    counts.add(
        AREA,
        "store corruption: skopeo inspect differences (must be 0)",
        sum(inspect_after[n] != inspect_before[n] for n in STABLE),
    )
    counts.add(
        AREA, "store corruption: unchanged-metadata files with new content (must be 0)", len(silent)
    )
    counts.add(
        AREA, "store corruption: untouched images' files changed (must be 0)", len(stable_diff)
    )

    assert alive, "the daemon died"
    assert "Traceback" not in log_text, log_text[-3000:]
    assert not writer_log.failures, writer_log.failures[:5]
    assert writer_log.commands["skopeo copy (pull)"] >= 3
    assert copy_log.correct >= 20
    assert copy_log.wrong == 0
    assert not copy_log.other_failures, copy_log.other_failures[:5]
    assert not long_holds, f"imgfs held a store lock for {max(long_holds):.2f} s"
    assert watch.samples > 100
    assert images_after == images_before
    assert inspect_after == inspect_before
    assert not silent, silent[:10]
    assert not stable_diff, stable_diff[:10]
