#!/usr/bin/env bash
# Install what imgfs needs on a fresh Debian/Ubuntu machine: FUSE 3, the container tools the
# tests and the sample store use, and imgfs itself (editable, with its dev tools).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

packages=(fuse3 libfuse3-dev pkg-config gcc buildah skopeo podman gnupg)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

log=$(mktemp)
if ! python3 -m pip install -q --disable-pip-version-check -e ".[dev]" >"$log" 2>&1; then
  cat "$log" >&2
  echo "setup: pip could not install imgfs and its dependencies" >&2
  exit 1
fi
rm -f "$log"
python3 -c "import imgfs, pyfuse3, trio, pybase64, fastcrc, zstandard, pytest" || {
  echo "setup: imgfs did not install" >&2; exit 1; }
