"""An image as an OCI image layout: the manifest rewritten to the served uncompressed layers.

Owns: the bytes of ``oci-layout``, ``index.json`` and the layout's manifest, following
containers/image ≥ 5.30 writing a ``containers-storage:`` image to an ``oci:`` destination
(storage-format.md §9.2): an OCI manifest whose layer descriptors are already the uncompressed
layers (digest = diff digest, size = diff size, uncompressed media type, no ``urls`` or
``annotations``) is kept byte for byte; otherwise it is re-serialized as Go's encoding/json
writes image-spec 1.1's structs (field order, omitempty, HTML-safe escaping, sorted maps) with
every layer replaced by {uncompressed media type of the original, diff digest, diff size}.
A Docker schema 2 manifest becomes an OCI manifest (an OCI layout holds only OCI manifests)
whose config descriptor names the stored config blob unchanged, with the OCI config media type
(c/image would re-encode the config into a new blob; imgfs offers only blobs the store holds).
Schema 1 manifests and manifest lists have no OCI layout here.
Must not know: the store, files, FUSE.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any

from imgfs import gojson
from imgfs.errors import MalformedMetadata, NotFound
from imgfs.store.manifest import (
    DOCKER_LAYER,
    DOCKER_V2S2,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    guess_type,
)

OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
OCI_NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar"
DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar"
LAYOUT_TYPES = (OCI_MANIFEST, DOCKER_V2S2)

# c/image's Decompress operation on a layer's media type (OCI1 and Schema2 MIME type sets).
_UNCOMPRESSED = {
    OCI_LAYER: OCI_LAYER,
    OCI_LAYER + "+gzip": OCI_LAYER,
    OCI_LAYER + "+zstd": OCI_LAYER,
    OCI_NONDISTRIBUTABLE: OCI_NONDISTRIBUTABLE,
    OCI_NONDISTRIBUTABLE + "+gzip": OCI_NONDISTRIBUTABLE,
    OCI_NONDISTRIBUTABLE + "+zstd": OCI_NONDISTRIBUTABLE,
}
_DOCKER_TO_OCI = {
    DOCKER_LAYER: OCI_LAYER,
    DOCKER_LAYER + ".gzip": OCI_LAYER,
    DOCKER_FOREIGN: OCI_NONDISTRIBUTABLE,
    DOCKER_FOREIGN + ".gzip": OCI_NONDISTRIBUTABLE,
}


def layout_manifest(stored: bytes, layers: Sequence[tuple[str, int]], what: str) -> bytes:
    """The manifest of the layout for ``stored``; ``layers`` = (diff digest, diff size), base
    first, as LayerInfosForCopy lists them."""
    doc = _load(stored, what)
    media_type = guess_type(doc)
    if media_type not in LAYOUT_TYPES:
        raise NotFound(f"{what}: a {media_type or 'manifest'} has no OCI layout here")
    descriptors = _list(doc.get("layers"), "layers", what)
    if len(descriptors) != len(layers):
        raise MalformedMetadata(f"{what}: manifest and store differ in their number of layers")
    if media_type == OCI_MANIFEST and _already_uncompressed(descriptors, layers):
        return stored
    table = _UNCOMPRESSED if media_type == OCI_MANIFEST else _DOCKER_TO_OCI
    new_layers = []
    for desc, (digest, size) in zip(descriptors, layers, strict=True):
        old_type = _object(desc, "layer", what).get("mediaType", "")
        new_type = table.get(old_type) if isinstance(old_type, str) else None
        if new_type is None:
            raise MalformedMetadata(f"{what}: cannot decompress layer media type {old_type!r:.80}")
        new_layers.append(_descriptor({"mediaType": new_type, "digest": digest, "size": size}))
    if media_type == DOCKER_V2S2:
        config = dict(_object(doc.get("config"), "config", what), mediaType=OCI_CONFIG)
        doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config}
    return _manifest(doc, new_layers, what)


def index_json(manifest_digest: str, manifest_size: int) -> bytes:
    """``index.json`` naming the one manifest (c/image's layout writer, image-spec 1.1)."""
    manifest = _descriptor(
        {"mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": manifest_size}
    )
    return (
        b'{"schemaVersion":2,"mediaType":' + gojson.string(OCI_INDEX)
        + b',"manifests":[' + manifest + b"]}"
    )  # fmt: skip


def _already_uncompressed(descriptors: list[Any], layers: Sequence[tuple[str, int]]) -> bool:
    for desc, (digest, size) in zip(descriptors, layers, strict=True):
        if not isinstance(desc, dict):
            return False
        if (desc.get("digest"), desc.get("size"), desc.get("mediaType")) != (
            digest,
            size,
            OCI_LAYER,
        ):
            return False
        if desc.get("urls") is not None or desc.get("annotations") is not None:
            return False
    return True


def _load(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise MalformedMetadata(f"{what}: manifest is not JSON: {exc}") from exc
    return _object(doc, "manifest", what)


def _object(value: object, name: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedMetadata(f"{what}: manifest {name} is not an object")
    return value


def _list(value: object, name: str, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise MalformedMetadata(f"{what}: manifest {name} is not a list")
    return value


def _manifest(doc: dict[str, Any], layers: list[bytes], what: str) -> bytes:
    """Go's Marshal of image-spec 1.1's Manifest: the field order and omitempty rules."""
    version = doc.get("schemaVersion")
    if not isinstance(version, int) or isinstance(version, bool):
        raise MalformedMetadata(f"{what}: manifest schemaVersion is not an integer")
    parts = [b'"schemaVersion":' + str(version).encode()]
    for key in ("mediaType", "artifactType"):
        if doc.get(key):
            parts.append(_field(key, _string(doc[key], key, what)))
    parts.append(b'"config":' + _descriptor(_object(doc.get("config"), "config", what), what))
    parts.append(b'"layers":[' + b",".join(layers) + b"]")
    if doc.get("subject") is not None:
        subject = _object(doc["subject"], "subject", what)
        parts.append(b'"subject":' + _descriptor(subject, what))
    if doc.get("annotations"):
        parts.append(b'"annotations":' + _map(doc["annotations"], what))
    return b"{" + b",".join(parts) + b"}"


def _descriptor(desc: dict[str, Any], what: str = "manifest") -> bytes:
    """Go's Marshal of image-spec 1.1's Descriptor."""
    size = desc.get("size")
    if not isinstance(size, int) or isinstance(size, bool):
        raise MalformedMetadata(f"{what}: descriptor size is not an integer")
    parts = [
        _field("mediaType", _string(desc.get("mediaType", ""), "mediaType", what)),
        _field("digest", _string(desc.get("digest"), "digest", what)),
        b'"size":' + str(size).encode(),
    ]
    urls = _list(desc.get("urls"), "urls", what)
    if urls:
        parts.append(
            b'"urls":[' + b",".join(gojson.string(_string(u, "url", what)) for u in urls) + b"]"
        )
    if desc.get("annotations"):
        parts.append(b'"annotations":' + _map(desc["annotations"], what))
    if desc.get("data"):
        parts.append(_field("data", _base64(desc["data"], what)))
    if desc.get("platform") is not None:
        parts.append(b'"platform":' + _platform(_object(desc["platform"], "platform", what), what))
    if desc.get("artifactType"):
        parts.append(_field("artifactType", _string(desc["artifactType"], "artifactType", what)))
    return b"{" + b",".join(parts) + b"}"


def _platform(platform: dict[str, Any], what: str) -> bytes:
    parts = [
        _field("architecture", _string(platform.get("architecture", ""), "architecture", what)),
        _field("os", _string(platform.get("os", ""), "os", what)),
    ]
    if platform.get("os.version"):
        parts.append(_field("os.version", _string(platform["os.version"], "os.version", what)))
    features = _list(platform.get("os.features"), "os.features", what)
    if features:
        items = b",".join(gojson.string(_string(f, "os.features", what)) for f in features)
        parts.append(b'"os.features":[' + items + b"]")
    if platform.get("variant"):
        parts.append(_field("variant", _string(platform["variant"], "variant", what)))
    return b"{" + b",".join(parts) + b"}"


def _map(value: object, what: str) -> bytes:
    if not isinstance(value, dict):
        raise MalformedMetadata(f"{what}: annotations are not an object")
    return gojson.string_map(
        {_string(k, "annotation", what): _string(v, "annotation", what) for k, v in value.items()}
    )


def _base64(value: object, what: str) -> str:
    try:
        raw = base64.b64decode(_string(value, "data", what), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedMetadata(f"{what}: descriptor data is not base64") from exc
    return base64.b64encode(raw).decode("ascii")


def _string(value: object, name: str, what: str) -> str:
    if not isinstance(value, str):
        raise MalformedMetadata(f"{what}: manifest {name} is not a string")
    return value


def _field(key: str, value: str) -> bytes:
    return gojson.string(key) + b":" + gojson.string(value)
