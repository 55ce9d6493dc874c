"""imgfs.store.manifest: c/image's type guess, manifest digest (JWS payload for signed schema1),
schema1 layers with throwaway entries, list instances."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest

from imgfs.errors import MalformedMetadata
from imgfs.store import manifest
from imgfs.store.manifest import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LIST,
    DOCKER_V2S1,
    DOCKER_V2S1_SIGNED,
    DOCKER_V2S2,
    EMPTY_LAYER_DIGEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
)

L1 = "sha256:" + "1" * 64
L2 = "sha256:" + "2" * 64


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _schema1_doc(**extra: Any) -> dict[str, Any]:
    """fsLayers/history top first: throwaway, L2, throwaway, throwaway, L1 (as skopeo writes)."""
    entries = [(EMPTY_LAYER_DIGEST, True), (L2, False), (EMPTY_LAYER_DIGEST, True)]
    entries += [(EMPTY_LAYER_DIGEST, True), (L1, False)]
    history = []
    for i, (_, empty) in enumerate(entries):
        compat: dict[str, Any] = {"id": f"{i:064x}", "created": "2024-01-02T03:04:05Z"}
        if empty:
            compat["throwaway"] = True
        history.append({"v1Compatibility": json.dumps(compat, separators=(",", ":"))})
    return {
        "schemaVersion": 1,
        "name": "schema1",
        "tag": "v1",
        "architecture": "amd64",
        "fsLayers": [{"blobSum": digest} for digest, _ in entries],
        "history": history,
        **extra,
    }


def _sign(payload: bytes, tail_length: int = 2) -> bytes:
    """A libtrust "pretty" signature around ``payload``:
    payload[:formatLength] + the signatures member + formatTail."""
    length = len(payload) - tail_length
    tail = payload[length:]
    header = {"formatLength": length, "formatTail": _b64url(tail), "time": "2024-01-02T03:04:05Z"}
    block = {
        "header": {"alg": "ES256", "jwk": {"kty": "EC", "crv": "P-256", "x": "x", "y": "y"}},
        "signature": _b64url(b"not checked by imgfs"),
        "protected": _b64url(json.dumps(header).encode()),
    }
    signatures = json.dumps([block], indent=3).replace("\n", "\n   ").encode()
    return payload[:length] + b',\n   "signatures": ' + signatures + tail


PAYLOAD = json.dumps(_schema1_doc(), indent=3).encode()
SIGNED = _sign(PAYLOAD)


def test_signed_schema1_digest_is_the_jws_payload_digest() -> None:
    assert json.loads(SIGNED)["signatures"], "the fixture really is signed"
    assert SIGNED != PAYLOAD
    assert manifest.digest_of(SIGNED) == _sha(PAYLOAD) != _sha(SIGNED)
    assert manifest.digest_of(PAYLOAD) == _sha(PAYLOAD), "unsigned: the bytes' digest"
    # c/image's own signing puts only "}" in formatTail; the payload is then the bytes + "}"
    signed = _sign(PAYLOAD, tail_length=1)
    assert manifest.digest_of(signed) == _sha(PAYLOAD)


def test_schema1_layers_bottom_first_with_throwaway_entries() -> None:
    for raw, media_type in ((SIGNED, DOCKER_V2S1_SIGNED), (PAYLOAD, DOCKER_V2S1)):
        man = manifest.parse(raw, "m")
        assert man.media_type == media_type
        assert man.config is None
        assert man.instances == ()
        assert not man.is_list
        assert man.uncompressed_layer_type == DOCKER_LAYER
        assert [d.digest for d in man.layers] == [L1] + [EMPTY_LAYER_DIGEST] * 2 + [L2] + [
            EMPTY_LAYER_DIGEST
        ]
        assert man.empty_layers == (False, True, True, False, True)
        assert {(d.size, d.media_type) for d in man.layers} == {(-1, "")}, "as c/image LayerInfos"


def test_schema1_declared_media_type_decides_nothing() -> None:
    """c/image recognises schema1 only by schemaVersion (and signed by "signatures")."""
    signed = json.loads(SIGNED)
    assert manifest.guess_type({**signed, "mediaType": DOCKER_V2S1}) == DOCKER_V2S1_SIGNED
    assert manifest.guess_type({"schemaVersion": 1, "mediaType": DOCKER_V2S1_SIGNED}) == DOCKER_V2S1
    # a recognised declared type wins, so such a manifest is digested whole
    oci = SIGNED.replace(b"{", b'{"mediaType": "' + OCI_MANIFEST.encode() + b'",', 1)
    assert manifest.guess_type(json.loads(oci)) == OCI_MANIFEST
    assert manifest.digest_of(oci) == _sha(oci)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"schemaVersion": 1}, DOCKER_V2S1),
        ({"schemaVersion": 1, "signatures": None}, DOCKER_V2S1),
        ({"schemaVersion": 1, "signatures": []}, DOCKER_V2S1_SIGNED),
        ({"schemaVersion": 1, "signatures": [{}]}, DOCKER_V2S1_SIGNED),
        ({"schemaVersion": 2, "mediaType": DOCKER_V2S2, "config": {}}, DOCKER_V2S2),
        ({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": []}, DOCKER_LIST),
        ({"schemaVersion": 2, "mediaType": OCI_INDEX}, OCI_INDEX),
        ({"schemaVersion": 2, "config": {"mediaType": OCI_CONFIG}}, OCI_MANIFEST),
        ({"schemaVersion": 2, "config": {"mediaType": DOCKER_CONFIG}}, DOCKER_V2S2),
        ({"schemaVersion": 2, "manifests": [{"digest": L1}]}, OCI_INDEX),
        ({"schemaVersion": 2, "mediaType": "text/plain"}, OCI_MANIFEST),
        ({"schemaVersion": 2}, OCI_MANIFEST),
    ],
)
def test_guess_type(doc: dict[str, object], expected: str) -> None:
    assert manifest.guess_type(doc) == expected


def test_empty_signature_list_digests_as_libtrust_does() -> None:
    """No signature block: libtrust's payload is empty (format length 0, no tail)."""
    raw = json.dumps(_schema1_doc(signatures=[]), indent=3).encode()
    assert manifest.digest_of(raw) == _sha(b"")


@pytest.mark.parametrize("media_type", [OCI_INDEX, DOCKER_LIST])
def test_list_instances(media_type: str) -> None:
    entries = [
        {"mediaType": OCI_MANIFEST, "digest": L1, "size": 500, "platform": {"os": "linux"}},
        {"mediaType": DOCKER_V2S2, "digest": L2, "size": 600},
    ]
    raw = json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": entries}).encode()
    man = manifest.parse(raw, "m")
    assert man.is_list
    assert man.media_type == media_type
    assert man.layers == ()
    assert man.empty_layers == ()
    assert man.config is None
    assert [(d.digest, d.size, d.media_type) for d in man.instances] == [
        (L1, 500, OCI_MANIFEST),
        (L2, 600, DOCKER_V2S2),
    ]
    assert manifest.digest_of(raw) == _sha(raw)


def _replace_header(signed: bytes, **changes: object) -> bytes:
    doc = json.loads(signed)
    protected = doc["signatures"][0]["protected"]
    header = json.loads(base64.urlsafe_b64decode(protected + "=" * (-len(protected) % 4)))
    new = _b64url(json.dumps({**header, **changes}).encode())
    return signed.replace(protected.encode(), new.encode())


@pytest.mark.parametrize(
    "raw",
    [
        _replace_header(SIGNED, formatLength=len(SIGNED) + 1),
        _replace_header(SIGNED, formatLength=-1),
        _replace_header(SIGNED, formatLength="12"),
        _replace_header(SIGNED, formatTail=None),
        SIGNED.replace(b'"protected": "', b'"protected": "!!', 1),
        json.dumps(_schema1_doc(signatures={"protected": "e30"})).encode(),
        json.dumps(_schema1_doc(signatures=["not an object"])).encode(),
    ],
)
def test_bad_signature_headers_are_malformed(raw: bytes) -> None:
    with pytest.raises(MalformedMetadata):
        manifest.digest_of(raw, "m")


def test_schema1_history_must_match_fs_layers() -> None:
    doc = _schema1_doc()
    doc["history"].pop()
    with pytest.raises(MalformedMetadata):
        manifest.parse(json.dumps(doc).encode(), "m")
    doc = _schema1_doc()
    doc["fsLayers"][1]["blobSum"] = "sha256:nothex"
    with pytest.raises(MalformedMetadata):
        manifest.parse(json.dumps(doc).encode(), "m")
