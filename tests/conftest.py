"""Shared pytest fixtures and markers (keep it small: store building lives in realstores.py)."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# One module identity for tests.realstores however pytest is started (`pytest` or `python -m`).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.mounting import Mount, mounted  # noqa: E402
from tests.realstores import DRIVERS, StoreSet, build_stores, stores_dir_from_env  # noqa: E402


def fuse_unavailable_reason() -> str | None:
    """Why FUSE mounts cannot work here, or None when they can."""
    if not os.path.exists("/dev/fuse"):
        return "FUSE unavailable: /dev/fuse is missing (load the fuse module / pass the device)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "FUSE unavailable: /dev/fuse is not readable and writable by this user"
    if shutil.which("fusermount3") is None:
        return "FUSE unavailable: fusermount3 not found (apt-get install fuse3)"
    return None


def real_stores_unavailable_reason() -> str | None:
    """Why the real stores cannot be built here, or None when they can."""
    missing = [t for t in ("buildah", "skopeo", "gpg") if shutil.which(t) is None]
    if missing:
        return f"real stores need {', '.join(missing)} (apt-get install buildah skopeo gnupg)"
    if os.geteuid() != 0:
        return "real stores are built as root (buildah mount, mknod, chown)"
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fuse_required: skip the test when FUSE (/dev/fuse, fusermount3) is unavailable"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("fuse_required") is not None:
        reason = fuse_unavailable_reason()
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture
def fuse_required() -> None:
    """Fixture form of the ``fuse_required`` marker."""
    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def real_stores(tmp_path_factory: pytest.TempPathFactory) -> StoreSet:
    """overlay + vfs stores built by buildah/skopeo, with skopeo's own output as the oracle.

    Built once per session into a temp dir, or into/from ``$IMGFS_TEST_STORES`` (reused while
    tests/realstores.py is unchanged). Treat the stores as read-only.
    """
    reason = real_stores_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    base: Path = stores_dir_from_env() or tmp_path_factory.mktemp("realstores")
    return build_stores(base)


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    """In-process ``cli.main`` calls add handlers on pytest's captured streams: undo them."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.fixture(scope="module", params=DRIVERS)
def mount(
    request: pytest.FixtureRequest,
    real_stores: StoreSet,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Mount, str]]:
    """The real overlay and vfs test stores, each mounted once per test module."""
    driver = request.param
    store = real_stores.store(driver)
    work = tmp_path_factory.mktemp(f"mount-{driver}")
    with mounted(store.root, store.runroot, driver, work) as m:
        yield m, driver
