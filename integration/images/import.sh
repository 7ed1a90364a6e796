#!/usr/bin/env bash
# integration/images/import.sh: loads the rrc test images into a containerd.
#
#   import.sh SOCKET NAMESPACE [NAME...]
#
# NAME is any of busybox redis memcached lighttpd pause (default: all). Reads
# $RRC_IMAGE_DIR/NAME.tar (default /var/cache/rrc/images, built by build.sh,
# which is run first if a tarball is missing), imports it with
# `ctr images import` and unpacks it for the snapshotter $RRC_SNAPSHOTTER
# (default overlayfs). The image is then docker.io/rrc/NAME:latest: the name
# comes from the io.containerd.image.name annotation in the tarball's
# index.json, so no --base-name/--index-name flag is needed.
set -euo pipefail
shopt -s inherit_errexit
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIR="${RRC_IMAGE_DIR:-/var/cache/rrc/images}"
SNAPSHOTTER="${RRC_SNAPSHOTTER:-overlayfs}"

die() { printf '[import] ERROR: %s\n' "$*" >&2; exit 1; }

[ $# -ge 2 ] || die "usage: $0 SOCKET NAMESPACE [NAME...]"
SOCK="$1" NS="$2"
shift 2
NAMES=("$@")
[ "${#NAMES[@]}" -gt 0 ] || NAMES=(busybox redis memcached lighttpd pause)
[ -S "$SOCK" ] || die "$SOCK is not a socket (is containerd running?)"

missing=()
for n in "${NAMES[@]}"; do
	[ -f "$DIR/$n.tar" ] || missing+=("$n")
done
if [ "${#missing[@]}" -gt 0 ]; then
	RRC_IMAGE_DIR="$DIR" "$HERE/build.sh" "${missing[@]}"
fi

for n in "${NAMES[@]}"; do
	ref="docker.io/rrc/$n:latest"
	ctr --address "$SOCK" --namespace "$NS" images import \
		--snapshotter "$SNAPSHOTTER" "$DIR/$n.tar" >/dev/null ||
		die "ctr images import $DIR/$n.tar failed"
	# STATUS "complete (2/2)", UNPACKED "true"
	ctr --address "$SOCK" --namespace "$NS" images check --snapshotter "$SNAPSHOTTER" "name==$ref" 2>/dev/null |
		awk -v r="$ref" '$1 == r && / complete / && $NF == "true" { ok = 1 } END { exit !ok }' ||
		die "$ref is not complete and unpacked ($SNAPSHOTTER) in namespace $NS after the import"
	printf '%s\n' "$ref"
done
