"""Whether the compiled fast paths of imgfs.layer (the ``_fastparse`` extension) are used.

Owns: importing ``imgfs.layer._fastparse`` once (setup.py builds it; without a compiler the
install still works and every caller runs its Python code), declining a stale build (one whose
``SOURCE_SHA256`` is not that of the ``_fastparse.c`` beside it, as in a checkout whose C source
changed since ``scripts/setup.sh`` built it: it would compute the old results), and the
test-only switch ``IMGFS_PURE_PYTHON=1`` that turns it off. Must not know: what the fast paths
compute (their callers, tree.py and tarsplit.py, bind their classes and keep the reference
Python code).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import ModuleType

SOURCE = Path(__file__).with_name("_fastparse.c")


def extension() -> ModuleType | None:
    """The extension module, or None (not built, stale, or IMGFS_PURE_PYTHON set)."""
    if os.environ.get("IMGFS_PURE_PYTHON"):
        return None
    try:
        from imgfs.layer import _fastparse
    except ImportError:
        return None
    return _fastparse if _is_current(_fastparse) else None


def _is_current(ext: ModuleType) -> bool:
    """Whether ``ext`` was built from the C source beside this file (an install without the
    source: it is what was installed)."""
    try:
        source = SOURCE.read_bytes()
    except OSError:
        return True
    return getattr(ext, "SOURCE_SHA256", None) == hashlib.sha256(source).hexdigest()
