"""Area 10: small files follow the store, and a writer's lock starves no other request (issue 10
classes 7 and 8, the kernel side), on real mounts in both modes.

Fresh: a manifest rewritten in place with the same length (and its record's digests updated,
as a writer would) is read with its new bytes after the store change, although its size and
mtime did not change: only content-addressed files keep the kernel's page cache across opens.
(On the 6.18 kernel this was written on, the old keep_cache policy did not serve stale bytes
either: the test guards the rule, it did not reproduce the report here.)

Locks: a helper process holds a POSIX write lock on ``overlay-layers/layers.lock`` (as
c/storage writers do) while more ``rootfs/`` readers than the daemon has worker threads wait
for it; the manifest of another image (which needs only ``images.lock``) is still served
while the lock is held, and the waiting readers get their bytes once it is released.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import storemaker, tarsplit_maker
from tests.hardening import harden
from tests.hardening.harden import Counts

pytestmark = pytest.mark.usefixtures("fuse_required")

AREA = "10 fresh and locks"
READERS = 12  # more than the daemon's 8 worker slots
WAIT = 30.0


def _store(root: Path, images: int) -> storemaker.StoreMaker:
    maker = storemaker.StoreMaker(root)
    for i in range(images):
        data = f"file of image {i}\n".encode() * 50
        maker.add_image(f"localhost/img{i}:1", [tarsplit_maker.make_tar([("f.txt", data)])])
    maker.write()
    for lock in ("overlay-layers/layers.lock", "overlay-images/images.lock"):
        (root / lock).write_bytes(b"")
    return maker


@pytest.fixture(params=["snapshots", "direct"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _extra(mode: str) -> tuple[str, ...]:
    return ("--direct",) if mode == "direct" else ()


def test_a_manifest_rewritten_with_the_same_length_is_served_new(
    tmp_path: Path, counts: Counts, mode: str
) -> None:
    maker = _store(tmp_path / "root", 1)
    image = maker.images[0]
    with harden.daemon(tmp_path / "root", tmp_path / "run", tmp_path, *_extra(mode)) as d:
        path = d.mnt / image.id / "manifest.json"
        assert path.read_bytes() == image.manifest
        assert path.read_bytes() == image.manifest  # now in the kernel's page cache
        doc = json.loads(image.manifest)
        old_digest = doc["layers"][0]["digest"]
        flipped = old_digest[:-1] + ("0" if old_digest[-1] != "0" else "1")
        new = image.manifest.replace(old_digest.encode(), flipped.encode())
        assert len(new) == len(image.manifest)
        assert new != image.manifest
        big = tmp_path / "root" / "overlay-images" / image.id / "manifest"
        st = os.stat(big)
        with open(big, "r+b") as f:  # in place: same inode, same length
            f.write(new)
        os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
        digest = "sha256:" + hashlib.sha256(new).hexdigest()
        images_json = tmp_path / "root" / "overlay-images" / "images.json"
        records = json.loads(images_json.read_bytes())
        records[0]["digest"] = digest
        records[0]["big-data-digests"]["manifest"] = digest
        images_json.write_text(json.dumps(records))
        got = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            got = path.read_bytes()
            if got == new:
                break
            time.sleep(0.3)
        counts.add(AREA, f"rewritten manifests checked ({mode})")
        counts.add(AREA, f"stale bytes served after the change ({mode})", int(got != new))
        assert got == new, "the old manifest is still served after the store changed"


class _Writer:
    """A helper process holding a POSIX fcntl write lock, as c/storage writers take it."""

    def __init__(self, lock: Path) -> None:
        code = (
            "import fcntl, sys\n"
            f"f = open({str(lock)!r}, 'r+b')\n"
            "fcntl.lockf(f, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == b"locked"

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=10)


@pytest.fixture
def writer() -> Iterator[list[_Writer]]:
    held: list[_Writer] = []
    yield held
    for w in held:
        w.release()


def test_a_writer_holding_layers_lock_starves_no_manifest_read(
    tmp_path: Path, counts: Counts, mode: str, writer: list[_Writer]
) -> None:
    maker = _store(tmp_path / "root", READERS + 1)
    with harden.daemon(tmp_path / "root", tmp_path / "run", tmp_path, *_extra(mode)) as d:
        os.listdir(d.mnt)
        writer.append(_Writer(tmp_path / "root" / "overlay-layers" / "layers.lock"))
        results: dict[int, bytes | str] = {}

        def read_rootfs(i: int) -> None:
            try:
                results[i] = (d.mnt / maker.images[i].id / "rootfs" / "f.txt").read_bytes()
            except OSError as exc:
                results[i] = str(exc)

        threads = [
            threading.Thread(target=read_rootfs, args=(i,), daemon=True) for i in range(READERS)
        ]
        for t in threads:
            t.start()
        time.sleep(1.5)  # every reader is now waiting for the writer
        assert not results, f"rootfs/ was read while the writer held layers.lock: {results}"
        other = maker.images[READERS]
        box: list[bytes] = []
        reader = threading.Thread(
            target=lambda: box.append((d.mnt / other.id / "manifest.json").read_bytes()),
            daemon=True,
        )
        started = time.monotonic()
        reader.start()
        reader.join(WAIT)
        waited = time.monotonic() - started
        served_while_held = list(box)
        counts.add(AREA, f"lock-holding writers ({mode})")
        counts.peak(AREA, f"manifest read while layers.lock held, s ({mode})", waited)
        still_held = writer[0].proc.poll() is None
        writer[0].release()
        for t in threads:
            t.join(WAIT)
        assert still_held
        assert served_while_held == [other.manifest], (
            f"manifest.json waited {waited:.1f} s for the writer"
        )
        want = {i: f"file of image {i}\n".encode() * 50 for i in range(READERS)}
        assert results == want
