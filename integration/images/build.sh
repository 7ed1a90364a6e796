#!/usr/bin/env bash
# integration/images/build.sh: builds the rrc test images as OCI image-layout
# tarballs, from the host's installed Debian packages (no registry, no docker).
#
#   build.sh [--force] [--out DIR] [NAME...]
#
# NAME is any of: busybox redis memcached lighttpd pause (default: all).
# Output: DIR/NAME.tar (default DIR: /var/cache/rrc/images), importable with
# `ctr images import` (see import.sh) as docker.io/rrc/NAME:latest.
#
# Each image is one uncompressed layer: busybox-static as /bin/busybox plus
# applet links, the server binaries plus every library `ldd` lists (and the
# dynamic loader) at their host paths, a minimal /etc. An image is rebuilt only
# when the files it is made of (host binaries and libraries, this script,
# pause.c) changed since its tarball was written (a fingerprint is kept in
# DIR/NAME.inputs), or with --force.
#
# Needs: bash, coreutils, tar, sha256sum, jq, ldd, gcc (for pause), chroot (checks).
set -euo pipefail
shopt -s inherit_errexit
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"
export LC_ALL=C
umask 022

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
OUT="${RRC_IMAGE_DIR:-/var/cache/rrc/images}"
ALL_IMAGES=(busybox redis memcached lighttpd pause)
# Fixed timestamp for every file, tar entry and the config's "created".
EPOCH="${SOURCE_DATE_EPOCH:-1700000000}"
CREATED="$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)"
DEFAULT_PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
case "$(uname -m)" in
	x86_64) ARCH=amd64 ;;
	aarch64) ARCH=arm64 ;;
	*) ARCH="$(dpkg --print-architecture)" ;;
esac

log() { printf '[images] %s\n' "$*" >&2; }
die() { printf '[images] ERROR: %s\n' "$*" >&2; exit 1; }

FORCE=0
NAMES=()
while [ $# -gt 0 ]; do
	case "$1" in
		--force | -f) FORCE=1 ;;
		--out) OUT="$2"; shift ;;
		-h | --help) sed -n '2,17p' "$SELF"; exit 0 ;;
		-*) die "unknown option $1" ;;
		*) NAMES+=("$1") ;;
	esac
	shift
done
[ "${#NAMES[@]}" -gt 0 ] || NAMES=("${ALL_IMAGES[@]}")

BUSYBOX_APPLETS=(
	sh ash ls cat echo sleep ps top tail head date wc env id mkdir rm touch true false
	nc wget grep egrep fgrep sed awk kill killall pidof hostname ip ifconfig route netstat
	ping nslookup printf test '[' '[[' expr seq cut tr sort uniq tee xargs find stat du df ln
	cp mv chmod chown readlink realpath basename dirname dd od hexdump md5sum sha256sum
	mount umount uname free uptime nproc timeout usleep watch which whoami more less vi
	tar gzip gunzip zcat mktemp sync yes nohup setsid nsenter unshare pwd rmdir
)

# ---------------------------------------------------------------------------
# Plan: what goes into an image. Fills FILES (host path -> image path, one
# "SRC DEST" per line) from the image's binaries and their libraries.

FILES=()

add_file() { # SRC [DEST]
	[ -e "$1" ] || die "missing file $1 (is its package installed? run integration/setup.sh)"
	FILES+=("$1 ${2:-$1}")
}

# Adds an ELF binary (or shared object) and all the libraries ldd lists,
# including the dynamic loader, each at the path ldd prints.
add_elf() { # SRC [DEST]
	local src="$1" dest="${2:-$1}" out lib
	add_file "$src" "$dest"
	out=$(ldd "$src" 2>&1) || {
		case "$out" in *"not a dynamic executable"* | *"statically linked"*) return 0 ;; esac
		die "ldd $src failed: $out"
	}
	if printf '%s\n' "$out" | grep -q 'not found'; then
		die "ldd $src: missing libraries: $(printf '%s\n' "$out" | grep 'not found' | tr '\n' ' ')"
	fi
	for lib in $(printf '%s\n' "$out" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }'); do
		add_file "$lib"
	done
}

add_busybox() {
	add_file /bin/busybox /bin/busybox
}

LIGHTTPD_MODULES=()   # none needed: indexfile, staticfile are built into 1.4.69

plan() { # NAME
	FILES=()
	case "$1" in
		busybox) add_busybox ;;
		redis)
			add_busybox
			add_elf /usr/bin/redis-server
			add_elf /usr/bin/redis-cli
			;;
		memcached)
			add_busybox
			add_elf /usr/bin/memcached
			;;
		lighttpd)
			add_busybox
			add_elf /usr/sbin/lighttpd
			local m
			for m in "${LIGHTTPD_MODULES[@]+"${LIGHTTPD_MODULES[@]}"}"; do
				add_elf "/usr/lib/lighttpd/$m.so"
			done
			;;
		pause)
			add_file "$HERE/pause.c" /.pause.c   # compiled, not copied
			;;
		*) die "unknown image '$1' (known: ${ALL_IMAGES[*]})" ;;
	esac
}

# The fingerprint of an image's inputs: every host file (path, size, mtime and
# ctime, so a package upgrade shows), this script and pause.c by content.
fingerprint() {
	local f
	{
		echo "arch $ARCH epoch $EPOCH"
		sha256sum "$SELF" "$HERE/pause.c" | awk '{print $1}'
		for f in "${FILES[@]}"; do
			stat -L -c '%n %s %Y %Z' "${f%% *}"
		done | sort -u
	}
}

# ---------------------------------------------------------------------------
# Rootfs

base_rootfs() { # ROOT
	local r="$1"
	mkdir -p "$r"/{bin,sbin,etc,dev,proc,sys,root,run,data,lib,lib64,home}
	mkdir -p "$r"/usr/{bin,sbin,lib,local/bin} "$r"/var/{lib,log,cache,www}
	chmod 0700 "$r/root"
	mkdir -p "$r/tmp" "$r/var/tmp"
	chmod 1777 "$r/tmp" "$r/var/tmp"
	ln -s ../run "$r/var/run"

	cat >"$r/etc/passwd" <<-'EOF'
		root:x:0:0:root:/root:/bin/sh
		daemon:x:1:1:daemon:/usr/sbin:/bin/false
		www-data:x:33:33:www-data:/var/www:/bin/false
		redis:x:999:999:redis:/data:/bin/false
		memcache:x:998:998:memcached:/nonexistent:/bin/false
		nobody:x:65534:65534:nobody:/nonexistent:/bin/false
	EOF
	cat >"$r/etc/group" <<-'EOF'
		root:x:0:
		daemon:x:1:
		www-data:x:33:
		redis:x:999:
		memcache:x:998:
		nogroup:x:65534:
	EOF
	cat >"$r/etc/nsswitch.conf" <<-'EOF'
		passwd:    files
		group:     files
		shadow:    files
		hosts:     files dns
		networks:  files
		protocols: files
		services:  files
	EOF
	cat >"$r/etc/hosts" <<-'EOF'
		127.0.0.1	localhost
		::1	localhost ip6-localhost ip6-loopback
	EOF
	: >"$r/etc/resolv.conf"
	echo rrc >"$r/etc/hostname"
}

copy_files() { # ROOT
	local r="$1" f src dest
	for f in "${FILES[@]}"; do
		src="${f%% *}" dest="${f#* }"
		[ "$dest" = /.pause.c ] && continue
		mkdir -p "$r$(dirname "$dest")"
		cp -L "$src" "$r$dest"
	done
}

busybox_links() { # ROOT
	local r="$1" a have
	have=" $(chroot "$r" /bin/busybox --list | tr '\n' ' ') "
	for a in "${BUSYBOX_APPLETS[@]}"; do
		case "$have" in *" $a "*) ;; *) continue ;; esac
		[ -e "$r/bin/$a" ] || ln -s busybox "$r/bin/$a"
	done
}

lighttpd_files() { # ROOT
	local r="$1"
	mkdir -p "$r/etc/lighttpd" "$r/var/www"
	cat >"$r/etc/lighttpd/lighttpd.conf" <<-'EOF'
		# Minimal lighttpd for the rrc test bed: static files from /var/www on :80.
		server.modules        = ()
		server.document-root  = "/var/www"
		server.port           = 80
		server.bind           = "0.0.0.0"
		server.username       = "www-data"
		server.groupname      = "www-data"
		server.tag            = "lighttpd"
		server.max-fds        = 1024
		index-file.names      = ( "index.html" )
		mimetype.assign       = (
		  ".html" => "text/html",
		  ".txt"  => "text/plain",
		  ".css"  => "text/css",
		  ".js"   => "text/javascript",
		  ".json" => "application/json",
		  ""      => "application/octet-stream"
		)
	EOF
	cat >"$r/var/www/index.html" <<-'EOF'
		<!DOCTYPE html>
		<html><head><title>rrc</title></head><body><p>hello from rrc lighttpd</p></body></html>
	EOF
}

# Runs a command of the image in a chroot, to check the libraries are all there.
check_in_rootfs() { # ROOT CMD...
	local r="$1" out rc=0 made_null=0
	shift
	if [ ! -e "$r/dev/null" ]; then   # lighttpd opens /dev/null; runc provides it later
		mkdir -p "$r/dev"
		mknod -m 0666 "$r/dev/null" c 1 3
		made_null=1
	fi
	out=$(chroot "$r" "$@" 2>&1 </dev/null) || rc=$?
	[ "$made_null" = 1 ] && rm -f "$r/dev/null"
	[ "$rc" = 0 ] || die "check in rootfs failed: $* -> $out"
}

# ---------------------------------------------------------------------------
# OCI layout

# Prints "sha256:HEX SIZE" of a file.
digest_size() {
	printf 'sha256:%s %s\n' "$(sha256sum "$1" | awk '{print $1}')" "$(stat -c %s "$1")"
}

# Moves FILE into LAYOUT/blobs/sha256/ under its digest; prints "DIGEST SIZE".
add_blob() { # LAYOUT FILE
	local ds hex
	ds=$(digest_size "$2")
	hex="${ds%% *}"
	mv "$2" "$1/blobs/sha256/${hex#sha256:}"
	printf '%s\n' "$ds"
}

det_tar() { # DIR OUTFILE [what...]: deterministic tar of DIR
	local dir="$1" out="$2"
	shift 2
	tar --create --file="$out" --directory="$dir" --format=gnu --sort=name \
		--numeric-owner --owner=0 --group=0 --mtime="@$EPOCH" "${@:-.}"
}

# Image settings (set by image_settings): JSON arrays / strings.
ENTRYPOINT='null' CMD='null' WORKDIR='/' USER='' PORTS='{}'

image_settings() { # NAME
	ENTRYPOINT='null' CMD='null' WORKDIR='/' USER='' PORTS='{}'
	case "$1" in
		busybox) CMD='["sh"]' ;;
		redis)
			ENTRYPOINT='["/usr/bin/redis-server"]'
			CMD='["--bind","0.0.0.0","--protected-mode","no","--save","","--appendonly","no","--dir","/data"]'
			WORKDIR=/data
			PORTS='{"6379/tcp":{}}'
			;;
		memcached)
			ENTRYPOINT='["/usr/bin/memcached"]'
			CMD='["-u","nobody","-p","11211","-t","4"]'
			PORTS='{"11211/tcp":{}}'
			;;
		lighttpd)
			ENTRYPOINT='["/usr/sbin/lighttpd"]'
			CMD='["-D","-f","/etc/lighttpd/lighttpd.conf"]'
			WORKDIR=/var/www
			PORTS='{"80/tcp":{}}'
			;;
		pause)
			ENTRYPOINT='["/pause"]'
			USER='65535:65535'
			;;
	esac
}

build_image() { # NAME FINGERPRINT
	local name="$1" fp="$2" work root layout
	work=$(mktemp -d "$OUT/.build-$name.XXXXXX")
	BUILD_DIRS+=("$work")
	root="$work/rootfs"
	layout="$work/layout"
	mkdir -p "$root" "$layout/blobs/sha256"

	# rootfs
	case "$name" in
		pause)
			mkdir -p "$root"/{dev,proc,sys,etc}
			gcc -static -Os -Wall -o "$root/pause" "$HERE/pause.c"
			strip -s "$root/pause" 2>/dev/null || true
			check_in_rootfs "$root" /pause -v
			;;
		*)
			base_rootfs "$root"
			copy_files "$root"
			busybox_links "$root"
			check_in_rootfs "$root" /bin/sh -c 'echo ok'
			case "$name" in
				redis)
					check_in_rootfs "$root" /usr/bin/redis-server --version
					check_in_rootfs "$root" /usr/bin/redis-cli --version
					;;
				memcached) check_in_rootfs "$root" /usr/bin/memcached --version ;;
				lighttpd)
					lighttpd_files "$root"
					check_in_rootfs "$root" /usr/sbin/lighttpd -tt -f /etc/lighttpd/lighttpd.conf
					;;
			esac
			;;
	esac

	# layer
	local layer config manifest index
	det_tar "$root" "$work/layer.tar"
	layer=$(add_blob "$layout" "$work/layer.tar")

	# config
	jq -nc \
		--arg created "$CREATED" --arg arch "$ARCH" \
		--arg path "PATH=$DEFAULT_PATH" --arg workdir "$WORKDIR" --arg user "$USER" \
		--argjson entrypoint "$ENTRYPOINT" --argjson cmd "$CMD" --argjson ports "$PORTS" \
		--arg diffid "${layer%% *}" --arg name "$name" '
		{
			created: $created,
			architecture: $arch,
			os: "linux",
			config: ({
				Env: [$path],
				WorkingDir: $workdir,
				Labels: {"org.opencontainers.image.title": ("rrc/" + $name)}
			}
			+ (if $user == "" then {} else {User: $user} end)
			+ (if $entrypoint == null then {} else {Entrypoint: $entrypoint} end)
			+ (if $cmd == null then {} else {Cmd: $cmd} end)
			+ (if $ports == {} then {} else {ExposedPorts: $ports} end)),
			rootfs: {type: "layers", diff_ids: [$diffid]},
			history: [{created: $created, created_by: ("rrc integration/images/build.sh " + $name)}]
		}' >"$work/config.json"
	config=$(add_blob "$layout" "$work/config.json")

	# manifest
	jq -nc --arg cd "${config%% *}" --argjson cs "${config#* }" \
		--arg ld "${layer%% *}" --argjson ls "${layer#* }" '
		{
			schemaVersion: 2,
			mediaType: "application/vnd.oci.image.manifest.v1+json",
			config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $cd, size: $cs},
			layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar", digest: $ld, size: $ls}]
		}' >"$work/manifest.json"
	manifest=$(add_blob "$layout" "$work/manifest.json")

	# index + layout marker
	jq -nc --arg md "${manifest%% *}" --argjson ms "${manifest#* }" --arg arch "$ARCH" \
		--arg ref "docker.io/rrc/$name:latest" '
		{
			schemaVersion: 2,
			mediaType: "application/vnd.oci.image.index.v1+json",
			manifests: [{
				mediaType: "application/vnd.oci.image.manifest.v1+json",
				digest: $md, size: $ms,
				platform: {architecture: $arch, os: "linux"},
				annotations: {
					"io.containerd.image.name": $ref,
					"org.opencontainers.image.ref.name": "latest"
				}
			}]
		}' >"$layout/index.json"
	printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"

	det_tar "$layout" "$work/image.tar" oci-layout index.json blobs
	mv -f "$work/image.tar" "$OUT/$name.tar"
	printf '%s\n' "$fp" >"$OUT/$name.inputs"
	rm -rf "$work"
	log "built $OUT/$name.tar ($(du -h "$OUT/$name.tar" | cut -f1), docker.io/rrc/$name:latest, layer ${layer%% *})"
}

# ---------------------------------------------------------------------------

BUILD_DIRS=()
cleanup() {
	local d
	for d in "${BUILD_DIRS[@]+"${BUILD_DIRS[@]}"}"; do rm -rf -- "$d"; done
}
trap cleanup EXIT

mkdir -p "$OUT"
for name in "${NAMES[@]}"; do
	plan "$name"
	image_settings "$name"
	fp=$(fingerprint)
	if [ "$FORCE" != 1 ] && [ -f "$OUT/$name.tar" ] && [ -f "$OUT/$name.inputs" ] &&
		[ "$(cat "$OUT/$name.inputs")" = "$fp" ]; then
		log "$name: up to date ($OUT/$name.tar)"
		continue
	fi
	build_image "$name" "$fp"
done
