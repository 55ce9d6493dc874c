"""Tar member headers parsed from the raw header blocks a tar-split segment holds.

Owns: the ustar / GNU / star / v7 header block layout, numeric fields (octal and GNU base-256),
PAX extended records (``x``; ``g`` marks a global header member), GNU long names (``L``/``K``),
and the rules Go's ``archive/tar`` reader applies to turn those into one member's metadata
(prefix joining, PAX overriding the block, GNU long names overriding PAX, ``\\0``-typed names
ending in ``/`` being directories). Must not know: tar-split lines, layer files, trees, FUSE.

Input is the concatenated segment bytes between two tar-split file entries: the previous
member's padding (less than 512 bytes, so ``len % 512`` of it) followed by this member's header
blocks. Everything is bounded (PAX data, long names, record counts); nothing is extracted and
Python's ``tarfile`` is not used. Errors are ``MalformedMetadata`` naming ``what``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from imgfs.errors import MalformedMetadata

BLOCK = 512
MAX_EXTENSION_BYTES = 1 << 20  # one PAX header or GNU long name
MAX_PAX_RECORDS = 4096
MAX_NAME = 64 << 10

# name, mode, uid, gid, size, mtime, chksum, typeflag, linkname, magic, version, uname, gname,
# devmajor, devminor, prefix (155 bytes; star uses only its first 131), 12 bytes of padding.
_BLOCK = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
_USTAR = (b"ustar\x00", b"00")
_GNU = (b"ustar ", b" \x00")
_OCTAL = frozenset(b"01234567")
_OCTAL_FIELD = b"01234567 \x00"  # what a plain octal field holds
_EXTENSIONS = frozenset(b"xLK")

REGULAR = "0"
HARDLINK = "1"
SYMLINK = "2"
CHARDEV = "3"
BLOCKDEV = "4"
DIRECTORY = "5"
FIFO = "6"
GLOBAL = "g"
_REGULAR_FLAGS = frozenset(("0", "\x00", "7"))
_OLD_REGULAR = "\x00"  # pre-POSIX regular file, or a directory when its name ends in '/'
KNOWN_TYPES = frozenset((REGULAR, HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO, GLOBAL))


@dataclass(frozen=True, slots=True)
class Header:
    """One member's metadata as Go's tar reader reports it (typeflag normalised, see above)."""

    name: bytes
    typeflag: str  # one of KNOWN_TYPES, or another flag the tree ignores
    mode: int  # permission bits incl. setuid/setgid/sticky (07777)
    uid: int
    gid: int
    size: int  # the header's size field (after PAX)
    mtime_ns: int
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: tuple[tuple[str, bytes], ...]


def parse_header(data: bytes, what: str) -> Header:
    """The member whose header blocks end ``data`` (previous padding first, ``len % 512``)."""
    pos = len(data) % BLOCK
    pax: dict[str, bytes] | None = None
    long_name: bytes | None = None
    long_link: bytes | None = None
    while True:
        if pos + BLOCK > len(data):
            raise MalformedMetadata(f"{what}: tar header missing before a member")
        flag = data[pos + 156]
        if flag not in _EXTENSIONS:
            break
        size = _number(data[pos + 124 : pos + 136], what)
        if size > MAX_EXTENSION_BYTES:
            raise MalformedMetadata(f"{what}: tar extension header of {size} bytes")
        body = data[pos + BLOCK : pos + BLOCK + size]
        if len(body) != size:
            raise MalformedMetadata(f"{what}: truncated tar extension header")
        pos += BLOCK + -(-size // BLOCK) * BLOCK
        if flag == 0x78:  # x: each one replaces the previous (as Go does)
            pax = _pax_records(body, what)
        elif flag == 0x4C:  # L
            long_name = _cstr(body)
        else:  # K
            long_link = _cstr(body)
    if pos + BLOCK != len(data):
        raise MalformedMetadata(f"{what}: unexpected bytes after a tar header")
    header = _block(data, pos, what)
    if pax:
        header = _merge_pax(header, pax, what)
    if long_name is not None or long_link is not None:
        header = _replace_names(header, long_name, long_link)
    if header.typeflag == _OLD_REGULAR:  # Go: by the final name (PAX path, GNU long name)
        header = _with(header, {"typeflag": DIRECTORY if header.name.endswith(b"/") else REGULAR})
    if len(header.name) > MAX_NAME or len(header.linkname) > MAX_NAME:
        raise MalformedMetadata(f"{what}: tar member name longer than {MAX_NAME} bytes")
    return header


def _block(data: bytes, pos: int, what: str) -> Header:
    (
        name, mode, uid, gid, size, mtime, _chksum, flag, linkname, magic, version,
        uname, gname, devmajor, devminor, prefix,
    ) = _BLOCK.unpack_from(data, pos)  # fmt: skip
    del uname, gname
    name = name.partition(b"\x00")[0]
    major = minor = 0
    ustar = (magic, version) == _USTAR
    if ustar or (magic, version) == _GNU:
        devices = _plain_devices(data[pos + 329 : pos + 345])
        if devices is None:
            devices = (_number(devmajor, what), _number(devminor, what))
        major, minor = devices
    if ustar:
        star = data[pos + 508 : pos + 512] == b"tar\x00"
        head = (prefix[:131] if star else prefix).partition(b"\x00")[0]
        if head:
            name = head + b"/" + name
    typeflag = flag.decode("latin-1")
    if typeflag in _REGULAR_FLAGS and typeflag != _OLD_REGULAR:  # '\0': parse_header decides
        typeflag = REGULAR
    numbers = _plain_numbers(data[pos + 100 : pos + 148])
    if numbers is None:
        numbers = (
            _number(mode, what), _number(uid, what), _number(gid, what), _number(size, what),
            _number(mtime, what, signed=True),
        )  # fmt: skip
    return Header(
        name=name,
        typeflag=typeflag,
        mode=numbers[0] & 0o7777,
        uid=numbers[1],
        gid=numbers[2],
        size=numbers[3],
        mtime_ns=numbers[4] * 1_000_000_000,
        linkname=linkname.partition(b"\x00")[0],
        devmajor=major,
        devminor=minor,
        xattrs=(),
    )


def _plain_numbers(fields: bytes) -> tuple[int, int, int, int, int] | None:
    """mode, uid, gid, size, mtime (bytes 100-148 of the block) when all five are plain octal,
    as nearly every tar writes them; None: let ``_number`` decide each (base-256, stray
    characters, and its error messages)."""
    if fields.translate(None, _OCTAL_FIELD):  # a byte that is no octal digit, space or NUL
        return None
    try:
        return (
            int(fields[0:8].strip(b" \x00") or b"0", 8),
            int(fields[8:16].strip(b" \x00") or b"0", 8),
            int(fields[16:24].strip(b" \x00") or b"0", 8),
            int(fields[24:36].strip(b" \x00") or b"0", 8),
            int(fields[36:48].strip(b" \x00") or b"0", 8),
        )
    except ValueError:  # a space or NUL between digits
        return None


def _plain_devices(fields: bytes) -> tuple[int, int] | None:
    """devmajor, devminor (bytes 329-345) as ``_plain_numbers`` reads its fields."""
    if fields.translate(None, _OCTAL_FIELD):
        return None
    try:
        return (
            int(fields[0:8].strip(b" \x00") or b"0", 8),
            int(fields[8:16].strip(b" \x00") or b"0", 8),
        )
    except ValueError:
        return None


def _cstr(field: bytes) -> bytes:
    return field.partition(b"\x00")[0]


def _number(field: bytes, what: str, signed: bool = False) -> int:
    """Go's parseNumeric: GNU base-256 when the high bit is set, else octal."""
    if field and field[0] & 0x80:
        inverse = 0xFF if field[0] & 0x40 else 0
        value = 0
        for i, byte in enumerate(field):
            byte ^= inverse
            if i == 0:
                byte &= 0x7F
            if value >> 56:
                raise MalformedMetadata(f"{what}: tar numeric field overflows")
            value = value << 8 | byte
        if inverse:
            value = ~value
            if not signed:
                raise MalformedMetadata(f"{what}: negative tar numeric field")
        return value
    text = field.strip(b" \x00")
    if not text:
        return 0
    if not _OCTAL.issuperset(text):
        raise MalformedMetadata(f"{what}: tar numeric field {field!r:.40} is not octal")
    return int(text, 8)


def _pax_records(body: bytes, what: str) -> dict[str, bytes]:
    """PAX ``"%d %s=%s\\n"`` records; later keys win, as in Go."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(body):
        if len(records) >= MAX_PAX_RECORDS:
            raise MalformedMetadata(f"{what}: more than {MAX_PAX_RECORDS} PAX records")
        space = body.find(b" ", pos, pos + 21)
        digits = body[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise MalformedMetadata(f"{what}: invalid PAX record length")
        end = pos + int(digits)
        if end > len(body) or end <= space + 1 or body[end - 1] != 0x0A:
            raise MalformedMetadata(f"{what}: invalid PAX record")
        key, eq, value = body[space + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise MalformedMetadata(f"{what}: PAX record without key=value")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos = end
    return records


def _merge_pax(header: Header, pax: dict[str, bytes], what: str) -> Header:
    """Go's mergePAX: PAX values override the block's fields; SCHILY.xattr.* are xattrs."""
    fields: dict[str, object] = {}
    if "path" in pax:
        fields["name"] = pax["path"]
    if "linkpath" in pax:
        fields["linkname"] = pax["linkpath"]
    for key in ("uid", "gid", "size"):
        if key in pax:
            fields[key] = _pax_int(pax[key], key, what)
    if "mtime" in pax:
        fields["mtime_ns"] = _pax_time(pax["mtime"], what)
    xattrs = tuple(
        (key.removeprefix("SCHILY.xattr."), value)
        for key, value in sorted(pax.items())
        if key.startswith("SCHILY.xattr.") and len(key) > len("SCHILY.xattr.")
    )
    if xattrs:
        fields["xattrs"] = xattrs
    return _with(header, fields)


def _replace_names(header: Header, name: bytes | None, link: bytes | None) -> Header:
    fields: dict[str, object] = {}
    if name is not None:
        fields["name"] = name
    if link is not None:
        fields["linkname"] = link
    return _with(header, fields)


def _with(header: Header, fields: dict[str, object]) -> Header:
    if not fields:
        return header
    values = {slot: getattr(header, slot) for slot in Header.__slots__}
    values.update(fields)
    return Header(**values)


def _pax_int(value: bytes, key: str, what: str) -> int:
    if not value.isdigit() or len(value) > 19:
        raise MalformedMetadata(f"{what}: PAX {key} {value!r:.40} is not a number")
    return int(value)


def _pax_time(value: bytes, what: str) -> int:
    """Go's parsePAXTime: seconds with an optional fraction (nanoseconds kept)."""
    secs, _, frac = value.partition(b".")
    negative = secs.startswith(b"-")
    digits = secs[1:] if negative else secs
    if not digits.isdigit() or len(digits) > 19 or (frac and not frac.isdigit()):
        raise MalformedMetadata(f"{what}: PAX mtime {value!r:.40} is invalid")
    nanos = int((frac[:9] or b"0").ljust(9, b"0"))
    total = int(digits) * 1_000_000_000 + nanos
    return -total if negative else total
