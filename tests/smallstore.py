"""Test helper: tiny real stores made with buildah (isolated from the host's configuration)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests import tools

DRIVER = "overlay"


def buildah(base: Path, *args: str) -> str:
    """Run buildah on the store ``base/root`` (run root ``base/run``); returns its stdout."""
    tools.require("buildah")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTAINERS_", "STORAGE_"))}
    conf = base / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "{DRIVER}"\n')
    env["CONTAINERS_STORAGE_CONF"] = str(conf)
    cmd = ["buildah", "--root", str(base / "root"), "--runroot", str(base / "run")]
    cmd += ["--storage-driver", DRIVER, *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return result.stdout.strip()


def commit_image(base: Path, name: str, text: str) -> str:
    """Commit a one-layer image ``localhost/<name>:1`` holding ``/<name>.txt``; returns its ID."""
    src = base / f"{name}.txt"
    src.write_text(text)
    ctr = buildah(base, "from", "scratch")
    buildah(base, "copy", ctr, str(src), f"/{name}.txt")
    buildah(base, "config", "--label", f"name={name}", ctr)
    image_id = buildah(base, "commit", "-q", ctr, f"localhost/{name}:1")
    buildah(base, "rm", ctr)
    return image_id
