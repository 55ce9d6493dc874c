"""Whether the compiled fast paths of imgfs.layer (the ``_fastparse`` extension) are used.

Owns: importing ``imgfs.layer._fastparse`` once (setup.py builds it; without a compiler the
install still works and every caller runs its Python code), and the test-only switch
``IMGFS_PURE_PYTHON=1`` that turns it off. Must not know: what the fast paths compute (their
callers, tree.py and tarsplit.py, bind their classes and keep the reference Python code).
"""

from __future__ import annotations

import os
from types import ModuleType


def extension() -> ModuleType | None:
    """The extension module, or None (not built, or IMGFS_PURE_PYTHON set)."""
    if os.environ.get("IMGFS_PURE_PYTHON"):
        return None
    try:
        from imgfs.layer import _fastparse
    except ImportError:
        return None
    return _fastparse
