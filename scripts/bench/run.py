"""imgfs benchmark: one command, a table of medians next to same-run references.

Usage (as root: it drops page caches)::

    python3 scripts/bench/run.py [--base /var/tmp/imgfs-bench] [--runs 3] [--out BENCHMARKS.md]
                                 [--sections cp,ttfb,small,many,concurrent]

Builds (or reuses) the stores of ``stores.py``, mounts them with imgfs (fresh daemon and empty
cache dir per cold run, page caches dropped), and prints the table of medians; with ``--out``
it also writes it (with the machine and the date) as Markdown. It asserts nothing about time.
Owns: which figures are measured and how they are tabulated. Must not know imgfs internals
beyond its CLI and public library.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import measure
import stores as bench_stores
from measure import MiB, Peaks, Sampler, drop_caches, imgfs_mount, median

import imgfs
from imgfs.layer.index import LayerIndex
from imgfs.layer.tarsplit import iter_entries

OUT_DIR = Path("/dev/shm/imgfs-bench-out")
"""Where copies go: tmpfs, so the disk column shows only imgfs's own extra disk."""


@dataclass
class Row:
    section: str
    what: str
    value: float
    unit: str
    ratio: str = ""
    rss: int = 0
    disk: int = 0
    note: str = ""


@dataclass
class Sample:
    seconds: float
    peaks: Peaks


class Bench:
    """Runs the sections and collects rows."""

    def __init__(self, stores: bench_stores.BenchStores, runs: int) -> None:
        self.s = stores
        self.runs = runs
        self.work = stores.base / "work"
        self.out = OUT_DIR
        self.rows: list[Row] = []
        for d in (self.work, self.out):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        lib = imgfs.Store.open(str(stores.bench.root), str(stores.bench.runroot), "overlay")
        self.lib = lib
        self.big = lib.image("localhost/big:v1")
        self.big_digest = _layer_digests(self.big)[0]
        self.big_size = _blob_size(self.big, self.big_digest)
        self.plain = bench_stores.export_layer(stores)

    # -- helpers -----------------------------------------------------------------------------

    def blob(self, mnt: Path, image: imgfs.Image, digest: str) -> Path:
        return mnt / image.id / "blobs" / digest

    def mount(self, *, direct: bool = False, fresh: bool = True, many: bool = False) -> object:
        st = self.s.many if many else self.s.bench
        return imgfs_mount(st.root, st.runroot, self.work, direct=direct, fresh_cache=fresh)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(_format_row(row), flush=True)

    def rate_row(
        self,
        section: str,
        what: str,
        samples: list[Sample],
        nbytes: int,
        ref: float | None,
        note: str = "",
    ) -> float:
        secs = median([x.seconds for x in samples])
        rate = nbytes / MiB / secs
        ratio = f"{rate / ref:.2f}x" if ref else ""
        rss = max(x.peaks.rss for x in samples)
        disk = max(x.peaks.disk for x in samples)
        self.add(Row(section, what, rate, "MiB/s", ratio, rss, disk, note))
        return rate

    def time_row(
        self, section: str, what: str, samples: list[Sample], unit: str = "ms", note: str = ""
    ) -> float:
        secs = median([x.seconds for x in samples])
        value = secs * 1000 if unit == "ms" else secs
        rss = max(x.peaks.rss for x in samples)
        disk = max(x.peaks.disk for x in samples)
        self.add(Row(section, what, value, unit, "", rss, disk, note))
        return secs

    def sampled(self, pid: int | None, fn: Callable[[], object]) -> Sample:
        with Sampler(pid, self.s.base) as sampler:
            seconds = measure.timed(fn)
        return Sample(seconds, sampler.peaks)

    def clean_out(self) -> None:
        for p in self.out.iterdir():
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()

    # -- 1. cp of the 1 GiB layer blob -------------------------------------------------------

    def section_cp(self) -> None:
        sec = "1 cp 1 GiB layer"
        ref = self._plain_refs(sec)
        self._imgfs_cp(sec, ref, direct=False)
        self._imgfs_cp(sec, ref, direct=True)
        self._skopeo_cp(sec, ref)
        self._ratarmount_cp(sec, ref)

    def _plain_refs(self, sec: str) -> float:
        cats, cps = [], []
        for _ in range(self.runs):
            drop_caches()
            cats.append(self.sampled(None, lambda: _sh(f"cat {self.plain} > /dev/null")))
            drop_caches()
            dst = self.out / "plain"
            cps.append(self.sampled(None, lambda dst=dst: _sh(f"cp {self.plain} {dst}")))
            self.clean_out()
        ref = self.rate_row(sec, "reference: cat plain file, cold", cats, self.big_size, None)
        self.rate_row(sec, "reference: cp plain file, cold", cps, self.big_size, ref)
        return ref

    def _imgfs_cp(self, sec: str, ref: float, direct: bool) -> None:
        first, second = [], []
        mode = "--direct" if direct else "snapshot"
        for _ in range(self.runs):
            drop_caches()
            with self.mount(direct=direct) as m:
                src = self.blob(m.mountpoint, self.big, self.big_digest)
                first.append(self.sampled(m.pid, lambda src=src: _sh(f"cp {src} {self.out}/a")))
                os.sync()
                second.append(self.sampled(m.pid, lambda src=src: _sh(f"cp {src} {self.out}/b")))
            self.clean_out()
        self.rate_row(sec, f"imgfs {mode}, cold", first, self.big_size, ref)
        again = "cached snapshot" if not direct else "warm page cache"
        self.rate_row(sec, f"imgfs {mode}, second cp ({again})", second, self.big_size, ref)

    def _skopeo_cp(self, sec: str, ref: float) -> None:
        samples = []
        for _ in range(self.runs):
            drop_caches()
            dst = self.out / "skopeo"
            cmd = ["copy", "-q", self.s.bench.ref("localhost/big:v1"), f"dir:{dst}"]
            samples.append(self.sampled(None, lambda cmd=cmd: self.s.skopeo(*cmd)))
            self.clean_out()
        self.rate_row(
            sec,
            "skopeo copy containers-storage: dir: (whole image)",
            samples,
            self.big_size,
            ref,
            "bytes = layer size",
        )

    def _ratarmount_cp(self, sec: str, ref: float) -> None:
        built = measure.timed(lambda: _ratarmount_index(self.plain, self.work))
        samples, content = [], 0
        for _ in range(self.runs):
            drop_caches()
            with measure.ratarmount_mount(self.plain, self.work) as (rmnt, pid):
                content = _tree_bytes(rmnt)
                dst = self.out / "tree"
                samples.append(self.sampled(pid, lambda r=rmnt, d=dst: _sh(f"cp -r {r} {d}")))
            self.clean_out()
        self.rate_row(
            sec,
            "ratarmount of the layer tar: cp -r of its whole content",
            samples,
            content,
            ref,
            f"index built once in {built:.1f} s, not counted",
        )

    # -- 2. time to first byte ---------------------------------------------------------------

    def section_ttfb(self) -> None:
        sec = "2 first 128 KiB of 1 GiB layer"
        for direct in (False, True):
            mode = "--direct" if direct else "snapshot"
            cold, cached = [], []
            for _ in range(self.runs):
                drop_caches()
                with self.mount(direct=direct) as m:
                    src = self.blob(m.mountpoint, self.big, self.big_digest)
                    cold.append(self.sampled(m.pid, lambda s=src: measure.read_first(s)))
                    _sh(f"cat {src} > /dev/null")
                if not direct:
                    with self.mount(direct=direct) as m:  # snapshot cached in one daemon
                        src = self.blob(m.mountpoint, self.big, self.big_digest)
                        _sh(f"cat {src} > /dev/null")
                        drop_caches()
                        cached.append(self.sampled(m.pid, lambda s=src: measure.read_first(s)))
                else:
                    drop_caches()
                    with self.mount(direct=True, fresh=False) as m:
                        src = self.blob(m.mountpoint, self.big, self.big_digest)
                        cached.append(self.sampled(m.pid, lambda s=src: measure.read_first(s)))
            self.time_row(sec, f"imgfs {mode}, cold (new daemon, no cache)", cold)
            note = "snapshot file exists" if not direct else "persisted index, new daemon"
            self.time_row(sec, f"imgfs {mode}, cached", cached, note=note + ", caches dropped")

    # -- 3. 100k-file layer ------------------------------------------------------------------

    def section_small(self) -> None:
        sec = "3 100k-file layer"
        image = self.lib.image("localhost/small:v1")
        digest = _layer_digests(image)[0]
        size = _blob_size(image, digest)
        source = image.layer_source(digest)
        parses = []
        for _ in range(self.runs):
            drop_caches()
            parses.append(self.sampled(None, lambda: _build_index(source.tarsplit_path)))
        self.time_row(sec, "tar-split parse + offset index (library, cold)", parses, "s")
        self._small_opens(sec, image, digest)
        self._small_cps(sec, image, digest, size)

    def _small_opens(self, sec: str, image: imgfs.Image, digest: str) -> None:
        first, again, persisted, snap = [], [], [], []
        for _ in range(self.runs):
            drop_caches()
            with self.mount(direct=True) as m:
                src = self.blob(m.mountpoint, image, digest)
                first.append(self.sampled(m.pid, lambda s=src: measure.open_only(s)))
                again.append(self.sampled(m.pid, lambda s=src: measure.open_only(s)))
            drop_caches()
            with self.mount(direct=True, fresh=False) as m:
                src = self.blob(m.mountpoint, image, digest)
                persisted.append(self.sampled(m.pid, lambda s=src: measure.open_only(s)))
            drop_caches()
            with self.mount() as m:
                src = self.blob(m.mountpoint, image, digest)
                snap.append(self.sampled(m.pid, lambda s=src: measure.read_first(s)))
        t1 = self.time_row(sec, "--direct first open, cold (parses)", first)
        t2 = self.time_row(sec, "--direct second open, same daemon (index in memory)", again)
        t3 = self.time_row(
            sec, "--direct open after remount (persisted index)", persisted, note="caches dropped"
        )
        self.add(
            Row(
                sec,
                "speed-up of persisted-index open over the first",
                t1 / t3,
                "x",
                note=f"in-memory: {t1 / t2:.0f}x",
            )
        )
        self.time_row(sec, "snapshot first open + 128 KiB, cold (streams, no parse)", snap)

    def _small_cps(self, sec: str, image: imgfs.Image, digest: str, size: int) -> None:
        for direct, fresh in ((False, True), (True, True), (True, False)):
            samples = []
            for _ in range(self.runs):
                drop_caches()
                with self.mount(direct=direct, fresh=fresh) as m:
                    src = self.blob(m.mountpoint, image, digest)
                    samples.append(self.sampled(m.pid, lambda s=src: _sh(f"cp {s} {self.out}/a")))
                self.clean_out()
            mode = "--direct" if direct else "snapshot"
            extra = "" if fresh else ", persisted index"
            secs = median([x.seconds for x in samples])
            self.rate_row(
                sec, f"imgfs {mode} full cp, cold{extra}", samples, size, None, f"{secs:.2f} s"
            )

    # -- 4. 1000-image store -----------------------------------------------------------------

    def section_many(self) -> None:
        sec = "4 1000-image store"
        ready, ls_root, ls_all, rss = [], [], [], []
        for _ in range(self.runs):
            drop_caches()
            with self.mount(many=True) as m:
                ready.append(Sample(m.ready_seconds, Peaks(measure.rss_bytes(m.pid))))
                cmd = f"ls {m.mountpoint} > /dev/null"
                ls_root.append(self.sampled(m.pid, lambda c=cmd: _sh(c)))
                # Layer contents (the layers/ and rootfs/ views) are left out, as the issue asks.
                cmd = f"ls -lR -I layers -I rootfs {m.mountpoint} > /dev/null"
                ls_all.append(self.sampled(m.pid, lambda c=cmd: _sh(c)))
                rss.append(measure.rss_bytes(m.pid))
        t_ready = self.time_row(sec, "mount to ready (imgfs returns)", ready)
        t_ls = self.time_row(sec, "ls of the root", ls_root)
        self.add(Row(sec, "mounted and root listed", (t_ready + t_ls) * 1000, "ms"))
        self.time_row(sec, "ls -lR of everything but layer contents", ls_all, "s")
        self.add(Row(sec, "daemon RSS after ls -lR", median(rss) / MiB, "MiB"))

    # -- 5. concurrent copies ----------------------------------------------------------------

    def section_concurrent(self) -> None:
        sec = "5 4 concurrent cp (4x256 MiB layers)"
        image = self.lib.image("localhost/multi:v1")
        digests = _layer_digests(image)
        total = sum(_blob_size(image, d) for d in digests)
        plains = [_plain_part(self.s.bench.root, k) for k in range(len(digests))]
        refs = []
        for _ in range(self.runs):
            drop_caches()
            refs.append(
                self.sampled(None, lambda: _parallel([f"cat {p} > /dev/null" for p in plains]))
            )
        ref = self.rate_row(
            sec, "reference: 4 concurrent cat of the layer files", refs, total, None
        )
        for direct in (False, True):
            samples = []
            for _ in range(self.runs):
                drop_caches()
                with self.mount(direct=direct) as m:
                    cmds = [
                        f"cp {self.blob(m.mountpoint, image, d)} {self.out}/c{k}"
                        for k, d in enumerate(digests)
                    ]
                    samples.append(self.sampled(m.pid, lambda c=cmds: _parallel(c)))
                self.clean_out()
            mode = "--direct" if direct else "snapshot"
            self.rate_row(sec, f"imgfs {mode}, 4 cp, aggregate, cold", samples, total, ref)


# -- module helpers ------------------------------------------------------------------------------


def _sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True)


def _parallel(cmds: list[str]) -> None:
    procs = [subprocess.Popen(c, shell=True) for c in cmds]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"{cmds} failed: {codes}")


def _layer_digests(image: imgfs.Image) -> list[str]:
    return [b.digest for b in image.blobs() if b.kind == "layer"]


def _blob_size(image: imgfs.Image, digest: str) -> int:
    return next(b.size for b in image.blobs() if b.digest == digest)


def _build_index(path: str) -> None:
    with open(path, "rb") as f:
        LayerIndex.build(iter_entries(f, "bench"), "bench")


def _plain_part(root: Path, k: int) -> Path:
    found = list((root / "overlay").glob(f"*/diff/part-{k}.bin"))
    if len(found) != 1:
        raise RuntimeError(f"part-{k}.bin: {found}")
    return found[0]


def _tree_bytes(top: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(top):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_size if not os.path.islink(os.path.join(dirpath, name)) else 0
    return total


def _ratarmount_index(tar: Path, work: Path) -> None:
    index = work / "ratarmount.index.sqlite"
    index.unlink(missing_ok=True)
    with measure.ratarmount_mount(tar, work):
        pass


def _format_row(row: Row) -> str:
    value = f"{row.value:,.1f}" if row.value < 100 else f"{row.value:,.0f}"
    rss = f"{row.rss / MiB:.0f} MiB" if row.rss else ""
    disk = f"{row.disk / MiB:,.0f} MiB" if row.disk > MiB else ""
    cells = [row.section, row.what, f"{value} {row.unit}", row.ratio, rss, disk, row.note]
    return "| " + " | ".join(cells) + " |"


def _machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    fs = subprocess.run(["df", "-hT", "/var/tmp"], capture_output=True, text=True).stdout
    return (
        f"{os.cpu_count()} x {cpu}, {mem:.0f} GiB RAM, kernel {platform.release()}, "
        f"Python {platform.python_version()}; /var/tmp: {fs.splitlines()[-1].split()[1]}"
    )


HEADER = (
    "| section | measure | median | ratio to reference | peak daemon RSS | peak extra disk "
    "| note |\n|---|---|---|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--base", type=Path, default=Path("/var/tmp/imgfs-bench"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the table as Markdown here")
    parser.add_argument("--sections", default="cp,ttfb,small,many,concurrent")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark drops page caches")
    stores = bench_stores.ensure_stores(args.base)
    bench = Bench(stores, args.runs)
    print(HEADER)
    started = time.monotonic()
    for name in args.sections.split(","):
        getattr(bench, f"section_{name}")()
    elapsed = time.monotonic() - started
    if args.out:
        _write_markdown(args.out, bench.rows, args.runs, elapsed)


def _write_markdown(path: Path, rows: list[Row], runs: int, elapsed: float) -> None:
    head = Path(__file__).with_name("BENCHMARKS.head.md").read_text()
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    table = "\n".join([HEADER, *(_format_row(r) for r in rows)])
    path.write_text(
        f"{head}\n## Results\n\nMeasured {when} on {_machine()}; median of {runs} runs "
        f"({elapsed / 60:.0f} min in all; load average at the end "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}).\n\n{table}\n"
    )


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(f"signal {signum}")  # so that every mount is unmounted in its finally


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    main()
