"""Area 13: the daemon's memory budget (``--memory``, default 300 MiB) whatever the store says
(issue 10 class 5).

Crafted stores, each mounted in both modes, the daemon's peak RSS (VmHWM) measured against the
budget:

- 40 images, each with a ``manifest-sha256:<D>`` big-data item hardlinked to one 60 MiB file
  (every item verifies: same bytes, same digest): each read whole; before, each Image cached
  its items whole (2.4 GB). Now big data is one byte-bounded cache and an item over a quarter
  of its share is read again. With ``--memory 100M`` the 60 MiB item is over the per-item cap
  and fails with EIO and a log line.
- a layer whose tar-split lists 2M empty members (one directory): before, its tree and the
  merged rootfs/ kept ~1.3 GB; now reading the tree stops at the tree share with OverBudget
  (``rootfs/`` and ``layers/`` fail with EIO and a log line).
- a layer with 150k members in one directory: the tree fits, merging that directory in
  ``rootfs/`` alone would exceed the merged-directory share and fails with EIO.
- 200 ``rootfs/`` files held open (and read) by one process: the per-handle cost is printed.
"""

from __future__ import annotations

import base64
import errno
import gzip
import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest

from tests import storemaker, tarsplit_maker
from tests.hardening import harden
from tests.hardening.harden import Counts

pytestmark = pytest.mark.usefixtures("fuse_required")

AREA = "13 memory budget"
BUDGET_MIB = 300.0
MODES = ["snapshots", "direct"]
BIG = 60 << 20
IMAGES = 40
HANDLES = 200


def _extra(mode: str) -> tuple[str, ...]:
    return ("--direct",) if mode == "direct" else ()


def _images_json(root: Path) -> Path:
    return root / f"{storemaker.DRIVER}-images" / "images.json"


def _layers_json(root: Path) -> Path:
    return root / f"{storemaker.DRIVER}-layers" / "layers.json"


# -- big data hardlinked into 40 images ------------------------------------------------------


@pytest.fixture(scope="module")
def bigdata(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], str]:
    from imgfs.store.files import big_data_file_name

    root = tmp_path_factory.mktemp("bigdata") / "root"
    maker = storemaker.StoreMaker(root)
    ids = [
        maker.add_image(f"localhost/big{i}:1", [tarsplit_maker.make_tar([(f"f{i}", b"x")])]).id
        for i in range(IMAGES)
    ]
    maker.write()
    big = root / "big"
    big.write_bytes(b"x" * BIG)  # not JSON: its manifest digest is its sha256
    digest = "sha256:" + hashlib.sha256(big.read_bytes()).hexdigest()
    key = f"manifest-{digest}"
    records = json.loads(_images_json(root).read_text())
    for rec in records:
        os.link(big, _images_json(root).parent / rec["id"] / big_data_file_name(key))
        rec["big-data-names"].append(key)
        rec["big-data-sizes"][key] = BIG
        rec["big-data-digests"][key] = digest
    _images_json(root).write_text(json.dumps(records))
    return root, ids, digest


def _read_big(mnt: Path, image_id: str, digest: str) -> bytes | int:
    path = mnt / image_id / "blobs" / digest
    try:
        return hashlib.sha256(harden.read_capped(path)).hexdigest().encode()
    except OSError as exc:
        return exc.errno or -1


@pytest.mark.parametrize("mode", MODES)
def test_hardlinked_big_data_stays_within_the_budget(
    bigdata: tuple[Path, list[str], str], tmp_path: Path, counts: Counts, mode: str
) -> None:
    root, ids, digest = bigdata
    with harden.daemon(root, tmp_path / "run", tmp_path, *_extra(mode)) as d:
        got = [_read_big(d.mnt, i, digest) for i in ids]
        got += [_read_big(d.mnt, i, digest) for i in ids[:4]]  # again: read again, not cached
        rss = harden.peak_rss_mib(d.pid)
    assert got == [digest.removeprefix("sha256:").encode()] * (IMAGES + 4)
    counts.add(AREA, f"attacks run ({mode})")
    counts.add(AREA, f"wrong bytes ({mode})", 0)
    counts.peak(AREA, f"daemon peak RSS MiB, {IMAGES} x 60 MiB hardlinked big data ({mode})", rss)
    counts.put(AREA, "memory budget, MiB", BUDGET_MIB)
    assert rss < BUDGET_MIB


@pytest.mark.parametrize("mode", MODES)
def test_a_big_data_item_over_its_cap_fails_alone(
    bigdata: tuple[Path, list[str], str], tmp_path: Path, counts: Counts, mode: str
) -> None:
    root, ids, digest = bigdata
    budget = 100
    with harden.daemon(
        root, tmp_path / "run", tmp_path, "--memory", f"{budget}M", *_extra(mode)
    ) as d:
        got = [_read_big(d.mnt, i, digest) for i in ids[:8]]
        manifest = (d.mnt / ids[0] / "manifest.json").read_bytes()
        rss = harden.peak_rss_mib(d.pid)
        log = d.log()
    assert got == [errno.EIO] * 8
    assert manifest.startswith(b"{")
    assert "memory budget" in log
    counts.add(AREA, f"attacks run ({mode})")
    counts.peak(AREA, f"daemon peak RSS MiB, 60 MiB item with --memory 100M ({mode})", rss)
    assert rss < budget


# -- a tar-split of 2M empty members ---------------------------------------------------------


def _write_wide_tarsplit(path: Path, members: int) -> int:
    """A gzip NDJSON tar-split of ``members`` empty files ``f0000000``… in the layer root, with
    valid ustar headers; returns the tar's length."""
    template = bytearray(tarfile.TarInfo("f0000000").tobuf(tarfile.USTAR_FORMAT))
    assert len(template) == 512
    with gzip.open(path, "wb", compresslevel=1) as out:
        batch: list[bytes] = []
        for i in range(members):
            header = template
            header[0:8] = b"f%07d" % i
            header[148:156] = b" " * 8
            header[148:156] = b"%06o\0 " % sum(header)
            payload = base64.b64encode(header).decode()
            batch.append(
                b'{"type":2,"payload":"%s","position":%d}\n{"type":1,"name":"f%07d",'
                b'"payload":null,"position":%d}\n' % (payload.encode(), 2 * i, i, 2 * i + 1)
            )
            if len(batch) == 4096:
                out.write(b"".join(batch))
                batch.clear()
        trailer = base64.b64encode(bytes(1024)).decode()
        batch.append(b'{"type":2,"payload":"%s","position":%d}\n' % (trailer.encode(), 2 * members))
        out.write(b"".join(batch))
    return members * 512 + 1024


def _wide_store(root: Path, members: int) -> tuple[Path, str, str]:
    maker = storemaker.StoreMaker(root)
    image = maker.add_image("localhost/wide:1", [tarsplit_maker.make_tar([("seed", b"x")])])
    maker.write()
    layer_id = image.layers[0]
    size = _write_wide_tarsplit(_layers_json(root).parent / f"{layer_id}.tar-split.gz", members)
    layers = json.loads(_layers_json(root).read_text())
    for rec in layers:
        rec["diff-size"] = size
    _layers_json(root).write_text(json.dumps(layers))
    return root, image.id, layer_id


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    return _wide_store(tmp_path_factory.mktemp("wide") / "root", 2_000_000)


@pytest.fixture(scope="module")
def broad(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    return _wide_store(tmp_path_factory.mktemp("broad") / "root", 150_000)


def _listing_errno(path: Path) -> int:
    try:
        os.listdir(path)
    except OSError as exc:
        return exc.errno or -1
    return 0


def _list_views(
    store: tuple[Path, str, str], tmp_path: Path, mode: str
) -> tuple[int, int | list[str], float, str]:
    """Mount ``store``: errno of listing its image's ``rootfs/``, ``layers/`` listed (or its
    errno), the daemon's peak RSS and its log."""
    root, image_id, _ = store
    with harden.daemon(root, tmp_path / "run", tmp_path, *_extra(mode)) as d:
        top = d.mnt / image_id
        rootfs = _listing_errno(top / "rootfs")
        try:
            layers: int | list[str] = [
                name for layer in (top / "layers").iterdir() for name in os.listdir(layer)
            ]
        except OSError as exc:  # the layer's entry needs its tree for its attributes
            layers = exc.errno or -1
        assert (top / "manifest.json").read_bytes().startswith(b"{")
        return rootfs, layers, harden.peak_rss_mib(d.pid), d.log()


@pytest.mark.parametrize("mode", MODES)
def test_a_tarsplit_of_2m_members_fails_within_the_budget(
    wide: tuple[Path, str, str], tmp_path: Path, counts: Counts, mode: str
) -> None:
    rootfs, layers, rss, log = _list_views(wide, tmp_path, mode)
    assert (rootfs, layers) == (errno.EIO, errno.EIO)
    assert "memory budget" in log
    counts.add(AREA, f"attacks run ({mode})")
    counts.peak(AREA, f"daemon peak RSS MiB, 2M-member tar-split ({mode})", rss)
    assert rss < BUDGET_MIB


@pytest.mark.parametrize("mode", MODES)
def test_a_directory_too_large_to_merge_fails_within_the_budget(
    broad: tuple[Path, str, str], tmp_path: Path, counts: Counts, mode: str
) -> None:
    rootfs, layers, rss, log = _list_views(broad, tmp_path, mode)
    assert rootfs == errno.EIO
    assert isinstance(layers, list)
    assert len(layers) == 150_000
    assert "memory budget" in log
    counts.add(AREA, f"attacks run ({mode})")
    counts.peak(AREA, f"daemon peak RSS MiB, 150k-entry directory ({mode})", rss)
    assert rss < BUDGET_MIB


# -- many open rootfs/ handles ---------------------------------------------------------------


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("many") / "root"
    files = {f"f{i}": harden.pseudo_random(i, 256 << 10) for i in range(HANDLES)}
    maker = storemaker.StoreMaker(root)
    image = maker.add_image("localhost/many:1", [tarsplit_maker.make_tar(list(files.items()))])
    maker.write()
    return root, image.id, files


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@pytest.mark.parametrize("mode", MODES)
def test_many_open_rootfs_handles_stay_within_the_budget(
    many: tuple[Path, str, dict[str, bytes]], tmp_path: Path, counts: Counts, mode: str
) -> None:
    root, image_id, files = many
    with harden.daemon(root, tmp_path / "run", tmp_path, *_extra(mode)) as d:
        top = d.mnt / image_id / "rootfs"
        assert len(os.listdir(top)) == HANDLES
        before = _rss_mib(d.pid)
        handles = [open(top / name, "rb") for name in files]  # noqa: SIM115 - held open
        try:
            wrong = sum(f.read() != files[n] for f, n in zip(handles, files, strict=True))
            held = _rss_mib(d.pid)
        finally:
            for f in handles:
                f.close()
        rss = harden.peak_rss_mib(d.pid)
    assert wrong == 0
    per_handle_kib = max(held - before, 0.0) * 1024 / HANDLES
    counts.add(AREA, f"attacks run ({mode})")
    counts.add(AREA, f"wrong bytes ({mode})", wrong)
    counts.peak(AREA, f"KiB per open rootfs/ handle, {HANDLES} held ({mode})", per_handle_kib)
    counts.peak(AREA, f"daemon peak RSS MiB, {HANDLES} open rootfs/ handles ({mode})", rss)
    assert rss < BUDGET_MIB
    assert per_handle_kib < 1024
