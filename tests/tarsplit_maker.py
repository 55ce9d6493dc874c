"""TEST-ONLY disassembler: tar bytes -> tar-split NDJSON.gz + a directory of extracted files.

Mimics vbatts/tar-split's disassembly as c/storage records a layer: for each member one segment
(the previous member's padding + this member's header blocks, PAX/GNU extension headers
included) and one file entry (name, size, base64 big-endian CRC-64/GO-ISO of the content or null);
then the bytes after the last member in <= 1 MiB segments. JSON is written as Go's encoding/json
writes it (field order, compact, ``<>&`` escaped, ``name_raw`` for non-UTF-8 names).
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import tarfile
from dataclasses import dataclass, field

from fastcrc import crc64

TRAILER_CHUNK = 1 << 20


@dataclass
class Disassembly:
    lines: list[dict[str, object]] = field(default_factory=list)

    def ndjson(self) -> bytes:
        out = []
        for obj in self.lines:
            text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
            text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            out.append(text.encode("utf-8") + b"\n")
        return b"".join(out)

    def gz(self) -> bytes:
        return gzip.compress(self.ndjson())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _name_fields(name: bytes) -> dict[str, object]:
    try:
        return {"name": name.decode("utf-8")}
    except UnicodeDecodeError:
        return {"name_raw": _b64(name)}


def disassemble(tar: bytes, dest: str | None = None) -> Disassembly:
    """Disassemble ``tar``; with ``dest``, extract its members there (without safety checks)."""
    result = Disassembly()
    pos = 0

    def add(obj: dict[str, object]) -> None:
        obj["position"] = len(result.lines)
        result.lines.append(obj)

    with tarfile.open(
        fileobj=io.BytesIO(tar), mode="r:", encoding="utf-8", errors="surrogateescape"
    ) as tf:
        for member in tf:
            add({"type": 2, "payload": _b64(tar[pos : member.offset_data])})
            name = member.name.encode("utf-8", "surrogateescape")
            if member.isdir():
                name += b"/"  # tarfile strips it; Go's reader keeps it
            size = member.size if member.isreg() else 0
            data = tar[member.offset_data : member.offset_data + size]
            entry: dict[str, object] = {"type": 1, **_name_fields(name)}
            if size:
                entry["size"] = size
                entry["payload"] = _b64(crc64.go_iso(data).to_bytes(8, "big"))
            else:
                entry["payload"] = None
            add(entry)
            pos = member.offset_data + size
            if dest is not None:
                _extract(dest, name, member, data)
    for start in range(pos, len(tar), TRAILER_CHUNK):
        add({"type": 2, "payload": _b64(tar[start : start + TRAILER_CHUNK])})
    return result


def _extract(dest: str, name: bytes, member: tarfile.TarInfo, data: bytes) -> None:
    path = os.path.join(os.fsencode(dest), name.strip(b"/"))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if member.isdir():
        os.makedirs(path, exist_ok=True)
    elif member.issym():
        os.symlink(os.fsencode(member.linkname), path)
    elif member.islnk():
        os.link(os.path.join(os.fsencode(dest), os.fsencode(member.linkname)), path)
    elif member.isreg():
        with open(path, "wb") as f:
            f.write(data)


def make_tar(
    members: list[tuple[str | bytes, bytes | str | None]],
    fmt: int = tarfile.PAX_FORMAT,
    trailer: bytes = b"",
) -> bytes:
    """A tar of ``(name, content)``: bytes = regular file, None = directory, ``"->t"`` = symlink
    to t, ``"=>t"`` = hardlink to t."""
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape"
    ) as tf:
        for raw_name, content in members:
            name = os.fsdecode(raw_name) if isinstance(raw_name, bytes) else raw_name
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if content is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tf.addfile(info)
            elif isinstance(content, str):
                info.type = tarfile.SYMTYPE if content.startswith("->") else tarfile.LNKTYPE
                info.linkname = content[2:]
                tf.addfile(info)
            else:
                info.size = len(content)
                info.mode = 0o644
                tf.addfile(info, io.BytesIO(content))
    return buf.getvalue() + trailer
