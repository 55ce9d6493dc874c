"""Benchmark: ``rootfs/`` of a real image with a 100k-file layer (root, skopeo, FUSE needed).

Builds (once, in WORKDIR) a vfs store holding one image whose single layer has N files (default
100 000: 10 top-level directories, 100 subdirectories each, small files), imported with
``skopeo copy`` from an OCI layout. Then mounts it with imgfs and times, each on a fresh mount:
``ls rootfs/`` with an empty cache dir (tar-split parsed), ``ls rootfs/`` again on a remount
(persisted layer tree), and ``ls -lR rootfs/`` (all directories, every file's attributes).
Prints figures; asserts nothing.

    python3 scripts/bench_views.py [--files N] [WORKDIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _layer(files: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for top in range(10):
            for sub in range(-1, 100):
                info = tarfile.TarInfo(f"d{top}" if sub < 0 else f"d{top}/s{sub}")
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                tf.addfile(info)
        for k in range(files):
            data = b"%d\n" % k
            info = tarfile.TarInfo(f"d{k % 10}/s{k // 10 % 100}/file-{k:07d}.txt")
            info.size, info.mtime, info.mode = len(data), 1_700_000_000 + k, 0o644
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _blob(layout: Path, data: bytes) -> dict[str, object]:
    (layout / "blobs" / "sha256" / _sha(data)[7:]).write_bytes(data)
    return {"digest": _sha(data), "size": len(data)}


def build(work: Path, files: int) -> tuple[Path, str]:
    store = work / "store"
    marker = work / f"built-{files}"
    if marker.exists():
        return store, marker.read_text().strip()
    shutil.rmtree(work, ignore_errors=True)
    layout = work / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    layer = _layer(files)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [_sha(layer)]},
    }).encode()  # fmt: skip
    oci = "application/vnd.oci.image"
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": f"{oci}.manifest.v1+json",
        "config": {"mediaType": f"{oci}.config.v1+json", **_blob(layout, config)},
        "layers": [{"mediaType": f"{oci}.layer.v1.tar", **_blob(layout, layer)}],
    }).encode()  # fmt: skip
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **_blob(layout, manifest),
        "annotations": {"org.opencontainers.image.ref.name": "big"}}]}  # fmt: skip
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    dest = f"containers-storage:[vfs@{store}/root+{store}/run]localhost/big:v1"
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "-q", f"oci:{layout}:big", dest], check=True
    )
    marker.write_text(_sha(config)[7:])
    return store, _sha(config)[7:]


def _timed_mount(store: Path, work: Path, image: str, command: list[str], fresh: bool) -> float:
    mnt, cache = work / "mnt", work / "cache"
    if fresh:
        shutil.rmtree(cache, ignore_errors=True)
    mnt.mkdir(exist_ok=True)
    imgfs = [sys.executable, "-m", "imgfs", "--driver", "vfs", "--runroot", str(store / "run")]
    subprocess.run([*imgfs, "--cache-dir", str(cache), str(store / "root"), str(mnt)], check=True)
    try:
        started = time.monotonic()
        subprocess.run([*command, str(mnt / image / "rootfs")], check=True, capture_output=True)
        return time.monotonic() - started
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("workdir", nargs="?", default="/var/tmp/imgfs-bench-views")
    args = parser.parse_args()
    work = Path(args.workdir)
    os.chdir(ROOT)
    store, image = build(work, args.files)
    cold = _timed_mount(store, work, image, ["ls"], fresh=True)
    warm = _timed_mount(store, work, image, ["ls"], fresh=False)
    full = _timed_mount(store, work, image, ["ls", "-lR"], fresh=False)
    print(f"{args.files} files: ls rootfs/ cold {cold:.2f}s, persisted tree {warm:.2f}s; "
          f"ls -lR rootfs/ {full:.2f}s")  # fmt: skip


if __name__ == "__main__":
    main()
