"""The one compiled part of imgfs: imgfs.layer._fastparse (everything else is in pyproject.toml).

The extension is optional at build time: without a C compiler or Python's headers the install
still succeeds and imgfs runs the same code in Python (tree.py falls back), only slower.
``scripts/setup.sh`` installs gcc and python3-dev, and CI fails if the extension is missing.
"""

import hashlib

from setuptools import Extension, setup

SOURCE = "imgfs/layer/_fastparse.c"
with open(SOURCE, "rb") as f:
    SOURCE_SHA256 = hashlib.sha256(f.read()).hexdigest()  # compiled.py: a stale build is unused

setup(
    ext_modules=[
        Extension(
            "imgfs.layer._fastparse",
            [SOURCE],
            define_macros=[("SOURCE_SHA256", f'"{SOURCE_SHA256}"')],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
            optional=True,
        )
    ]
)
