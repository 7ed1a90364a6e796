#!/usr/bin/env bash
# integration/setup.sh: prepares this machine as the rrc test bed.
#
#   - installs the Debian packages the tests need (containerd, runc, the servers
#     the images are made of, network tools, CRIU's build dependencies), without
#     letting their postinst scripts start daemons on the host;
#   - builds CRIU 4.2.x from Debian sid's source package (Debian 12's CRIU 3.17
#     does not work on this kernel) and installs it as /usr/local/sbin/criu;
#   - builds the local OCI images (integration/images/build.sh) into
#     /var/cache/rrc/images/.
#
# Idempotent: a second run checks and does nothing (a few seconds).
# Runs as root, with no stdin and no environment (CI runs it with CI=true).
#
# Environment (all optional):
#   RRC_CACHE_DIR       cache root (default /var/cache/rrc)
#   RRC_IMAGE_DIR       where the image tarballs go (default $RRC_CACHE_DIR/images)
#   RRC_SKIP_IMAGES=1   do not build the images
#   RRC_FORCE_CRIU=1    rebuild and reinstall CRIU even if a 4.2.x is installed
set -euo pipefail
shopt -s inherit_errexit

export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"
export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C
umask 022

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${RRC_CACHE_DIR:-/var/cache/rrc}"
CRIU_CACHE="$CACHE/criu"
CRIU_BIN=/usr/local/sbin/criu
CRIU_SERIES='4.2'          # versions accepted: 4.2.x
START_TS=$(date +%s)

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"

mkdir -p "$CACHE"
# One setup at a time (tests may call it concurrently).
exec 9>"$CACHE/setup.lock"
if ! flock -n 9; then
	log "another setup.sh is running; waiting for it"
	flock 9
fi

# --------------------------------------------------------------------------
# Cleanup of whatever this run created temporarily.
POLICY_RC=/usr/sbin/policy-rc.d
CREATED_POLICY_RC=0
CLEANUP_PATHS=()
cleanup() {
	if [ "$CREATED_POLICY_RC" = 1 ]; then
		rm -f "$POLICY_RC"
	fi
	local p
	for p in "${CLEANUP_PATHS[@]+"${CLEANUP_PATHS[@]}"}"; do
		rm -rf -- "$p"
	done
}
trap cleanup EXIT

# --------------------------------------------------------------------------
# apt helpers

# Runs an apt/dpkg command, retrying while another process holds the dpkg/apt
# lock (up to 30 tries, 5 s apart). Output goes to stderr; a failure that is
# not a lock failure is returned at once.
apt_retry() {
	local try out rc
	out=$(mktemp)
	for try in $(seq 1 30); do
		rc=0
		"$@" </dev/null >"$out" 2>&1 || rc=$?
		cat "$out" >&2
		if [ "$rc" = 0 ]; then
			rm -f "$out"
			return 0
		fi
		if grep -qE 'Could not get lock|Unable to (acquire the dpkg frontend lock|lock (the administration|directory))|is another process using it|dpkg (status database|frontend lock) is locked' "$out"; then
			log "apt/dpkg lock is held; retry $try/30 in 5 s"
			sleep 5
			continue
		fi
		rm -f "$out"
		return "$rc"
	done
	rm -f "$out"
	return 1
}

pkg_installed() {
	[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}

APT_PACKAGES=(
	# runtime of the test bed
	containerd runc iptables nftables iproute2
	# servers and clients the images and tests are made of
	redis-server redis-tools memcached lighttpd busybox-static wrk jq
	# CRIU build dependencies (and gcc for the pause image)
	build-essential pkg-config libbsd-dev libcap-dev libgnutls28-dev libnet1-dev
	libnftables-dev libnl-3-dev libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler
	protobuf-compiler uuid-dev python3-protobuf libaio-dev
	# used by this script
	xz-utils
)
# Daemons whose postinst would start them on the host.
HOST_DAEMONS=(containerd redis-server memcached lighttpd)

# pids (one per line) of the running processes named $1
pids_of() { pgrep -x "$1" 2>/dev/null || true; }

# Whether pid $2 is daemon $1 as its Debian package starts it on the host
# (detached to pid 1, default config), not a test's own instance.
is_package_daemon() { # NAME PID
	local cmd
	[ "$(ps -o ppid= -p "$2" 2>/dev/null | tr -d ' ')" = 1 ] || return 1
	cmd=$(tr '\0' ' ' <"/proc/$2/cmdline" 2>/dev/null) || return 1
	case "$1:$cmd" in
		"containerd:/usr/bin/containerd " | "containerd:containerd ") return 0 ;;
		redis-server:*127.0.0.1:6379* | redis-server:*/etc/redis/*) return 0 ;;
		memcached:*/run/memcached/* | memcached:*" -u memcache "*) return 0 ;;
		lighttpd:*" -D "*) return 1 ;;
		lighttpd:*/etc/lighttpd/lighttpd.conf*) return 0 ;;
	esac
	return 1
}

install_packages() {
	local missing=() p
	for p in "${APT_PACKAGES[@]}"; do
		pkg_installed "$p" || missing+=("$p")
	done
	if [ "${#missing[@]}" = 0 ]; then
		log "apt packages: all ${#APT_PACKAGES[@]} installed"
		return 0
	fi
	log "apt packages to install: ${missing[*]}"

	# Daemons already running before the install are none of our business.
	declare -A before=()
	local d pid
	for d in "${HOST_DAEMONS[@]}"; do
		for pid in $(pids_of "$d"); do before[$pid]=1; done
	done

	# Keep postinst scripts from starting daemons (invoke-rc.d honours this).
	if [ ! -e "$POLICY_RC" ]; then
		printf '#!/bin/sh\n# temporary, written by rrc integration/setup.sh\nexit 101\n' >"$POLICY_RC"
		chmod 0755 "$POLICY_RC"
		CREATED_POLICY_RC=1
	fi

	if ! apt_retry apt-get update -q; then
		log "WARNING: apt-get update failed; trying the install with the lists we have"
	fi
	apt_retry apt-get install -y -q --no-install-recommends \
		-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
		"${missing[@]}" || die "apt-get install failed (packages: ${missing[*]})"

	if [ "$CREATED_POLICY_RC" = 1 ]; then
		rm -f "$POLICY_RC"
		CREATED_POLICY_RC=0
	fi

	# Anything that got started anyway (a daemon detached to pid 1 during the
	# install) is stopped again: tests run their own instances.
	for d in "${HOST_DAEMONS[@]}"; do
		for pid in $(pids_of "$d"); do
			[ -n "${before[$pid]+x}" ] && continue
			is_package_daemon "$d" "$pid" || continue
			log "stopping host daemon $d (pid $pid) started by the package install"
			kill -TERM "$pid" 2>/dev/null || true
			for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
			kill -KILL "$pid" 2>/dev/null || true
		done
	done

	for p in "${missing[@]}"; do
		pkg_installed "$p" || die "package $p is still not installed"
	done
	if pkg_installed criu; then
		log "WARNING: Debian's criu package (3.17) is installed; it does not work on this kernel." \
			"$CRIU_BIN must come first on PATH."
	fi
}

# --------------------------------------------------------------------------
# CRIU 4.2.x from Debian sid's source package

criu_version_of() { # prints e.g. 4.2.1, or nothing
	"$1" --version 2>/dev/null | sed -n 's/^Version: *\([0-9][0-9.]*\).*/\1/p' | head -n1
}

criu_ok_version() {
	case "$1" in "$CRIU_SERIES".*|"$CRIU_SERIES") return 0 ;; esac
	return 1
}

# Fetches criu_<ver>.orig.tar.xz from sid's deb-src into $CRIU_CACHE, through
# a private apt configuration (the host's sources are untouched). Prints the
# path of the tarball.
fetch_criu_source() {
	local aptdir="$CRIU_CACHE/apt" line uri file hash
	mkdir -p "$aptdir/lists/partial" "$aptdir/cache/archives/partial"
	echo 'deb-src http://deb.debian.org/debian sid main' >"$aptdir/sources.list"
	local opts=(
		-o "Dir::Etc::SourceList=$aptdir/sources.list"
		-o "Dir::Etc::SourceParts=/dev/null"
		-o "Dir::State::Lists=$aptdir/lists"
		-o "Dir::Cache=$aptdir/cache"
		-o "Dir::Cache::pkgcache="
		-o "Dir::Cache::srcpkgcache="
	)
	log "criu: fetching the sid source index (private apt config in $aptdir)"
	apt_retry apt-get "${opts[@]}" update -q || die "criu: apt-get update of the sid deb-src failed"
	line=$(apt-get "${opts[@]}" source --print-uris criu </dev/null 2>/dev/null | grep -E "^'[^']*\.orig\.tar\.xz' " | head -n1) ||
		die "criu: no criu source package found in sid"
	# 'URI' FILE SIZE SHA256:HASH
	uri=$(printf '%s\n' "$line" | awk '{print $1}' | tr -d "'")
	file=$(printf '%s\n' "$line" | awk '{print $2}')
	hash=$(printf '%s\n' "$line" | awk '{print $4}')
	case "$file" in criu_"$CRIU_SERIES".*.orig.tar.xz) ;;
		*) log "WARNING: sid's criu source is $file, not $CRIU_SERIES.x; building it anyway" ;;
	esac
	log "criu: downloading $file"
	/usr/lib/apt/apt-helper download-file "$uri" "$CRIU_CACHE/$file.part" "$hash" </dev/null >&2 ||
		die "criu: download of $uri failed"
	mv -f "$CRIU_CACHE/$file.part" "$CRIU_CACHE/$file"
	printf '%s\n' "$CRIU_CACHE/$file"
}

install_criu() {
	local have=""
	[ -x "$CRIU_BIN" ] && have=$(criu_version_of "$CRIU_BIN")
	local stamp=""
	[ -f "$CRIU_CACHE/installed-version" ] && stamp=$(cat "$CRIU_CACHE/installed-version")
	if [ -n "$have" ] && { criu_ok_version "$have" || [ "$have" = "$stamp" ]; } &&
		[ "${RRC_FORCE_CRIU:-0}" != 1 ]; then
		log "criu: $CRIU_BIN is $have"
		return 0
	fi
	mkdir -p "$CRIU_CACHE"

	local tarball="" t
	for t in "$CRIU_CACHE"/criu_"$CRIU_SERIES".*.orig.tar.xz; do
		[ -f "$t" ] && tarball=$t
	done
	[ -n "$tarball" ] || tarball=$(fetch_criu_source)

	local ver srcdir
	ver=$(basename "$tarball" .orig.tar.xz)
	ver=${ver#criu_}
	srcdir="$CRIU_CACHE/src/criu-$ver"
	if [ -x "$srcdir/criu/criu" ] && [ "$(criu_version_of "$srcdir/criu/criu")" = "$ver" ] &&
		[ "${RRC_FORCE_CRIU:-0}" != 1 ]; then
		log "criu: using the cached build in $srcdir"
	else
		log "criu: building $ver in $srcdir (about 90 s; log: $CRIU_CACHE/build.log)"
		rm -rf "$srcdir"
		mkdir -p "$CRIU_CACHE/src"
		tar -C "$CRIU_CACHE/src" -xJf "$tarball"
		[ -d "$srcdir" ] || die "criu: $tarball did not unpack to $srcdir"
		local jobs
		jobs=$(nproc 2>/dev/null || echo 2)
		# Debian's python3 (not a pyenv shim) for CRIU's build scripts.
		if ! (cd "$srcdir" && PATH="/usr/sbin:/usr/bin:/sbin:/bin" make -j"$jobs" criu) \
			</dev/null >"$CRIU_CACHE/build.log" 2>&1; then
			tail -n 40 "$CRIU_CACHE/build.log" >&2
			die "criu: build failed (full log: $CRIU_CACHE/build.log)"
		fi
	fi
	install -m 0755 "$srcdir/criu/criu" "$CRIU_BIN"
	have=$(criu_version_of "$CRIU_BIN")
	[ -n "$have" ] || die "criu: $CRIU_BIN --version reports no version"
	printf '%s\n' "$have" >"$CRIU_CACHE/installed-version"
	log "criu: installed $CRIU_BIN ($have)"
}

check_criu() {
	local out first
	first=$(command -v criu || true)
	if [ "$first" != "$CRIU_BIN" ]; then
		log "WARNING: 'criu' on PATH is ${first:-nothing}, not $CRIU_BIN; tests must call $CRIU_BIN"
	fi
	out=$("$CRIU_BIN" check 2>&1) || true
	if ! printf '%s\n' "$out" | grep -q 'Looks good'; then
		printf '%s\n' "$out" >&2
		die "'$CRIU_BIN check' did not say \"Looks good.\" (see above): CRIU cannot checkpoint on this kernel/setup"
	fi
	log "criu check: $(printf '%s\n' "$out" | tail -n1)"
}

# --------------------------------------------------------------------------

install_packages
install_criu
check_criu

if [ "${RRC_SKIP_IMAGES:-0}" != 1 ]; then
	RRC_IMAGE_DIR="${RRC_IMAGE_DIR:-$CACHE/images}" "$HERE/images/build.sh"
fi

END_TS=$(date +%s)
echo "rrc test bed ready ($((END_TS - START_TS)) s):"
echo "  containerd: $(containerd --version 2>/dev/null | awk '{print $3}')"
echo "  runc:       $(runc --version 2>/dev/null | awk 'NR==1{print $3}')"
echo "  criu:       $(criu_version_of "$CRIU_BIN") ($CRIU_BIN)"
if [ "${RRC_SKIP_IMAGES:-0}" != 1 ]; then
	echo "  images:     $(cd "${RRC_IMAGE_DIR:-$CACHE/images}" && ls -- *.tar | tr '\n' ' ')(in ${RRC_IMAGE_DIR:-$CACHE/images})"
fi
