"""Image and layer records of ``images.json`` / ``layers.json``, parsed once at the edge.

Owns: the shape of the store's JSON records and their validation (IDs and digests checked before
anything uses them as a path), the ``metadata`` string of c/image (signature sizes) and RFC 3339
times. Must not know: files, locks, where the JSON came from.

Every field of every record is parsed defensively, so that one bad record fails alone: a record
whose ID is unusable, or that is not even JSON (a number beyond every bound, nesting too deep,
bytes that are not UTF-8), is dropped (``parse_*`` return the reason in ``skipped``); a record
with a usable ID but other bad fields is kept with ``problem`` set, so that its image shows up
and its files fail with a clear error; a big-data item with a bad size or digest fails alone
(``bad_big_data``). Strings are read as Go's encoding/json reads them (c/storage is Go): bytes
that are not UTF-8 and lone UTF-16 surrogates become U+FFFD, so names are always encodable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
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
    bad_big_data: frozenset[str] = frozenset()  # items with an invalid recorded size/digest

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
    toc_digest: str | None = None  # zstd:chunked: the TOC's digest (partial pulls)
    expected_diff_digest: bool = False  # diff_digest is c/image's expected-layer-diffid flag
    big_data_names: tuple[str, ...] = ()  # layer big data (the TOC, the layer-data format)
    compression: int | None = None  # of the pulled blob: 0 none, 1 bzip2, 2 gzip, 3 xz, 4 zstd
    uids: tuple[int, ...] = ()  # uidset/gidset: the owners the layer's files use
    gids: tuple[int, ...] = ()


@dataclass(frozen=True)
class SignatureSizes:
    """Lengths that split c/image's concatenated signature big data."""

    default: tuple[int, ...]
    per_digest: Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class Unparsable:
    """An element of a JSON array that does not decode on its own (it fails alone)."""

    reason: str


# One token of a JSON text for splitting an array: a string (escapes respected, possibly
# unterminated), a bracket or a comma. Everything else (numbers, literals, space) is skipped.
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{},]', re.S)


def load_array(data: bytes, what: str) -> list[object]:
    """Decode a JSON array file (empty file = empty list), bounded.

    When the whole text does not decode, the array is split into its elements and each is
    decoded alone: an element that still fails becomes ``Unparsable`` (its record is skipped)
    and the others are kept. Only a text that is not an array at all fails as a whole.
    """
    if len(data) > MAX_JSON_BYTES:
        raise MalformedMetadata(f"{what}: larger than {MAX_JSON_BYTES} bytes")
    text = data.decode("utf-8", errors="replace")  # as Go: invalid bytes become U+FFFD
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        elements = _split_array(text)
        if elements is None:
            raise MalformedMetadata(f"{what}: invalid JSON: {exc!s:.200}") from exc
        return [_load_element(element) for element in elements]
    if not isinstance(value, list):
        raise MalformedMetadata(f"{what}: not a JSON array")
    return value


def _load_element(text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        return Unparsable(f"invalid JSON: {exc!s:.200}")


def _split_array(text: str) -> list[str] | None:
    """The top-level elements of a JSON array, as texts; None when ``text`` is no array.

    Only strings and nesting are tracked, so a damaged element stays one element as long as
    its brackets balance; an unterminated array ends at the end of the text.
    """
    body = text.lstrip()
    if not body.startswith("["):
        return None
    elements: list[str] = []
    depth = 0
    start = 0
    for match in _TOKEN.finditer(body):
        token = match.group()
        if token[0] == '"':
            continue
        if token in "[{":
            depth += 1
            if depth == 1:
                start = match.end()
        elif token in "]}":
            depth -= 1
            if depth == 0:
                elements.append(body[start : match.start()])
                return [e for e in elements if e.strip()]
        elif depth == 1:
            elements.append(body[start : match.start()])
            start = match.end()
    elements.append(body[start:])
    return [e for e in elements if e.strip()]


def go_text(value: str) -> str:
    """``value`` as Go's encoding/json would hold it: lone surrogates replaced by U+FFFD."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return value


def parse_images(items: list[object], what: str) -> tuple[list[ImageRecord], list[str]]:
    """Parse image records; returns (records, reasons for skipped entries)."""
    records: list[ImageRecord] = []
    skipped: list[str] = []
    for index, item in enumerate(items):
        reason = _unusable(item, "image")
        if reason is not None:
            skipped.append(f"{what}: entry {index} {reason}")
            continue
        assert isinstance(item, dict)
        records.append(_image(item))
    return records, skipped


def parse_layers(
    items: list[object], what: str, source: str
) -> tuple[list[LayerRecord], list[str]]:
    """Parse layer records; returns (records, reasons for skipped entries)."""
    records: list[LayerRecord] = []
    skipped: list[str] = []
    for index, item in enumerate(items):
        reason = _unusable(item, "layer")
        if reason is not None:
            skipped.append(f"{what}: entry {index} {reason}")
            continue
        assert isinstance(item, dict)
        records.append(_layer(item, source))
    return records, skipped


def _unusable(item: object, kind: str) -> str | None:
    """Why a record is dropped, or None when it has a usable ID."""
    if isinstance(item, Unparsable):
        return f"is not JSON ({item.reason})"
    if not isinstance(item, dict):
        return f"is not an object, so has no valid {kind} ID"
    if not is_id(item.get("id")):
        return f"has no valid {kind} ID ({item.get('id')!r:.80})"
    return None


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
    except (ValueError, OverflowError):  # e.g. year 1 at +01:00 is before datetime.min
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
    digests, bad_digests = _big_data_digests(item.get("big-data-digests"), problems)
    layer = _optional_id(item.get("layer"), "top layer", problems)
    metadata = item.get("metadata")
    if metadata is None:
        metadata = ""
    elif not isinstance(metadata, str):
        problems.append("metadata is not a string")
        metadata = ""
    digest = item.get("digest")
    return ImageRecord(
        id=image_id,
        digest=digest if is_digest(digest) and isinstance(digest, str) else None,
        names=tuple(names),
        layer=layer,
        metadata=go_text(metadata),
        big_data_names=tuple(big_names),
        big_data_sizes=sizes,
        big_data_digests=digests,
        created=parse_time(item.get("created")),
        problem="; ".join(problems) or None,
        bad_big_data=bad_sizes | bad_digests,
    )


def _big_data_sizes(value: object, problems: list[str]) -> tuple[dict[str, int], frozenset[str]]:
    """Valid sizes by item, and the items whose size is invalid (they fail alone, so a bad
    ``signatures`` size fails only the signatures)."""
    sizes = _map(value, "big-data-sizes", problems)
    good = {k: v for k, v in sizes.items() if _is_size(v) and isinstance(v, int)}
    return good, frozenset(sizes.keys() - good.keys())


def _big_data_digests(value: object, problems: list[str]) -> tuple[dict[str, str], frozenset[str]]:
    """Valid digests by item, and the items whose recorded digest is invalid (they fail alone:
    their bytes cannot be checked)."""
    digests = _map(value, "big-data-digests", problems)
    good = {k: v for k, v in digests.items() if is_digest(v) and isinstance(v, str)}
    return good, frozenset(digests.keys() - good.keys())


def _optional_id(value: object, key: str, problems: list[str]) -> str | None:
    if value is None or value == "":
        return None
    if not is_id(value) or not isinstance(value, str):
        problems.append(f"invalid {key} {value!r:.80}")
        return None
    return value


def _layer(item: dict[str, object], source: str) -> LayerRecord:
    problems: list[str] = []
    parent = _optional_id(item.get("parent"), "parent", problems)
    flags = item.get("flags")
    if flags is None:
        flags = {}
    elif not isinstance(flags, dict):
        problems.append("flags is not an object")
        flags = {}
    toc_digest = item.get("toc-digest")
    if toc_digest is not None and not is_digest(toc_digest):
        problems.append(f"invalid toc-digest {toc_digest!r:.80}")
        toc_digest = None
    diff_digest = item.get("diff-digest")
    expected = False
    if diff_digest is None or diff_digest == "":
        diff_digest = flags.get("expected-layer-diffid") if toc_digest else None
        expected = diff_digest is not None
    if diff_digest is not None and not is_digest(diff_digest):
        problems.append(f"invalid diff-digest {diff_digest!r:.80}")
        diff_digest = None
    big_data_names = tuple(_str_list(item.get("big-data-names"), "big-data-names", problems))
    size = item.get("diff-size")
    if size is not None and not (_is_size(size) or (isinstance(size, int) and size == -1)):
        problems.append(f"invalid diff-size {size!r:.40}")
        size = None
    return LayerRecord(
        id=str(item["id"]),
        parent=parent,
        diff_digest=diff_digest if isinstance(diff_digest, str) else None,
        diff_size=size if isinstance(size, int) and size >= 0 else None,
        incomplete=flags.get("incomplete") is True,
        created=parse_time(item.get("created")),
        problem="; ".join(problems) or None,
        source=source,
        toc_digest=toc_digest if isinstance(toc_digest, str) else None,
        expected_diff_digest=expected,
        big_data_names=big_data_names,
        compression=_small_int(item.get("compression")),
        uids=_ids(item.get("uidset")),
        gids=_ids(item.get("gidset")),
    )


def _small_int(value: object) -> int | None:
    return (
        value
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 256
        else None
    )


def _ids(value: object) -> tuple[int, ...]:
    """A uidset/gidset (informative: file owners come from the tar headers); bad -> empty."""
    if not isinstance(value, list) or len(value) > 1 << 16:
        return ()
    ok = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 32 for v in value)
    return tuple(value) if ok else ()


def _str_list(value: object, key: str, problems: list[str]) -> list[str]:
    """A list of strings (as Go text), in order."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"{key} is not a list of strings")
        return []
    return [go_text(v) for v in value if isinstance(v, str)]


def _map(value: object, key: str, problems: list[str]) -> dict[str, object]:
    """An object's members by Go-text key (null: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{key} is not an object")
        return {}
    return {go_text(str(k)): v for k, v in value.items()}
