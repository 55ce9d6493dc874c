"""Real containers/storage stores for the imgfs tests, built by the real tools.

``build_stores(base)`` builds, once, an ``overlay`` and a ``vfs`` store under *base* with Debian's
buildah/skopeo (no network: every image is made from scratch, or crafted here as an OCI layout and
imported with ``skopeo copy``), and records, for every image, what the tools themselves report: the
``skopeo inspect --raw`` bytes, a ``skopeo copy ... dir:`` export (the oracle for the mounted tree),
the image ID, names, config digest and diff IDs.

Images in EACH store (``kind`` -> name; "distinct" = its own image record):

=================  ===========================  ====================================================
kind               name(s)                      how it is made / what is special
=================  ===========================  ====================================================
tiny               localhost/tiny:v1            buildah, 1 layer, a few files, label + env + cmd
awkward-stage1     localhost/awkward:stage1     buildah add of a crafted PAX tar (see below)
awkward-stage2     localhost/awkward:stage2     + layer 2: whiteouts, removed+recreated dir, ...
awkward            localhost/awkward:v1         + layer 3 (buildah copy + deletes/chmod); 3 layers;
                                                stage1/stage2 are prefixes of its layer chain
awkward-gzip       localhost/awkward:gzip       awkward's 3 layers gzip-compressed in an OCI layout,
                                                on top of a 1-file marker layer, config with an
                                                extra label: a distinct image whose 4 layers are
                                                NEW records (compression 2, compressed digests)
                                                though 3 share diff-digests with awkward:v1's
                                                (different parents -> different layer IDs)
awkward-zstd       localhost/awkward:zstd       same, zstd-compressed (compression 4)
awkward-v2s2       localhost/awkward:v2s2       same with gzip -9, ``skopeo copy --format v2s2``
                                                (Docker schema 2 manifest + converted config)
reimport-shared    localhost/reimport:gzip,     buildah image re-imported gzip-compressed with the
                   localhost/reimport:v1        SAME config: c/image reuses the record, so both
                                                names share one record whose ``manifest`` is the
                                                gzip manifest (storage-format 4.3 / 11.17);
                                                ``other_manifests`` holds the original manifest
signed             localhost/signed:v1          uncompressed OCI import, two GPG signatures
signed-gzip        localhost/signed:gzip        gzip import (own content), one signature: skopeo
                                                refuses the dir: export ("Would invalidate
                                                signatures"); the oracle is the
                                                ``--remove-signatures`` export, and
                                                expected_signatures come from the dir: copy that
                                                was imported
fromlist           localhost/fromlist:v1        pulled out of a 2-platform OCI index (host arch +
                                                one other); ``list_digest``/``other_manifests``
mylist             localhost/mylist:v1          ``buildah manifest create/add`` (tiny by name,
                                                awkward by ID), layer-less, ``instances.json``;
                                                skopeo cannot export it (no dir: oracle)
untagged           (no names)                   buildah commit without a name
crafted            localhost/crafted:v1         one uncompressed layer whose tar bytes are made
                                                here (GNU long names, 10240-byte blocking,
                                                trailing garbage); ``crafted_tar`` = those bytes
schema1            localhost/schema1:v1         signed Docker schema 1: an OCI image whose config
                                                history has 3 ``empty_layer`` entries (one on top)
                                                around its 2 layers, ``skopeo copy --format v2s1``
                                                to dir:, then into the store: 5 fsLayers, 3 of
                                                them ``throwaway`` (a3ed95...), no config;
                                                ``manifest_digest`` = the JWS payload digest;
                                                the dir: export re-signs the manifest (differs on
                                                every run), its blobs do not
=================  ===========================  ====================================================

The awkward content (layer 1, imported with ``buildah add``, then re-tarred by c/storage): names
> 100 bytes and paths > 255 bytes (PAX), non-UTF-8 names, names with newline/tab/``<>&``,
hardlinks, relative/absolute/dangling symlinks, empty files, files of exactly 512 and 1024 bytes,
a 3 MiB+ file, a FIFO, a char and a block device, setuid/setgid/sticky and mode 0000, a uid/gid
above 2**21, an mtime above 2**33, a ``user.`` xattr. Layer 2 (made through ``buildah mount``)
deletes a file and a hardlink (whiteouts), removes and recreates a directory (overlay: opaque
``.wh..wh..opq``; vfs: one ``.wh.`` per removed file) and adds files. Layer 3 deletes a layer-2
file, renames a layer-1 file and chmods another (copy-up).

Isolation: every tool runs with ``--root/--runroot/--storage-driver`` (or the store spec in the
``containers-storage:[driver@root+runroot]`` reference), a generated storage.conf, registries.conf,
containers.conf, auth file and policy file under *base*, a throwaway GNUPGHOME, and TMPDIR under
*base*. When possible (root + ``unshare``) the whole build runs in a private mount namespace in
which ``/var/lib/containers`` is read-only, so c/image's blob-info cache stays in memory: nothing
under /var/lib/containers is written and the stores do not depend on earlier runs.

Caching: a complete build ends by writing ``.complete`` (holding the sha256 of this file);
``build_stores`` on such a directory just loads ``storeset.json``. Set ``IMGFS_TEST_STORES`` to a
directory to keep stores between test runs (see ``stores_dir_from_env``).

Run ``python3 tests/realstores.py DIR`` to build (or load) and print a summary.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DRIVERS",
    "ENV_STORES",
    "Image",
    "Store",
    "StoreSet",
    "ToolError",
    "build_stores",
    "images_json",
    "jws_payload",
    "load_storeset",
    "source_hash",
    "stores_dir_from_env",
    "tool_env",
    "write_tool_conf",
]

DRIVERS = ("overlay", "vfs")
ENV_STORES = "IMGFS_TEST_STORES"
MARKER = ".complete"
STAMP = ".imgfs-realstores"  # written first: lets a later build clear the directory safely
LOCKFILE = ".lock"
STORESET_JSON = "storeset.json"
FORMAT_VERSION = 1
TOOL_TIMEOUT = 300.0
BUILD_TIMEOUT = 1800.0

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"

# Deterministic content shared with the tests (tests check these members exist in the layers).
LONG_NAME = "awkward/" + "n" * 150 + ".txt"  # one component > 100 bytes
LONG_PATH = "awkward/deep/" + "d" * 120 + "/" + "e" * 120 + "/" + "f" * 40 + ".txt"  # > 255 bytes
NON_UTF8_NAMES = (b"awkward/\xff\xfe.bin", b"awkward/caf\xe9.txt")
BIG_SIZE = 3 * 1024 * 1024 + 7
FIXED_MTIME = 1_700_000_000


# --------------------------------------------------------------------------------------------
# public data model


@dataclass(frozen=True)
class Store:
    """One store: pass these to the library as graphroot/runroot/driver."""

    driver: str
    root: Path
    runroot: Path

    @property
    def spec(self) -> str:
        """The c/image store specifier ``[driver@root+runroot]``."""
        return f"[{self.driver}@{self.root}+{self.runroot}]"

    def ref(self, name_or_id: str) -> str:
        """A ``containers-storage:`` reference for skopeo (name, ``name@digest`` or image ID)."""
        return f"containers-storage:{self.spec}{name_or_id}"

    @property
    def images_json_path(self) -> Path:
        return self.root / f"{self.driver}-images" / "images.json"

    @property
    def layers_json_path(self) -> Path:
        return self.root / f"{self.driver}-layers" / "layers.json"


@dataclass(frozen=True)
class Image:
    """What the real tools say about one image of one store.

    Frozen, but holds lists/dicts (compare with ``==``; not hashable).
    """

    driver: str  # which store (key of StoreSet.stores)
    kind: str  # e.g. "awkward-gzip"; unique per store
    name: str | None  # the name it was built/imported as (None: untagged)
    names: list[str]  # names of its record in images.json, in stored order
    id: str  # 64-hex image ID
    manifest_digest: str  # big-data-digests["manifest"]: sha256 of inspect_raw, except for
    # signed schema1 (the JWS payload's digest, storage-format 4.4)
    inspect_raw: bytes  # `skopeo inspect --raw` = the stored primary manifest
    config_digest: str | None  # from the manifest; None for a manifest list and schema1
    config_raw: bytes | None  # the config blob bytes
    diff_ids: list[str]  # config rootfs.diff_ids (bottom layer first); [] for lists; schema1:
    # the blobSums of its non-throwaway entries (uncompressed tars here), bottom first
    oracle_dir: Path | None  # `skopeo copy ... dir:` output, None when skopeo cannot
    oracle_flags: list[str]  # extra skopeo flags the oracle export needed
    oracle_note: str | None  # why the export failed/was degraded (skopeo's message)
    expected_signatures: list[bytes]  # signature blobs, in stored order
    list_digest: str | None = None  # fromlist: digest of the index it was pulled out of
    other_manifests: dict[str, bytes] = field(default_factory=dict)  # digest -> bytes, besides
    # the primary manifest, that the store keeps in the record (list; pre-reimport manifest)
    crafted_tar: Path | None = None  # crafted: the exact layer tar that was imported
    notes: str = ""

    def oracle_files(self) -> dict[str, Path]:
        """Files of the dir: export by name (``version``, ``manifest.json``, ``<hex>``, ...)."""
        if self.oracle_dir is None:
            return {}
        return {p.name: p for p in sorted(self.oracle_dir.iterdir())}

    def layer_paths(self) -> list[Path]:
        """The uncompressed layer tars of the dir: export, bottom first."""
        if self.oracle_dir is None:
            return []
        return [self.oracle_dir / d.split(":", 1)[1] for d in self.diff_ids]


@dataclass(frozen=True)
class StoreSet:
    base: Path
    stores: dict[str, Store]  # driver -> Store
    images: dict[str, list[Image]]  # driver -> images in build order
    gpg_fingerprints: list[str]  # signers of the signed images (key 1, key 2)
    gpg_public_keys: Path | None  # armored public keys of those signers
    tool_versions: dict[str, str]
    build_seconds: float
    isolated: bool  # built in a private mount namespace (/var/lib/containers untouched)
    notes: list[str]

    def store(self, driver: str) -> Store:
        return self.stores[driver]

    def image(self, driver: str, kind: str) -> Image:
        for img in self.images[driver]:
            if img.kind == kind:
                return img
        raise KeyError(f"no image of kind {kind!r} in the {driver} store")

    def all_images(self) -> list[Image]:
        return [img for d in self.stores for img in self.images[d]]


class ToolError(RuntimeError):
    """A tool call failed; carries the command line and its stderr."""

    def __init__(self, cmd: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        tail = "\n".join(stderr.strip().splitlines()[-40:])
        super().__init__(f"command failed (exit {returncode}): {' '.join(cmd)}\n{tail}")


def images_json(store: Store) -> list[dict[str, Any]]:
    """The image records of *store* (an absent or empty file is an empty list)."""
    try:
        data = store.images_json_path.read_bytes()
    except FileNotFoundError:
        return []
    if not data.strip():
        return []
    records = json.loads(data)
    assert isinstance(records, list)
    return records


def jws_payload(signed: bytes) -> bytes:
    """The JWS payload of a signed schema1 manifest (docker/libtrust; independent of imgfs):
    the bytes up to the first signature's ``formatLength`` plus its decoded ``formatTail``."""

    def b64url(text: str) -> bytes:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    protected = json.loads(b64url(json.loads(signed)["signatures"][0]["protected"]))
    return signed[: protected["formatLength"]] + b64url(protected["formatTail"])


def source_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def stores_dir_from_env() -> Path | None:
    value = os.environ.get(ENV_STORES, "").strip()
    return Path(value) if value else None


# --------------------------------------------------------------------------------------------
# entry point


def build_stores(base: Path) -> StoreSet:
    """Build the stores into *base* (or load them when *base* holds a complete build).

    *base* must be empty, absent, or an earlier (possibly partial) build; anything else is
    refused rather than deleted.
    """
    base = Path(os.path.abspath(base))
    base.mkdir(parents=True, exist_ok=True)
    with _flocked(base / LOCKFILE):
        if _is_complete(base):
            return load_storeset(base)
        _clear(base)
        (base / STAMP).write_text("imgfs test stores (tests/realstores.py); safe to delete\n")
        started = time.monotonic()
        isolated = _run_build(base)
        elapsed = time.monotonic() - started
        meta_path = base / STORESET_JSON
        meta = json.loads(meta_path.read_text())
        meta["build_seconds"] = round(elapsed, 2)
        meta["isolated"] = isolated
        meta_path.write_text(json.dumps(meta, indent=1))
        (base / MARKER).write_text(source_hash() + "\n")
        return load_storeset(base)


def load_storeset(base: Path) -> StoreSet:
    base = Path(os.path.abspath(base))
    meta = json.loads((base / STORESET_JSON).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{base / STORESET_JSON}: unknown format {meta.get('format')!r}")
    return _storeset_from_json(base, meta)


def _is_complete(base: Path) -> bool:
    try:
        marker = (base / MARKER).read_text().strip()
    except OSError:
        return False
    return marker == source_hash() and (base / STORESET_JSON).is_file()


def _clear(base: Path) -> None:
    entries = [p for p in base.iterdir() if p.name != LOCKFILE]
    if not entries:
        return
    if not (base / STAMP).exists():
        raise RuntimeError(
            f"{base} is not empty and was not made by tests/realstores.py; refusing to clear it"
        )
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _run_build(base: Path) -> bool:
    """Build in a private mount namespace when possible; return whether that was possible."""
    if _can_unshare():
        cmd = [
            "unshare", "--mount", "--propagation", "private", "--",
            sys.executable, os.path.abspath(__file__), "--inner", str(base),
        ]  # fmt: skip
        _run_raw(cmd, timeout=BUILD_TIMEOUT)
        return True
    _build(base, isolated=False)
    return False


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    try:
        _run_raw(["unshare", "--mount", "--propagation", "private", "true"], timeout=30)
    except ToolError:
        return False
    return True


def _isolate_var_lib_containers() -> None:
    """Inside the private namespace: make c/image's blob-info cache dir unwritable (-> memory)."""
    target = Path("/var/lib/containers")
    if target.is_dir():
        cmd = ["mount", "-t", "tmpfs", "-o", "ro,size=64k,mode=0700", "imgfs-test", str(target)]
        _run(cmd)
    else:
        _run(["mount", "--bind", "/var/lib", "/var/lib"])
        _run(["mount", "-o", "remount,bind,ro", "/var/lib"])


# --------------------------------------------------------------------------------------------
# tool plumbing

_log_lock = threading.Lock()
_log_path: Path | None = None


def _log(line: str) -> None:
    if _log_path is None:
        return
    with _log_lock, _log_path.open("a") as f:
        f.write(line.rstrip("\n") + "\n")


def _run_raw(
    cmd: Sequence[str],
    env: dict[str, str] | None = None,
    input: bytes | None = None,
    timeout: float = TOOL_TIMEOUT,
) -> bytes:
    """Run one command (every tool call goes through here); return its stdout.

    Raises ToolError, carrying the command's stderr, when it fails or times out.
    """
    started = time.monotonic()
    try:
        proc = subprocess.run(
            list(cmd), env=env, input=input, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise ToolError(cmd, -1, "", f"timed out after {timeout}s: {e}") from e
    _log(f"[{time.monotonic() - started:6.2f}s rc={proc.returncode}] {' '.join(cmd)}")
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace")
        _log(err)
        raise ToolError(cmd, proc.returncode, proc.stdout.decode(errors="replace"), err)
    return proc.stdout


def _run(cmd: Sequence[str], env: dict[str, str] | None = None, input: bytes | None = None) -> str:
    return _run_raw(cmd, env, input).decode(errors="replace")


def tool_env(base: Path, gnupghome: Path | None = None) -> dict[str, str]:
    """Environment that isolates buildah/skopeo/gpg from the host's configuration."""
    conf = base / "conf"
    drop = ("CONTAINERS_", "BUILDAH_", "STORAGE_", "REGISTRY_AUTH", "PODMAN_", "DOCKER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        CONTAINERS_STORAGE_CONF=str(conf / "storage.conf"),
        CONTAINERS_REGISTRIES_CONF=str(conf / "registries.conf"),
        CONTAINERS_CONF=str(conf / "containers.conf"),
        REGISTRY_AUTH_FILE=str(conf / "auth.json"),
        TMPDIR=str(base / "tmp"),
        GNUPGHOME=str(gnupghome if gnupghome is not None else conf / "no-gnupg"),
        LC_ALL="C.UTF-8",
    )
    return env


def _write_conf(base: Path) -> None:
    conf = base / "conf"
    write_tool_conf(
        base,
        storage_conf=(
            "# tools are always given --root/--runroot/--storage-driver; this is a safety net\n"
            "[storage]\n"
            'driver = "vfs"\n'
            f'graphroot = "{conf}/unused-root"\n'
            f'runroot = "{conf}/unused-runroot"\n'
        ),
        containers_conf="# empty: built-in defaults\n",
    )


def write_tool_conf(base: Path, storage_conf: str, containers_conf: str) -> None:
    """The configuration files ``tool_env(base)`` points the tools at (under ``base/conf``)."""
    conf = base / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    (base / "tmp").mkdir(exist_ok=True)
    (conf / "registries.d").mkdir(exist_ok=True)
    (conf / "storage.conf").write_text(storage_conf)
    (conf / "registries.conf").write_text(
        'unqualified-search-registries = []\nshort-name-mode = "disabled"\n'
    )
    (conf / "containers.conf").write_text(containers_conf)
    (conf / "auth.json").write_text('{"auths": {}}\n')
    (conf / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')


class _Tools:
    """buildah/skopeo/gpg with the isolating environment and flags."""

    def __init__(self, base: Path, gnupghome: Path) -> None:
        self.base = base
        self.env = tool_env(base, gnupghome)
        self.gnupghome = gnupghome
        self.policy = base / "conf" / "policy.json"

    def buildah(self, store: Store, *args: str, policy: bool = False) -> str:
        cmd = [
            "buildah", "--root", str(store.root), "--runroot", str(store.runroot),
            "--storage-driver", store.driver,
            "--registries-conf", str(self.base / "conf" / "registries.conf"),
            args[0],
        ]  # fmt: skip
        if policy:
            cmd += ["--signature-policy", str(self.policy)]
        return _run([*cmd, *args[1:]], env=self.env)

    def skopeo(self, *args: str) -> str:
        return self.skopeo_bytes(*args).decode(errors="replace")

    def skopeo_bytes(self, *args: str) -> bytes:
        cmd = [
            "skopeo", "--policy", str(self.policy),
            "--registries.d", str(self.base / "conf" / "registries.d"),
            "--tmpdir", str(self.base / "tmp"),
            *args,
        ]  # fmt: skip
        return _run_raw(cmd, env=self.env)

    def gpg(self, *args: str, input: bytes | None = None) -> str:
        cmd = ["gpg", "--homedir", str(self.gnupghome), "--batch", "--no-tty", *args]
        return _run(cmd, env=self.env, input=input)


# --------------------------------------------------------------------------------------------
# content


def _rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _ti(
    name: str | bytes, type_: bytes = tarfile.REGTYPE, mode: int = 0o644, **kw: Any
) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(os.fsdecode(name))
    ti.type = type_
    ti.mode = mode
    ti.mtime = FIXED_MTIME
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def awkward_tar(tar_format: int = tarfile.PAX_FORMAT, trailing: bytes = b"") -> bytes:
    """The awkward layer-1 tree as a tar (PAX for ``buildah add``; GNU for the crafted layer)."""
    buf = io.BytesIO()
    opts: dict[str, Any] = {"format": tar_format, "encoding": "utf-8", "errors": "surrogateescape"}
    with tarfile.open(fileobj=buf, mode="w", **opts) as tf:
        _add_awkward_members(tf)
    return buf.getvalue() + trailing


def _add_awkward_members(tf: tarfile.TarFile) -> None:
    def d(name: str, mode: int = 0o755) -> None:
        tf.addfile(_ti(name, tarfile.DIRTYPE, mode))

    def f(name: str | bytes, data: bytes, mode: int = 0o644, **kw: Any) -> None:
        ti = _ti(name, tarfile.REGTYPE, mode, size=len(data), **kw)
        tf.addfile(ti, io.BytesIO(data))

    def other(name: str, type_: bytes, mode: int = 0o644, **kw: Any) -> None:
        tf.addfile(_ti(name, type_, mode, **kw))

    d("awkward")
    d("awkward/dir")
    d("awkward/emptydir", 0o700)
    d("awkward/sticky", 0o1777)
    d("awkward/opq")
    d("awkward/opq/sub")
    d("awkward/deep")
    d("awkward/deep/" + "d" * 120)
    d("awkward/deep/" + "d" * 120 + "/" + "e" * 120)
    f("awkward/hello.txt", b"hello, world\n")
    f("awkward/empty", b"")
    f("awkward/f512", _rand(512, 512))
    f("awkward/f1024", _rand(1024, 1024))
    f("awkward/big.bin", _rand(3, BIG_SIZE))
    f(LONG_NAME, b"a name longer than 100 bytes\n")
    f(LONG_PATH, b"a path longer than 255 bytes\n")
    for i, raw in enumerate(NON_UTF8_NAMES):
        f(raw, f"non-utf-8 name {i}\n".encode())
    f("awkward/ünï-日本.txt", b"utf-8 name\n")
    f("awkward/sp ace & <tag>.txt", b"json-escaped characters\n")
    f("awkward/new\nline\ttab\\.txt", b"control characters in the name\n")
    f("awkward/hl-target", b"hardlinked content\n")
    other("awkward/hl-link", tarfile.LNKTYPE, linkname="awkward/hl-target")
    other("awkward/dir/hl-link2", tarfile.LNKTYPE, linkname="awkward/hl-target")
    other("awkward/rel-link", tarfile.SYMTYPE, 0o777, linkname="f512")
    other("awkward/abs-link", tarfile.SYMTYPE, 0o777, linkname="/awkward/f1024")
    other("awkward/dangling", tarfile.SYMTYPE, 0o777, linkname="/does/not/exist")
    other("awkward/dir-link", tarfile.SYMTYPE, 0o777, linkname="dir")
    other("awkward/long-link", tarfile.SYMTYPE, 0o777, linkname=LONG_NAME.split("/", 1)[1])
    other("awkward/fifo", tarfile.FIFOTYPE, 0o600)
    other("awkward/chardev", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3)
    other("awkward/blockdev", tarfile.BLKTYPE, 0o660, devmajor=7, devminor=200)
    f("awkward/suid", b"#!/bin/sh\n", 0o4755)
    f("awkward/sgid", b"#!/bin/sh\n", 0o2755)
    f("awkward/mode0000", b"nobody may read this\n", 0o000)
    f("awkward/owned", b"owned by 1234:5678\n", uid=1234, gid=5678, uname="u1234", gname="g5678")
    f("awkward/biguid", b"uid above 2**21\n", uid=3_000_000, gid=3_000_001, uname="", gname="")
    f("awkward/future", b"mtime above 2**33\n", mtime=2**33 + 5)
    f("awkward/xattr.txt", b"has a user xattr\n", pax_headers={"SCHILY.xattr.user.imgfs": "hello"})
    f("awkward/gone.txt", b"deleted in layer 2\n")
    f("awkward/opq/a.txt", b"hidden by the opaque dir\n")
    f("awkward/opq/b.txt", b"hidden too\n")
    f("awkward/opq/sub/c.txt", b"and this\n")


def _layer2_ops(root: Path) -> None:
    """Changes made through the mounted working container for layer 2."""
    a = root / "awkward"
    (a / "gone.txt").unlink()  # whiteout of a lower file
    (a / "dir" / "hl-link2").unlink()  # whiteout of a lower hardlink
    shutil.rmtree(a / "opq")  # removed and recreated: opaque dir (overlay)
    (a / "opq").mkdir(mode=0o755)
    (a / "opq" / "new.txt").write_bytes(b"the only file of the recreated dir\n")
    (a / "layer2.txt").write_bytes(b"layer 2\n")
    (a / "f512").write_bytes(_rand(5120, 512))  # modified, same size
    (a / "l2-a").write_bytes(b"hardlinked in layer 2\n")
    os.link(a / "l2-a", a / "l2-b")
    os.symlink("layer2.txt", a / "l2-rel")
    os.mkfifo(a / "l2-fifo", 0o644)
    (a / "l2-empty").write_bytes(b"")


def _layer3_ops(root: Path) -> None:
    """Changes made through the mounted working container for layer 3."""
    a = root / "awkward"
    (a / "layer2.txt").unlink()  # whiteout of a layer-2 file
    os.rename(a / "hello.txt", a / "hello-renamed.txt")
    os.chmod(a / "f1024", 0o600)  # metadata-only change: copy-up


def _tar_files(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        dirs: set[str] = set()
        for name, data in sorted(files.items()):
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dname = "/".join(parts[:i])
                if dname not in dirs:
                    dirs.add(dname)
                    tf.addfile(_ti(dname, tarfile.DIRTYPE, 0o755))
            tf.addfile(_ti(name, size=len(data)), io.BytesIO(data))
    return buf.getvalue()


def _write_tree(dest: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        p = dest / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.utime(p, (FIXED_MTIME, FIXED_MTIME))


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _compress(data: bytes, algo: str, level: int = 6) -> bytes:
    if algo == "gzip":
        return gzip.compress(data, compresslevel=level, mtime=0)
    if algo == "zstd":
        try:
            import zstandard
        except ImportError:
            cmd = ["zstd", "-q", "-c", f"-{level}"]
            return _run_raw(cmd, input=data)
        out: bytes = zstandard.ZstdCompressor(level=level).compress(data)
        return out
    raise ValueError(algo)


def _jdump(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _host_arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(m, m)


def _other_arch() -> str:
    return "arm64" if _host_arch() != "arm64" else "amd64"


class _OciLayout:
    """A minimal OCI image layout written by hand (the importable source for skopeo)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.index: list[dict[str, Any]] = []

    def blob(self, data: bytes) -> dict[str, Any]:
        digest = _sha(data)
        (self.path / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(data)
        return {"digest": digest, "size": len(data)}

    def image(self, config: dict[str, Any], layers: list[tuple[bytes, str]]) -> tuple[bytes, bytes]:
        """Write config + layers (data, media type); return (manifest bytes, config bytes)."""
        cfg = _jdump(config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, **self.blob(cfg)},
            "layers": [{"mediaType": mt, **self.blob(data)} for data, mt in layers],
        }
        raw = _jdump(manifest)
        self.blob(raw)
        return raw, cfg

    def tag(self, tag: str, raw: bytes, media_type: str = OCI_MANIFEST) -> None:
        self.index.append({
            "mediaType": media_type, "digest": _sha(raw), "size": len(raw),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        })  # fmt: skip
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.index}
        (self.path / "index.json").write_bytes(_jdump(index))


def _config(arch: str, label: str, diff_ids: list[str]) -> dict[str, Any]:
    return {
        "created": "2024-01-02T03:04:05Z",
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin"], "Labels": {"org.imgfs.kind": label}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-02T03:04:05Z", "created_by": f"imgfs realstores {label}"}],
    }


# --------------------------------------------------------------------------------------------
# the build


@dataclass
class _Pending:
    """An image built but not yet described (oracle export etc. happens at the end)."""

    kind: str
    name: str | None
    expected_names: list[str]
    image_id: str | None = None
    expected_signatures: list[bytes] | None = None  # when skopeo's export cannot show them
    list_digest: str | None = None
    other_manifests: dict[str, bytes] = field(default_factory=dict)
    crafted_tar: Path | None = None
    notes: str = ""
    export_may_fail: bool = False  # skopeo is known to refuse the dir: export


def _build(base: Path, isolated: bool) -> None:
    global _log_path
    _log_path = base / "build.log"
    if isolated:
        _isolate_var_lib_containers()
    _write_conf(base)
    started = time.monotonic()
    stores = {
        d: Store(d, base / "stores" / d / "root", base / "stores" / d / "runroot") for d in DRIVERS
    }
    # GPG home: short path (agent socket), removed after the build.
    gnupghome = Path(tempfile.mkdtemp(prefix="imgfs-gpg-", dir="/tmp"))
    try:
        tools = _Tools(base, gnupghome)
        fingerprints = _make_gpg_keys(tools, base)
        with ThreadPoolExecutor(max_workers=len(stores)) as pool:
            futures = {
                d: pool.submit(_StoreBuilder(tools, base, s, fingerprints).run)
                for d, s in stores.items()
            }
            images = {d: fut.result() for d, fut in futures.items()}
        versions = {
            "buildah": _run(["buildah", "--version"]).strip(),
            "skopeo": _run(["skopeo", "--version"]).strip(),
            "gpg": _run(["gpg", "--version"]).splitlines()[0],
        }
    finally:
        with contextlib.suppress(Exception):
            _run(
                ["gpgconf", "--homedir", str(gnupghome), "--kill", "all"],
                env=tool_env(base, gnupghome),
            )
        shutil.rmtree(gnupghome, ignore_errors=True)
    shutil.rmtree(base / "tmp", ignore_errors=True)
    (base / "tmp").mkdir()
    ss = StoreSet(
        base=base,
        stores=stores,
        images=images,
        gpg_fingerprints=fingerprints,
        gpg_public_keys=base / "gpg-public-keys.asc",
        tool_versions=versions,
        build_seconds=round(time.monotonic() - started, 2),
        isolated=isolated,
        notes=[]
        if isolated
        else ["not isolated: c/image's blob-info cache under /var/lib/containers was used"],
    )
    (base / STORESET_JSON).write_text(json.dumps(_storeset_to_json(ss), indent=1))


def _make_gpg_keys(tools: _Tools, base: Path) -> list[str]:
    fprs: list[str] = []
    for i in (1, 2):
        uid = f"imgfs test key {i} <key{i}@imgfs.invalid>"
        tools.gpg(
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            "--quick-gen-key",
            uid,
            "ed25519",
            "sign",
            "never",
        )
    for line in tools.gpg("--with-colons", "--list-secret-keys").splitlines():
        if line.startswith("fpr:"):
            fprs.append(line.split(":")[9])
    if len(fprs) != 2:
        raise RuntimeError(f"expected 2 gpg keys, found {fprs}")
    (base / "gpg-public-keys.asc").write_text(tools.gpg("--armor", "--export", *fprs))
    return fprs


class _StoreBuilder:
    """Builds every image of one store; ``run()`` returns them described."""

    def __init__(self, tools: _Tools, base: Path, store: Store, fprs: list[str]) -> None:
        self.tools = tools
        self.base = base
        self.store = store
        self.fprs = fprs
        self.work = base / "work" / store.driver
        self.pending: list[_Pending] = []
        self.layout: _OciLayout
        self.awkward_id = ""

    def run(self) -> list[Image]:
        self.work.mkdir(parents=True)
        self.store.root.mkdir(parents=True)
        self.store.runroot.mkdir(parents=True)
        self.layout = _OciLayout(self.work / "oci")
        self.tiny()
        self.awkward()
        self.untagged()
        self.variants()
        self.reimport()
        self.signed()
        self.fromlist()
        self.crafted()
        self.schema1()
        self.mylist()
        images = [_describe(self.tools, self.base, self.store, p) for p in self.pending]
        # inputs no longer needed (~20 MiB); crafted-layer.tar and the *-pre dirs stay
        shutil.rmtree(self.layout.path)
        for exported in self.work.glob("*-dir"):
            shutil.rmtree(exported)
        return images

    # helpers ----------------------------------------------------------------------------------

    def add(self, kind: str, name: str | None, **kw: Any) -> None:
        names = kw.pop("names", [name] if name else [])
        self.pending.append(_Pending(kind, name, names, **kw))

    def buildah(self, *args: str, policy: bool = False) -> str:
        return self.tools.buildah(self.store, *args, policy=policy)

    def from_(self, image: str) -> str:
        out = self.buildah("from", "--pull=never", "-q", image, policy=True)
        return out.strip().splitlines()[-1]

    def commit(self, ctr: str, name: str | None) -> str:
        out = self.buildah("commit", "-q", "--rm", ctr, *([name] if name else []), policy=True)
        image_id = out.strip().splitlines()[-1].strip().removeprefix("sha256:")
        if len(image_id) != 64:
            raise RuntimeError(f"unexpected buildah commit output: {out!r}")
        return image_id

    def mount_and(self, ctr: str, ops: Callable[[Path], None]) -> None:
        """Change the working container's files directly, as ``RUN`` would."""
        mountpoint = Path(self.buildah("mount", ctr).strip().splitlines()[-1])
        try:
            ops(mountpoint)
        finally:
            self.buildah("umount", ctr)

    def from_scratch(self, kind: str, files: dict[str, bytes], *config: str) -> str:
        """A one-layer buildah image of *files*; returns the working container."""
        src = self.work / f"{kind}-src"
        _write_tree(src, files)
        ctr = self.from_("scratch")
        self.buildah("copy", "-q", ctr, str(src), "/")
        self.buildah("config", "--label", f"org.imgfs.kind={kind}", *config, ctr)
        return ctr

    def skopeo_copy(self, src: str, dest: str, *flags: str) -> None:
        self.tools.skopeo("copy", "-q", *flags, src, dest)

    def oci(self, tag: str) -> str:
        return f"oci:{self.layout.path}:{tag}"

    # images -----------------------------------------------------------------------------------

    def tiny(self) -> None:
        files = {"hello.txt": b"hello from tiny\n", "etc/motd": b"tiny\n", "bin/.keep": b""}
        ctr = self.from_scratch("tiny", files, "--env", "TINY=1", "--cmd", "/hello.txt")
        self.commit(ctr, "localhost/tiny:v1")
        self.add("tiny", "localhost/tiny:v1")

    def awkward(self) -> None:
        l1 = self.work / "awkward-layer1.tar"
        l1.write_bytes(awkward_tar())
        ctr = self.from_("scratch")
        self.buildah("add", "-q", ctr, str(l1), "/")
        self.buildah("config", "--label", "org.imgfs.kind=awkward", "--env", "STAGE=1", ctr)
        self.commit(ctr, "localhost/awkward:stage1")
        self.add("awkward-stage1", "localhost/awkward:stage1")

        ctr = self.from_("localhost/awkward:stage1")
        self.mount_and(ctr, _layer2_ops)
        self.buildah("config", "--env", "STAGE=2", ctr)
        self.commit(ctr, "localhost/awkward:stage2")
        self.add("awkward-stage2", "localhost/awkward:stage2")

        l3 = self.work / "awkward-layer3"
        _write_tree(l3, {"a.txt": b"layer 3\n", "exact1024": _rand(31024, 1024), "sub/b": b"b\n"})
        ctr = self.from_("localhost/awkward:stage2")
        self.buildah("copy", "-q", ctr, str(l3), "/awkward/l3/")
        self.mount_and(ctr, _layer3_ops)
        self.buildah("config", "--env", "STAGE=3", "--label", "org.imgfs.layers=3", ctr)
        self.awkward_id = self.commit(ctr, "localhost/awkward:v1")
        self.add("awkward", "localhost/awkward:v1")

    def untagged(self) -> None:
        text = f"untagged image in the {self.store.driver} store\n".encode()
        image_id = self.commit(self.from_scratch("untagged", {"untagged.txt": text}), None)
        self.add("untagged", None, names=[], image_id=image_id)

    def _export(self, name: str) -> tuple[bytes, dict[str, Any], list[bytes]]:
        """dir: export of *name* -> (manifest bytes, config, uncompressed layers)."""
        out = self.work / (name.replace("/", "_").replace(":", "_") + "-dir")
        self.skopeo_copy(self.store.ref(name), f"dir:{out}")
        raw = (out / "manifest.json").read_bytes()
        manifest = json.loads(raw)
        config = json.loads((out / _hex(manifest["config"]["digest"])).read_bytes())
        layers = [(out / _hex(ly["digest"])).read_bytes() for ly in manifest["layers"]]
        return raw, config, layers

    def variants(self) -> None:
        """awkward:v1's layers again, compressed, on top of a marker layer.

        The marker layer gives the awkward layers new chain IDs, so the store keeps them as NEW
        layer records (compression 2/4, compressed digests) with the same diff-digests as
        awkward:v1's, instead of reusing awkward:v1's records. v2s2 gets its own gzip bytes
        (level 9): with awkward-gzip's blobs c/image would build its layers from those (records
        with compression 0 but a gzip compressed-diff-digest).
        """
        _, config, layers = self._export("localhost/awkward:v1")
        for kind, algo, level, fmt in (
            ("awkward-gzip", "gzip", 6, ()),
            ("awkward-zstd", "zstd", 3, ()),
            ("awkward-v2s2", "gzip", 9, ("--format", "v2s2")),
        ):
            marker = _tar_files({"variant.txt": kind.encode() + b"\n"})
            cfg = json.loads(json.dumps(config))
            cfg["config"]["Labels"] = (cfg["config"].get("Labels") or {}) | {
                "org.imgfs.variant": kind
            }
            cfg["rootfs"]["diff_ids"] = [_sha(marker), *cfg["rootfs"]["diff_ids"]]
            history = {"created": cfg.get("created", ""), "created_by": f"marker {kind}"}
            cfg["history"] = [history, *cfg.get("history", [])]
            blobs = [_compress(b, algo, level) for b in [marker, *layers]]
            raw, _ = self.layout.image(cfg, [(b, f"{OCI_LAYER}+{algo}") for b in blobs])
            self.layout.tag(kind, raw)
            name = "localhost/awkward:" + kind.split("-")[1]
            self.skopeo_copy(self.oci(kind), self.store.ref(name), *fmt)
            self.add(kind, name)

    def reimport(self) -> None:
        """A buildah image, then the SAME config again with a gzip layer under another name."""
        ctr = self.from_scratch("reimport", {"reimport.txt": b"stored twice\n"})
        self.commit(ctr, "localhost/reimport:v1")
        manifest_raw, config, (layer,) = self._export("localhost/reimport:v1")
        raw, _ = self.layout.image(config, [(_compress(layer, "gzip"), OCI_LAYER + "+gzip")])
        self.layout.tag("reimport-gzip", raw)
        self.skopeo_copy(self.oci("reimport-gzip"), self.store.ref("localhost/reimport:gzip"))
        self.add(
            "reimport-shared", "localhost/reimport:gzip",
            names=["localhost/reimport:gzip", "localhost/reimport:v1"],
            other_manifests={_sha(manifest_raw): manifest_raw},
            notes="same config re-imported gzip-compressed: one record, manifest = the gzip one",
        )  # fmt: skip

    def signed(self) -> None:
        arch = _host_arch()
        layer = _tar_files({"signed/payload.txt": b"signed content\n", "signed/x": b"x" * 700})
        raw, _ = self.layout.image(_config(arch, "signed", [_sha(layer)]), [(layer, OCI_LAYER)])
        self.layout.tag("signed", raw)
        pre = self.work / "signed-pre"
        # signature 1 is made into a dir: copy (needs --sign-identity), 2 on import into the store
        sign1 = ("--sign-by", self.fprs[0], "--sign-identity", "localhost/signed:v1")
        self.skopeo_copy(self.oci("signed"), f"dir:{pre}", *sign1)
        sign2 = ("--sign-by", self.fprs[1])
        self.skopeo_copy(f"dir:{pre}", self.store.ref("localhost/signed:v1"), *sign2)
        self.add("signed", "localhost/signed:v1", notes="signature 1 by key 1, 2 by key 2")

        layer = _tar_files({"signed/payload.txt": b"signed, gzip-compressed\n"})
        raw, _ = self.layout.image(
            _config(arch, "signed-gzip", [_sha(layer)]),
            [(_compress(layer, "gzip"), OCI_LAYER + "+gzip")],
        )
        self.layout.tag("signed-gzip", raw)
        pre = self.work / "signed-gzip-pre"
        sign1 = ("--sign-by", self.fprs[0], "--sign-identity", "localhost/signed:gzip")
        self.skopeo_copy(self.oci("signed-gzip"), f"dir:{pre}", *sign1)
        self.skopeo_copy(f"dir:{pre}", self.store.ref("localhost/signed:gzip"))
        self.add(
            "signed-gzip", "localhost/signed:gzip",
            expected_signatures=_dir_signatures(pre), export_may_fail=True,
            notes="gzip layers + signature: expected_signatures come from the dir: copy imported",
        )  # fmt: skip

    def fromlist(self) -> None:
        entries = []
        for arch in (_host_arch(), _other_arch()):
            layer = _tar_files({f"platform/{arch}.txt": f"built for {arch}\n".encode()})
            raw, _ = self.layout.image(
                _config(arch, f"fromlist-{arch}", [_sha(layer)]),
                [(_compress(layer, "gzip"), OCI_LAYER + "+gzip")],
            )
            entries.append({
                "mediaType": OCI_MANIFEST, "digest": _sha(raw), "size": len(raw),
                "platform": {"architecture": arch, "os": "linux"},
            })  # fmt: skip
        list_raw = _jdump({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
        self.layout.blob(list_raw)
        self.layout.tag("fromlist", list_raw, OCI_INDEX)
        self.skopeo_copy(self.oci("fromlist"), self.store.ref("localhost/fromlist:v1"))
        self.add(
            "fromlist", "localhost/fromlist:v1",
            list_digest=_sha(list_raw), other_manifests={_sha(list_raw): list_raw},
            notes=f"{_host_arch()} instance of an OCI index ({_host_arch()}, {_other_arch()})",
        )  # fmt: skip

    def crafted(self) -> None:
        """One uncompressed layer whose exact bytes are made here (GNU tar, trailing bytes)."""
        data = awkward_tar(tarfile.GNU_FORMAT, b"\0" * 512 + b"trailing garbage after the end\n")
        path = self.work / "crafted-layer.tar"
        path.write_bytes(data)
        config = _config(_host_arch(), "crafted", [_sha(data)])
        raw, _ = self.layout.image(config, [(data, OCI_LAYER)])
        self.layout.tag("crafted", raw)
        self.skopeo_copy(self.oci("crafted"), self.store.ref("localhost/crafted:v1"))
        notes = "GNU-format tar, 10240-byte blocking, trailing bytes after the end"
        self.add("crafted", "localhost/crafted:v1", crafted_tar=path, notes=notes)

    def schema1(self) -> None:
        """A signed Docker schema 1 image with throwaway entries, converted by skopeo.

        The conversion goes through dir: (a direct ``--format v2s1`` import into the store left,
        when tried, an image with 3 physical layers for 2 real ones that skopeo could not
        export); the dir: copy then goes into the store unchanged, signed with a random key.
        """
        l1 = _tar_files({"schema1/one.txt": b"schema1 layer one\n", "schema1/keep": b"1\n"})
        l2 = _tar_files({"schema1/two.txt": b"schema1 layer two\n"})
        config = _config(_host_arch(), "schema1", [_sha(l1), _sha(l2)])
        steps = [("ADD one", False), ("ENV x", True), ("LABEL y", True), ("ADD two", False)]
        steps.append(("CMD", True))  # the top entry is a throwaway one too
        config["history"] = [
            {"created": config["created"], "created_by": f"schema1 {step}"}
            | ({"empty_layer": True} if empty else {})
            for step, empty in steps
        ]
        raw, _ = self.layout.image(config, [(l1, OCI_LAYER), (l2, OCI_LAYER)])
        self.layout.tag("schema1", raw)
        converted = self.work / "schema1-dir"
        self.skopeo_copy(self.oci("schema1"), f"dir:{converted}", "--format", "v2s1")
        self.skopeo_copy(f"dir:{converted}", self.store.ref("localhost/schema1:v1"))
        stored = json.loads(
            self.tools.skopeo_bytes("inspect", "--raw", self.store.ref("localhost/schema1:v1"))
        )
        if stored.get("schemaVersion") != 1 or not stored.get("signatures"):
            raise RuntimeError("schema1: the store does not hold a signed schema 1 manifest")
        if _schema1_throwaway(stored) != [empty for _, empty in steps]:
            raise RuntimeError("schema1: the stored manifest lost the throwaway entries")
        notes = "signed schema1; fsLayers top first: empty, two, empty, empty, one"
        self.add("schema1", "localhost/schema1:v1", notes=notes)

    def mylist(self) -> None:
        self.buildah("manifest", "create", "localhost/mylist:v1")
        self.buildah("manifest", "add", "localhost/mylist:v1", self.store.ref("localhost/tiny:v1"))
        self.buildah(
            "manifest", "add", "--arch", _other_arch(), "--os", "linux",
            "localhost/mylist:v1", self.store.ref(self.awkward_id),
        )  # fmt: skip
        notes = (
            f"instances: tiny:v1 (added by name), awkward:v1 (added by image ID, platform"
            f" overridden to {_other_arch()}); instances.json keeps those reference strings"
        )
        self.add("mylist", "localhost/mylist:v1", export_may_fail=True, notes=notes)


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def _schema1_throwaway(manifest: dict[str, Any]) -> list[bool]:
    """Per schema1 history entry, bottom first: whether it is ``throwaway`` (an empty layer)."""
    return [
        json.loads(h["v1Compatibility"]).get("throwaway") is True
        for h in reversed(manifest["history"])
    ]


def _schema1_layers(manifest: dict[str, Any]) -> list[str]:
    """The blobSums of a schema1 manifest's real (non-throwaway) layers, bottom first."""
    blobs = [ly["blobSum"] for ly in reversed(manifest["fsLayers"])]
    empty = _schema1_throwaway(manifest)
    return [b for b, e in zip(blobs, empty, strict=True) if not e]


def _dir_signatures(path: Path) -> list[bytes]:
    sigs: list[bytes] = []
    i = 1
    while (path / f"signature-{i}").exists():
        sigs.append((path / f"signature-{i}").read_bytes())
        i += 1
    return sigs


def _describe(tools: _Tools, base: Path, store: Store, p: _Pending) -> Image:
    records = images_json(store)
    if p.image_id is not None:
        matches = [r for r in records if r["id"] == p.image_id]
    else:
        matches = [r for r in records if p.name in (r.get("names") or [])]
    if len(matches) != 1:
        raise RuntimeError(
            f"{store.driver}/{p.kind}: {len(matches)} records for {p.name or p.image_id}"
        )
    rec = matches[0]
    image_id: str = rec["id"]
    names: list[str] = list(rec.get("names") or [])
    if sorted(names) != sorted(p.expected_names):
        raise RuntimeError(f"{store.driver}/{p.kind}: names {names}, expected {p.expected_names}")
    ref = p.name if p.name else image_id
    inspect_raw = tools.skopeo_bytes("inspect", "--raw", store.ref(ref))
    manifest = json.loads(inspect_raw)
    config_digest: str | None = (manifest.get("config") or {}).get("digest")

    oracle: Path | None = base / "oracle" / store.driver / p.kind
    assert oracle is not None
    oracle.parent.mkdir(parents=True, exist_ok=True)
    flags: list[str] = []
    note: str | None = None
    try:
        tools.skopeo("copy", "-q", store.ref(ref), f"dir:{oracle}")
    except ToolError as e:
        if not p.export_may_fail:
            raise
        note = _last_error_line(e.stderr)
        shutil.rmtree(oracle, ignore_errors=True)
        if "invalidate signatures" in e.stderr:
            flags = ["--remove-signatures"]
            tools.skopeo("copy", "-q", *flags, store.ref(ref), f"dir:{oracle}")
        else:
            oracle = None

    config_raw: bytes | None = None
    if config_digest is not None:
        if oracle is not None:
            config_raw = (oracle / config_digest.split(":")[1]).read_bytes()
        else:
            config_raw = tools.skopeo_bytes("inspect", "--raw", "--config", store.ref(ref))
    diff_ids: list[str] = []
    if config_raw is not None:
        diff_ids = list(json.loads(config_raw).get("rootfs", {}).get("diff_ids") or [])
    elif manifest.get("schemaVersion") == 1:
        diff_ids = _schema1_layers(manifest)

    if p.expected_signatures is not None:
        sigs = p.expected_signatures
    elif oracle is not None and not flags:
        sigs = _dir_signatures(oracle)
    else:
        sigs = []
    return Image(
        driver=store.driver, kind=p.kind, name=p.name, names=names, id=image_id,
        manifest_digest=rec["big-data-digests"]["manifest"], inspect_raw=inspect_raw,
        config_digest=config_digest, config_raw=config_raw, diff_ids=diff_ids,
        oracle_dir=oracle, oracle_flags=flags, oracle_note=note, expected_signatures=sigs,
        list_digest=p.list_digest, other_manifests=p.other_manifests,
        crafted_tar=p.crafted_tar, notes=p.notes,
    )  # fmt: skip


def _last_error_line(stderr: str) -> str:
    """The message of the tool's last log line (``time=... level=fatal msg="..."``)."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    if not lines:
        return "(no message)"
    line = lines[-1]
    if ' msg="' in line and line.endswith('"'):
        with contextlib.suppress(ValueError):
            msg = json.loads(line[line.index(' msg="') + 5 :])
            if isinstance(msg, str):
                return msg
    return line


# --------------------------------------------------------------------------------------------
# (de)serialisation of the StoreSet (storeset.json; paths relative to base, bytes as base64)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _rel(base: Path, p: Path | None) -> str | None:
    return None if p is None else os.path.relpath(p, base)


def _storeset_to_json(ss: StoreSet) -> dict[str, Any]:
    def image(img: Image) -> dict[str, Any]:
        out = dataclasses.asdict(img)
        out["inspect_raw"] = _b64(img.inspect_raw)
        out["config_raw"] = None if img.config_raw is None else _b64(img.config_raw)
        out["expected_signatures"] = [_b64(s) for s in img.expected_signatures]
        out["other_manifests"] = {k: _b64(v) for k, v in img.other_manifests.items()}
        out["oracle_dir"] = _rel(ss.base, img.oracle_dir)
        out["crafted_tar"] = _rel(ss.base, img.crafted_tar)
        return out

    return {
        "format": FORMAT_VERSION,
        "stores": {
            d: {
                "driver": s.driver,
                "root": _rel(ss.base, s.root),
                "runroot": _rel(ss.base, s.runroot),
            }
            for d, s in ss.stores.items()
        },
        "images": {d: [image(i) for i in imgs] for d, imgs in ss.images.items()},
        "gpg_fingerprints": ss.gpg_fingerprints,
        "gpg_public_keys": _rel(ss.base, ss.gpg_public_keys),
        "tool_versions": ss.tool_versions,
        "build_seconds": ss.build_seconds,
        "isolated": ss.isolated,
        "notes": ss.notes,
    }


def _storeset_from_json(base: Path, meta: dict[str, Any]) -> StoreSet:
    def path(v: str | None) -> Path | None:
        return None if v is None else base / v

    def image(o: dict[str, Any]) -> Image:
        o = dict(o)
        o["inspect_raw"] = base64.b64decode(o["inspect_raw"])
        o["config_raw"] = None if o["config_raw"] is None else base64.b64decode(o["config_raw"])
        o["expected_signatures"] = [base64.b64decode(s) for s in o["expected_signatures"]]
        o["other_manifests"] = {k: base64.b64decode(v) for k, v in o["other_manifests"].items()}
        o["oracle_dir"] = path(o["oracle_dir"])
        o["crafted_tar"] = path(o["crafted_tar"])
        return Image(**o)

    stores = {
        d: Store(s["driver"], base / s["root"], base / s["runroot"])
        for d, s in meta["stores"].items()
    }
    return StoreSet(
        base=base,
        stores=stores,
        images={d: [image(o) for o in imgs] for d, imgs in meta["images"].items()},
        gpg_fingerprints=list(meta["gpg_fingerprints"]),
        gpg_public_keys=path(meta["gpg_public_keys"]),
        tool_versions=dict(meta["tool_versions"]),
        build_seconds=float(meta["build_seconds"]),
        isolated=bool(meta["isolated"]),
        notes=list(meta["notes"]),
    )


# --------------------------------------------------------------------------------------------


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--inner":
        _build(Path(argv[1]), isolated=True)
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python3 tests/realstores.py DIR", file=sys.stderr)
        return 2
    started = time.monotonic()
    ss = build_stores(Path(argv[0]))
    took = time.monotonic() - started
    print(f"stores in {ss.base} (built in {ss.build_seconds:.1f}s; this call {took:.1f}s)")
    for img in ss.all_images():
        oracle = (
            "dir: "
            + ("ok" if img.oracle_dir else "none")
            + (f" {img.oracle_flags}" if img.oracle_flags else "")
        )
        names = ",".join(img.names) or "<none>"
        print(f"  {img.driver:8} {img.kind:16} {img.id[:12]} {names:48} {oracle}")
        if img.oracle_note:
            print(f"  {'':8} {'':16} skopeo: {img.oracle_note}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
