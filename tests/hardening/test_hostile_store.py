"""Area 1: hostile layer content and metadata, served by the real daemon.

One buildah-made image is cloned once per attack (own image record, layer record, tar-split
and content dir) and each clone is broken one way. Where an attack needs the digests to line
up (a name that would reach a host file), the layer's diff-size and diff-digest are rewritten
to what the stream WOULD be with the host file's bytes, so only path safety stands between
the attack and the host file. Every image is then read through the mount (default snapshot
mode and ``--direct``): each attack must end in EIO (layer or image) or a skipped image with a
log line, never a byte of a host file, with bounded daemon memory, while an untouched clone
keeps serving correct bytes after every attack.
"""

from __future__ import annotations

import base64
import errno
import gzip
import hashlib
import json
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import imgfs
from tests import crafted
from tests.hardening import harden
from tests.hardening.harden import Counts

pytestmark = pytest.mark.usefixtures("fuse_required")

AREA = "1 hostile"
DRIVER = harden.DRIVER
MAX_PEAK_RSS_MIB = 300.0
READ_TIMEOUT = 60.0
MAX_VIEW_PATHS = 200
FILES = {
    "a.txt": b"alpha\n" * 100,
    "dir/b.txt": b"bravo\n" * 50,
    "big.bin": harden.pseudo_random(1, 300_000),
}


@dataclass
class Ctx:
    root: Path
    image: str
    layer: str
    secret: Path  # a host file outside the store
    secret_dir: Path

    @property
    def content(self) -> Path:
        return self.root / DRIVER / self.layer / "diff"

    @property
    def tarsplit(self) -> Path:
        return self.root / f"{DRIVER}-layers" / f"{self.layer}.tar-split.gz"

    def entries(self) -> list[dict[str, Any]]:
        return crafted.read_entries(self.tarsplit)

    def write(
        self, entries: list[dict[str, Any]], overrides: dict[str, bytes] | None = None
    ) -> None:
        """Write the tar-split and make diff-size/diff-digest match the stream it describes,
        taking file bytes from ``overrides`` (by entry name) or the layer's own files."""
        crafted.write_entries(self.tarsplit, entries)
        h = hashlib.sha256()
        size = 0
        for e in entries:
            if e["type"] == 2:
                data = base64.b64decode(e.get("payload") or "")
            elif e.get("size"):
                name = e["name"]
                if overrides and name in overrides:
                    data = overrides[name]
                else:
                    data = FILES[name.removeprefix("./")]  # original bytes (maybe moved)
            else:
                continue
            h.update(data)
            size += len(data)
        self.edit_layer({"diff-size": size, "diff-digest": "sha256:" + h.hexdigest()})

    def edit_layer(self, fields: dict[str, Any]) -> None:
        path = self.root / f"{DRIVER}-layers" / "layers.json"
        harden.save(
            path, [{**r, **fields} if r["id"] == self.layer else r for r in harden.load(path)]
        )

    def edit_image(self, fields: dict[str, Any]) -> None:
        path = self.root / f"{DRIVER}-images" / "images.json"
        harden.save(
            path, [{**r, **fields} if r["id"] == self.image else r for r in harden.load(path)]
        )

    def image_record(self) -> dict[str, Any]:
        path = self.root / f"{DRIVER}-images" / "images.json"
        return next(r for r in harden.load(path) if r["id"] == self.image)

    def retarget(self, name: str, host: Path, old: str = "a.txt") -> None:
        """Point the entry ``old`` at ``name`` with the size and CRC of host file ``host``."""
        data = host.read_bytes()
        entries = self.entries()
        entry = next(e for e in entries if e.get("name") == old)
        entry.update(name=name, size=len(data), payload=crafted.crc_payload(data))
        self.write(entries, {name: data})


def _gzip_members(member_plain: bytes, copies: int) -> bytes:
    member = gzip.compress(member_plain, compresslevel=9)
    return member * copies


# -- the attacks ---------------------------------------------------------------------------------


def dotdot_passwd(c: Ctx) -> None:
    c.retarget("../../../../../../../../../etc/passwd", Path("/etc/passwd"))


def dotdot_secret(c: Ctx) -> None:
    c.retarget("dir/../../../../../../../../.." + str(c.secret), c.secret)


def absolute_secret(c: Ctx) -> None:
    c.retarget(str(c.secret), c.secret)


def absolute_shadow(c: Ctx) -> None:
    c.retarget("/etc/shadow", Path("/etc/shadow"))


def symlink_relative(c: Ctx) -> None:
    (c.content / "evil").symlink_to("../../../../../../../../../../etc")
    c.retarget("evil/passwd", Path("/etc/passwd"))


def symlink_absolute(c: Ctx) -> None:
    (c.content / "evil").symlink_to(c.secret_dir)
    c.retarget(f"evil/{c.secret.name}", c.secret)


def symlink_final(c: Ctx) -> None:
    (c.content / "a.txt").unlink()
    (c.content / "a.txt").symlink_to(c.secret)
    c.retarget("a.txt", c.secret)


def symlinked_parent_dir(c: Ctx) -> None:
    shutil.rmtree(c.content / "dir")
    (c.content / "dir").symlink_to(c.secret_dir)
    c.retarget(f"dir/{c.secret.name}", c.secret)


def symlinked_diff_dir(c: Ctx) -> None:
    shutil.rmtree(c.content)
    c.content.symlink_to(c.secret_dir)
    c.retarget(c.secret.name, c.secret)


def symlinked_layer_dir(c: Ctx) -> None:
    """overlay/<layer> -> a host directory whose diff/ holds the secret under a layer name."""
    host = c.secret_dir.parent / f"fake-layer-{c.layer[:8]}"
    shutil.copytree(c.content, host / "diff", symlinks=True)
    shutil.copyfile(c.secret, host / "diff" / "a.txt")
    shutil.rmtree(c.root / DRIVER / c.layer)
    (c.root / DRIVER / c.layer).symlink_to(host)
    c.retarget("a.txt", c.secret)


def tarsplit_symlink(c: Ctx) -> None:
    c.tarsplit.unlink()
    c.tarsplit.symlink_to(c.secret)


def manifest_symlink(c: Ctx) -> None:
    path = c.root / f"{DRIVER}-images" / c.image / "manifest"
    path.unlink()
    path.symlink_to("/etc/passwd")


def image_dir_symlink(c: Ctx) -> None:
    path = c.root / f"{DRIVER}-images" / c.image
    host = c.secret_dir.parent / f"fake-image-{c.image[:8]}"
    shutil.copytree(path, host)
    shutil.rmtree(path)
    path.symlink_to(host)


def fifo_for_file(c: Ctx) -> None:
    (c.content / "a.txt").unlink()
    os.mkfifo(c.content / "a.txt")


def device_for_file(c: Ctx) -> None:
    (c.content / "big.bin").unlink()
    os.mknod(c.content / "big.bin", 0o600 | 0o020000, os.makedev(1, 5))  # like /dev/zero


def directory_for_file(c: Ctx) -> None:
    (c.content / "a.txt").unlink()
    (c.content / "a.txt").mkdir()


def file_larger(c: Ctx) -> None:
    with open(c.content / "a.txt", "ab") as f:
        f.write(b"more")


def file_smaller(c: Ctx) -> None:
    os.truncate(c.content / "big.bin", 1000)


def file_changed(c: Ctx) -> None:
    (c.content / "a.txt").write_bytes(b"ALPHA\n" * 100)


def duplicate_names(c: Ctx) -> None:
    entries = c.entries()
    entry = next(e for e in entries if e.get("name") == "a.txt")
    entries.insert(entries.index(entry) + 1, {**entry, "name": "./a.txt"})
    c.write(entries)


def line_100mb(c: Ctx) -> None:
    entries = c.entries()
    head = b'{"type":2,"payload":"'
    body = b"A" * (16 << 20)
    plain = b"".join(json.dumps(e).encode() + b"\n" for e in entries[:2]) + head
    c.tarsplit.write_bytes(gzip.compress(plain) + _gzip_members(body, 7))


def gzip_bomb_zeros(c: Ctx) -> None:
    c.tarsplit.write_bytes(_gzip_members(b"\0" * (32 << 20), 128))  # 4 GiB from ~4 MB


def gzip_bomb_segments(c: Ctx) -> None:
    line = b'{"type":2,"payload":"' + b"A" * (1 << 20) + b'","position":0}\n'
    c.tarsplit.write_bytes(_gzip_members(line * 32, 128))  # 4 GiB of valid segment lines


def gzip_bomb_lines(c: Ctx) -> None:
    c.tarsplit.write_bytes(_gzip_members(b"\n" * (32 << 20), 64))  # 2 GiB of empty lines


def deep_path(c: Ctx) -> None:
    data = FILES["a.txt"]
    entries = c.entries()
    entry = next(e for e in entries if e.get("name") == "a.txt")
    entry["name"] = "d/" * 30_000 + "a.txt"
    c.write(entries, {entry["name"]: data})


def deep_json(c: Ctx) -> None:
    entries = c.entries()
    data = b"".join(json.dumps(e).encode() + b"\n" for e in entries)
    c.tarsplit.write_bytes(gzip.compress(data + b"[" * 30_000 + b"]" * 30_000 + b"\n"))


def nul_in_name(c: Ctx) -> None:
    entries = c.entries()
    next(e for e in entries if e.get("name") == "a.txt")["name"] = "a.txt\u0000/../../etc/passwd"
    crafted.write_entries(c.tarsplit, entries)


def nul_in_raw_name(c: Ctx) -> None:
    entries = c.entries()
    entry = next(e for e in entries if e.get("name") == "a.txt")
    del entry["name"]
    entry["name_raw"] = base64.b64encode(b"a.txt\x00x").decode()
    crafted.write_entries(c.tarsplit, entries)


def invalid_base64_segment(c: Ctx) -> None:
    entries = c.entries()
    next(e for e in entries if e["type"] == 2)["payload"] = "!!not base64!!"
    crafted.write_entries(c.tarsplit, entries)


def invalid_base64_crc(c: Ctx) -> None:
    entries = c.entries()
    next(e for e in entries if e.get("name") == "a.txt")["payload"] = "@@@="
    crafted.write_entries(c.tarsplit, entries)


def image_id_not_hex(c: Ctx) -> None:
    c.edit_image({"id": "../../../../etc"})


def layer_parent_not_hex(c: Ctx) -> None:
    c.edit_layer({"parent": "../../../etc"})


def top_layer_not_hex(c: Ctx) -> None:
    c.edit_image({"layer": "../../../../etc/passwd"})


def layer_id_not_hex(c: Ctx) -> None:
    c.edit_layer({"id": "../" + c.layer})


def digest_not_hex(c: Ctx) -> None:
    c.edit_layer({"diff-digest": "sha256:../../../../etc/passwd"})


def big_data_digest_not_hex(c: Ctx) -> None:
    rec = c.image_record()
    c.edit_image({"big-data-digests": {**rec["big-data-digests"], "manifest": "sha256:../../x"}})


def big_data_names_escape(c: Ctx) -> None:
    rec = c.image_record()
    evil = ["../../../../etc/passwd", "manifest-../../../../etc/passwd", "/etc/shadow", ".."]
    sizes = {**rec["big-data-sizes"], **{k: 100 for k in evil}}
    c.edit_image({"big-data-names": [*rec["big-data-names"], *evil], "big-data-sizes": sizes})


def signature_sizes_short(c: Ctx) -> None:
    c.edit_image({"metadata": json.dumps({"signature-sizes": [10, 20]})})


def signature_sizes_negative(c: Ctx) -> None:
    c.edit_image({"metadata": json.dumps({"signature-sizes": [-1, 5]})})


def signature_sizes_huge(c: Ctx) -> None:
    rec = c.image_record()
    c.edit_image(
        {
            "metadata": json.dumps({"signature-sizes": [2**62]}),
            "big-data-names": [*rec["big-data-names"], "signatures"],
            "big-data-sizes": {**rec["big-data-sizes"], "signatures": 2**62},
        }
    )


def diff_size_negative(c: Ctx) -> None:
    c.edit_layer({"diff-size": -7})


def diff_size_huge(c: Ctx) -> None:
    c.edit_layer({"diff-size": 2**62})


def diff_size_wrong(c: Ctx) -> None:
    c.edit_layer({"diff-size": 2**45})


def entry_size_negative(c: Ctx) -> None:
    entries = c.entries()
    next(e for e in entries if e.get("name") == "a.txt")["size"] = -5
    crafted.write_entries(c.tarsplit, entries)


def entry_size_huge(c: Ctx) -> None:
    entries = c.entries()
    next(e for e in entries if e.get("name") == "a.txt")["size"] = 2**70
    crafted.write_entries(c.tarsplit, entries)


def big_data_size_negative(c: Ctx) -> None:
    rec = c.image_record()
    c.edit_image({"big-data-sizes": {**rec["big-data-sizes"], "manifest": -1}})


LAYER, IMAGE, SKIP, OK = "layer-EIO", "image-EIO", "skipped", "served-ok"
SIG = "signatures-EIO"  # only signatures/ fails; manifest, config, blobs and views serve
ATTACKS: dict[str, tuple[Callable[[Ctx], None], frozenset[str]]] = {
    f.__name__: (f, frozenset(allowed))
    for f, allowed in [
        (dotdot_passwd, {LAYER}),
        (dotdot_secret, {LAYER}),
        (absolute_secret, {LAYER}),
        (absolute_shadow, {LAYER}),
        (symlink_relative, {LAYER}),
        (symlink_absolute, {LAYER}),
        (symlink_final, {LAYER}),
        (symlinked_parent_dir, {LAYER}),
        (symlinked_diff_dir, {LAYER}),
        (symlinked_layer_dir, {LAYER}),
        (tarsplit_symlink, {LAYER}),
        (manifest_symlink, {IMAGE}),
        (image_dir_symlink, {IMAGE}),
        (fifo_for_file, {LAYER}),
        (device_for_file, {LAYER}),
        (directory_for_file, {LAYER}),
        (file_larger, {LAYER}),
        (file_smaller, {LAYER}),
        (file_changed, {LAYER}),
        (duplicate_names, {LAYER}),
        (line_100mb, {LAYER}),
        (gzip_bomb_zeros, {LAYER}),
        (gzip_bomb_segments, {LAYER}),
        (gzip_bomb_lines, {LAYER}),
        (deep_path, {LAYER}),
        (deep_json, {LAYER}),
        (nul_in_name, {LAYER}),
        (nul_in_raw_name, {LAYER}),
        (invalid_base64_segment, {LAYER}),
        (invalid_base64_crc, {LAYER}),
        (image_id_not_hex, {SKIP}),
        (layer_parent_not_hex, {IMAGE}),
        (top_layer_not_hex, {IMAGE}),
        (layer_id_not_hex, {IMAGE}),
        (digest_not_hex, {IMAGE}),
        (big_data_digest_not_hex, {IMAGE}),
        (big_data_names_escape, {OK}),
        (signature_sizes_short, {SIG}),
        (signature_sizes_negative, {SIG}),
        (signature_sizes_huge, {SIG}),
        (diff_size_negative, {IMAGE}),
        (diff_size_huge, {IMAGE}),
        (diff_size_wrong, {LAYER}),
        (entry_size_negative, {LAYER}),
        (entry_size_huge, {LAYER}),
        (big_data_size_negative, {IMAGE}),
    ]
}


# -- fixtures ----------------------------------------------------------------------------------


@dataclass
class Hostile:
    root: Path
    runroot: Path
    good: str  # an untouched clone
    good_blob: str
    good_bytes: bytes
    layer_digest: str
    ids: dict[str, str]  # attack -> image ID (as created; "skipped" ones are not listed)
    layers: dict[str, str]
    host: harden.HostBytes


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Hostile:
    base = tmp_path_factory.mktemp("hostile")
    tools = harden.Tools.at(base)
    image_id = tools.commit_files("localhost/base:1", FILES)
    root = base / "root"
    store = imgfs.Store.open(str(root), str(base / "run"), DRIVER)
    img = store.image(image_id)
    layer_digest = next(b.digest for b in img.blobs() if b.kind == "layer")
    with img.open_blob(layer_digest) as f:
        good_bytes = f.read()
    secret_dir = base / "host-secrets"
    secret_dir.mkdir()
    secret = secret_dir / "secret.bin"
    secret.write_bytes(harden.pseudo_random(99, 4096))
    good, _ = harden.clone_image(root, image_id, "good")
    ids: dict[str, str] = {}
    layers: dict[str, str] = {}
    for name, (attack, _allowed) in ATTACKS.items():
        new_image, new_layer = harden.clone_image(root, image_id, name.replace("_", "-"))
        attack(Ctx(root, new_image, new_layer, secret, secret_dir))
        ids[name], layers[name] = new_image, new_layer
    host = harden.HostBytes([*harden.HOST_FILES, secret])
    return Hostile(
        root, base / "run", good, layer_digest, good_bytes, layer_digest, ids, layers, host
    )


@pytest.fixture(scope="module", params=["snapshot", "direct"])
def served(
    request: pytest.FixtureRequest, hostile: Hostile, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, harden.Daemon]]:
    mode = request.param
    work = tmp_path_factory.mktemp(f"hostile-{mode}")
    extra = ("--direct",) if mode == "direct" else ()
    with harden.daemon(hostile.root, hostile.runroot, work, *extra) as d:
        yield mode, d


# -- reading -----------------------------------------------------------------------------------


Outcome = harden.Outcome
_read_capped = harden.read_capped
_read_image = harden.read_image


def _read_views(mnt: Path, image_id: str) -> Outcome:
    """List and read ``rootfs/`` and ``layers/`` (at most MAX_VIEW_PATHS paths)."""
    if image_id not in os.listdir(mnt):
        return Outcome(False, {}, {})
    top = mnt / image_id
    errors: dict[str, int] = {}
    read: dict[str, bytes] = {}
    pending = [Path("rootfs"), Path("layers")]
    seen = 0
    while pending and seen < MAX_VIEW_PATHS:
        rel = pending.pop()
        seen += 1
        try:
            st = os.lstat(top / rel)
            if stat.S_ISDIR(st.st_mode):
                pending += [rel / name for name in os.listdir(top / rel)]
            elif stat.S_ISREG(st.st_mode):
                read[str(rel)] = _read_capped(top / rel)
        except OSError as exc:
            errors[str(rel)] = exc.errno or 0
    return Outcome(True, errors, read)


def _check_views(attack: str, got: str, d: harden.Daemon, hostile: Hostile) -> None:
    """The views fail with EIO at most, never leak host bytes, and serve fully where the
    attack is not on the layer (signatures, big-data names)."""
    views = _with_timeout(lambda: _read_views(d.mnt, hostile.ids[attack]), READ_TIMEOUT)
    assert views is not None, f"{attack}: reading rootfs/ and layers/ hung"
    leaked = [rel for rel, data in views.read.items() if hostile.host.found_in(data)]
    assert not leaked, f"{attack}: host bytes served in {leaked}"
    bad_errno = {rel: e for rel, e in views.errors.items() if e != errno.EIO}
    assert not bad_errno, f"{attack}: view errors other than EIO: {bad_errno}"
    if got in (SIG, OK):
        assert not views.errors, f"{attack}: views failed: {views.errors}"
        assert views.read.get("rootfs/a.txt") == FILES["a.txt"], attack
    if attack == "deep_path":
        assert views.errors, "deep_path: the views of the deep layer served"
        assert "deeper than 4096 components" in d.log()


def _classify(outcome: Outcome) -> str:
    if not outcome.listed:
        return SKIP
    if not outcome.errors:
        return OK
    if "manifest.json" not in outcome.read:
        return IMAGE
    if all(k.startswith("blobs/") for k in outcome.errors):
        return LAYER
    if all(k.split("/")[0] == "signatures" for k in outcome.errors):
        return SIG
    return IMAGE


def _with_timeout(fn: Callable[[], Outcome], timeout: float) -> Outcome | None:
    box: list[Outcome | BaseException] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if box and isinstance(box[0], BaseException):
        raise box[0]
    return box[0] if box else None


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attack(
    attack: str, served: tuple[str, harden.Daemon], hostile: Hostile, counts: Counts
) -> None:
    mode, d = served
    image_id = hostile.ids[attack]
    allowed = ATTACKS[attack][1]
    outcome = _with_timeout(lambda: _read_image(d.mnt, image_id), READ_TIMEOUT)
    assert outcome is not None, f"{attack}: reading the image hung for {READ_TIMEOUT}s"
    got = _classify(outcome)
    counts.add(AREA, f"attacks run ({mode})")
    counts.add(AREA, f"files read ({mode})", len(outcome.read))
    counts.add(
        AREA,
        f"reads failed with EIO ({mode})",
        sum(1 for e in outcome.errors.values() if e == errno.EIO),
    )
    counts.add(AREA, f"outcome {got} ({mode})")
    leaked = [rel for rel, data in outcome.read.items() if hostile.host.found_in(data)]
    counts.add(AREA, "host-file bytes served (must be 0)", len(leaked))
    assert not leaked, f"{attack}: host bytes served in {leaked}"
    bad_errno = {rel: e for rel, e in outcome.errors.items() if e != errno.EIO}
    assert not bad_errno, f"{attack}: errors other than EIO: {bad_errno}"
    assert got in allowed, f"{attack}: {got}, expected {sorted(allowed)}; errors {outcome.errors}"
    if got != OK:
        what = image_id[:12] if got != SKIP else "no valid image ID"
        layer = hostile.layers[attack][:12]
        assert what in d.log() or layer in d.log(), f"{attack}: no log line for {what}"
        counts.add(AREA, f"failures with a log line ({mode})")
    _check_views(attack, got, d, hostile)
    assert harden.alive(d.pid), f"{attack}: the daemon died"
    good = (d.mnt / hostile.good / "blobs" / hostile.good_blob).read_bytes()
    assert good == hostile.good_bytes, f"{attack}: the untouched image stopped serving"
    counts.add(AREA, f"good image re-read correctly after an attack ({mode})")
    rss = harden.peak_rss_mib(d.pid)
    counts.peak(AREA, f"daemon peak RSS MiB ({mode})", round(rss, 1))
    assert rss < MAX_PEAK_RSS_MIB, f"{attack}: daemon peak RSS {rss:.0f} MiB"
