"""Benchmark stores, built once with buildah from scratch (no network) and reused.

Owns: the layout under the bench directory (default ``/var/tmp/imgfs-bench``), the content of
the benchmark images and the ``skopeo copy ... dir:`` exports of the big and the 100k-file
image (``export-big``, ``export-small``), and how podman is run on a store. Must not know:
imgfs, mounting, timing.

Stores (overlay driver, each with its own graph root and run root):

- ``bench``: ``localhost/big:v1`` (one ~1 GiB layer: four 240 MiB random files plus 4000 small
  ones), ``localhost/multi:v1`` (four ~256 MiB layers, for concurrent copies) and
  ``localhost/small:v1`` (one layer of 100k small files).
- ``many``: ``localhost/base:v1`` (two shared layers) and 1000 images ``localhost/many:N``, each
  with one tiny unique layer and its own label, so each is a distinct image record.

A finished store has a ``.complete`` marker; delete the directory to rebuild.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
BIG_FILES = 4
BIG_FILE_SIZE = 240 * MiB
BIG_SMALL_FILES = 4000
MULTI_LAYERS = 4
MULTI_LAYER_SIZE = 256 * MiB
SMALL_FILES = 100_000
MANY_IMAGES = 1000

Fill = Callable[[Path], None]


@dataclass(frozen=True)
class BenchStore:
    """One buildah store: graph root, run root, driver."""

    root: Path
    runroot: Path
    driver: str = "overlay"

    def buildah(self, conf: Path, *args: str) -> str:
        cmd = [
            "buildah",
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            self.driver,
            "--registries-conf",
            str(conf / "registries.conf"),
            *args,
        ]
        return _run(cmd, conf)

    def podman(self, conf: Path, *args: str) -> str:
        """``podman`` (as root) on this store; its stdout."""
        cmd = ["podman", "--root", str(self.root), "--runroot", str(self.runroot)]
        return _run([*cmd, "--storage-driver", self.driver, *args], conf)

    def ref(self, image: str) -> str:
        return f"containers-storage:[{self.driver}@{self.root}+{self.runroot}]{image}"


@dataclass(frozen=True)
class BenchStores:
    base: Path
    bench: BenchStore
    many: BenchStore
    export: Path
    """``skopeo copy containers-storage:localhost/big:v1 dir:`` of the big image."""
    export_small: Path
    """``skopeo copy containers-storage:localhost/small:v1 dir:`` of the 100k-file image."""

    @property
    def conf(self) -> Path:
        return self.base / "conf"

    def skopeo(self, *args: str) -> str:
        policy = self.conf / "policy.json"
        return _run(
            ["skopeo", "--policy", str(policy), "--tmpdir", str(self.base / "tmp"), *args],
            self.conf,
        )


def _env(conf: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTAINERS_", "BUILDAH_"))}
    env.update(
        CONTAINERS_REGISTRIES_CONF=str(conf / "registries.conf"),
        CONTAINERS_CONF=str(conf / "containers.conf"),
        CONTAINERS_STORAGE_CONF=str(conf / "storage.conf"),
        TMPDIR=str(conf.parent / "tmp"),
    )
    return env


def _run(cmd: list[str], conf: Path) -> str:
    proc = subprocess.run(cmd, env=_env(conf), capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def _write_conf(conf: Path) -> None:
    conf.mkdir(parents=True, exist_ok=True)
    (conf.parent / "tmp").mkdir(exist_ok=True)
    (conf / "registries.conf").write_text("unqualified-search-registries = []\n")
    (conf / "containers.conf").write_text("# built-in defaults\n")
    (conf / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{conf}/unused"\n'
        f'runroot = "{conf}/unused-run"\n'
    )
    (conf / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')


def _random_file(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(rng.randbytes(n))
            left -= n


def _small_files(top: Path, count: int, seed: int, max_size: int = 4096) -> None:
    rng = random.Random(seed)
    for k in range(count):
        d = top / f"d{k // 1000:03d}"
        if k % 1000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"file-{k:06d}.txt").write_bytes(rng.randbytes(rng.randint(0, max_size)))


def _exists(store: BenchStore, conf: Path, name: str) -> bool:
    try:
        store.buildah(conf, "inspect", "--type", "image", name)
    except RuntimeError:
        return False
    return True


def _layer_on(store: BenchStore, conf: Path, parent: str, name: str, fill: Fill) -> None:
    """Commit ``name``: ``parent`` (an image, or "scratch") plus one layer written by ``fill``."""
    if _exists(store, conf, name):
        return
    ctr = store.buildah(conf, "from", "--pull=never", parent)
    try:
        fill(Path(store.buildah(conf, "mount", ctr)))
        store.buildah(conf, "commit", "-q", ctr, name)
    finally:
        store.buildah(conf, "rm", ctr)


def _fill_big(mnt: Path) -> None:
    for k in range(BIG_FILES):
        _random_file(mnt / f"big-{k}.bin", BIG_FILE_SIZE, seed=k)
    _small_files(mnt / "small", BIG_SMALL_FILES, seed=99, max_size=64 << 10)


def _fill_part(k: int) -> Fill:
    return lambda mnt: _random_file(mnt / f"part-{k}.bin", MULTI_LAYER_SIZE, seed=100 + k)


def _build_bench(store: BenchStore, conf: Path) -> None:
    _layer_on(store, conf, "scratch", "localhost/big:v1", _fill_big)
    parent = "scratch"
    for k in range(MULTI_LAYERS):
        name = f"localhost/multi:l{k + 1}"
        _layer_on(store, conf, parent, name, _fill_part(k))
        parent = name
    if not _exists(store, conf, "localhost/multi:v1"):
        store.buildah(conf, "tag", parent, "localhost/multi:v1")
    fill: Fill = lambda m: _small_files(m / "f", SMALL_FILES, 7)  # noqa: E731
    _layer_on(store, conf, "scratch", "localhost/small:v1", fill)


def _build_many(store: BenchStore, conf: Path) -> float:
    """Base image (two layers) + MANY_IMAGES commits of a one-file layer; returns seconds."""
    _layer_on(store, conf, "scratch", "localhost/base:l1", lambda m: _small_files(m / "a", 500, 1))
    _layer_on(
        store,
        conf,
        "localhost/base:l1",
        "localhost/base:v1",
        lambda m: _small_files(m / "b", 500, 2),
    )
    ctr = store.buildah(conf, "from", "--pull=never", "localhost/base:v1")
    mnt = Path(store.buildah(conf, "mount", ctr))
    started = time.monotonic()
    try:
        for k in range(MANY_IMAGES):
            (mnt / "unique").write_text(f"image {k}\n")
            store.buildah(conf, "config", "--label", f"bench.n={k}", ctr)
            store.buildah(conf, "commit", "-q", ctr, f"localhost/many:{k}")
    finally:
        store.buildah(conf, "rm", ctr)
    return time.monotonic() - started


def ensure_stores(base: Path, log: object = print) -> BenchStores:
    """Build (or reuse) every benchmark store under ``base``."""
    assert callable(log)
    conf = base / "conf"
    _write_conf(conf)
    stores = BenchStores(
        base=base,
        bench=BenchStore(base / "bench", base / "bench-run"),
        many=BenchStore(base / "many", base / "many-run"),
        export=base / "export-big",
        export_small=base / "export-small",
    )
    if not (base / "bench" / ".complete").exists():
        log("building the bench store (1 GiB, 4x256 MiB, 100k-file layers) ...")
        started = time.monotonic()
        _build_bench(stores.bench, conf)
        (base / "bench" / ".complete").write_text(f"{time.monotonic() - started:.1f}\n")
    if not (base / "many" / ".complete").exists():
        log(f"building the {MANY_IMAGES}-image store ...")
        seconds = _build_many(stores.many, conf)
        (base / "many" / ".complete").write_text(f"{seconds:.1f}\n")
    if not (stores.export / ".complete").exists():
        stores.skopeo("copy", "-q", stores.bench.ref("localhost/big:v1"), f"dir:{stores.export}")
        (stores.export / ".complete").write_text("\n")
    if not (stores.export_small / ".complete").exists():
        ref = stores.bench.ref("localhost/small:v1")
        stores.skopeo("copy", "-q", ref, f"dir:{stores.export_small}")
        (stores.export_small / ".complete").write_text("\n")
    return stores


def image_info(stores: BenchStores, store: BenchStore, name: str) -> tuple[str, list[str]]:
    """(image ID, uncompressed layer digests) of ``name``, as skopeo reports them."""
    config = json.loads(stores.skopeo("inspect", "--config", store.ref(name)))
    image_id = store.buildah(
        stores.conf, "inspect", "--type", "image", "--format", "{{.FromImageID}}", name
    )
    return image_id, list(config["rootfs"]["diff_ids"])


def export_layer(stores: BenchStores) -> Path:
    """The big layer's file in the ``dir:`` export (an uncompressed tar)."""
    return export_layers(stores.export)[0]


def export_layers(export: Path) -> list[Path]:
    """The layer files of a ``dir:`` export (uncompressed tars), bottom layer first."""
    manifest = json.loads((export / "manifest.json").read_text())
    return [export / layer["digest"].removeprefix("sha256:") for layer in manifest["layers"]]
