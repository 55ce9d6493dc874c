"""Manifests as containers/image reads them: type, digest, config and layer descriptors.

Owns: c/image's manifest type guess, the digest rule (sha256 of the bytes; of the JWS payload
for signed Docker schema1), and what a manifest says about its config, layers and instances.
Must not know: the store, files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass

from imgfs.digest import EMPTY_LAYER_DIGEST, is_digest
from imgfs.errors import MalformedMetadata

MAX_MANIFEST_BYTES = 4 << 20

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_V2S2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_V2S1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_V2S1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"

LIST_TYPES = (OCI_INDEX, DOCKER_LIST)
SCHEMA1_TYPES = (DOCKER_V2S1, DOCKER_V2S1_SIGNED)
# Declared types c/image's guess takes as they are; schema1 is only ever recognised by its
# schemaVersion (a declared schema1 type decides nothing, as in c/image).
_DECLARED = (OCI_MANIFEST, OCI_INDEX, DOCKER_V2S2, DOCKER_LIST)


@dataclass(frozen=True)
class Descriptor:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class Manifest:
    """The parts of one manifest that decide an image's blobs."""

    media_type: str
    config: Descriptor | None
    layers: tuple[Descriptor, ...]  # schema1: bottom first; empty layers marked by the constant
    empty_layers: tuple[bool, ...]  # schema1 throwaway entries (always False otherwise)
    instances: tuple[Descriptor, ...]  # lists and indexes only

    @property
    def is_list(self) -> bool:
        return self.media_type in LIST_TYPES

    @property
    def uncompressed_layer_type(self) -> str:
        """The media type c/image's LayerInfosForCopy gives the served (uncompressed) layers."""
        if self.media_type == OCI_MANIFEST:
            return OCI_LAYER
        if self.media_type in (DOCKER_V2S2, *SCHEMA1_TYPES):
            return DOCKER_LAYER
        return ""


def parse(data: bytes, what: str) -> Manifest:
    """Parse ``data`` (bounded) into a Manifest; MalformedMetadata names ``what``."""
    doc = _load(data, what)
    media_type = guess_type(doc)
    if media_type in SCHEMA1_TYPES:
        layers, empty = _schema1_layers(doc, what)
        return Manifest(media_type, None, layers, empty, ())
    if media_type in LIST_TYPES:
        instances = tuple(_descriptor(d, what) for d in _list(doc, "manifests", what))
        return Manifest(media_type, None, (), (), instances)
    config_doc = doc.get("config")
    config = _descriptor(config_doc, what) if config_doc is not None else None
    layers = tuple(_descriptor(d, what) for d in _list(doc, "layers", what))
    return Manifest(media_type, config, layers, (False,) * len(layers), ())


def digest_of(data: bytes, what: str = "manifest") -> str:
    """The manifest digest c/image computes (JWS payload for signed schema1)."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict) and guess_type(doc) == DOCKER_V2S1_SIGNED:
        return "sha256:" + hashlib.sha256(_jws_payload(data, doc, what)).hexdigest()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def guess_type(doc: dict[str, object]) -> str:
    """c/image's GuessMIMEType on a decoded manifest."""
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared in _DECLARED:
        return declared
    version = doc.get("schemaVersion")
    if version == 1:
        # signed when "signatures" is there and not null, even if empty (Go: non-nil interface)
        return DOCKER_V2S1_SIGNED if doc.get("signatures") is not None else DOCKER_V2S1
    config = doc.get("config")
    if isinstance(config, dict):
        if config.get("mediaType") == DOCKER_CONFIG:
            return DOCKER_V2S2
        return OCI_MANIFEST
    if doc.get("manifests"):
        return OCI_INDEX
    return OCI_MANIFEST


def _load(data: bytes, what: str) -> dict[str, object]:
    if len(data) > MAX_MANIFEST_BYTES:
        raise MalformedMetadata(f"{what}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise MalformedMetadata(f"{what}: manifest is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise MalformedMetadata(f"{what}: manifest is not a JSON object")
    return doc


def _list(doc: dict[str, object], key: str, what: str) -> list[object]:
    value = doc.get(key) or []
    if not isinstance(value, list):
        raise MalformedMetadata(f"{what}: manifest {key} is not a list")
    return value


def _descriptor(value: object, what: str) -> Descriptor:
    if not isinstance(value, dict):
        raise MalformedMetadata(f"{what}: manifest descriptor is not an object")
    digest, size, media_type = value.get("digest"), value.get("size"), value.get("mediaType", "")
    if not isinstance(digest, str) or not is_digest(digest):
        raise MalformedMetadata(f"{what}: manifest names an invalid digest {digest!r:.80}")
    if not isinstance(size, int) or isinstance(size, bool) or size < -1:
        raise MalformedMetadata(f"{what}: manifest descriptor {digest} has invalid size")
    if not isinstance(media_type, str):
        raise MalformedMetadata(f"{what}: manifest descriptor {digest} has invalid mediaType")
    return Descriptor(digest, size, media_type)


def _schema1_layers(
    doc: dict[str, object], what: str
) -> tuple[tuple[Descriptor, ...], tuple[bool, ...]]:
    fs_layers = _list(doc, "fsLayers", what)
    history = _list(doc, "history", what)
    if len(history) != len(fs_layers):
        raise MalformedMetadata(f"{what}: schema1 fsLayers and history differ in length")
    layers: list[Descriptor] = []
    empty: list[bool] = []
    for layer, hist in zip(reversed(fs_layers), reversed(history), strict=True):
        blob = layer.get("blobSum") if isinstance(layer, dict) else None
        if not isinstance(blob, str) or not is_digest(blob):
            raise MalformedMetadata(f"{what}: schema1 blobSum {blob!r:.80} is invalid")
        layers.append(Descriptor(blob, -1, ""))
        empty.append(_throwaway(hist))
    return tuple(layers), tuple(empty)


def _throwaway(hist: object) -> bool:
    compat = hist.get("v1Compatibility") if isinstance(hist, dict) else None
    if not isinstance(compat, str):
        return False
    try:
        value = json.loads(compat)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and value.get("throwaway") is True


def _jws_payload(data: bytes, doc: dict[str, object], what: str) -> bytes:
    signatures = doc.get("signatures")
    if not isinstance(signatures, list):
        raise MalformedMetadata(f"{what}: schema1 signatures are not a list")
    if not signatures:
        return b""  # libtrust: no signature gives format length 0 and no tail
    first = signatures[0]
    protected = first.get("protected") if isinstance(first, dict) else None
    try:
        header = json.loads(_b64url(str(protected)))
        length, tail = header["formatLength"], _b64url(header["formatTail"])
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError) as exc:
        raise MalformedMetadata(f"{what}: schema1 signature header is invalid") from exc
    if not isinstance(length, int) or not 0 <= length <= len(data):
        raise MalformedMetadata(f"{what}: schema1 formatLength is out of range")
    return data[:length] + tail


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _b64url(text: str) -> bytes:
    """JOSE base64url as libtrust decodes it: the URL alphabet only, padding optional."""
    if _B64URL.fullmatch(text) is None:
        raise binascii.Error("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


__all__ = ["EMPTY_LAYER_DIGEST", "Descriptor", "Manifest", "digest_of", "guess_type", "parse"]
