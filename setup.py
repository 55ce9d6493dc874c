"""The one compiled part of imgfs: imgfs.layer._fastparse (everything else is in pyproject.toml).

The extension is optional at build time: without a C compiler or Python's headers the install
still succeeds and imgfs runs the same code in Python (tree.py falls back), only slower.
``scripts/setup.sh`` installs gcc and python3-dev, and CI fails if the extension is missing.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "imgfs.layer._fastparse",
            ["imgfs/layer/_fastparse.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
            optional=True,
        )
    ]
)
