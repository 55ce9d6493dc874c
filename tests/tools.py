"""Test helper: skip (with the reason and the package to install) when a real tool is absent."""

from __future__ import annotations

import shutil

import pytest

PACKAGES = {"buildah": "buildah", "skopeo": "skopeo", "podman": "podman", "gpg": "gnupg"}


def require(tool: str) -> None:
    """Skip the calling test unless ``tool`` is on PATH."""
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (apt-get install {PACKAGES.get(tool, tool)})")
