"""imgfs benchmark: one command, a table of medians next to same-run references.

Usage (as root: it drops page caches)::

    python3 scripts/bench/run.py [--base /var/tmp/imgfs-bench] [--runs 3] [--out BENCHMARKS.md]
                                 [--sections cp,ttfb,small,many,concurrent,ls,cat,snapshot]
                                 [--tree /work/wt-x | --imgfs-python /work/wt-x/.venv/bin/python]

Builds (or reuses) the stores of ``stores.py``, mounts them with imgfs (fresh daemon and empty
cache dir per cold run, page caches dropped), and prints the table of medians; with ``--out``
it also writes it (with the machine and the date) as Markdown. It asserts nothing about time.
Quick check of one change: ``--sections ls --runs 1`` (a minute or two; ``cat`` takes longer).
``--tree``/``--imgfs-python`` mount with another checkout's imgfs (``PYTHON -m imgfs``); the
library calls that find image IDs and digests use the imgfs this script imports.
Owns: which figures are measured and how they are tabulated. Must not know imgfs internals
beyond its CLI and public library.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    def __init__(
        self,
        stores: bench_stores.BenchStores,
        runs: int,
        imgfs_cmd: tuple[str, ...],
        work: Path | None = None,
    ) -> None:
        self.s = stores
        self.runs = runs
        self.imgfs_cmd = imgfs_cmd
        self._real: Path | None = None
        self.work = work or stores.base / "work"
        self.out = OUT_DIR if work is None else OUT_DIR.with_name(f"{OUT_DIR.name}-{work.name}")
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

    def mount(
        self, *, direct: bool = False, fresh: bool = True, many: bool = False
    ) -> contextlib.AbstractContextManager[measure.ImgfsMount]:
        st = self.s.many if many else self.s.bench
        return imgfs_mount(
            st.root, st.runroot, self.work, direct=direct, fresh_cache=fresh, command=self.imgfs_cmd
        )

    def add(self, row: Row, samples: list[Sample] | None = None) -> None:
        cpu = median([x.peaks.cpu for x in samples]) if samples else 0.0
        if cpu:
            busy = f"daemon CPU {cpu:.2f} s, command CPU "
            busy += f"{median([x.peaks.command_cpu for x in samples or []]):.2f} s"
            row.note = f"{row.note}; {busy}" if row.note else busy
        disturbed = sum(1 for x in samples or [] if x.peaks.foreign_drops)
        if disturbed:
            runs = f"{disturbed} of {len(samples or [])} runs"
            warn = f"{runs} disturbed: another process dropped the page caches"
            row.note = f"{row.note}; {warn}" if row.note else warn
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
        self.add(Row(section, what, rate, "MiB/s", ratio, rss, disk, note), samples)
        return rate

    def time_row(
        self,
        section: str,
        what: str,
        samples: list[Sample],
        unit: str = "ms",
        note: str = "",
        ref: tuple[float, str] | None = None,
    ) -> float:
        """A median time; ``ref`` (seconds, name): the ratio column is time / reference time."""
        secs = median([x.seconds for x in samples])
        value = secs * 1000 if unit == "ms" else secs
        rss = max(x.peaks.rss for x in samples)
        disk = max(x.peaks.disk for x in samples)
        ratio = f"{secs / ref[0]:.2f}x {ref[1]}" if ref else ""
        self.add(Row(section, what, value, unit, ratio, rss, disk, note), samples)
        return secs

    def sampled(self, pid: int | None, fn: Callable[..., object], *args: Any) -> Sample:
        """``fn(*args)`` timed, with ``pid``'s RSS and the disk sampled meanwhile."""
        with Sampler(pid, self.s.base) as sampler:
            seconds = measure.timed(lambda: fn(*args))
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
            cps.append(self.sampled(None, _sh, f"cp {self.plain} {dst}"))
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
                first.append(self.sampled(m.pid, _sh, f"cp {src} {self.out}/a"))
                os.sync()
                second.append(self.sampled(m.pid, _sh, f"cp {src} {self.out}/b"))
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
            samples.append(self.sampled(None, self.s.skopeo, *cmd))
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
                samples.append(self.sampled(pid, _sh, f"cp -r {rmnt} {dst}"))
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
                    cold.append(self.sampled(m.pid, measure.read_first, src))
                    _sh(f"cat {src} > /dev/null")
                if not direct:
                    with self.mount(direct=direct) as m:  # snapshot cached in one daemon
                        src = self.blob(m.mountpoint, self.big, self.big_digest)
                        _sh(f"cat {src} > /dev/null")
                        drop_caches()
                        cached.append(self.sampled(m.pid, measure.read_first, src))
                else:
                    drop_caches()
                    with self.mount(direct=True, fresh=False) as m:
                        src = self.blob(m.mountpoint, self.big, self.big_digest)
                        cached.append(self.sampled(m.pid, measure.read_first, src))
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
                first.append(self.sampled(m.pid, measure.open_only, src))
                again.append(self.sampled(m.pid, measure.open_only, src))
            drop_caches()
            with self.mount(direct=True, fresh=False) as m:
                src = self.blob(m.mountpoint, image, digest)
                persisted.append(self.sampled(m.pid, measure.open_only, src))
            drop_caches()
            with self.mount() as m:
                src = self.blob(m.mountpoint, image, digest)
                snap.append(self.sampled(m.pid, measure.read_first, src))
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
        """Full cp of the blob; GNU tar of the layer's diff dir as the reference, with the page
        caches dropped (cold) and with the layer's files and tar-split in them (warm: what is
        left is CPU, the issue's target)."""
        diff = _small_diff(self.s.bench.root)
        inputs = (diff, Path(image.layer_source(digest).tarsplit_path))
        tar_cmd = f"tar -cf - -C {diff} . > {self.out}/t.tar"
        for warm in (False, True):
            tars = []
            for _ in range(self.runs):
                self._caches(warm, inputs)
                tars.append(self.sampled(None, _sh, tar_cmd))
                self.clean_out()
            tar = median([x.seconds for x in tars])
            cache = "layer files in page cache" if warm else "cold"
            what = f"reference: GNU tar -cf - -C <layer diff dir> . ({cache})"
            self.rate_row(sec, what, tars, size, None, f"{tar:.2f} s; bytes = layer blob size")
            modes = (
                ((False, True), (True, True))
                if warm
                else ((False, True), (True, True), (True, False))
            )
            for direct, fresh in modes:
                samples = []
                for _ in range(self.runs):
                    self._caches(warm, inputs)
                    with self.mount(direct=direct, fresh=fresh) as m:
                        src = self.blob(m.mountpoint, image, digest)
                        samples.append(self.sampled(m.pid, _sh, f"cp {src} {self.out}/a"))
                    self.clean_out()
                mode = "--direct" if direct else "snapshot"
                extra = ("" if fresh else ", persisted index") + (
                    ", layer files in page cache" if warm else ""
                )
                secs = median([x.seconds for x in samples])
                note = f"{secs:.2f} s = {secs / tar:.2f}x the tar time" + (
                    " (target <= 2.5x)" if fresh else ""
                )
                what = f"imgfs {mode} full cp, cold{extra}"
                self.rate_row(sec, what, samples, size, None, note)

    def _caches(self, warm: bool, inputs: tuple[Path, ...]) -> None:
        """Drop the page caches; ``warm``: then read ``inputs`` (directories: every file
        below) back into them."""
        drop_caches()
        for path in inputs if warm else ():
            if path.is_dir():
                _sh(f"tar -cf - -C {path} . | cat > /dev/null")
            else:
                _sh(f"cat {path} > /dev/null")

    # -- 4. 1000-image store -----------------------------------------------------------------

    def section_many(self) -> None:
        sec = "4 1000-image store"
        ready, ls_root, ls_all, ls_again, rss = [], [], [], [], []
        ref_all, ref_again = [], []
        ls_cmd = "ls -lR -I layers -I rootfs {} > /dev/null"
        mirror = self.work / "many-mirror"  # built from this run's first mount
        shutil.rmtree(mirror, ignore_errors=True)
        for _ in range(self.runs):
            drop_caches()
            with self.mount(many=True) as m:
                ready.append(Sample(m.ready_seconds, Peaks(measure.rss_bytes(m.pid))))
                cmd = f"ls {m.mountpoint} > /dev/null"
                ls_root.append(self.sampled(m.pid, _sh, cmd))
                # Layer contents (the layers/ and rootfs/ views) are left out, as the issue asks.
                ls_all.append(self.sampled(m.pid, _sh, ls_cmd.format(m.mountpoint)))
                rss.append(measure.rss_bytes(m.pid))
                ls_again.append(self.sampled(m.pid, _sh, ls_cmd.format(m.mountpoint)))
                if not mirror.exists():
                    _mirror_tree(m.mountpoint, mirror, skip=(b"layers", b"rootfs"))
            # The reference: the minimal pyfuse3 fs serving the same names, kinds, sizes and
            # link targets (requests per pass are the same; its handlers answer inline).
            drop_caches()
            with measure.minimal_mount(self.work, tree=mirror) as (mm, pid):
                ref_all.append(self.sampled(pid, _sh, ls_cmd.format(mm / "rootfs")))
                ref_again.append(self.sampled(pid, _sh, ls_cmd.format(mm / "rootfs")))
        t_ready = self.time_row(
            sec, "mount to ready (imgfs returns)", ready, note="target <= 0.5 s"
        )
        t_ls = self.time_row(sec, "ls of the root", ls_root)
        self.add(Row(sec, "mounted and root listed", (t_ready + t_ls) * 1000, "ms"))
        ref = self.time_row(
            sec, "minimal pyfuse3 fs, the same tree: ls -lR", ref_all, "s", note="reference"
        )
        self.time_row(
            sec,
            "ls -lR of everything but layer contents",
            ls_all,
            "s",
            note="target <= 2 s",
            ref=(ref, "minimal fs"),
        )
        ref = self.time_row(
            sec, "minimal pyfuse3 fs, the same tree: ls -lR again", ref_again, "s", note="reference"
        )
        self.time_row(sec, "the same ls -lR again (cached)", ls_again, "s", ref=(ref, "minimal fs"))
        self.add(
            Row(sec, "daemon RSS after ls -lR", median(rss) / MiB, "MiB", note="target <= 150 MiB")
        )

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
                    samples.append(self.sampled(m.pid, _parallel, cmds))
                self.clean_out()
            mode = "--direct" if direct else "snapshot"
            self.rate_row(sec, f"imgfs {mode}, 4 cp, aggregate, cold", samples, total, ref)

    # -- 6, 7. rootfs/ of the 100k-file image: ls -lR, find | xargs cat ------------------------

    def section_ls(self) -> None:
        self._rootfs("6 ls -lR rootfs/ (100k files)", "ls -lR . > /dev/null", _LS_REFS)

    def section_cat(self) -> None:
        cmd = "find . -type f -print0 | xargs -0 cat > /dev/null"
        self._rootfs("7 find rootfs -type f \\| xargs cat (100k files)", cmd, _CAT_REFS)

    def _rootfs(self, sec: str, cmd: str, refs: tuple[str, str]) -> None:
        """``cmd`` (run in the tree's top directory) on each of the five trees: in a fresh
        mount with the page caches dropped after mounting (cold), then again in the same
        mount (second pass). imgfs's rows show the ratios the issue's targets are about."""
        image = self.lib.image("localhost/small:v1")
        real = self.real_dir()
        tar = bench_stores.export_layers(self.s.export_small)[0]
        built = measure.timed(lambda: _ratarmount_index(tar, self.work))

        def podman(*args: str) -> str:
            return self.s.bench.podman(self.s.conf, *args)

        trees: dict[str, Callable[[], contextlib.AbstractContextManager[tuple[Path, int | None]]]]
        trees = {
            "real directory": lambda: contextlib.nullcontext((real, None)),
            "podman image mount": lambda: _no_pid(
                measure.podman_mount(podman, "localhost/small:v1")
            ),
            "minimal pyfuse3 fs": lambda: _rootfs_of(measure.minimal_mount(self.work, tree=real)),
            "ratarmount": lambda: measure.ratarmount_mount(tar, self.work),
            "imgfs": lambda: _imgfs_rootfs(self.mount(), image.id),
        }
        times: dict[str, tuple[float, float]] = {}
        for name, tree in trees.items():
            cold, second = self._passes(tree, cmd)
            if name == "imgfs":
                self._rootfs_imgfs(sec, cold, second, times, refs)
                continue
            note = (
                f"ratarmount index built once in {built:.1f} s, not counted"
                if (name == "ratarmount")
                else ""
            )
            times[name] = (
                self.time_row(sec, f"{name}, cold", cold, "s", note),
                self.time_row(sec, f"{name}, second pass", second, "s"),
            )

    def _rootfs_imgfs(
        self,
        sec: str,
        cold: list[Sample],
        second: list[Sample],
        times: dict[str, tuple[float, float]],
        refs: tuple[str, str],
    ) -> None:
        ref_cold = (times[refs[0]][0], _SHORT[refs[0]])
        ref_second = (times[refs[1]][1], _SHORT[refs[1]])
        targets = _TARGETS[refs]
        t = self.time_row(sec, "imgfs, cold", cold, "s", targets[0], ref=ref_cold)
        self.time_row(sec, "imgfs, second pass", second, "s", targets[1], ref=ref_second)
        if refs == _CAT_REFS:
            factor = times["ratarmount"][0] / t
            self.add(Row(sec, "ratarmount cold / imgfs cold", factor, "x", note="target >= 2x"))

    def _passes(
        self,
        tree: Callable[[], contextlib.AbstractContextManager[tuple[Path, int | None]]],
        cmd: str,
    ) -> tuple[list[Sample], list[Sample]]:
        cold, second = [], []
        for _ in range(self.runs):
            with tree() as (top, pid):
                drop_caches()
                cold.append(self.sampled(pid, _sh, cmd, top))
                second.append(self.sampled(pid, _sh, cmd, top))
        return cold, second

    def real_dir(self) -> Path:
        """The 100k-file image's layers (the ``dir:`` export's tars) extracted in order into a
        directory under the work directory (once per benchmark run)."""
        if self._real is None:
            real = self.work / "real"
            real.mkdir()
            for layer in bench_stores.export_layers(self.s.export_small):
                _sh(f"tar -xf {layer} -C {real}")
            self._real = real
        return self._real

    # -- 8. the 1 GiB blob: cold against the completed snapshot ------------------------------

    def section_snapshot(self) -> None:
        sec = "8 1 GiB layer: cold vs completed snapshot"
        runs: dict[str, list[Sample]] = {}

        def timed(name: str, pid: int | None, cmd: str, drop: bool = True) -> None:
            if drop:
                drop_caches()
            runs.setdefault(name, []).append(self.sampled(pid, _sh, cmd))
            self.clean_out()

        source = self.big.layer_source(self.big_digest)
        inputs = (_big_diff(self.s.bench.root), Path(source.tarsplit_path))

        for run in range(self.runs):
            with self.mount() as m:
                src = self.blob(m.mountpoint, self.big, self.big_digest)
                timed("cold", m.pid, f"cp {src} {self.out}/a")
                snap = _snapshot_file(m.pid, self.big_size)
                with measure.minimal_mount(self.work, file=snap) as (mm, pid):
                    # imgfs and the minimal fs read the same file, interleaved, each first in
                    # every other run: the disk is slower for a while after the snapshot was
                    # written back (the plain cp of it, measured then, was slower than the
                    # minimal fs's cp through FUSE later), so a fixed order favours the second.
                    pairs = [
                        (("done cp", m.pid, src), ("min cp", pid, f"{mm}/blob")),
                        (("done cat", m.pid, src), ("min cat", pid, f"{mm}/blob")),
                    ]
                    for pair in pairs:
                        for name, who, path in pair if run % 2 == 0 else pair[::-1]:
                            cmd = "cp" if name.endswith("cp") else "cat"
                            out = f"{self.out}/a" if cmd == "cp" else "> /dev/null"
                            timed(name, who, f"{cmd} {path} {out}")
                timed("plain cp", None, f"cp {snap} {self.out}/a")
                with measure.minimal_mount(self.work, file=snap, file_cache=True) as (mm, pid):
                    timed("min cache cp", pid, f"cp {mm}/blob {self.out}/a")
            with self.mount(direct=True) as m:
                src = self.blob(m.mountpoint, self.big, self.big_digest)
                timed("direct cold", m.pid, f"cp {src} {self.out}/a")
            self._caches(True, inputs)
            with self.mount() as m:
                src = self.blob(m.mountpoint, self.big, self.big_digest)
                timed("warm cold", m.pid, f"cp {src} {self.out}/a", drop=False)
                timed("warm done", m.pid, f"cp {src} {self.out}/a", drop=False)
            self._caches(True, inputs)
            with self.mount(direct=True) as m:
                src = self.blob(m.mountpoint, self.big, self.big_digest)
                timed("warm direct", m.pid, f"cp {src} {self.out}/a", drop=False)
        done = self.time_row(
            sec,
            "reference: imgfs cp of the completed snapshot",
            runs["done cp"],
            "s",
            "same daemon, after the cold cp; caches dropped",
        )
        ref = (done, "completed")
        self.time_row(sec, "imgfs snapshot, cold cp", runs["cold"], "s", "target <= 1.3x", ref)
        self.time_row(
            sec, "imgfs --direct, cold cp", runs["direct cold"], "s", "target <= 1.3x", ref
        )
        self.time_row(
            sec,
            "reference: cp of the snapshot file itself",
            runs["plain cp"],
            "s",
            "/proc/PID/fd of the daemon's snapshot",
            ref,
        )
        warm = self.time_row(
            sec,
            "reference: imgfs cp of the completed snapshot, page cache warm",
            runs["warm done"],
            "s",
            "same daemon, right after the cold cp below",
        )
        ref = (warm, "completed, warm")
        for name, mode in (("warm cold", "snapshot"), ("warm direct", "--direct")):
            what = f"imgfs {mode}, cold cp, layer files in page cache"
            self.time_row(sec, what, runs[name], "s", "target <= 1.3x", ref)
        mcp = self.time_row(
            sec,
            "minimal pyfuse3 fs serving the snapshot (direct_io): cp",
            runs["min cp"],
            "s",
        )
        mcat = self.time_row(
            sec, "minimal pyfuse3 fs serving the snapshot (direct_io): cat", runs["min cat"], "s"
        )
        self.time_row(
            sec,
            "minimal pyfuse3 fs serving the snapshot (keep_cache): cp",
            runs["min cache cp"],
            "s",
            ref=(mcp, "min direct_io"),
        )
        self.time_row(
            sec,
            "imgfs completed snapshot: cp",
            runs["done cp"],
            "s",
            "target <= 1.1x",
            (mcp, "minimal fs"),
        )
        self.time_row(
            sec,
            "imgfs completed snapshot: cat",
            runs["done cat"],
            "s",
            "target <= 1.1x",
            (mcat, "minimal fs"),
        )


# -- module helpers ------------------------------------------------------------------------------

_LS_REFS = ("real directory", "real directory")
_CAT_REFS = ("minimal pyfuse3 fs", "real directory")
_SHORT = {"real directory": "real dir", "minimal pyfuse3 fs": "minimal fs"}
_TARGETS = {
    _LS_REFS: ("target <= 2x", "target <= 2x"),
    _CAT_REFS: ("target <= 1.2x", "target <= 3x"),
}


@contextlib.contextmanager
def _no_pid(mount: contextlib.AbstractContextManager[Path]) -> Iterator[tuple[Path, int | None]]:
    with mount as top:
        yield top, None


@contextlib.contextmanager
def _rootfs_of(
    mount: contextlib.AbstractContextManager[tuple[Path, int]],
) -> Iterator[tuple[Path, int | None]]:
    with mount as (mnt, pid):
        yield mnt / "rootfs", pid


@contextlib.contextmanager
def _imgfs_rootfs(
    mount: contextlib.AbstractContextManager[measure.ImgfsMount], image_id: str
) -> Iterator[tuple[Path, int | None]]:
    with mount as m:
        yield m.mountpoint / image_id / "rootfs", m.pid


def _snapshot_file(pid: int, size: int) -> Path:
    """The daemon's open snapshot file of ``size`` bytes, as ``/proc/PID/fd/N`` (it is
    unlinked: no other name reaches the very same file)."""
    fds = Path(f"/proc/{pid}/fd")
    for fd in sorted(fds.iterdir(), key=lambda p: int(p.name)):
        try:
            target = os.readlink(fd)
            if target.endswith("(deleted)") and os.stat(fd).st_size == size:
                return fd
        except OSError:
            continue
    raise RuntimeError(f"no open snapshot file of {size} bytes in imgfs daemon {pid}")


def _big_diff(root: Path) -> Path:
    """The 1 GiB layer's ``diff`` directory in the store (read only)."""
    found = list((root / "overlay").glob("*/diff/big-0.bin"))
    if len(found) != 1:
        raise RuntimeError(f"the 1 GiB layer's diff dir: {found}")
    return found[0].parent


def _small_diff(root: Path) -> Path:
    """The 100k-file layer's ``diff`` directory in the store (read only)."""
    found = list((root / "overlay").glob("*/diff/f/d000/file-000000.txt"))
    if len(found) != 1:
        raise RuntimeError(f"the 100k-file layer's diff dir: {found}")
    return found[0].parents[2]


def _mirror_tree(src: Path, dst: Path, skip: tuple[bytes, ...]) -> None:
    """A real directory with ``src``'s names, kinds, sizes (sparse files) and link targets,
    leaving out the contents of directories named in ``skip`` (kept empty)."""
    tmp = dst.with_name(dst.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    for root, dirs, files in os.walk(os.fsencode(src)):
        out = os.path.join(os.fsencode(tmp), os.path.relpath(root, os.fsencode(src)))
        os.makedirs(out, exist_ok=True)
        for name in dirs + files:
            path, copy = os.path.join(root, name), os.path.join(out, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(path), copy)
            elif stat.S_ISDIR(st.st_mode):
                os.makedirs(copy, exist_ok=True)
            else:
                with open(copy, "wb") as f:
                    f.truncate(st.st_size)
        dirs[:] = [d for d in dirs if d not in skip]
    tmp.rename(dst)


def _sh(cmd: str, cwd: Path | None = None) -> None:
    subprocess.run(cmd, shell=True, check=True, cwd=cwd)


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
    measure.ratarmount_index(tar, work).unlink(missing_ok=True)
    with measure.ratarmount_mount(tar, work):
        pass


def _format_row(row: Row) -> str:
    value = f"{row.value:,.1f}" if row.value < 100 else f"{row.value:,.0f}"
    if row.unit in ("s", "x") and row.value < 10:
        value = f"{row.value:.2f}"
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
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument(
        "--imgfs-python", type=Path, help="mount with PYTHON -m imgfs (another checkout's venv)"
    )
    parser.add_argument(
        "--tree", type=Path, help="mount with the imgfs of this checkout (its .venv/bin/python)"
    )
    parser.add_argument(
        "--runs-of",
        default=DEFAULT_RUNS_OF,
        help=f"runs of single sections, e.g. cat=3,ls=5 (default {DEFAULT_RUNS_OF}: at most)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="scratch dir, emptied first (default BASE/work; one per concurrent run)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark drops page caches")
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        sys.exit(f"unknown sections {sorted(unknown)}; known: {','.join(SECTIONS)}")
    imgfs_cmd = _imgfs_command(args.imgfs_python, args.tree)
    stores = bench_stores.ensure_stores(args.base)
    bench = Bench(stores, args.runs, imgfs_cmd, args.work)
    source = _imgfs_source(imgfs_cmd)
    _byte_compile(imgfs_cmd)
    print(f"imgfs: {' '.join(imgfs_cmd)} ({source})", flush=True)
    started_load = _load()
    print(HEADER)
    started = time.monotonic()
    runs_of = _runs_of(args.runs_of, args.runs)
    for name in args.sections.split(","):
        bench.runs = runs_of.get(name, args.runs)
        getattr(bench, f"section_{name}")()
    elapsed = time.monotonic() - started
    if args.out:
        ran = set(args.sections.split(","))
        fewer = ", ".join(f"{k}: {v}" for k, v in runs_of.items() if k in ran and v != args.runs)
        runs = f"{args.runs} runs" + (f" ({fewer})" if fewer else "")
        _write_markdown(args.out, bench.rows, runs, elapsed, started_load, source)


SECTIONS = ("cp", "ttfb", "small", "many", "concurrent", "ls", "cat", "snapshot")


DEFAULT_RUNS_OF = "cat=2"
"""``cat`` at imgfs's speed of issue 13 takes 4-5 min per run; the default caps it at 2 runs."""


def _runs_of(spec: str, runs: int) -> dict[str, int]:
    """``SECTION=N,...`` as a dict; the default spec caps (never raises) ``--runs``."""
    out: dict[str, int] = {}
    for item in filter(None, spec.split(",")):
        name, _, count = item.partition("=")
        if name not in SECTIONS or not count.isdigit() or int(count) < 1:
            sys.exit(f"--runs-of: {item!r} is not SECTION=N (sections: {','.join(SECTIONS)})")
        out[name] = min(int(count), runs) if spec == DEFAULT_RUNS_OF else int(count)
    return out


def _imgfs_command(python: Path | None, tree: Path | None) -> tuple[str, ...]:
    if tree is not None:
        python = tree / ".venv" / "bin" / "python"
    if python is None:
        return measure.IMGFS
    if not python.exists():
        sys.exit(f"{python}: no such interpreter (run scripts/setup.sh in the checkout)")
    return (str(python), "-m", "imgfs")


def _byte_compile(cmd: tuple[str, ...]) -> None:
    """Write the mounting imgfs's .pyc files, as an installed package has them: with
    PYTHONDONTWRITEBYTECODE set (as here) every mount would compile its ~60 modules again
    (~90 ms of CPU before the mount is ready)."""
    python = cmd[0] if cmd != measure.IMGFS else sys.executable
    code = "import compileall, imgfs, os; compileall.compile_dir(os.path.dirname(imgfs.__file__))"
    subprocess.run([python, "-c", code], capture_output=True, cwd="/", check=False)


def _imgfs_source(cmd: tuple[str, ...]) -> str:
    """Where the mounting imgfs's code comes from."""
    python = cmd[0] if cmd != measure.IMGFS else sys.executable
    code = "import imgfs, os; print(os.path.dirname(os.path.dirname(imgfs.__file__)))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd="/")
    tree = out.stdout.strip()
    if not tree:
        return out.stderr.strip()
    git = ["git", "-C", tree, "log", "-1", "--format=%h %s"]
    commit = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", tree, "status", "--porcelain", "imgfs"], capture_output=True, text=True
    ).stdout
    return f"{tree} at {commit[:60]}" + (" (imgfs/ modified)" if dirty.strip() else "")


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _write_markdown(
    path: Path, rows: list[Row], runs: str, elapsed: float, load: str, source: str
) -> None:
    head = Path(__file__).with_name("BENCHMARKS.head.md").read_text()
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    table = "\n".join([HEADER, *(_format_row(r) for r in rows)])
    path.write_text(
        f"{head}\n## Results\n\nMeasured {when} on {_machine()}; imgfs from {source}; median of "
        f"{runs} ({elapsed / 60:.0f} min in all; load average at the start {load}, at the end "
        f"{_load()}).\n\n{table}\n"
    )


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(f"signal {signum}")  # so that every mount is unmounted in its finally


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    main()
