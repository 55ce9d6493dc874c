"""The architecture's rules, checked: the public API, the package order, and a core that never
imports FUSE (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import imgfs

PACKAGE = pathlib.Path(imgfs.__file__).parent
PUBLIC = {"Store", "Image", "BlobInfo", "ImgfsError", "StoreNotFound", "ImageNotFound"}

# Lowest first: a module may import modules of its own rank or lower, never higher.
RANKS = {
    "imgfs.errors": 0,
    "imgfs.digest": 0,
    "imgfs.lru": 0,
    "imgfs.budget": 0,
    "imgfs.gojson": 0,
    "imgfs.layer": 1,
    "imgfs.store": 2,
    "imgfs.cache": 3,
    "imgfs.views": 4,
    "imgfs.fuse": 5,
    "imgfs.cli": 6,
    "imgfs.__main__": 7,
    "imgfs": 8,  # the package's __init__: the public re-exports
}
FUSE_ONLY = ("pyfuse3", "trio")
ADAPTER_PACKAGES = ("imgfs.fuse",)


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _rank(module: str) -> int:
    for depth in range(module.count(".") + 1, 0, -1):
        prefix = ".".join(module.split(".")[:depth])
        if prefix in RANKS and (prefix != "imgfs" or module == "imgfs"):
            return RANKS[prefix]
    raise AssertionError(f"{module} belongs to no package of docs/ARCHITECTURE.md")


def _imports(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "imgfs":  # from imgfs import errors: the submodule
                names.update(f"imgfs.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
    return names


def test_all_lists_exactly_the_public_names() -> None:
    exported = {
        name
        for name in dir(imgfs)
        if not name.startswith("_") and not isinstance(getattr(imgfs, name), type(imgfs))
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


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_follow_the_package_order(module: str) -> None:
    rank = _rank(module)
    for name in _imports(_modules()[module]):
        if name.split(".")[0] in FUSE_ONLY:
            assert module.startswith(ADAPTER_PACKAGES), f"{module} imports {name}"
        elif name == "imgfs" or name.startswith("imgfs."):
            assert _rank(name) <= rank, f"{module} (rank {rank}) imports {name} ({_rank(name)})"


def test_core_never_imports_pyfuse3_or_trio() -> None:
    core = sorted(m for m in _modules() if _rank(m) < RANKS["imgfs.fuse"] or m == "imgfs")
    code = (
        "import importlib, sys\n"
        f"for name in {core!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in ('pyfuse3', 'trio') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"the core imported {result.stdout.strip()}"
    assert len(core) > 20
