"""Test helper: copies of a real store, then changed the way a corrupt or hostile store is.

The real tools cannot make these stores; everything else about them is real (copied with
``cp -a`` from a store buildah made).
"""

from __future__ import annotations

import base64
import gzip
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastcrc


def copy_store(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def layer_of(root: Path, driver: str, image_id: str) -> str:
    """The top layer ID of ``image_id`` in the store at ``root``."""
    images = json.loads((root / f"{driver}-images" / "images.json").read_bytes())
    return str(next(i for i in images if i["id"] == image_id)["layer"])


def tarsplit_path(root: Path, driver: str, layer_id: str) -> Path:
    return root / f"{driver}-layers" / f"{layer_id}.tar-split.gz"


def content_dir(root: Path, driver: str, layer_id: str) -> Path:
    if driver == "overlay":
        return root / "overlay" / layer_id / "diff"
    return root / "vfs" / "dir" / layer_id


def read_entries(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_entries(path: Path, entries: list[dict[str, Any]]) -> None:
    data = b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in entries)
    path.write_bytes(gzip.compress(data))


def crc_payload(data: bytes) -> str:
    return base64.b64encode(fastcrc.crc64.go_iso(data).to_bytes(8, "big")).decode()


def first_file_entry(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return next(e for e in entries if e["type"] == 1 and e.get("size"))


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_bytes()))))
