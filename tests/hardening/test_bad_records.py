"""Area 7: one bad record fails alone — at start, in ``--list`` and in the live view — and
content-addressed big data is checked against its name.

One buildah-made image is cloned once per case (own image record, layer record, big-data dir,
tar-split and content dir) and one field of the clone's record is broken (every field of image
and layer records: wrong types, lone surrogates, bytes that are not UTF-8, times before year 1,
numbers beyond every bound, nesting too deep, non-dict records), or one of its content-addressed
big-data items is replaced by bytes of another digest. All the cases sit in ONE store: the mount
must start with all of them (default mode and ``--direct``), ``--list`` must run without a
traceback, every bad clone must be skipped or fail with EIO only, every blob served must hash to
its name, an untouched clone must keep serving correct bytes, and a record added while mounted
(a good image next to another bad record) must show up in the live view.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import imgfs
from tests.hardening import harden
from tests.hardening.harden import Counts

pytestmark = pytest.mark.usefixtures("fuse_required")

AREA = "7 one bad record"
DRIVER = harden.DRIVER
FILES = {"a.txt": b"alpha\n" * 100, "dir/b.txt": b"bravo\n" * 50}
DEEP = 100_000  # nesting: far beyond Python's recursion limit and Go's 10000
HUGE_INT = "9" * 5000  # beyond Python's int-string limit (4300 digits)
_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class Raw:
    """JSON text put verbatim where the field's value goes (not expressible via json.dumps)."""

    text: bytes


Edit = dict[str, Any]
# case -> (record to edit: "image" | "layer", fields to set (None: delete), the whole record)
CASES: dict[str, tuple[str, Edit | Raw | object]] = {
    # image records, field by field
    "image names: lone surrogate": ("image", {"names": ["localhost/x\ud800:1"]}),
    "image names: reversed surrogates": ("image", {"names": ["\udfff\ud800", "ok/n:1"]}),
    "image names: not UTF-8": ("image", {"names": [Raw(b'"localhost/\xff\xfe:1"')]}),
    "image names: not a list": ("image", {"names": "localhost/x:1"}),
    "image names: numbers": ("image", {"names": [1, 2]}),
    "image names: object": ("image", {"names": {"a": 1}}),
    "image names: NUL and slashes": ("image", {"names": ["a\0b", "//", "../.."]}),
    "image digest: number": ("image", {"digest": 5}),
    "image digest: surrogate": ("image", {"digest": "sha256:\ud800"}),
    "image layer: number": ("image", {"layer": 7}),
    "image layer: list": ("image", {"layer": ["x"]}),
    "image layer: missing layer": ("image", {"layer": "f" * 64}),
    "image metadata: number": ("image", {"metadata": 5}),
    "image metadata: object": ("image", {"metadata": {"signature-sizes": [1]}}),
    "image metadata: surrogate": ("image", {"metadata": "\ud800"}),
    "image metadata: deep JSON text": ("image", {"metadata": "[" * DEEP}),
    "image metadata: huge int text": ("image", {"metadata": '{"signature-sizes":[' + HUGE_INT}),
    "image big-data-names: surrogate": ("image", {"big-data-names": ["manifest", "\ud800"]}),
    "image big-data-names: not a list": ("image", {"big-data-names": "manifest"}),
    "image big-data-names: numbers": ("image", {"big-data-names": [1]}),
    "image big-data-names: very long": ("image", {"big-data-names": ["manifest", "x" * 5000]}),
    "image big-data-sizes: negative": ("image", {"big-data-sizes": {"manifest": -5}}),
    "image big-data-sizes: string": ("image", {"big-data-sizes": {"manifest": "10"}}),
    "image big-data-sizes: 2**80": ("image", {"big-data-sizes": {"manifest": 2**80}}),
    "image big-data-sizes: float": ("image", {"big-data-sizes": {"manifest": 1.5}}),
    "image big-data-sizes: bool": ("image", {"big-data-sizes": {"manifest": True}}),
    "image big-data-sizes: list": ("image", {"big-data-sizes": []}),
    "image big-data-sizes: 5000 digits": ("image", {"big-data-sizes": Raw(HUGE_INT.encode())}),
    "image big-data-sizes: 1e999": ("image", {"big-data-sizes": {"manifest": Raw(b"1e999")}}),
    "image big-data-digests: number": ("image", {"big-data-digests": {"manifest": 5}}),
    "image big-data-digests: md5": ("image", {"big-data-digests": {"manifest": "md5:00"}}),
    "image big-data-digests: string": ("image", {"big-data-digests": "x"}),
    "image created: year 1 at +01:00": ("image", {"created": "0001-01-01T00:00:00+01:00"}),
    "image created: year 9999 at -01:00": ("image", {"created": "9999-12-31T23:59:59-01:00"}),
    "image created: number": ("image", {"created": 5}),
    "image created: month 13": ("image", {"created": "2024-13-45T99:99:99Z"}),
    "image id: path": ("image", {"id": "../../../../etc"}),
    "image id: number": ("image", {"id": 5}),
    "image id: missing": ("image", {"id": None}),
    "image record: number": ("image", Raw(b"5")),
    "image record: string": ("image", Raw(b'"an image"')),
    "image record: null": ("image", Raw(b"null")),
    "image record: deep array": ("image", Raw(b"[" * DEEP + b"]" * DEEP)),
    # layer records, field by field
    "layer parent: number": ("layer", {"parent": 5}),
    "layer parent: path": ("layer", {"parent": "../../etc"}),
    "layer parent: loop to itself": ("layer", {"parent": "SELF"}),
    "layer diff-digest: number": ("layer", {"diff-digest": 5}),
    "layer diff-digest: surrogate": ("layer", {"diff-digest": "sha256:\ud800"}),
    "layer diff-size: negative": ("layer", {"diff-size": -5}),
    "layer diff-size: 2**80": ("layer", {"diff-size": 2**80}),
    "layer diff-size: string": ("layer", {"diff-size": "10"}),
    "layer diff-size: float -1.0": ("layer", {"diff-size": -1.0}),
    "layer diff-size: bool": ("layer", {"diff-size": True}),
    "layer diff-size: 5000 digits": ("layer", {"diff-size": Raw(HUGE_INT.encode())}),
    "layer flags: string": ("layer", {"flags": "incomplete"}),
    "layer flags: incomplete as text": ("layer", {"flags": {"incomplete": "true"}}),
    "layer flags: incomplete": ("layer", {"flags": {"incomplete": True}}),
    "layer toc-digest: bad expected diffid": (
        "layer",
        {
            "diff-digest": None,
            "toc-digest": "sha256:" + "0" * 64,
            "flags": {"expected-layer-diffid": 5},
        },
    ),
    "layer created: year 1 at +01:00": ("layer", {"created": "0001-01-01T00:00:00+01:00"}),
    "layer id: path": ("layer", {"id": "../x"}),
    "layer record: number": ("layer", Raw(b"5")),
    "layer record: deep object": ("layer", Raw(b'{"a":' * DEEP + b"1" + b"}" * DEEP)),
}


# content-addressed big data whose bytes do not hash to the name they are served under
def _manifest_instance_without_digest(rec: dict[str, Any], image_dir: Path) -> None:
    """A ``manifest-sha256:<D>`` item with no big-data-digests entry and other bytes."""
    fake = "sha256:" + hashlib.sha256(b"not these bytes").hexdigest()
    key = f"manifest-{fake}"
    data = (image_dir / "manifest").read_bytes()
    (image_dir / _file_name(key)).write_bytes(data)
    rec["big-data-names"].append(key)
    rec["big-data-sizes"][key] = len(data)


def _config_changed_same_size(rec: dict[str, Any], image_dir: Path) -> None:
    """The config (named by its digest) rewritten with the same length, no recorded digest."""
    key = next(k for k in rec["big-data-names"] if k.startswith("sha256:"))
    path = image_dir / _file_name(key)
    data = bytearray(path.read_bytes())
    data[-2] = ord(" ") if data[-2] != ord(" ") else ord("\t")
    path.write_bytes(bytes(data))
    rec["big-data-digests"].pop(key, None)


def _manifest_changed_same_size(rec: dict[str, Any], image_dir: Path) -> None:
    """The primary manifest rewritten with the same length, its recorded digest removed (the
    image ``digest`` still names it)."""
    path = image_dir / "manifest"
    data = bytearray(path.read_bytes())
    data[-1] = ord(" ") if data[-1] != ord(" ") else ord("\n")
    path.write_bytes(bytes(data))
    rec["big-data-digests"].pop("manifest", None)


BIG_DATA_CASES: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "big data: manifest-<D> without recorded digest": _manifest_instance_without_digest,
    "big data: config changed, same size": _config_changed_same_size,
    "big data: manifest changed, same size": _manifest_changed_same_size,
}


def _file_name(key: str) -> str:
    from imgfs.store.files import big_data_file_name

    return big_data_file_name(key)


# -- building the store ------------------------------------------------------------------------


@dataclass
class Bad:
    root: Path
    runroot: Path
    base: Path
    good: str
    good_blob: str
    good_bytes: bytes
    ids: dict[str, str]  # case -> the clone's image ID as created
    good_records: tuple[dict[str, Any], dict[str, Any]]  # the good image's and its layer's


def _set(record: dict[str, Any], fields: Edit, raws: dict[str, bytes]) -> dict[str, Any]:
    out = dict(record)
    for key, value in fields.items():
        if value is None:
            out.pop(key, None)
        elif value == "SELF":
            out[key] = record["id"]
        else:
            out[key] = _marked(value, raws)
    return out


def _marked(value: Any, raws: dict[str, bytes]) -> Any:
    """``value`` with every Raw replaced by a unique marker string (substituted after dumps)."""
    if isinstance(value, Raw):
        marker = f"@@raw-{len(raws)}@@"
        raws[marker] = value.text
        return marker
    if isinstance(value, list):
        return [_marked(v, raws) for v in value]
    if isinstance(value, dict):
        return {k: _marked(v, raws) for k, v in value.items()}
    return value


def _substitute(root: Path, raws: dict[str, bytes]) -> None:
    """Put the Raw texts in place of their markers, once every edit is done (after this the
    files may no longer be JSON that Python can load)."""
    for kind in ("images", "layers"):
        path = root / f"{DRIVER}-{kind}" / f"{kind}.json"
        text = path.read_bytes()
        for marker, raw in raws.items():
            text = text.replace(json.dumps(marker).encode(), raw)
        path.write_bytes(text)


def _apply(
    root: Path, image_id: str, layer_id: str, target: str, edit: object, raws: dict[str, bytes]
) -> None:
    kind = "images" if target == "image" else "layers"
    path = root / f"{DRIVER}-{kind}" / f"{kind}.json"
    wanted = image_id if target == "image" else layer_id
    records = harden.load(path)
    out: list[Any] = []
    for rec in records:
        if not isinstance(rec, dict) or rec.get("id") != wanted:
            out.append(rec)
        elif isinstance(edit, Raw):
            out.append(_marked(edit, raws))
        else:
            assert isinstance(edit, dict)
            out.append(_set(rec, edit, raws))
    harden.save(path, out)


def _edit_big_data(root: Path, image_id: str, change: Callable[[dict[str, Any], Path]]) -> None:
    path = root / f"{DRIVER}-images" / "images.json"
    records = harden.load(path)
    rec = next(r for r in records if isinstance(r, dict) and r.get("id") == image_id)
    change(rec, root / f"{DRIVER}-images" / image_id)
    harden.save(path, records)


def _extra_records(root: Path, runroot: Path) -> None:
    """Records no image uses: an unused layer from before year 1, volatile layers with bad
    fields (the issue's OverflowError example and friends)."""
    layers = root / f"{DRIVER}-layers" / "layers.json"
    harden.save(
        layers,
        [
            *harden.load(layers),
            {"id": harden.fake_id("unused"), "created": "0001-01-01T00:00:00+01:00"},
        ],
    )
    volatile = root / f"{DRIVER}-layers" / "volatile-layers.json"
    volatile.write_text(
        json.dumps(
            [
                {"id": harden.fake_id("vol-1"), "created": "0001-01-01T00:00:00+01:00"},
                {"id": harden.fake_id("vol-2"), "names": ["\ud800"], "diff-size": -7},
                "not a record",
            ]
        )
    )


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> Bad:
    base = tmp_path_factory.mktemp("badrec")
    tools = harden.Tools.at(base)
    image_id = tools.commit_files("localhost/base:1", FILES)
    root = base / "root"
    good, _ = harden.clone_image(root, image_id, "good")
    store = imgfs.Store.open(str(root), str(base / "run"), DRIVER)
    img = store.image(good)
    blob = next(b.digest for b in img.blobs() if b.kind == "layer")
    with img.open_blob(blob) as f:
        good_bytes = f.read()
    ids: dict[str, str] = {}
    raws: dict[str, bytes] = {}
    for n, (case, (target, edit)) in enumerate(CASES.items()):
        new_image, new_layer = harden.clone_image(root, image_id, f"case-{n}")
        _apply(root, new_image, new_layer, target, edit, raws)
        ids[case] = new_image
    for n, (case, change) in enumerate(BIG_DATA_CASES.items()):
        new_image, _ = harden.clone_image(root, image_id, f"bigdata-{n}")
        _edit_big_data(root, new_image, change)
        ids[case] = new_image
    _extra_records(root, base / "run")
    image_rec = next(r for r in harden.load(root / f"{DRIVER}-images" / "images.json")
                     if isinstance(r, dict) and r.get("id") == good)  # fmt: skip
    layers = harden.load(root / f"{DRIVER}-layers" / "layers.json")
    layer_rec = next(r for r in layers if isinstance(r, dict) and r.get("id") == image_rec["layer"])
    _substitute(root, raws)
    return Bad(root, base / "run", base, good, blob, good_bytes, ids, (image_rec, layer_rec))


# -- the checks --------------------------------------------------------------------------------


def test_library_lists_every_usable_record(bad: Bad, counts: Counts) -> None:
    store = imgfs.Store.open(str(bad.root), str(bad.runroot), DRIVER)
    images = {i.id: i for i in store.images()}
    assert bad.good in images
    failures = 0
    for image_id in bad.ids.values():
        image = images.get(image_id)
        if image is None:
            continue
        for call in (image.manifest, image.blobs, image.signatures, image.config):
            try:
                call()
            except imgfs.ImgfsError:
                failures += 1
        str(image.names)  # names are text Python can print and encode
        for name in image.names:
            name.encode("utf-8")
    counts.add(AREA, "bad records in one store", len(CASES) + len(BIG_DATA_CASES) + 4)
    counts.add(
        AREA,
        "library: bad images listed (others skipped)",
        len(set(bad.ids.values()) & set(images)),
    )
    counts.add(AREA, "library: calls failing with ImgfsError", failures)
    with store.image(bad.good).open_blob(bad.good_blob) as f:
        assert f.read() == bad.good_bytes


def _list(root: Path, runroot: Path) -> subprocess.CompletedProcess[bytes]:
    cmd = [sys.executable, "-m", "imgfs", "--list", "--driver", DRIVER, "--runroot",
           str(runroot), str(root)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": _ROOT}
    return subprocess.run(cmd, capture_output=True, timeout=120, check=False, env=env)


def test_list_runs_without_a_traceback(bad: Bad, counts: Counts) -> None:
    result = _list(bad.root, bad.runroot)
    stderr = result.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr[-3000:]
    assert result.returncode in (0, 1), stderr[-3000:]
    assert bad.good.encode() in result.stdout
    counts.put(AREA, "--list exit code (0 or 1, no traceback)", result.returncode)


@pytest.fixture(scope="module", params=["snapshot", "direct"])
def served(
    request: pytest.FixtureRequest, bad: Bad, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, harden.Daemon]]:
    mode = request.param
    work = tmp_path_factory.mktemp(f"badrec-{mode}")
    extra = ("--direct",) if mode == "direct" else ()
    with harden.daemon(bad.root, bad.runroot, work, *extra) as d:
        yield mode, d


def _wrong_bytes(read: dict[str, bytes]) -> list[str]:
    """Blobs whose bytes do not hash to their name."""
    return [
        rel
        for rel, data in read.items()
        if rel.startswith("blobs/") and "sha256:" + hashlib.sha256(data).hexdigest() != rel[6:]
    ]


@pytest.mark.parametrize("case", [*CASES, *BIG_DATA_CASES])
def test_a_bad_record_fails_alone(
    case: str, served: tuple[str, harden.Daemon], bad: Bad, counts: Counts
) -> None:
    mode, d = served
    counts.add(AREA, f"mount started with every bad record ({mode})", 0)
    image_id = bad.ids[case]
    counts.add(AREA, f"cases run ({mode})")
    seen = harden.read_image(d.mnt, image_id)
    read, errors = seen.read, seen.errors
    outcome = "skipped" if not seen.listed else "EIO" if errors else "served-ok"
    counts.add(AREA, f"outcome {outcome} ({mode})")
    wrong = _wrong_bytes(read)
    counts.add(AREA, "blobs served with bytes of another digest (must be 0)", len(wrong))
    assert not wrong, f"{case}: {wrong}"
    assert all(e == errno.EIO for e in errors.values()), f"{case}: {errors}"
    if case in BIG_DATA_CASES:
        assert errors, f"{case}: the changed big data was served"
        assert image_id[:12] in d.log(), f"{case}: no log line"
    if outcome != "served-ok":
        assert image_id[:12] in d.log() or "entry" in d.log(), f"{case}: no log line"
    os.listdir(d.mnt / "by-name")  # the names view builds
    assert harden.alive(d.pid), f"{case}: the daemon died"
    good = (d.mnt / bad.good / "blobs" / bad.good_blob).read_bytes()
    assert good == bad.good_bytes, f"{case}: the untouched image stopped serving"


def test_the_mount_started_with_every_bad_record(
    served: tuple[str, harden.Daemon], bad: Bad, counts: Counts
) -> None:
    mode, d = served
    listed = set(os.listdir(d.mnt))
    assert bad.good in listed
    counts.put(AREA, f"mount started with every bad record ({mode})", 1)
    counts.put(AREA, f"images listed ({mode})", len(listed) - 1)


def _wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("mode", ["snapshot", "direct"])
def test_live_view_follows_changes_past_new_bad_records(
    mode: str, bad: Bad, tmp_path: Path, counts: Counts
) -> None:
    """A copy of the store, mounted; then a new bad record (lone surrogate name, created before
    year 1) and a new good image are added: the good one must appear."""
    root = tmp_path / "root"
    shutil.copytree(bad.root, root, symlinks=True)
    extra = ("--direct",) if mode == "direct" else ()
    image_rec, layer_rec = bad.good_records
    with harden.daemon(root, bad.runroot, tmp_path / "work", *extra) as d:
        assert bad.good in os.listdir(d.mnt)
        late_bad = {**image_rec, "id": harden.fake_id("late-bad"), "names": ["\ud800"],
                    "created": "0001-01-01T00:00:00+01:00"}  # fmt: skip
        _append(root / f"{DRIVER}-images" / "images.json", late_bad)
        assert _wait_for(lambda: late_bad["id"] in os.listdir(d.mnt)), d.log()[-2000:]
        late_good = _clone_appending(root, image_rec, layer_rec, "late-good")
        assert _wait_for(lambda: late_good in os.listdir(d.mnt)), d.log()[-2000:]
        data = (d.mnt / late_good / "blobs" / bad.good_blob).read_bytes()
        assert data == bad.good_bytes
        counts.add(AREA, f"live view followed past a new bad record ({mode})")


def _append(path: Path, record: dict[str, Any]) -> None:
    """Append a record to a JSON array file that Python may not load (its bytes stay)."""
    text = path.read_bytes().rstrip()
    assert text.endswith(b"]")
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(text[:-1] + b"," + json.dumps(record).encode() + b"]")
    os.replace(tmp, path)  # as c/storage: a new file renamed into place


def _clone_appending(
    root: Path, image_rec: dict[str, Any], layer_rec: dict[str, Any], label: str
) -> str:
    """harden.clone_image for a store whose JSON Python cannot load."""
    new_image, new_layer = harden.fake_id("image:" + label), harden.fake_id("layer:" + label)
    images, layers = root / f"{DRIVER}-images", root / f"{DRIVER}-layers"
    shutil.copytree(images / image_rec["id"], images / new_image, symlinks=True)
    shutil.copytree(root / DRIVER / layer_rec["id"], root / DRIVER / new_layer, symlinks=True)
    shutil.copyfile(
        layers / f"{layer_rec['id']}.tar-split.gz", layers / f"{new_layer}.tar-split.gz"
    )
    _append(layers / "layers.json", {**layer_rec, "id": new_layer})
    _append(images / "images.json", {**image_rec, "id": new_image, "layer": new_layer,
                                     "names": [f"localhost/{label}:1"]})  # fmt: skip
    return new_image


# -- lock files of the wrong kind --------------------------------------------------------------


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _dir(p: Path) -> None:
    p.mkdir()


def _symlink(p: Path) -> None:
    p.symlink_to(p.parent / "images.json")


def _socket(p: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    s.close()


LOCK_KINDS: dict[str, Callable[[Path], None]] = {
    "FIFO": _fifo,
    "directory": _dir,
    "symlink": _symlink,
    "socket": _socket,
}


@pytest.mark.parametrize("lock", ["images.lock", "layers.lock"])
@pytest.mark.parametrize("kind", list(LOCK_KINDS))
def test_a_lock_file_of_the_wrong_kind_fails_the_store_clearly(
    kind: str, lock: str, bad: Bad, tmp_path: Path, counts: Counts
) -> None:
    root = tmp_path / "root"
    shutil.copytree(bad.root, root, symlinks=True)
    where = root / f"{DRIVER}-{lock.split('.')[0]}" / lock
    where.unlink()
    LOCK_KINDS[kind](where)
    started = time.monotonic()
    result = _list(root, bad.runroot)
    stderr = result.stderr.decode(errors="replace")
    assert time.monotonic() - started < 30
    assert result.returncode != 0
    assert "Traceback" not in stderr, stderr
    assert str(where) in stderr, stderr
    assert f"is a {kind}" in stderr, stderr
    counts.add(AREA, "lock files of a wrong kind: --list failed clearly, no hang")
    for mode in ("snapshot", "direct"):
        extra = ("--direct",) if mode == "direct" else ()
        with harden.daemon(root, bad.runroot, tmp_path / mode, *extra) as d:
            assert os.listdir(d.mnt) is not None  # answers, does not hang
            assert str(where) in d.log(), d.log()[-2000:]
        counts.add(AREA, f"lock files of a wrong kind: mount answered and logged ({mode})")
