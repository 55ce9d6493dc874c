"""Helpers of the hardening suite: small real stores, cloned images, host-byte detection,
daemon process lookup, store inventories."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests import realstores, tools
from tests.mounting import mount_command, unmount

DRIVER = "overlay"
HOST_FILES = (Path("/etc/passwd"), Path("/etc/shadow"), Path("/etc/group"))


# -- counts ---------------------------------------------------------------------------------------

_ORDER = ("1 hostile", "2 fuzz", "3 concurrency", "4 store untouched", "5 faults", "6 privilege")


class Counts:
    """Thread-safe (area, metric) -> value table; numbers add up, text replaces."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rows: dict[str, dict[str, object]] = {}
        self.started = time.monotonic()

    def add(self, area: str, metric: str, value: int | float = 1) -> None:
        with self._lock:
            row = self.rows.setdefault(area, {})
            old = row.get(metric, 0)
            row[metric] = (old if isinstance(old, int | float) else 0) + value

    def put(self, area: str, metric: str, value: object) -> None:
        with self._lock:
            self.rows.setdefault(area, {})[metric] = value

    def peak(self, area: str, metric: str, value: int | float) -> None:
        with self._lock:
            row = self.rows.setdefault(area, {})
            old = row.get(metric)
            if not isinstance(old, int | float) or value > old:
                row[metric] = value

    def render(self) -> str:
        lines = ["imgfs hardening counts", "=" * 22]
        areas = sorted(self.rows, key=lambda a: (_ORDER.index(a) if a in _ORDER else 99, a))
        for area in areas:
            row = self.rows[area]
            width = max(len(m) for m in row)
            lines.append("")
            lines.append(f"[{area}]")
            for metric, value in row.items():
                shown = f"{value:.2f}" if isinstance(value, float) else str(value)
                lines.append(f"  {metric:<{width}}  {shown}")
        lines.append("")
        lines.append(f"suite wall time: {time.monotonic() - self.started:.1f} s")
        return "\n".join(lines) + "\n"


# -- isolated tools ----------------------------------------------------------------------------


def write_tool_conf(base: Path) -> dict[str, str]:
    """storage.conf/registries.conf/containers.conf/policy under ``base``; the tools' env."""
    realstores.write_tool_conf(
        base,
        storage_conf=(
            f'[storage]\ndriver = "{DRIVER}"\ngraphroot = "{base}/root"\nrunroot = "{base}/run"\n'
        ),
        containers_conf='[engine]\ncgroup_manager = "cgroupfs"\n',
    )
    return realstores.tool_env(base)


@dataclass(frozen=True)
class Tools:
    """buildah/podman/skopeo bound to one store under ``base`` (never /var/lib/containers)."""

    base: Path
    env: dict[str, str]
    run_dir: Path | None = None  # podman wants a run root shorter than 50 characters

    @classmethod
    def at(cls, base: Path, run_dir: Path | None = None) -> Tools:
        return cls(base, write_tool_conf(base), run_dir)

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def runroot(self) -> Path:
        return self.run_dir or self.base / "run"

    def _store_flags(self) -> list[str]:
        return [
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            DRIVER,
        ]

    def run(self, cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        tools.require(cmd[0])
        return subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def buildah(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["buildah", *self._store_flags(), *args]
        result = self.run(cmd)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {result.stderr}")
        return result

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["podman", *self._store_flags(), *args]
        result = self.run(cmd)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {result.stderr}")
        return result

    def skopeo(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        policy = str(self.base / "conf" / "policy.json")
        cmd = ["skopeo", "--policy", policy, "--tmpdir", str(self.base / "tmp"), *args]
        result = self.run(cmd)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {result.stderr}")
        return result

    def ref(self, name: str) -> str:
        return f"containers-storage:[{DRIVER}@{self.root}+{self.runroot}]{name}"

    def commit_files(self, name: str, files: dict[str, bytes]) -> str:
        """A one-layer image ``name`` holding ``files``; returns its image ID."""
        src = self.base / "src" / name.replace("/", "_").replace(":", "_")
        for rel, data in files.items():
            path = src / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        ctr = self.buildah("from", "scratch").stdout.strip()
        self.buildah("copy", ctr, f"{src}/.", "/")
        self.buildah("config", "--label", f"name={name}", ctr)
        image_id = self.buildah("commit", "-q", ctr, name).stdout.strip()
        self.buildah("rm", ctr)
        return image_id


def pseudo_random(seed: int, n: int) -> bytes:
    """Deterministic incompressible bytes (fast: sha256 counter stream)."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:n])


# -- host bytes --------------------------------------------------------------------------------

WINDOW = 32
STRIDE = 16


class HostBytes:
    """Detects any run of >= 48 bytes of a host file inside data read from a mount."""

    def __init__(self, files: list[Path]) -> None:
        self.files = [f for f in files if f.is_file()]
        self._windows: set[bytes] = set()
        for path in self.files:
            data = path.read_bytes()
            for i in range(len(data) - WINDOW + 1):
                self._windows.add(data[i : i + WINDOW])
        self.checked_bytes = 0

    def found_in(self, data: bytes) -> bool:
        self.checked_bytes += len(data)
        windows = self._windows
        return any(
            data[i : i + WINDOW] in windows for i in range(0, len(data) - WINDOW + 1, STRIDE)
        )


# -- the daemon --------------------------------------------------------------------------------


def daemon_pid(mnt: Path) -> int | None:
    """PID of the imgfs daemon serving ``mnt`` (found through /proc)."""
    want = os.fsencode(str(mnt))
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if want in args and any(b"imgfs" in a for a in args):
            return int(entry)
    return None


def peak_rss_mib(pid: int) -> float:
    """VmHWM (peak resident set) of ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@dataclass
class Daemon:
    mnt: Path
    cache: Path
    log_file: Path
    pid: int
    stderr: str = ""  # what the mount command said before detaching

    def log(self) -> str:
        try:
            return self.stderr + self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return self.stderr


def start(
    root: Path,
    runroot: Path,
    mnt: Path,
    cache: Path,
    log_file: Path,
    *extra: str,
    driver: str = DRIVER,
) -> Daemon:
    mnt.mkdir(parents=True, exist_ok=True)
    cmd = mount_command(root, runroot, driver, mnt, cache, log_file, *extra)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"imgfs failed: {result.stderr}")
    pid = daemon_pid(mnt)
    assert pid is not None, "daemon process not found"
    return Daemon(mnt, cache, log_file, pid, result.stderr)


def stop(daemon: Daemon) -> None:
    """Unmount and make sure the daemon is gone (SIGKILL only as a last resort)."""
    unmount(daemon.mnt)
    for _ in range(50):
        if not alive(daemon.pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(daemon.pid, signal.SIGKILL)


@contextlib.contextmanager
def daemon(root: Path, runroot: Path, work: Path, *extra: str) -> Iterator[Daemon]:
    with daemon_for(root, runroot, DRIVER, work, *extra) as d:
        yield d


@contextlib.contextmanager
def daemon_for(root: Path, runroot: Path, driver: str, work: Path, *extra: str) -> Iterator[Daemon]:
    d = start(
        root, runroot, work / "mnt", work / "cache", work / "imgfs.log", *extra, driver=driver
    )
    try:
        yield d
    finally:
        stop(d)


def unmount_below(top: Path) -> None:
    """Unmount whatever the container tools left mounted under ``top`` (deepest first)."""
    prefix = str(top.resolve()).rstrip("/") + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix):
            points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


# -- reading an image through the mount --------------------------------------------------------

READ_CAP = 64 << 20


@dataclass
class Outcome:
    listed: bool
    errors: dict[str, int]  # relative path -> errno, for the files of DESIGN.md section 1
    read: dict[str, bytes]


def read_capped(path: Path) -> bytes:
    """The file's bytes, read in 1 MiB chunks (a hostile st_size may be 2**62), capped."""
    parts = []
    total = 0
    with open(path, "rb", buffering=0) as f:
        while total < READ_CAP and (chunk := f.read(1 << 20)):
            parts.append(chunk)
            total += len(chunk)
    return b"".join(parts)


def read_image(mnt: Path, image_id: str) -> Outcome:
    """Read every file of DESIGN.md section 1 by its known name (the other views of the
    image dir, rootfs/ and layers/, are not part of this contract)."""
    if image_id not in os.listdir(mnt):
        return Outcome(False, {}, {})
    top = mnt / image_id
    errors: dict[str, int] = {}
    read: dict[str, bytes] = {}
    paths = ["manifest.json", "config.json"]
    for section in ("signatures", "blobs"):
        try:
            paths += [f"{section}/{n}" for n in os.listdir(top / section)]
        except OSError as exc:
            errors[section] = exc.errno or 0
    for rel in paths:
        try:
            read[rel] = read_capped(top / rel)
        except FileNotFoundError:
            if rel != "config.json":  # lists and schema1 images have none
                errors[rel] = errno.ENOENT
        except OSError as exc:
            errors[rel] = exc.errno or 0
    return Outcome(True, errors, read)


# -- store surgery -----------------------------------------------------------------------------


def load(path: Path) -> Any:
    return json.loads(path.read_bytes())


def save(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value))


def fake_id(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def clone_image(root: Path, image_id: str, label: str) -> tuple[str, str]:
    """Copy image ``image_id`` (one layer) as a new image + layer named after ``label``.

    Returns (new image ID, new layer ID). The clone has its own image record, big-data dir,
    layer record, tar-split and content dir, so breaking it touches nothing else.
    """
    images_json = root / f"{DRIVER}-images" / "images.json"
    layers_json = root / f"{DRIVER}-layers" / "layers.json"
    images, layers = load(images_json), load(layers_json)
    rec = next(i for i in images if i["id"] == image_id)
    layer = next(la for la in layers if la["id"] == rec["layer"])
    new_image, new_layer = fake_id("image:" + label), fake_id("layer:" + label)
    images.append({**rec, "id": new_image, "layer": new_layer, "names": [f"localhost/{label}:1"]})
    layers.append({**layer, "id": new_layer})
    shutil.copytree(
        root / f"{DRIVER}-images" / image_id, root / f"{DRIVER}-images" / new_image, symlinks=True
    )
    shutil.copytree(root / DRIVER / layer["id"], root / DRIVER / new_layer, symlinks=True)
    shutil.copyfile(
        root / f"{DRIVER}-layers" / f"{layer['id']}.tar-split.gz",
        root / f"{DRIVER}-layers" / f"{new_layer}.tar-split.gz",
    )
    save(images_json, images)
    save(layers_json, layers)
    return new_image, new_layer


# -- inventories -------------------------------------------------------------------------------


def inventory(top: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under ``top``: type, mode, owner, size, mtime, ctime, sha256/link target."""
    found: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, top)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                content = h.hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            found[rel] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                st.st_ino,
                content,
            )
    return found


def differences(
    before: dict[str, tuple[object, ...]], after: dict[str, tuple[object, ...]]
) -> list[str]:
    out = [f"removed {p}" for p in sorted(set(before) - set(after))]
    out += [f"added {p}" for p in sorted(set(after) - set(before))]
    out += [f"changed {p}" for p in sorted(set(before) & set(after)) if before[p] != after[p]]
    return out
