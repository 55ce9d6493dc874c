"""An attacker's fuzzing of imgfs/layer/_fastparse.c against the Python reference.

A seeded random-mutation loop (on top of test_fastparse.py's hypothesis tests) over real header
blocks and tar-split lines and crafted ones: every field rewritten with octal at and past its
width, spaces and NULs in every position, base-256 marks, names with ``.``/``..``/``//``/NUL, every
type flag, the three magics, padding of 0..2048 bytes, truncations; lines with non-canonical and
malformed base64, JSON escapes, control characters, invalid UTF-8, numbers at their digit limits.
Wherever the extension returns a value it must be the Python code's (``_same_or_none``,
``_check_line``); it must never crash nor leak: tracemalloc and the refcounts of everything it
hands out are checked around many calls on each exit path, and every allocation is made to fail
in turn.

By default each fuzz test runs a fixed number of cases (seconds in the suite);
``IMGFS_FUZZ_SECONDS=N`` runs each for N seconds instead, ``IMGFS_FUZZ_SEED`` picks the seed and
``IMGFS_FUZZ_CORPUS=/var/tmp/imgfs-bench`` adds (a sample of) every tar-split below that
directory, read only, to the corpus.

AddressSanitizer + UBSan run, in a scratch copy of imgfs/, tests/ and pyproject.toml (pytest
imports imgfs from the directory it runs in):

    gcc -shared -fPIC -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined \
        -fno-omit-frame-pointer -I/usr/include/python3.11 imgfs/layer/_fastparse.c \
        -DSOURCE_SHA256="\"$(sha256sum imgfs/layer/_fastparse.c | cut -c1-64)\"" \
        -o imgfs/layer/_fastparse.cpython-311-x86_64-linux-gnu.so
    LD_PRELOAD=$(gcc -print-file-name=libasan.so) PYTHONMALLOC=malloc ASAN_OPTIONS=detect_leaks=0 \
        IMGFS_FUZZ_SECONDS=600 /path/to/.venv/bin/python -m pytest tests/test_fastparse_fuzz.py

``PYTHONMALLOC=malloc`` matters: under pymalloc a bytes object under 512 bytes (nearly every
tar-split line) sits inside an arena and ASan cannot see a read past it. A read of exactly one
byte past a bytes object stays invisible either way (its trailing NUL).
"""

from __future__ import annotations

import base64
import gc
import glob
import gzip
import io
import os
import pathlib
import random
import sys
import tarfile
import time
import tracemalloc
from collections.abc import Callable, Iterator

import pytest

from imgfs.layer import compiled
from imgfs.layer.tarsplit import Segment, iter_entries
from imgfs.layer.tree import parse_member
from tests.test_fastparse import (
    _CORPUS,
    _LINE_CASES,
    _LINES,
    _block,
    _check_line,
    _ext,
    _name_of,
    _python,
    _same_or_none,
    needs_ext,
)

_SECONDS = float(os.environ.get("IMGFS_FUZZ_SECONDS", "0"))
_SEED = int(os.environ.get("IMGFS_FUZZ_SEED", "13"))
_CASES = 20_000  # per fuzz test without IMGFS_FUZZ_SECONDS (a few seconds each)

_FIELDS = {  # field: (offset, length) in a header block
    "name": (0, 100), "mode": (100, 8), "uid": (108, 8), "gid": (116, 8), "size": (124, 12),
    "mtime": (136, 12), "chksum": (148, 8), "typeflag": (156, 1), "linkname": (157, 100),
    "magic": (257, 8), "uname": (265, 32), "gname": (297, 32), "devmajor": (329, 8),
    "devminor": (337, 8), "prefix": (345, 155), "pad": (500, 8), "star": (508, 4),
}  # fmt: skip
_NUMBERS = ("mode", "uid", "gid", "size", "mtime", "chksum", "devmajor", "devminor")
_MAGICS = [b"ustar\x0000", b"ustar  \x00", b"\0" * 8, b"ustar\x00 0", b"ustar \x0000"]
_FLAGS = b"0123456789gxLKASDMNVX\x00\x80\xff"
_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _corpus_dir() -> tuple[list[tuple[bytes, bytes, int, int | None]], list[bytes]]:
    """Members (header bytes, name, size, crc) and lines of the tar-splits below
    IMGFS_FUZZ_CORPUS (a bench store), sampled; nothing without it."""
    root = os.environ.get("IMGFS_FUZZ_CORPUS")
    members: list[tuple[bytes, bytes, int, int | None]] = []
    lines: list[bytes] = []
    if not root:
        return members, lines
    sample = random.Random(_SEED)
    for path in sorted(glob.glob(os.path.join(root, "**", "*.tar-split.gz"), recursive=True)):
        with open(path, "rb") as f:
            raw = f.read()
        some = gzip.decompress(raw).split(b"\n")
        lines += sample.sample(some, min(len(some), 2000))
        pending: list[bytes] = []
        for entry in iter_entries(io.BytesIO(raw), path):
            if isinstance(entry, Segment):
                pending.append(entry.payload)
            elif sample.random() < 0.05:
                crc = int.from_bytes(entry.crc, "big") if entry.crc and entry.size else None
                members.append((b"".join(pending), entry.name, entry.size, crc))
                pending.clear()
            else:
                pending.clear()
    return members, lines


_DIR_MEMBERS, _DIR_LINES = _corpus_dir()
_LONG = _block("p" * 140 + "/" + "n" * 99)  # the ustar prefix field used
_BLOCKS = [
    *_CORPUS,
    _LONG[:508] + b"tar\0",  # star: only 131 bytes of prefix
    _LONG[:257] + b"ustar  \0" + _LONG[265:],  # GNU magic: the prefix field is no prefix
    *(data[-512:] for data, *_ in _DIR_MEMBERS if len(data) >= 512),
]
_ALL_LINES = _LINES + [line for line, _ in _LINE_CASES] + _DIR_LINES


def _rounds(rng: random.Random) -> Iterator[random.Random]:
    """_CASES rounds, or as many as fit in IMGFS_FUZZ_SECONDS."""
    if _SECONDS <= 0:
        for _ in range(_CASES):
            yield rng
        return
    end = time.monotonic() + _SECONDS
    while time.monotonic() < end:
        for _ in range(100):
            yield rng


def _junk(rng: random.Random, n: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(n))


def _octal(rng: random.Random, width: int) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:  # any number of digits, up to past the field
        digits = b"%o" % rng.getrandbits(rng.randint(0, 3 * width + 3))
    elif kind == 1:
        digits = rng.choice([b"7" * width, b"7" * (width - 1), b"0" * width, b"1" + b"0" * width])
    elif kind == 2:
        digits = bytes(rng.choice(b"01234567 \x00") for _ in range(rng.randint(0, width)))
    else:
        digits = b"%o" % rng.randint(0, 8**8)
    lead = rng.choice([b"", b" ", b"\0", b"  ", b" \0"])
    return lead + digits + rng.choice([b"", b" ", b"\0", b" \0", b"\0 "])


def _name(rng: random.Random, width: int = 100) -> bytes:
    parts = [b"a", b"b", b".", b"..", b"", b"dir", b"\xc3\xbc", b"x" * rng.randint(1, 60), b"\0"]
    value = b"/".join(rng.choice(parts) for _ in range(rng.randint(0, 8)))
    if rng.random() < 0.1:
        value = b"n" * width
    for prefix in (b"/", b"./"):
        if rng.random() < 0.2:
            value = prefix + value
    return value + (b"/" if rng.random() < 0.2 else b"")


def _mutated_block(rng: random.Random, block: bytes) -> bytes:
    out = bytearray(block)
    for _ in range(rng.choice([0, 1, 1, 2, 3, 5])):
        field = rng.choice(list(_FIELDS))
        pos, length = _FIELDS[field]
        if field in _NUMBERS:
            value = _octal(rng, length) if rng.random() < 0.8 else _junk(rng, length)
            if rng.random() < 0.05:  # a GNU base-256 number
                value = bytes([0x80 | rng.getrandbits(7)]) + _junk(rng, length - 1)
        elif field in ("name", "linkname", "prefix"):
            value = _name(rng, length) if rng.random() < 0.8 else _junk(rng, length)
        elif field == "typeflag":
            value = bytes([rng.choice(_FLAGS)])
        elif field == "magic":
            value = rng.choice(_MAGICS)
        elif field == "star":
            value = rng.choice([b"tar\0", b"tar ", b"\0\0\0\0"])
        else:
            value = _junk(rng, rng.randint(0, length))
        if rng.random() < 0.5:
            out[pos : pos + length] = bytes(length)
        start = pos + (0 if rng.random() < 0.7 else rng.randrange(length))
        value = value[: pos + length - start]
        out[start : start + len(value)] = value
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        out[rng.randrange(512)] = rng.getrandbits(8)
    return bytes(out)


def _other_name(rng: random.Random, block: bytes) -> bytes:
    """The name field, or it joined to the prefix field (155 or star's 131 bytes), whatever the
    magic says."""
    base = block[:100].partition(b"\0")[0]
    prefix = block[345 : 345 + rng.choice([131, 155])].partition(b"\0")[0]
    return base if rng.random() < 0.3 else prefix + b"/" + base


def _plain_size(block: bytes) -> int:
    try:
        return abs(int(block[124:136].strip(b" \0") or b"0", 8))
    except ValueError:
        return 0


@needs_ext
def test_fuzz_members_equal_python_or_decline() -> None:
    taken = total = 0
    for rng in _rounds(random.Random(_SEED)):
        block = _mutated_block(rng, rng.choice(_BLOCKS))
        where = rng.random()
        if where < 0.6:  # the previous member's padding, then the block
            pad = rng.randrange(512)
            data = (_junk(rng, pad) if rng.random() < 0.3 else bytes(pad)) + block
        elif where < 0.8:  # any length 0..2048
            data = _junk(rng, rng.randint(0, 2048))
            if rng.random() < 0.7:
                data = (bytes(rng.randint(0, 600)) + block)[: rng.randint(0, 2048)]
        else:
            data = bytes(rng.randint(0, 1100)) + block
        which = rng.random()
        if which < 0.6:
            name = _name_of(block)
        elif which < 0.75:  # what the block would name read another way: a confused parser
            name = _other_name(rng, block)
        elif which < 0.85:
            name = rng.choice([b"./", b"/", b""]) + _name_of(block) + rng.choice([b"", b"/"])
        else:
            name = _name(rng)
        size = _plain_size(block) if rng.random() < 0.7 else 0
        if rng.random() < 0.2:
            size = max(0, size + rng.choice([-1, 1, 1 << 33, 1 << 36]))
        if rng.random() < 0.1:
            size = rng.choice([(1 << 64) - 1, 1 << 63, 8**11, 8**12 - 1])
        crc = rng.choice([None, 5, 1 << 70]) if size else None
        taken += _same_or_none(data, name, size, crc, rng.randint(0, 1 << 40))
        total += 1
    for data, name, size, crc in _DIR_MEMBERS:  # the real ones, unmutated
        taken += _same_or_none(data, name, size, crc)
        total += 1
    assert taken >= total // 10  # not vacuous: many mutants stay plain


def _base64(rng: random.Random) -> bytes:
    raw = _junk(rng, rng.choice([0, 1, 2, 3, 8, 8, rng.randrange(700)]))
    text = bytearray(base64.b64encode(raw))
    for _ in range(0 if rng.random() < 0.5 else rng.randint(1, 3)):
        at = rng.randint(0, len(text))
        edit = rng.choice([b"=", b"==", b"A", b"\\n", b"\\/", b"\\u0041", b" ", b"\r", b"-", b"_",
                           b"\0", b"\xc3\xbc", bytes([rng.choice(_B64)]), b'"'])  # fmt: skip
        how = rng.random()
        if how < 0.5:
            text[at:at] = edit
        elif how < 0.8:
            text[at : at + 1] = edit
        else:
            del text[at : at + 1]
    return bytes(text)


def _crafted_line(rng: random.Random) -> bytes:
    position = rng.choice([b"0", b"7", b"1234567890123456789", b"12345678901234567890", b"",
                           b"-1", b"01", b"1.0"])  # fmt: skip
    end = rng.choice([b"}", b"}", b"} ", b"}}", b""])
    if rng.random() < 0.5:
        return b'{"type":2,"payload":"' + _base64(rng) + b'","position":' + position + end
    name = _name(rng) if rng.random() < 0.7 else _junk(rng, rng.randint(0, 20))
    if rng.random() < 0.2:
        name += rng.choice([b'\\"', b"\\\\", b"\\u0000", b"\\ud800", b"\t", b"\x1f", b"\x7f"])
    line = b'{"type":1,"name":"' + name + b'",'
    if rng.random() < 0.6:
        size = rng.choice([b"1", b"0", b"05", b"999999999999999", b"1000000000000000",
                           b"9999999999999999", b"99999999999999999", b"-5", b"1e3",
                           b"%d" % rng.getrandbits(rng.randint(1, 64))])  # fmt: skip
        line += b'"size":' + size + b","
    payload = rng.random()
    if payload < 0.3:
        line += b'"payload":null'
    elif payload < 0.9:
        crc = base64.b64encode(_junk(rng, 8)) if rng.random() < 0.6 else _base64(rng)
        line += b'"payload":"' + crc + b'"'
    else:
        line += b'"payload":' + rng.choice([b"nul", b"1", b'""', b"true"])
    return line + b',"position":' + position + end


_LINE_EDITS = [b'"', b"\\", b"=", b"A", b",", b"}", b" ", b"\0", b"\x1f", b"\xc3\xbc", b"\xff",
               b"null", b'"size":1,', b"0"]  # fmt: skip


def _mutated_line(rng: random.Random, line: bytes) -> bytes:
    out = bytearray(line)
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        at = rng.randint(0, len(out))
        how = rng.random()
        if how < 0.3:
            out[at:at] = rng.choice(_LINE_EDITS)
        elif how < 0.6:
            del out[at : at + rng.randint(1, 4)]
        elif how < 0.8 and out:
            out[min(at, len(out) - 1)] = rng.getrandbits(8)
        else:
            del out[at:]  # truncated
    return bytes(out)


@needs_ext
def test_fuzz_lines_equal_python_or_decline() -> None:
    taken = total = 0
    with pytest.MonkeyPatch.context() as monkeypatch:
        for rng in _rounds(random.Random(_SEED + 1)):
            kind = rng.random()
            if kind < 0.45:
                line = _mutated_line(rng, rng.choice(_ALL_LINES))
            elif kind < 0.9:
                line = _crafted_line(rng)
                if rng.random() < 0.3:
                    line = _mutated_line(rng, line)
            else:
                line = _junk(rng, rng.randint(0, 2048))
                if rng.random() < 0.7:
                    line = rng.choice([b'{"type":2,"payload":"', b'{"type":1,"name":"']) + line
            taken += _check_line(line.replace(b"\n", b""), monkeypatch)
            total += 1
        for line in _DIR_LINES:
            taken += _check_line(line, monkeypatch)
            total += 1
    assert taken >= total // 10


# -- no leaks, no lost references, allocation failures, odd arguments ---------------------------

_CRC = 1 << 70  # big ints: not the small-int cache
_GOOD = _block(size=5, uid=0o7777777, mtime=0o7777777777)
_DOTTED = _block("./a/b")
_ROOT = _block("./", tarfile.DIRTYPE)
_HARDLINK = _block("a", tarfile.LNKTYPE, linkname="./x//y")
_UNSAFE = _block("a", tarfile.LNKTYPE, linkname="../x")
_NOT_OCTAL = _GOOD[:100] + b"9" + _GOOD[101:]
_CALLS: dict[str, Callable[[], object]] = {
    "member": lambda: _ext().member(_GOOD, b"dir/file", 5, _CRC, 3),
    "member padded": lambda: _ext().member(b"\0" * 100 + _GOOD, b"dir/file", 5, _CRC, 3),
    "member ./name": lambda: _ext().member(_DOTTED, b"./a/b", 0, None, 3),
    "member root": lambda: _ext().member(_ROOT, b"./", 0, None, 3),
    "member hardlink": lambda: _ext().member(_HARDLINK, b"a", 0, None, 3),
    "member unsafe hardlink": lambda: _ext().member(_UNSAFE, b"a", 0, None, 3),
    "member sizes differ": lambda: _ext().member(_GOOD, b"dir/file", 6, _CRC, 3),
    "member names differ": lambda: _ext().member(_GOOD, b"dir/filf", 5, _CRC, 3),
    "member not octal": lambda: _ext().member(_NOT_OCTAL, b"dir/file", 5, _CRC, 3),
    "member short": lambda: _ext().member(_GOOD[:511], b"dir/file", 5, _CRC, 3),
    "segment": lambda: _ext().entry(b'{"type":2,"payload":"' + b"QUJD" * 50 + b'","position":1}'),
    "segment not canonical": lambda: _ext().entry(b'{"type":2,"payload":"QR==","position":1}'),
    "segment bad tail": lambda: _ext().entry(b'{"type":2,"payload":"QUJD","position":1x'),
    "file": lambda: _ext().entry(
        b'{"type":1,"name":"a/b","size":5,"payload":"AAAAAAAAAAE=","position":1}'
    ),
    "file without size": lambda: _ext().entry(b'{"type":1,"name":"a","payload":null,"position":1}'),
    "file crc of 7 bytes": lambda: _ext().entry(
        b'{"type":1,"name":"a","size":5,"payload":"AAAAAAAAAA==","position":1}'
    ),
    "other line": lambda: _ext().entry(b'{"type":3}'),
}


def _refcounts() -> list[int]:
    return [sys.getrefcount(o) for o in (None, False, True, (), _CRC, _GOOD)]


@needs_ext
@pytest.mark.parametrize("call", sorted(_CALLS))
def test_no_leak_on_any_exit(call: str) -> None:
    """Each exit path, 20k times: no memory kept, no reference taken or dropped (Python 3.11's
    None, False and () are counted, so a missing incref of one shows)."""
    run = _CALLS[call]
    for _ in range(100):
        run()
    refs = _refcounts()
    for _ in range(20_000):
        run()
    assert _refcounts() == refs
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(20_000):
            run()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 20_000  # one leaked object per call would be >= 600 kB


@needs_ext
@pytest.mark.parametrize("call", sorted(_CALLS))
def test_allocation_failures_raise_memory_error(call: str) -> None:
    """Each of the first 40 allocations of a call fails (alone, and with all after it): the
    call returns a result or raises MemoryError, never SystemError (NULL without an exception,
    or a result with one set) and never crashes."""
    testcapi = pytest.importorskip("_testcapi")
    run = _CALLS[call]
    for start in range(40):
        for stop in (start + 1, 0):
            testcapi.set_nomemory(start, stop)
            try:
                run()
            except MemoryError:
                pass
            finally:
                testcapi.remove_mem_hooks()


@needs_ext
def test_sizes_no_header_holds_are_declined() -> None:
    """A negative size or one of 2**64 and more: None (Python decides: an error), not an
    OverflowError escaping the fast path."""
    for size in (-1, -(1 << 70), 1 << 64, 1 << 100):
        assert _ext().member(_GOOD, b"dir/file", size, _CRC, 3) is None
        assert _python(_GOOD, b"dir/file", size, _CRC, 3) is None
    with pytest.raises(TypeError):
        _ext().member(_GOOD, b"dir/file", 5.0, _CRC, 3)


@needs_ext
def test_only_bytes_are_taken() -> None:
    """bytearray, memoryview (strided too) and str are a caller's error (TypeError), never read."""
    strided = memoryview(_GOOD * 2)[::2]
    for data in (bytearray(_GOOD), memoryview(_GOOD), strided, _GOOD.decode("latin-1")):
        with pytest.raises(TypeError):
            _ext().member(data, b"dir/file", 5, _CRC, 3)
        with pytest.raises(TypeError):
            _ext().member(_GOOD, data, 5, _CRC, 3)
        with pytest.raises(TypeError):
            _ext().entry(data)
    assert parse_member(_GOOD, b"dir/file", 5, _CRC, 3, "t") == _CALLS["member"]()


@needs_ext
def test_a_stale_build_is_not_used(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build of another C source (the checkout changed since set-up built it) computes other
    results than the Python code beside it: compiled.py declines it; without the source beside
    it (an install) the build is what was installed."""
    assert compiled.extension() is _ext()
    changed = tmp_path / "_fastparse.c"
    changed.write_bytes(compiled.SOURCE.read_bytes() + b"/* changed */\n")
    monkeypatch.setattr(compiled, "SOURCE", changed)
    assert compiled.extension() is None
    monkeypatch.setattr(compiled, "SOURCE", tmp_path / "missing.c")
    assert compiled.extension() is _ext()
