#!/usr/bin/env bash
# Set up, then run the checks CI runs: ruff (lint and format), mypy and the whole test suite
# (real stores made with buildah/skopeo, real FUSE mounts), all with the checkout's .venv (Debian's python3; the
# tests start `sys.executable -m imgfs`, so the daemons they mount run in the venv too).
# Extra arguments go to pytest. Any failure, and pytest collecting no test (exit 5), fail.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py=.venv/bin/python
"$py" -m ruff check imgfs tests scripts
"$py" -m ruff format --check imgfs tests scripts
"$py" -m mypy
"$py" -m pytest -q "$@"
