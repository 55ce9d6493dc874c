"""TEST-ONLY: a containers/storage overlay store written without buildah, for kernel-free tests.

Writes what c/storage would (storage-format.md): ``overlay-layers/layers.json`` with each
layer's ``<id>.tar-split.gz`` (from ``tarsplit_maker``), the extracted files in
``overlay/<id>/diff``, and ``overlay-images/images.json`` with each image's big data (the OCI
manifest, the config) under c/storage's file names. Real-tool stores stay the oracle for bytes
(tests/realstores.py); this one lets the tree and the adapter be tested where buildah is absent.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from imgfs.store.files import big_data_file_name
from tests import tarsplit_maker

DRIVER = "overlay"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
CREATED = "2024-05-06T07:08:09.123456789Z"


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _id(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


@dataclass
class MadeImage:
    id: str
    names: list[str]
    layers: list[str]  # layer IDs, base first
    diff_ids: list[str]
    manifest: bytes
    config: bytes


@dataclass
class StoreMaker:
    """``add_image`` as often as wanted, then ``write()``; the store is at ``root``."""

    root: Path
    images: list[MadeImage] = field(default_factory=list)
    _layers: list[dict[str, object]] = field(default_factory=list)
    _records: list[dict[str, object]] = field(default_factory=list)

    def add_image(self, name: str, layer_tars: list[bytes]) -> MadeImage:
        parent: str | None = None
        ids, diff_ids = [], []
        for tar in layer_tars:
            layer_id = _id(f"{parent}:{_sha(tar)}")
            if all(r["id"] != layer_id for r in self._layers):  # images share their base layers
                self._add_layer(layer_id, parent, tar)
            ids.append(layer_id)
            diff_ids.append(_sha(tar))
            parent = layer_id
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "created": CREATED,
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            },
            separators=(",", ":"),
        ).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": _sha(config), "size": len(config)},
                "layers": [
                    {"mediaType": OCI_LAYER, "digest": d, "size": len(t)}
                    for d, t in zip(diff_ids, layer_tars, strict=True)
                ],
            },
            separators=(",", ":"),
        ).encode()
        image = MadeImage(
            _id(f"image:{name}:{_sha(config)}"), [name], ids, diff_ids, manifest, config
        )
        self._add_record(image)
        self.images.append(image)
        return image

    def _add_layer(self, layer_id: str, parent: str | None, tar: bytes) -> None:
        diff = self.root / DRIVER / layer_id / "diff"
        diff.mkdir(parents=True)
        split = tarsplit_maker.disassemble(tar, str(diff))
        layers_dir = self.root / f"{DRIVER}-layers"
        layers_dir.mkdir(parents=True, exist_ok=True)
        (layers_dir / f"{layer_id}.tar-split.gz").write_bytes(split.gz())
        record: dict[str, object] = {
            "id": layer_id,
            "created": CREATED,
            "compressed-diff-digest": _sha(tar),
            "compressed-size": len(tar),
            "diff-digest": _sha(tar),
            "diff-size": len(tar),
            "compression": 0,
        }
        if parent is not None:
            record["parent"] = parent
        self._layers.append(record)

    def _add_record(self, image: MadeImage) -> None:
        big = {"manifest": image.manifest, _sha(image.config): image.config}
        big[f"manifest-{_sha(image.manifest)}"] = image.manifest
        image_dir = self.root / f"{DRIVER}-images" / image.id
        image_dir.mkdir(parents=True)
        for key, data in big.items():
            (image_dir / big_data_file_name(key)).write_bytes(data)
        self._records.append(
            {
                "id": image.id,
                "digest": _sha(image.manifest),
                "names": image.names,
                "layer": image.layers[-1],
                "metadata": "{}",
                "big-data-names": list(big),
                "big-data-sizes": {k: len(v) for k, v in big.items()},
                "big-data-digests": {k: _sha(v) for k, v in big.items()},
                "created": CREATED,
            }
        )

    def write(self) -> Path:
        (self.root / f"{DRIVER}-layers").mkdir(parents=True, exist_ok=True)
        (self.root / f"{DRIVER}-images").mkdir(parents=True, exist_ok=True)
        (self.root / f"{DRIVER}-layers" / "layers.json").write_text(json.dumps(self._layers))
        (self.root / f"{DRIVER}-images" / "images.json").write_text(json.dumps(self._records))
        return self.root
