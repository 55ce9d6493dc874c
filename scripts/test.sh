#!/usr/bin/env bash
# Set up, then run the checks CI runs: ruff, mypy and the whole test suite (real stores made
# with buildah/skopeo, real FUSE mounts). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m ruff check imgfs tests scripts
python3 -m mypy
python3 -m pytest -q "$@"
