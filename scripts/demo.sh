#!/usr/bin/env bash
# The main job on a fresh machine: set up, mount a store, and look around.
#   bash scripts/demo.sh [STORE] [MOUNTPOINT]
# STORE defaults to the store podman would use if it holds images, else a small sample store
# built once with buildah (scripts/make_sample_store.sh). The mount stays up afterwards;
# unmount it with `imgfs -u MOUNTPOINT`. An earlier demo mount at MOUNTPOINT is replaced; any
# other file system mounted there is left alone (the demo stops).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
imgfs=$(pwd -P)/.venv/bin/imgfs
python=$(pwd -P)/.venv/bin/python

store="${1:-}"
mnt="${2:-/tmp/imgfs-demo}"
if [ -z "$store" ]; then
  if "$python" -c 'import imgfs, sys; sys.exit(0 if imgfs.Store.open().images() else 1)' 2>/dev/null; then
    echo "== using the store podman uses"
  else
    store=/var/tmp/imgfs-sample-store
    if [ ! -d "$store/overlay-images" ] && [ ! -d "$store/vfs-images" ]; then
      echo "== no store with images here: building a sample store in $store"
      bash scripts/make_sample_store.sh "$store"
    fi
  fi
fi

mkdir -p "$mnt"
if mountpoint -q "$mnt"; then
  # imgfs -u refuses (exit 7) anything that is not an imgfs mount: never unmount others' mounts.
  "$imgfs" -u "$mnt" || { echo "demo: $mnt is not free (see above); choose another MOUNTPOINT" >&2; exit 1; }
fi
echo "== imgfs ${store:-the-default-store} $mnt"
"$imgfs" ${store:+"$store"} "$mnt"

out=$(mktemp -d)
trap 'rm -rf -- "$out"' EXIT
echo "== ls -l $mnt"; ls -l "$mnt"
echo "== by-name"; find "$mnt/by-name" -type l -printf '%p -> %l\n'
image=$(find "$mnt" -mindepth 1 -maxdepth 1 -type d -name '[0-9a-f]*' | head -n 1)
echo "== ls -l $image $image/blobs"; ls -l "$image" "$image/blobs"
echo "== cat $image/manifest.json"; cat "$image/manifest.json"; echo
blob=$(ls -S "$image"/blobs/* | head -n 1)
echo "== cp $blob $out/"; cp "$blob" "$out/"
echo "== sha256sum (must equal the blob's name)"; sha256sum "$out/$(basename "$blob")"
echo
echo "Mounted at $mnt. Unmount with: $imgfs -u $mnt   (the log: $("$python" -c 'from imgfs.fuse.logfile import default_log_path as p; print(p())'))"
