"""Image and layer records of ``images.json`` / ``layers.json``, parsed once at the edge.

Owns: the shape of the store's JSON records and their validation (IDs and digests checked before
anything uses them as a path), the ``metadata`` string of c/image (signature sizes) and RFC 3339
times. Must not know: files, locks, where the JSON came from.

A record whose ID is unusable is dropped (``parse_*`` returns it in ``skipped``); a record with a
usable ID but other bad fields is kept with ``problem`` set, so that its image shows up and its
files fail with a clear error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from imgfs.digest import is_digest, is_id
from imgfs.errors import MalformedMetadata

MAX_JSON_BYTES = 256 << 20
_MAX_SIZE = 1 << 50
_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)")


@dataclass(frozen=True)
class ImageRecord:
    id: str
    digest: str | None
    names: tuple[str, ...]
    layer: str | None
    metadata: str
    big_data_names: tuple[str, ...]
    big_data_sizes: Mapping[str, int]
    big_data_digests: Mapping[str, str]
    created: datetime | None
    problem: str | None = None
    bad_big_data: frozenset[str] = frozenset()  # items with an invalid recorded size

    @property
    def manifest_digest(self) -> str | None:
        """The image digest as c/image reports it: the digest of big-data item ``manifest``."""
        value = self.big_data_digests.get("manifest")
        return value if value is not None else self.digest


@dataclass(frozen=True)
class LayerRecord:
    id: str
    parent: str | None
    diff_digest: str | None
    diff_size: int | None
    incomplete: bool
    created: datetime | None
    problem: str | None = None
    source: str = field(default="", compare=False)  # the <driver>-layers dir it came from


@dataclass(frozen=True)
class SignatureSizes:
    """Lengths that split c/image's concatenated signature big data."""

    default: tuple[int, ...]
    per_digest: Mapping[str, tuple[int, ...]]


def load_array(data: bytes, what: str) -> list[object]:
    """Decode a JSON array file (empty file = empty list), bounded."""
    if len(data) > MAX_JSON_BYTES:
        raise MalformedMetadata(f"{what}: larger than {MAX_JSON_BYTES} bytes")
    if not data.strip():
        return []
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise MalformedMetadata(f"{what}: invalid JSON: {exc}") from exc
    if not isinstance(value, list):
        raise MalformedMetadata(f"{what}: not a JSON array")
    return value


def parse_images(items: list[object], what: str) -> tuple[list[ImageRecord], list[str]]:
    """Parse image records; returns (records, reasons for skipped entries)."""
    records: list[ImageRecord] = []
    skipped: list[str] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not is_id(item.get("id")):
            skipped.append(f"{what}: entry {index} has no valid image ID")
            continue
        records.append(_image(item))
    return records, skipped


def parse_layers(
    items: list[object], what: str, source: str
) -> tuple[list[LayerRecord], list[str]]:
    """Parse layer records; returns (records, reasons for skipped entries)."""
    records: list[LayerRecord] = []
    skipped: list[str] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not is_id(item.get("id")):
            skipped.append(f"{what}: entry {index} has no valid layer ID")
            continue
        records.append(_layer(item, source))
    return records, skipped


def parse_time(value: object) -> datetime | None:
    """RFC 3339 with up to 9 fractional digits (Python keeps 6)."""
    if not isinstance(value, str):
        return None
    match = _TIME.fullmatch(value)
    if match is None:
        return None
    base, frac, zone = match.groups()
    micro = (frac or "").ljust(6, "0")[:6]
    zone = "+00:00" if zone == "Z" else zone
    try:
        return datetime.fromisoformat(f"{base}.{micro}{zone}").astimezone(UTC)
    except ValueError:
        return None


def parse_signature_sizes(metadata: str, what: str) -> SignatureSizes:
    """The ``signature-sizes`` / ``signatures-sizes`` of c/image's metadata string."""
    if not metadata:
        return SignatureSizes((), {})
    try:
        doc = json.loads(metadata)
    except (ValueError, RecursionError) as exc:
        raise MalformedMetadata(f"{what}: metadata is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise MalformedMetadata(f"{what}: metadata is not a JSON object")
    default = _sizes(doc.get("signature-sizes"), what)
    per = doc.get("signatures-sizes") or {}
    if not isinstance(per, dict):
        raise MalformedMetadata(f"{what}: signatures-sizes is not an object")
    return SignatureSizes(default, {str(k): _sizes(v, what) for k, v in per.items()})


def _sizes(value: object, what: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(_is_size(v) for v in value):
        raise MalformedMetadata(f"{what}: signature sizes are not a list of sizes")
    return tuple(value)


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_SIZE


def _image(item: dict[str, object]) -> ImageRecord:
    image_id = str(item["id"])
    problems: list[str] = []
    names = _str_list(item.get("names"), "names", problems)
    big_names = _str_list(item.get("big-data-names"), "big-data-names", problems)
    sizes, bad_sizes = _big_data_sizes(item.get("big-data-sizes"), problems)
    digests = {
        k: v
        for k, v in _map(
            item.get("big-data-digests"), is_digest, "big-data-digests", problems
        ).items()
        if isinstance(v, str)
    }
    layer = item.get("layer")
    if layer in (None, ""):
        layer = None
    elif not is_id(layer):
        problems.append(f"invalid top layer {layer!r:.80}")
        layer = None
    metadata = item.get("metadata", "")
    if not isinstance(metadata, str):
        problems.append("metadata is not a string")
        metadata = ""
    digest = item.get("digest")
    return ImageRecord(
        id=image_id,
        digest=digest if isinstance(digest, str) and is_digest(digest) else None,
        names=tuple(names),
        layer=layer if isinstance(layer, str) else None,
        metadata=metadata,
        big_data_names=tuple(big_names),
        big_data_sizes=sizes,
        big_data_digests=digests,
        created=parse_time(item.get("created")),
        problem="; ".join(problems) or None,
        bad_big_data=bad_sizes,
    )


def _big_data_sizes(value: object, problems: list[str]) -> tuple[dict[str, int], frozenset[str]]:
    """Valid sizes by item, and the items whose size is invalid (they fail alone, so a bad
    ``signatures`` size fails only the signatures)."""
    sizes = _map(value, lambda _: True, "big-data-sizes", problems)
    good = {k: v for k, v in sizes.items() if _is_size(v) and isinstance(v, int)}
    return good, frozenset(sizes.keys() - good.keys())


def _layer(item: dict[str, object], source: str) -> LayerRecord:
    problems: list[str] = []
    parent = item.get("parent")
    if parent in (None, ""):
        parent = None
    elif not is_id(parent):
        problems.append(f"invalid parent {parent!r:.80}")
        parent = None
    flags = item.get("flags") or {}
    if not isinstance(flags, dict):
        problems.append("flags is not an object")
        flags = {}
    diff_digest = item.get("diff-digest")
    if diff_digest in (None, ""):
        diff_digest = flags.get("expected-layer-diffid") if item.get("toc-digest") else None
    if diff_digest is not None and not is_digest(diff_digest):
        problems.append(f"invalid diff-digest {diff_digest!r:.80}")
        diff_digest = None
    size = item.get("diff-size")
    if size is not None and not (_is_size(size) or size == -1):
        problems.append(f"invalid diff-size {size!r:.40}")
        size = None
    return LayerRecord(
        id=str(item["id"]),
        parent=parent if isinstance(parent, str) else None,
        diff_digest=diff_digest if isinstance(diff_digest, str) else None,
        diff_size=size if isinstance(size, int) and size >= 0 else None,
        incomplete=flags.get("incomplete") is True,
        created=parse_time(item.get("created")),
        problem="; ".join(problems) or None,
        source=source,
    )


def _str_list(value: object, key: str, problems: list[str]) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"{key} is not a list of strings")
        return []
    return list(value)


def _map(
    value: object, valid: Callable[[object], bool], key: str, problems: list[str]
) -> dict[str, object]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{key} is not an object")
        return {}
    good = {str(k): v for k, v in value.items() if valid(v)}
    if len(good) != len(value):
        problems.append(f"{key} has invalid values")
    return good
