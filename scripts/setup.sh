#!/usr/bin/env bash
# Install imgfs on a fresh Debian/Ubuntu machine with the distribution's own python3 (PEP 668:
# nothing is pip-installed into it):
#   1. the Debian packages: FUSE 3 and what pyfuse3 builds against, python3-venv, and the
#      container tools the tests and the sample store use;
#   2. a virtual environment .venv/ in this checkout (/usr/bin/python3 -m venv) with imgfs
#      installed editable, with its dev tools (ruff, mypy, pytest);
#   3. the commands: as root /usr/local/bin/imgfs, the mount(8) helper /sbin/mount.fuse.imgfs
#      (fstab, mount -t fuse.imgfs), the man page and bash completion; as another user the same
#      under ~/.local (the helper cannot be installed without root: see the README).
# Re-running it is cheap: packages and the venv are only touched when something is missing or
# pyproject.toml, setup.py or the C source of imgfs.layer._fastparse changed (the editable
# install builds that extension in place: imgfs/layer/_fastparse.*.so).
set -euo pipefail
cd "$(dirname "$0")/.."
checkout=$(pwd -P)
venv=$checkout/.venv
python=/usr/bin/python3

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

packages=(fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev buildah skopeo podman gnupg
  mount util-linux debootstrap uidmap)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The venv: Debian's interpreter, never whatever python3 comes first on PATH.
if ! "$venv/bin/python" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix or sys.base_prefix != "/usr")' 2>/dev/null; then
  rm -rf "$venv"
  "$python" -m venv "$venv"
fi
stamp=$venv/.imgfs-installed
want=$(cat pyproject.toml setup.py imgfs/layer/_fastparse.c | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log=$(mktemp)
  trap 'rm -f "$log"' EXIT
  if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]" >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: pip could not install imgfs and its dependencies into $venv" >&2
    exit 1
  fi
  echo "$want" >"$stamp"
fi
"$venv/bin/python" -c "import imgfs, pyfuse3, trio, pybase64, fastcrc, zstandard, pytest" || {
  echo "setup: imgfs did not install into $venv" >&2; exit 1; }
# The compiled fast path is optional (imgfs falls back to Python, slower); say so if it is missing.
"$venv/bin/python" -c "import imgfs.layer._fastparse" 2>/dev/null ||
  echo "setup: imgfs.layer._fastparse did not build (gcc, python3-dev?); imgfs runs in pure Python" >&2

# The commands, the man page and the completion.
link() { # link TARGET LINK: create or update LINK, but never replace a file that is not a link
  mkdir -p "$(dirname "$2")"
  if [ -e "$2" ] && [ ! -L "$2" ]; then
    echo "setup: $2 exists and is not a link; left alone" >&2
  else
    ln -sfn "$1" "$2"
  fi
}
if [ "$(id -u)" -eq 0 ]; then
  link "$venv/bin/imgfs" /usr/local/bin/imgfs
  link "$venv/bin/mount.fuse.imgfs" /sbin/mount.fuse.imgfs
  install -D -m 0644 docs/imgfs.1 /usr/local/share/man/man1/imgfs.1
  install -D -m 0644 scripts/imgfs.bash-completion /usr/share/bash-completion/completions/imgfs
else
  data=${XDG_DATA_HOME:-$HOME/.local/share}
  link "$venv/bin/imgfs" "$HOME/.local/bin/imgfs"
  install -D -m 0644 docs/imgfs.1 "$data/man/man1/imgfs.1"
  install -D -m 0644 scripts/imgfs.bash-completion "$data/bash-completion/completions/imgfs"
fi
