"""Area 2: property-based fuzzing of every parser of untrusted input.

Each parser gets thousands of generated inputs (derandomized: the same cases on every run)
and may only fail with its documented error types: ``MalformedMetadata``/``UnsafePath`` for
store metadata, ``ConfigError`` for storage.conf. The counts table reports how many cases
each parser saw and how many it rejected.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgfs.errors import ConfigError, ImgfsError, MalformedMetadata, UnsafePath
from imgfs.layer import tarsplit
from imgfs.store import config, manifest, records, signatures
from imgfs.store.image import Store
from tests.hardening.harden import Counts

AREA = "2 fuzz"
FUZZ = settings(
    max_examples=500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=30),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=25,
)
hexish = st.one_of(
    st.text("0123456789abcdef", min_size=64, max_size=64),
    st.sampled_from(["../../etc", "", "/", "..", "A" * 64, "0" * 63, "0" * 65]),
    st.text(max_size=70),
)
digestish = st.one_of(hexish.map(lambda h: "sha256:" + h), hexish)
sizes = st.one_of(st.integers(min_value=-(2**66), max_value=2**66), st.none(), json_scalars)


def _record(counts: Counts, parser: str, rejected: bool) -> None:
    counts.add(AREA, f"{parser}: cases")
    if rejected:
        counts.add(AREA, f"{parser}: rejected with the documented error")


# -- tar-split lines ----------------------------------------------------------------------------

names = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["a", "./a", "/a", "a/../b", "../x", "a\x00b", "a//b/", ".", "d/" * 300]),
)
b64 = st.one_of(
    st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
    st.text(max_size=20),
    st.none(),
)
entry = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from([1, 2]), json_scalars)},
    optional={
        "name": st.one_of(names, json_scalars),
        "name_raw": b64,
        "size": sizes,
        "payload": b64,
        "position": sizes,
    },
)
good_entry = st.one_of(
    st.builds(
        lambda b, n: {"type": 2, "payload": base64.b64encode(b).decode(), "position": n},
        st.binary(max_size=40),
        st.integers(0, 99),
    ),
    st.builds(
        lambda name, size, crc: {
            "type": 1,
            "name": name,
            "size": size,
            "payload": base64.b64encode(crc).decode() if size else None,
        },
        names,
        st.integers(0, 2**20),
        st.binary(min_size=8, max_size=8),
    ),
)
line = st.one_of(
    good_entry.map(lambda e: json.dumps(e, separators=(",", ":")).encode()),
    good_entry.map(lambda e: json.dumps(e, separators=(",", ":")).encode()),
    entry.map(lambda e: json.dumps(e).encode()),
    entry.map(lambda e: json.dumps(e, separators=(",", ":")).encode()),
    st.binary(max_size=60),
    st.sampled_from(
        [b"[" * 5000, b'{"type":1,"name":"\\ud800","size":1,"payload":"AAAAAAAAAAA="}']
    ),
)


@FUZZ
@given(lines=st.lists(line, max_size=12), mangle=st.sampled_from(["gzip", "raw", "truncated"]))
def test_tarsplit_lines(lines: list[bytes], mangle: str, counts: Counts) -> None:
    data = b"\n".join(lines)
    blob = gzip.compress(data)
    if mangle == "raw":
        blob = data
    elif mangle == "truncated":
        blob = blob[: len(blob) // 2]
    rejected = False
    message = ""
    try:
        for item in tarsplit.iter_entries(io.BytesIO(blob), "fuzz layer"):
            assert isinstance(item, tarsplit.Segment | tarsplit.FileEntry)
            if isinstance(item, tarsplit.FileEntry):
                assert b"\x00" not in item.name
                assert 0 <= item.size <= tarsplit.MAX_SIZE
                assert (item.crc is None) == (item.size == 0)
    except MalformedMetadata as exc:
        message = str(exc)
        rejected = True
    assert not rejected or "fuzz layer" in message
    _record(counts, "tar-split lines", rejected)


@FUZZ
@given(name=st.binary(max_size=80) | names.map(str.encode))
def test_clean_name(name: bytes, counts: Counts) -> None:
    rejected = False
    try:
        cleaned = tarsplit.clean_name(name)
    except UnsafePath:
        rejected = True
    else:
        parts = cleaned.split(b"/")
        assert b".." not in parts
        assert b"" not in parts
        assert b"\x00" not in cleaned
        assert not cleaned.startswith(b"/")
    _record(counts, "tar-split member names", rejected)


# -- images.json / layers.json / image metadata -----------------------------------------------

image_record = st.fixed_dictionaries(
    {},
    optional={
        "id": hexish,
        "digest": digestish,
        "names": st.one_of(st.lists(st.text(max_size=20), max_size=3), json_values),
        "layer": hexish,
        "metadata": st.one_of(st.text(max_size=40), json_values),
        "big-data-names": st.one_of(st.lists(st.text(max_size=20), max_size=3), json_values),
        "big-data-sizes": st.dictionaries(st.text(max_size=10), sizes, max_size=3),
        "big-data-digests": st.dictionaries(st.text(max_size=10), digestish, max_size=3),
        "created": st.one_of(st.text(max_size=40), json_values),
    },
)
layer_record = st.fixed_dictionaries(
    {},
    optional={
        "id": hexish,
        "parent": hexish,
        "diff-digest": digestish,
        "diff-size": sizes,
        "toc-digest": digestish,
        "flags": st.one_of(
            st.fixed_dictionaries(
                {}, optional={"incomplete": json_scalars, "expected-layer-diffid": digestish}
            ),
            json_values,
        ),
        "created": json_values,
    },
)


def _array_bytes(items: list[Any], raw: bytes, mode: str) -> bytes:
    if mode == "raw":
        return raw
    text = json.dumps(items).encode()
    return text[: len(text) // 2] if mode == "truncated" else text


@FUZZ
@given(
    items=st.lists(st.one_of(image_record, json_values), max_size=6),
    raw=st.binary(max_size=60),
    mode=st.sampled_from(["json", "json", "raw", "truncated"]),
)
def test_images_json(items: list[Any], raw: bytes, mode: str, counts: Counts) -> None:
    rejected = False
    try:
        parsed, _skipped = records.parse_images(
            records.load_array(_array_bytes(items, raw, mode), "i"), "i"
        )
        for rec in parsed:
            assert len(rec.id) == 64
            assert all(c in "0123456789abcdef" for c in rec.id)
            assert rec.layer is None or len(rec.layer) == 64
            assert all(v >= 0 for v in rec.big_data_sizes.values())
    except MalformedMetadata:
        rejected = True
    _record(counts, "images.json", rejected)


@FUZZ
@given(
    items=st.lists(st.one_of(layer_record, json_values), max_size=6),
    raw=st.binary(max_size=60),
    mode=st.sampled_from(["json", "json", "raw", "truncated"]),
)
def test_layers_json(items: list[Any], raw: bytes, mode: str, counts: Counts) -> None:
    rejected = False
    try:
        parsed, _ = records.parse_layers(
            records.load_array(_array_bytes(items, raw, mode), "l"), "l", "/x"
        )
        for rec in parsed:
            assert rec.parent is None or len(rec.parent) == 64
            assert rec.diff_digest is None or rec.diff_digest.startswith("sha256:")
            assert rec.diff_size is None or rec.diff_size >= 0
    except MalformedMetadata:
        rejected = True
    _record(counts, "layers.json", rejected)


metadata_doc = st.fixed_dictionaries(
    {},
    optional={
        "signature-sizes": st.one_of(st.lists(sizes, max_size=4), json_values),
        "signatures-sizes": st.one_of(
            st.dictionaries(digestish, st.lists(sizes, max_size=3), max_size=2), json_values
        ),
    },
)


@FUZZ
@given(
    doc=st.one_of(metadata_doc.map(json.dumps), st.text(max_size=40)),
    data=st.binary(max_size=64),
)
def test_image_metadata_and_signatures(doc: str, data: bytes, counts: Counts) -> None:
    rejected = False
    try:
        found = records.parse_signature_sizes(doc, "m")
        blobs = signatures.split_signatures(data, found.default, "m")
        assert sum(map(len, blobs)) >= 0
    except MalformedMetadata:
        rejected = True
    _record(counts, "image metadata + signatures", rejected)


descriptor = st.fixed_dictionaries(
    {}, optional={"digest": digestish, "size": sizes, "mediaType": json_scalars}
)
MEDIA_TYPES = [*manifest.LIST_TYPES, *manifest.SCHEMA1_TYPES]
MEDIA_TYPES += [manifest.OCI_MANIFEST, manifest.DOCKER_V2S2]
manifest_doc = st.fixed_dictionaries(
    {},
    optional={
        "schemaVersion": st.one_of(st.sampled_from([1, 2]), json_scalars),
        "mediaType": st.one_of(st.sampled_from(MEDIA_TYPES), json_scalars),
        "config": st.one_of(descriptor, json_values),
        "layers": st.one_of(st.lists(descriptor, max_size=3), json_values),
        "manifests": st.one_of(st.lists(descriptor, max_size=3), json_values),
        "fsLayers": st.lists(
            st.one_of(st.fixed_dictionaries({"blobSum": digestish}), json_values), max_size=3
        ),
        "history": st.lists(
            st.one_of(st.fixed_dictionaries({"v1Compatibility": json_scalars}), json_values),
            max_size=3,
        ),
        "signatures": st.one_of(
            st.lists(st.fixed_dictionaries({"protected": st.text(max_size=30)}), max_size=2),
            json_values,
        ),
    },
)


@FUZZ
@given(doc=st.one_of(manifest_doc.map(lambda d: json.dumps(d).encode()), st.binary(max_size=60)))
def test_manifests(doc: bytes, counts: Counts) -> None:
    rejected = False
    try:
        parsed = manifest.parse(doc, "m")
        assert all(d.digest.startswith("sha256:") for d in (*parsed.layers, *parsed.instances))
        manifest.digest_of(doc, "m")
    except MalformedMetadata:
        rejected = True
    _record(counts, "manifests", rejected)


# -- storage.conf ------------------------------------------------------------------------------

toml_value = st.one_of(
    st.text(max_size=20).map(json.dumps),
    st.integers().map(str),
    st.booleans().map(lambda b: str(b).lower()),
    st.lists(st.text(max_size=10).map(json.dumps), max_size=3).map(
        lambda v: "[" + ", ".join(v) + "]"
    ),
)
conf_key = st.sampled_from(
    [
        "driver",
        "graphroot",
        "runroot",
        "imagestore",
        "transient_store",
        "rootless_storage_path",
        "additionalimagestores",
        "x",
    ]
)
conf_text = st.one_of(
    st.lists(
        st.tuples(
            st.sampled_from(["[storage]", "[storage]", "[storage.options]", "[other]"]),
            st.lists(st.tuples(conf_key, toml_value), max_size=4),
        ),
        max_size=1,
    ).map(
        lambda tables: "\n".join(
            t + "\n" + "\n".join(f"{k} = {v}" for k, v in kv) for t, kv in tables
        )
    ),
    st.text(max_size=80),
)


@FUZZ
@given(text=conf_text, driver_env=st.sampled_from([None, "overlay", "zfs", "nonsense"]))
def test_storage_conf(
    text: str, driver_env: str | None, tmp_path_factory: pytest.TempPathFactory, counts: Counts
) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz-storage.conf"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    env = {"CONTAINERS_STORAGE_CONF": str(path), "HOME": "/nonexistent"}
    if driver_env:
        env["STORAGE_DRIVER"] = driver_env
    rejected = False
    try:
        resolved = config.resolve(None, None, None, env=env)
        assert resolved.driver in config.SUPPORTED_DRIVERS
        assert os.path.isabs(resolved.graphroot)
    except ConfigError:
        rejected = True
    _record(counts, "storage.conf", rejected)


# -- a whole store: fuzzed images.json + layers.json read through the library --------------------


@settings(FUZZ, max_examples=250)
@given(
    images=st.lists(image_record, max_size=4),
    layers=st.lists(layer_record, max_size=4),
)
def test_store_from_fuzzed_records(
    images: list[Any], layers: list[Any], tmp_path_factory: pytest.TempPathFactory, counts: Counts
) -> None:
    root = tmp_path_factory.getbasetemp() / "fuzz-store"
    (root / "overlay-images").mkdir(parents=True, exist_ok=True)
    (root / "overlay-layers").mkdir(parents=True, exist_ok=True)
    (root / "overlay-images" / "images.json").write_text(json.dumps(images))
    (root / "overlay-layers" / "layers.json").write_text(json.dumps(layers))
    rejected = False
    try:
        store = Store.open(str(root), str(root / "run"), "overlay")
        for image in store.images():
            for call in (image.manifest, image.blobs, image.signatures, image.layer_chain):
                try:
                    call()
                except ImgfsError:
                    rejected = True
    except MalformedMetadata:
        rejected = True
    _record(counts, "store (images.json + layers.json)", rejected)


def test_fuzz_totals(counts: Counts) -> None:
    """Runs last in this file: the total must really be thousands of cases."""
    row = counts.rows.get(AREA, {})
    total = sum(v for k, v in row.items() if k.endswith(": cases") and isinstance(v, int))
    counts.put(AREA, "TOTAL cases", total)
    assert total >= 3000, row
