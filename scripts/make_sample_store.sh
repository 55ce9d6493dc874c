#!/usr/bin/env bash
# make_sample_store.sh ROOT [DRIVER]
#
# Build a small containers/storage store with buildah, to try imgfs without an existing store:
#   localhost/sample/hello:v1   one layer, a few files
#   localhost/sample/multi:v1   three layers built on top of each other
# DRIVER is overlay (default) or vfs. The runroot is ROOT.run (set RUNROOT= to change it).
# Nothing is pulled: the images are built from scratch. Then:  imgfs --driver DRIVER ROOT MOUNTPOINT
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 || $1 == -* ]]; then
    echo "usage: $0 ROOT [DRIVER]   (DRIVER: overlay or vfs; default overlay)" >&2
    exit 2
fi
command -v buildah >/dev/null || { echo "$0: buildah not found (apt-get install buildah)" >&2; exit 1; }

root=$(realpath -m -- "$1")
driver=${2:-overlay}
runroot=${RUNROOT:-$root.run}
work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT

# Keep the host's registries and trust policy out of it.
echo '{"default": [{"type": "insecureAcceptAnything"}]}' >"$work/policy.json"
: >"$work/registries.conf"
export CONTAINERS_REGISTRIES_CONF=$work/registries.conf

b() { buildah --root "$root" --runroot "$runroot" --storage-driver "$driver" "$@"; }
from() { b from --signature-policy "$work/policy.json" --pull=never -q "$1"; }
commit() { b commit --signature-policy "$work/policy.json" -q --rm "$@"; }

# hello: one layer
mkdir -p "$work/hello/etc"
echo "hello from imgfs" >"$work/hello/hello.txt"
echo "a sample image built by make_sample_store.sh" >"$work/hello/etc/motd"
ln -s hello.txt "$work/hello/greeting"
ctr=$(from scratch)
b copy -q "$ctr" "$work/hello" /
b config --cmd /hello.txt --label org.example.sample=hello "$ctr"
commit "$ctr" localhost/sample/hello:v1 >/dev/null

# multi: three layers, each committed on top of the previous one
parent=scratch
steps=()
for i in 1 2 3; do
    mkdir -p "$work/layer$i/data"
    echo "layer $i" >"$work/layer$i/data/layer$i.txt"
    head -c $((i * 256 * 1024)) /dev/urandom >"$work/layer$i/data/random$i.bin"
    ctr=$(from "$parent")
    b copy -q "$ctr" "$work/layer$i" /
    if ((i < 3)); then
        parent=$(commit "$ctr")
        steps+=("$parent")
    else
        b config --label org.example.sample=multi "$ctr"
        commit "$ctr" localhost/sample/multi:v1 >/dev/null
    fi
done
b rmi "${steps[@]}" >/dev/null # the unnamed intermediate images; their layers stay in use

b images
echo
echo "store: $root (driver $driver, runroot $runroot)"
echo "try:   mkdir -p /tmp/imgfs-mnt && imgfs --driver $driver $root /tmp/imgfs-mnt"
