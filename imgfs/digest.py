"""Validation of IDs and digests before they touch a path.

Owns: the syntax of 64-hex IDs and ``sha256:<hex>`` digests. Must not know: files, the store.
"""

from __future__ import annotations

import re

from imgfs.errors import MalformedMetadata

_HEX = re.compile(r"[0-9a-f]*")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

# The gzip of an empty 1024-zero tar that schema1 manifests name for throwaway layers.
EMPTY_LAYER_DIGEST = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4"
EMPTY_LAYER_BYTES = bytes.fromhex(
    "1f8b080000096e8800ff621805a360148c5800080000ffff2eafb5ef00040000"
)


def is_id(value: object) -> bool:
    """True for a 64-character lower-case hex string (image and layer IDs)."""
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def is_hex(value: str) -> bool:
    """True for lower-case hex characters only (an ID or an ID prefix; empty counts)."""
    return _HEX.fullmatch(value) is not None


def is_digest(value: object) -> bool:
    """True for ``sha256:`` followed by 64 lower-case hex characters."""
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def check_digest(value: object, what: str) -> str:
    """Return ``value`` if it is a valid sha256 digest, else raise MalformedMetadata."""
    if not is_digest(value):
        raise MalformedMetadata(f"{what}: invalid digest {value!r:.80}")
    assert isinstance(value, str)
    return value
