"""TEST-ONLY: stores written by podman 5 (Debian 13's podman 5.4 / buildah 1.39 / skopeo 1.18).

``build_podman5_stores(base)`` runs the trixie root's tools (``tests/trixie.py``) against stores
under *base* and records, per image, what podman 5's own skopeo reports: ``skopeo inspect
--raw`` and a ``skopeo copy containers-storage:[overlay@graph+run]IMG dir:`` export (the
oracle). Stores (all overlay):

==============  ============================================================================
store           how it is made
==============  ============================================================================
src             buildah from scratch: ``p5:base`` (1 layer: a 3 MiB file, duplicate contents,
                an empty file, a hardlink, symlinks, modes) and ``p5:two`` (+ a layer made
                through ``buildah mount``: a deleted file (whiteout), a new and a changed file)
partial         ``enable_partial_images``: ``p5:two`` pushed as zstd:chunked to the loopback
                registry and pulled back partially (``toc-digest``, ``zstd-chunked-manifest``
                big data, a generated tar-split), and its gzip push pulled normally
convert         ``enable_partial_images`` + ``convert_images``: the gzip push pulled and
                converted to zstd:chunked while pulling
unpredictable   ``insecure_allow_unpredictable_image_contents``: the zstd:chunked push pulled
                partially without computing the uncompressed digest (empty ``diff-digest``,
                ``expected-layer-diffid`` set by c/image), tar-split kept
imagestore      ``imagestore`` set: the zstd:chunked push pulled partially, images and layers
                under the image store, tar-splits under the graph root
idmapped        the gzip push pulled, then ID-mapped copies of its top layer made the way
                c/storage makes them when idmapped mounts are not used
                (``_CONTAINERS_OVERLAY_DISABLE_IDMAP=yes``): ``podman create --uidmap`` and
                ``buildah from --userns-uid-map`` (two mappings). Each copy is a new layer with
                the top layer's parent and digests and a copy of its tar-split, ``uidmap``/
                ``gidmap`` in layers.json, listed in the image's ``mapped-layers``; its overlay
                ``lower`` names the template layer, ``diff1`` holds the chowned copy-ups of the
                whole tree and ``diff`` is empty (drivers/overlay ``UpdateLayerIDMap``). The
                podman container, changed through ``podman mount``, committed as ``p5:mapcommit``
forcemask       ``force_mask = "0700"`` (overlay option): the gzip push pulled (pkg/archive);
                every file and directory is stored with mode 0700 (devices and FIFOs as
                regular files) and the real owner, mode and type in the
                ``user.containers.override_stat`` xattr
forcemask-zc    the same, the zstd:chunked push pulled partially (pkg/chunked's force_mask)
==============  ============================================================================

The second layer of ``p5:two`` also holds what stored modes and types lose: a file of mode 0000
owned by 1234:5678, a directory of mode 0000 with a file in it, a FIFO, a character device and
a setuid file.

The registry is Debian's ``docker-registry`` in the root, on 127.0.0.1 and a free port, plain
HTTP; it is stopped (by its pid) before this returns. A complete build ends with ``.complete``
(the sha256 of this file and of tests/trixie.py); ``IMGFS_PODMAN5_STORES`` keeps one between
runs. Must not know: imgfs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.trixie import Chroot, trixie_root

ENV_STORES = "IMGFS_PODMAN5_STORES"
STORES = (
    "src",
    "partial",
    "convert",
    "unpredictable",
    "imagestore",
    "idmapped",
    "forcemask",
    "forcemask-zc",
)
_PULL_OPTIONS = {
    "partial": {"enable_partial_images": "true"},
    "convert": {"enable_partial_images": "true", "convert_images": "true"},
    "unpredictable": {
        "enable_partial_images": "true",
        "insecure_allow_unpredictable_image_contents": "true",
    },
    "imagestore": {"enable_partial_images": "true"},
    "forcemask-zc": {"enable_partial_images": "true"},
}
_OVERLAY_OPTIONS = {name: {"force_mask": "0700"} for name in ("forcemask", "forcemask-zc")}
# The ID mappings of the ID-mapped copies (container ID 0 -> host ID, 65536 IDs).
ID_MAPS = (100000, 200000)
# store -> [(pulled from, local name)]
_PULLS = {
    "partial": [("p5:zc", "zc"), ("p5:gz", "gz")],
    "convert": [("p5:gz", "gz")],
    "unpredictable": [("p5:zc", "zc")],
    "imagestore": [("p5:zc", "zc")],
    "idmapped": [("p5:gz", "gz")],
    "forcemask": [("p5:gz", "gz")],
    "forcemask-zc": [("p5:zc", "zc")],
}
# c/storage makes ID-mapped copies only where it does not use idmapped mounts (drivers/overlay)
_NO_IDMAPPED_MOUNTS = {"_CONTAINERS_OVERLAY_DISABLE_IDMAP": "yes"}


@dataclass(frozen=True)
class P5Store:
    name: str
    graphroot: Path
    runroot: Path
    imagestore: Path | None
    storage_conf: Path


@dataclass(frozen=True)
class P5Image:
    store: str
    ref: str  # the name in the store
    id: str
    raw_manifest: bytes  # skopeo inspect --raw
    export: Path  # skopeo copy ... dir:
    diff_ids: tuple[str, ...]


@dataclass(frozen=True)
class P5Stores:
    base: Path
    stores: dict[str, P5Store]
    images: list[P5Image]
    versions: str
    build_seconds: float

    def image(self, store: str, ref: str) -> P5Image:
        return next(i for i in self.images if i.store == store and i.ref == ref)


def stores_dir_from_env() -> Path | None:
    value = os.environ.get(ENV_STORES, "").strip()
    return Path(value) if value else None


def _source_hash() -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update((Path(__file__).parent / "trixie.py").read_bytes())
    return h.hexdigest()


def build_podman5_stores(base: Path) -> P5Stores:
    """Build (or load a complete earlier build of) the podman 5 stores under *base*."""
    base = Path(os.path.abspath(base))
    base.mkdir(parents=True, exist_ok=True)
    marker = base / ".complete"
    if marker.is_file() and marker.read_text().strip() == _source_hash():
        return _load(base)
    root = trixie_root()
    for p in base.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    started = time.monotonic()
    _Builder(root, base).build()
    meta = json.loads((base / "p5.json").read_text())
    meta["build_seconds"] = round(time.monotonic() - started, 1)
    (base / "p5.json").write_text(json.dumps(meta, indent=1))
    marker.write_text(_source_hash() + "\n")
    return _load(base)


def _load(base: Path) -> P5Stores:
    meta = json.loads((base / "p5.json").read_text())
    stores = {name: _store(base, name) for name in STORES}
    images = [
        P5Image(
            store=i["store"],
            ref=i["ref"],
            id=i["id"],
            raw_manifest=(base / i["raw"]).read_bytes(),
            export=base / i["export"],
            diff_ids=tuple(i["diff_ids"]),
        )
        for i in meta["images"]
    ]
    return P5Stores(base, stores, images, meta["versions"], meta.get("build_seconds", 0.0))


def _store(base: Path, name: str) -> P5Store:
    top = base / "stores" / name
    return P5Store(
        name,
        top / "graph",
        top / "run",
        top / "images" if name == "imagestore" else None,
        top / "storage.conf",
    )


class _Builder:
    def __init__(self, root: Path, base: Path) -> None:
        self.base = base
        self.ch = Chroot(root, base)
        self.port = 0
        self.registry: subprocess.Popen[bytes] | None = None
        self.images: list[dict[str, object]] = []

    def build(self) -> None:
        self._write_common()
        for name in STORES:
            self._write_storage_conf(name)
        self._make_src()
        self._start_registry()
        try:
            self._push()
            for name, pulls in _PULLS.items():
                for remote, local in pulls:
                    self._pull(name, remote, local)
        finally:
            self._stop_registry()
        self._map_copies()
        for name, refs in {"src": ["p5:base", "p5:two"], **_local_refs()}.items():
            for ref in refs:
                self._describe(name, ref)
        versions = self.ch.run(["sh", "-c", "podman --version; buildah --version; "
                                "skopeo --version"])  # fmt: skip
        meta = {"images": self.images, "versions": versions}
        (self.base / "p5.json").write_text(json.dumps(meta, indent=1))

    # --- configuration ---------------------------------------------------------------------

    def _write_common(self) -> None:
        (self.base / "tmp").mkdir()
        (self.base / "policy.json").write_text(
            '{"default": [{"type": "insecureAcceptAnything"}]}\n'
        )
        (self.base / "containers.conf").write_text(
            '[engine]\nevents_logger = "none"\n[containers]\nlog_driver = "k8s-file"\n'
        )

    def _write_registries(self) -> None:
        (self.base / "registries.conf").write_text(
            "unqualified-search-registries = []\n"
            f'[[registry]]\nlocation = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def _write_storage_conf(self, name: str) -> None:
        st = _store(self.base, name)
        st.graphroot.mkdir(parents=True)
        st.runroot.mkdir(parents=True)
        lines = [
            "[storage]",
            'driver = "overlay"',
            f'graphroot = "{self.ch.inner(st.graphroot)}"',
            f'runroot = "{self.ch.inner(st.runroot)}"',
        ]
        if st.imagestore is not None:
            st.imagestore.mkdir(parents=True)
            lines.append(f'imagestore = "{self.ch.inner(st.imagestore)}"')
        lines += ["[storage.options]", "[storage.options.pull_options]"]
        lines += [f'{k} = "{v}"' for k, v in _PULL_OPTIONS.get(name, {}).items()]
        if name in _OVERLAY_OPTIONS:
            lines.append("[storage.options.overlay]")
            lines += [f'{k} = "{v}"' for k, v in _OVERLAY_OPTIONS[name].items()]
        st.storage_conf.write_text("\n".join(lines) + "\n")

    def _env(self, store: str) -> dict[str, str]:
        return {
            "CONTAINERS_STORAGE_CONF": self.ch.inner(_store(self.base, store).storage_conf),
            "CONTAINERS_REGISTRIES_CONF": "/w/registries.conf",
            "CONTAINERS_CONF": "/w/containers.conf",
            "TMPDIR": "/w/tmp",
        }

    def _tool(self, store: str, *cmd: str, env: dict[str, str] | None = None) -> str:
        return self.ch.run(list(cmd), env={**self._env(store), **(env or {})}, timeout=600)

    # --- the source images -----------------------------------------------------------------

    def _make_src(self) -> None:
        ctx = self.base / "ctx"
        _write_context(ctx)
        (self.base / "layer2.sh").write_text(_LAYER2)
        self._tool(
            "src", "sh", "-ec",
            "c=$(buildah from scratch); buildah copy $c /w/ctx/ /; "
            "buildah config --label org.imgfs.test=p5 --env PATH=/bin $c; "
            "buildah commit --rm $c localhost/p5:base; "
            "c=$(buildah from localhost/p5:base); m=$(buildah mount $c); sh /w/layer2.sh $m; "
            "buildah umount $c; buildah commit --rm $c localhost/p5:two",
        )  # fmt: skip

    # --- registry --------------------------------------------------------------------------

    def _start_registry(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._write_registries()
        reg = self.base / "registry"
        (reg / "data").mkdir(parents=True)
        (reg / "config.yml").write_text(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
            "    rootdirectory: /w/registry/data\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n"
        )
        self.registry = self.ch.start(
            ["docker-registry", "serve", "/w/registry/config.yml"], reg / "log"
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/", timeout=2):
                    return
            except OSError as exc:
                if self.registry.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"registry did not start: {exc}; {(reg / 'log').read_text()[-500:]}"
                    ) from exc
                time.sleep(0.2)

    def _stop_registry(self) -> None:
        if self.registry is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.registry.pid, signal.SIGTERM)
        try:
            self.registry.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.registry.pid, signal.SIGKILL)
            self.registry.wait()
        self.registry = None

    def _push(self) -> None:
        reg = f"127.0.0.1:{self.port}"
        for fmt, tag in (("zstd:chunked", "zc"), ("gzip", "gz")):
            self._tool(
                "src", "podman", "push", "--tls-verify=false", "--compression-format", fmt,
                "--force-compression", "localhost/p5:two", f"{reg}/p5:{tag}",
            )  # fmt: skip

    def _pull(self, store: str, remote: str, local: str) -> None:
        self._tool(store, "podman", "pull", "--tls-verify=false", f"127.0.0.1:{self.port}/{remote}")
        self._tool(
            store, "podman", "tag", f"127.0.0.1:{self.port}/{remote}", f"localhost/p5:{local}"
        )

    def _map_copies(self) -> None:
        """ID-mapped copies of p5:gz's top layer, made the way c/storage makes them when it
        cannot use idmapped mounts (store.go ``imageTopLayerForMapping``)."""
        a, b = (f"0:{host}:65536" for host in ID_MAPS)
        self._tool(
            "idmapped", "sh", "-ec",
            f"podman create --uidmap {a} --gidmap {a} --name mapped1 localhost/p5:gz /bin/true; "
            f"buildah from --userns-uid-map {b} --userns-gid-map {b} localhost/p5:gz; "
            "m=$(podman mount mapped1); echo mapped > $m/srv/mapped.txt; "
            "podman umount mapped1; podman commit mapped1 localhost/p5:mapcommit",
            env=_NO_IDMAPPED_MOUNTS,
        )  # fmt: skip

    # --- the oracle ------------------------------------------------------------------------

    def _describe(self, store: str, ref: str) -> None:
        st = _store(self.base, store)
        spec = f"[overlay@{self.ch.inner(st.graphroot)}+{self.ch.inner(st.runroot)}]"
        if st.imagestore is not None:
            spec = ""  # the store of CONTAINERS_STORAGE_CONF, with its imagestore
        name = ref if "/" in ref else f"localhost/{ref}"
        out = self.base / "export" / store / ref.replace(":", "_")
        out.parent.mkdir(parents=True, exist_ok=True)
        raw_path = out.with_suffix(".raw")
        raw = self._tool(store, "skopeo", "inspect", "--raw", f"containers-storage:{spec}{name}")
        raw_path.write_text(raw)
        self._tool(
            store, "skopeo", "copy", "--policy", "/w/policy.json",
            f"containers-storage:{spec}{name}", f"dir:{self.ch.inner(out)}",
        )  # fmt: skip
        image_id = self._tool(store, "podman", "image", "inspect", "--format", "{{.Id}}", name)
        manifest = json.loads((out / "manifest.json").read_bytes())
        config = json.loads((out / manifest["config"]["digest"].split(":")[1]).read_bytes())
        self.images.append(
            {
                "store": store,
                "ref": ref,
                "id": image_id.strip(),
                "raw": str(raw_path.relative_to(self.base)),
                "export": str(out.relative_to(self.base)),
                "diff_ids": config["rootfs"]["diff_ids"],
            }
        )


def _local_refs() -> dict[str, list[str]]:
    refs = {store: [f"p5:{local}" for _, local in pulls] for store, pulls in _PULLS.items()}
    refs["idmapped"].append("p5:mapcommit")
    return refs


_LAYER2 = """set -e
m=$1
rm "$m/etc/removed.conf"
echo changed > "$m/etc/motd"
mkdir -p "$m/srv/new"
head -c 300000 /dev/zero > "$m/srv/new/zeros.bin"
echo layer2 > "$m/srv/new/hello.txt"
echo secret > "$m/etc/secret"
chown 1234:5678 "$m/etc/secret"
chmod 0000 "$m/etc/secret"
mkdir "$m/srv/closed"
echo inside > "$m/srv/closed/in.txt"
chown 4321:4321 "$m/srv/closed/in.txt"
chmod 0000 "$m/srv/closed"
mkfifo -m 0640 "$m/srv/new/fifo"
mknod -m 0620 "$m/srv/new/null" c 1 3
echo suid > "$m/srv/new/suid"
chmod 4755 "$m/srv/new/suid"
"""


def _write_context(ctx: Path) -> None:
    """The first layer's files (deterministic contents)."""
    rnd = random.Random(14)
    big = rnd.randbytes(3 << 20)
    files = {
        "etc/motd": b"hello from podman 5\n",
        "etc/removed.conf": b"removed in layer 2\n",
        "usr/lib/big.bin": big,
        "usr/lib/copy-of-big.bin": big,  # same contents: one object in a flat layout
        "usr/share/doc/a.txt": b"same text\n",
        "usr/share/doc/b.txt": b"same text\n",
        "usr/share/doc/empty": b"",
        "usr/share/doc/mid.bin": rnd.randbytes(200_000),
        "var/lib/odd name \t.txt": b"spaces and a tab\n",
    }
    for name, data in files.items():
        path = ctx / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    os.link(ctx / "usr/share/doc/mid.bin", ctx / "usr/share/doc/mid-link.bin")
    os.symlink("../lib/big.bin", ctx / "usr/share/big-link")
    os.symlink("/etc/motd", ctx / "etc/motd-abs")
    (ctx / "usr/lib/big.bin").chmod(0o755)
    (ctx / "etc/motd").chmod(0o600)
    os.makedirs(ctx / "srv/empty-dir")


if __name__ == "__main__":
    import sys

    s = build_podman5_stores(Path(sys.argv[1]))
    print(s.versions, s.build_seconds)
    for i in s.images:
        print(i.store, i.ref, i.id[:12], i.diff_ids)
