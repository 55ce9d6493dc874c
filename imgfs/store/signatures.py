"""Signature blobs as containers/image stores them and as ``skopeo copy … dir:`` writes them.

Owns: splitting c/image's concatenated signature big data by its recorded sizes, recognising
each blob's format (simple signing / OpenPGP, or the ``\\x00<format>\\n`` prefix), and the bytes
a ``dir:`` destination writes for it. Must not know: files, the store.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence

from imgfs import gojson
from imgfs.errors import MalformedMetadata

_OPENPGP_FIRST_BYTES = frozenset(
    [0xA0, 0xA1, 0xA2, 0xA3, 0xC8, 0x90, 0x91, 0x92, 0x3D, 0xC4, 0x88, 0x89, 0x8A, 0x8B, 0xC2]
)
SIMPLE_SIGNING = b"simple-signing"
SIGSTORE_JSON = b"sigstore-json"


def split_signatures(data: bytes, sizes: Sequence[int], what: str) -> list[bytes]:
    """Slice ``data`` by ``sizes`` exactly (GetSignaturesWithFormat) into dir:-format blobs."""
    blobs: list[bytes] = []
    offset = 0
    for number, length in enumerate(sizes, 1):
        if offset + length > len(data):
            raise MalformedMetadata(
                f"{what}: signature sizes need {offset + length} bytes, only {len(data)} stored"
            )
        blobs.append(dir_blob(data[offset : offset + length], f"{what}: signature {number}"))
        offset += length
    if offset != len(data):
        raise MalformedMetadata(f"{what}: signature data has {len(data) - offset} extra bytes")
    return blobs


def dir_blob(blob: bytes, what: str) -> bytes:
    """The bytes c/image's ``signature.Blob`` gives for a stored signature ``blob``."""
    if not blob:
        raise MalformedMetadata(f"{what}: empty signature")
    if blob[0] != 0:
        if blob[0] not in _OPENPGP_FIRST_BYTES:
            raise MalformedMetadata(f"{what}: unrecognized signature format")
        return blob
    name, newline, body = blob[1:].partition(b"\n")
    if not newline:
        raise MalformedMetadata(f"{what}: signature format name is not terminated")
    if name == SIMPLE_SIGNING:
        return body
    if name == SIGSTORE_JSON:
        return b"\x00" + SIGSTORE_JSON + b"\n" + _sigstore(body, what)
    raise MalformedMetadata(f"{what}: unsupported signature format {name[:40]!r}")


def _sigstore(body: bytes, what: str) -> bytes:
    try:
        doc = json.loads(body)
        mime = doc["mimeType"]
        payload = base64.b64decode(doc["payload"] or "", validate=True)
        annotations = doc.get("annotations") or {}
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError) as exc:
        raise MalformedMetadata(f"{what}: invalid sigstore signature") from exc
    if not isinstance(mime, str) or not isinstance(annotations, dict):
        raise MalformedMetadata(f"{what}: invalid sigstore signature")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
        raise MalformedMetadata(f"{what}: invalid sigstore annotations")
    parts = [
        b'{"mimeType":' + gojson.string(mime),
        b',"payload":' + gojson.string(base64.b64encode(payload).decode("ascii")),
        b',"annotations":' + (gojson.string_map(annotations) if annotations else b"null"),
    ]
    return b"".join(parts) + b"}"
