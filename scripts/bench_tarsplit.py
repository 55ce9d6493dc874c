"""Benchmark: parse + index a synthetic tar-split of 100k files.

Writes a realistic ``tar-split.gz`` (ustar/PAX headers from ``tarfile``, names of 40-60 bytes,
10% directories, some long names needing PAX, Go-style JSON) to a temp dir, then times
``LayerIndex.build(iter_entries(...))`` (median of 3), reports entries/s, index memory per file
(``nbytes`` and the tracemalloc peak of one build), and ``to_bytes``/``from_bytes`` times.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import os
import random
import statistics
import tarfile
import tempfile
import time
import tracemalloc
from collections.abc import Callable

from imgfs.layer.index import LayerIndex
from imgfs.layer.tarsplit import iter_entries


def _name(rng: random.Random, k: int) -> str:
    dirs = ["usr/lib/x86_64-linux-gnu", "usr/share/doc", "usr/share/locale/de/LC_MESSAGES"]
    stem = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_-") for _ in range(rng.randint(8, 26)))
    name = f"{rng.choice(dirs)}/{stem}{k}.so.{rng.randint(0, 9)}"
    if rng.random() < 0.03:
        name = f"usr/share/{'very-long-directory-name/' * 5}{name}"  # > 100 bytes: PAX path
    return name


def make_tarsplit(path: str, files: int, seed: int = 1) -> int:
    """Write a tar-split.gz of ``files`` members to ``path``; return the line count."""
    rng = random.Random(seed)
    lines: list[bytes] = []
    pad = 0
    for k in range(files):
        info = tarfile.TarInfo(_name(rng, k))
        info.mtime = 1_700_000_000 + k
        is_dir = rng.random() < 0.1
        info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
        info.size = 0 if is_dir else int(rng.lognormvariate(8, 2)) % (1 << 24)
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        payload = base64.b64encode(b"\0" * pad + header).decode()
        lines.append(f'{{"type":2,"payload":"{payload}","position":{len(lines)}}}'.encode())
        crc = base64.b64encode(rng.randbytes(8)).decode()
        size = f'"size":{info.size},' if info.size else ""
        pl = f'"{crc}"' if info.size else "null"
        entry = f'{{"type":1,"name":"{info.name}",{size}"payload":{pl},"position":{len(lines)}}}'
        lines.append(entry.encode())
        pad = -info.size % 512
    trailer = base64.b64encode(b"\0" * (pad + 1024)).decode()
    lines.append(f'{{"type":2,"payload":"{trailer}","position":{len(lines)}}}'.encode())
    with gzip.open(path, "wb", compresslevel=6) as f:
        f.write(b"\n".join(lines) + b"\n")
    return len(lines)


def build(path: str) -> LayerIndex:
    with open(path, "rb") as f:
        return LayerIndex.build(iter_entries(f, "bench"), "bench")


def timed(fn: Callable[[], object], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "layer.tar-split.gz")
        n_lines = make_tarsplit(path, args.files)
        gz_size = os.path.getsize(path)
        print(f"tar-split: {args.files} files, {n_lines} lines, {gz_size} bytes gzipped")

        def parse_only() -> None:
            with open(path, "rb") as f:
                for _ in iter_entries(f, "bench"):
                    pass

        t_parse = timed(parse_only)
        t_build = timed(lambda: build(path))
        index = build(path)
        tracemalloc.start()
        build(path)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"parse only:      {t_parse:.3f} s  ({n_lines / t_parse:,.0f} lines/s)")
        print(f"parse + index:   {t_build:.3f} s  ({n_lines / t_build:,.0f} entries/s)")
        print(
            f"blob size {index.size} bytes, segments {index.segment_bytes} bytes, "
            f"{index.data_file_count} data files"
        )
        print(f"index nbytes:    {index.nbytes} ({index.nbytes / args.files:.1f} bytes/file)")
        print(f"tracemalloc peak during build: {peak} ({peak / args.files:.1f} bytes/file)")
        blob = index.to_bytes()
        t_to = timed(index.to_bytes)
        t_from = timed(lambda: LayerIndex.from_bytes(blob, "bench"))
        print(
            f"to_bytes:        {t_to:.3f} s, {len(blob)} bytes ({len(blob) / args.files:.1f}/file)"
        )
        print(f"from_bytes:      {t_from:.3f} s  (speed-up vs parse: {t_build / t_from:.0f}x)")


if __name__ == "__main__":
    main()
