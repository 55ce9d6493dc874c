"""TEST-ONLY oracles for ``layers/`` and ``rootfs/``: layer tars applied as c/storage applies them.

``apply_layers(tars, dest)`` extracts uncompressed layer tars (skopeo's ``dir:`` export, our own
fixtures) in order into ``dest`` the way c/storage's ``UnpackLayer`` does: ``.wh.<name>``
removes ``<name>``, ``.wh..wh..opq`` removes what lower layers put in its directory, top-level
``.wh..wh.*`` is skipped, a directory over a directory keeps its content, anything else is
replaced; owners, modes, xattrs and times are set from the headers; hardlinks are hardlinks;
devices are made with mknod (needs root). Members are written one by one (never
``extractall``), and names with ``..`` are refused.

``tar_listing(tar)`` parses ``tar -tv --numeric-owner --full-time`` (GNU tar, UTC) of a layer.
"""

from __future__ import annotations

import codecs
import os
import re
import shutil
import stat
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


def _clean(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    assert ".." not in parts, f"unsafe member name {name!r}"
    return "/".join(parts)


def _remove(path: bytes) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def apply_layers(tars: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for tar in tars:
        _apply_layer(tar, os.fsencode(dest))


def _apply_layer(tar: Path, root: bytes) -> None:
    unpacked: set[bytes] = set()
    dirs: list[tuple[bytes, tarfile.TarInfo]] = []
    with tarfile.open(tar, "r:", encoding="utf-8", errors="surrogateescape") as tf:
        for member in tf:
            name = _clean(member.name)
            if not name:
                dirs.append((root, member))
                continue
            path = os.path.join(root, os.fsencode(name))
            base = os.path.basename(name)
            if name.startswith(".wh..wh.") and name != OPAQUE:
                continue
            if base == OPAQUE:
                _opaque(os.path.dirname(path), unpacked)
                continue
            if base.startswith(WHITEOUT):
                _remove(os.path.join(os.path.dirname(path), os.fsencode(base[len(WHITEOUT) :])))
                continue
            unpacked.add(path)
            _create(tf, member, root, path)
            if member.isdir():
                dirs.append((path, member))
    for path, member in reversed(dirs):
        os.utime(path, ns=(int(member.mtime) * 10**9,) * 2, follow_symlinks=False)


def _opaque(directory: bytes, unpacked: set[bytes]) -> None:
    for name in os.listdir(directory):
        child = os.path.join(directory, name)
        if child not in unpacked:
            _remove(child)


def _create(tf: tarfile.TarFile, member: tarfile.TarInfo, root: bytes, path: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    exists = os.path.lexists(path)
    if exists and not (member.isdir() and os.path.isdir(path) and not os.path.islink(path)):
        _remove(path)
    if member.isdir():
        os.makedirs(path, exist_ok=True)
    elif member.isreg():
        source = tf.extractfile(member)
        assert source is not None
        with open(path, "wb") as out:
            shutil.copyfileobj(source, out)
    elif member.issym():
        os.symlink(os.fsencode(member.linkname), path)
    elif member.islnk():
        os.link(os.path.join(root, os.fsencode(_clean(member.linkname))), path)
        os.lchown(path, member.uid, member.gid)
        return  # c/storage does not chmod/chtime through a link
    elif member.ischr() or member.isblk():
        kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
        os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))
    elif member.isfifo():
        os.mkfifo(path, 0o600)
    os.lchown(path, member.uid, member.gid)
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            raw = value.encode("utf-8", "surrogateescape")
            os.setxattr(path, key.removeprefix("SCHILY.xattr."), raw, follow_symlinks=False)
    if not member.issym():
        os.chmod(path, member.mode & 0o7777)
        os.utime(path, ns=(int(member.mtime) * 10**9,) * 2)


@dataclass(frozen=True)
class Listed:
    """One line of ``tar -tv``."""

    type: str  # first mode char: - d l h c b p
    perms: str  # the other nine mode chars
    uid: int
    gid: int
    size: str  # bytes, or "major,minor"
    mtime: str  # YYYY-MM-DD HH:MM:SS (UTC)
    name: bytes
    link: bytes | None


_LINE = re.compile(rb"^(.)(.{9}) (\d+)/(\d+) +(\d+|\d+,\d+) (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (.*)$")


def _unescape(text: bytes) -> bytes:
    return codecs.escape_decode(text)[0]  # type: ignore[attr-defined,no-any-return]


def tar_listing(tar: Path) -> list[Listed]:
    env = {**os.environ, "TZ": "UTC", "LC_ALL": "C"}
    cmd = ["tar", "-tv", "--numeric-owner", "--full-time", "--quoting-style=escape", "-f", str(tar)]
    out = subprocess.run(cmd, capture_output=True, check=True, env=env).stdout
    listed = []
    for line in out.splitlines():
        m = _LINE.match(line)
        assert m is not None, line
        kind, perms, uid, gid, size, mtime, rest = m.groups()
        link = None
        if kind == b"l":
            rest, _, target = rest.partition(b" -> ")
            link = _unescape(target)
        elif kind == b"h":
            rest, _, target = rest.partition(b" link to ")
            link = _unescape(target)
        fields = (kind.decode(), perms.decode(), int(uid), int(gid), size.decode())
        listed.append(Listed(*fields, mtime.decode(), _unescape(rest), link))
    return listed
