"""The architecture's rules, checked: the public API, and a core that never imports FUSE."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import imgfs

ADAPTER_MODULES = {"imgfs.fuse_ops", "imgfs.daemon", "imgfs.cli", "imgfs.__main__"}
PUBLIC = {"Store", "Image", "BlobInfo", "ImgfsError", "StoreNotFound", "ImageNotFound"}


def _core_modules() -> list[str]:
    names = [f"imgfs.{m.name}" for m in pkgutil.iter_modules(imgfs.__path__)]
    return sorted(set(names) - ADAPTER_MODULES)


def test_all_lists_exactly_the_public_names() -> None:
    exported = {name for name in dir(imgfs) if not name.startswith("_")} - {
        m.split(".")[1] for m in _core_modules() + sorted(ADAPTER_MODULES)
    }
    assert set(imgfs.__all__) - {"__version__"} == exported
    assert set(imgfs.__all__) >= PUBLIC
    for name in imgfs.__all__:
        assert getattr(imgfs, name) is not None


def test_library_api_of_design_section_4() -> None:
    assert callable(imgfs.Store.open)
    for method in ("images", "image"):
        assert callable(getattr(imgfs.Store, method))
    for method in ("manifest", "config", "signatures", "blobs", "open_blob"):
        assert callable(getattr(imgfs.Image, method))
    assert {"digest", "size", "media_type", "kind"} <= set(imgfs.BlobInfo.__dataclass_fields__)


def test_core_never_imports_pyfuse3_or_trio() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {_core_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in ('pyfuse3', 'trio') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"the core imported {result.stdout.strip()}"
    assert len(_core_modules()) > 15
