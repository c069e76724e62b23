#!/usr/bin/env bash
# build-qemu11.sh [OUTDIR]
#
# Builds a Debian trixie chroot (debootstrap --variant=minbase) holding QEMU
# 11.x from trixie-backports, for the vhost-user console guest tests: QEMU
# 7.2 to 10.1 have no device that fronts a vhost-user console, QEMU >= 10.2
# has `-device vhost-user-test-device-pci`.
#
# OUTDIR defaults to <repo>/.cache/qemu11. It gets:
#   OUTDIR/root                  the chroot
#   OUTDIR/qemu-system-x86_64    a wrapper that runs the chroot's QEMU (see
#                                qemu11-wrapper.sh next to this script)
#   OUTDIR/stamp                 written last; when it matches this script's
#                                hash, nothing is done (idempotent)
#
# Needs root (debootstrap, chroot, mount). Installs debootstrap on the host
# with apt-get when it is missing. Every failure is a non-zero exit with a
# message naming what failed.
set -euo pipefail

die() {
  echo "build-qemu11.sh: ERROR: $*" >&2
  exit 1
}
note() { echo "build-qemu11.sh: $*" >&2; }

SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
SCRIPT_DIR=$(dirname "$SCRIPT_PATH")
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
OUTDIR=${1:-$REPO_ROOT/.cache/qemu11}
ROOT=$OUTDIR/root

# The Debian mirror is the one this machine's apt already uses (its sources, never a host named
# here): the first configured archive of a main suite (not -security, -updates or -backports).
# DEBIAN_MIRROR overrides it.
# apt lists only the archives it has fetched indexes of, hence the update when it lists none.
archive_of_sources() {
  apt-get indextargets --format '$(TARGET_OF) $(RELEASE) $(REPO_URI)' 2>/dev/null |
    awk '$1 == "deb" && $2 !~ /-/ { sub(/\/$/, "", $3); print $3; exit }'
}
host_mirror() {
  local m
  m=$(archive_of_sources)
  if [ -z "$m" ] && [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq >/dev/null 2>&1
    m=$(archive_of_sources)
  fi
  echo "$m"
}
MIRROR=${DEBIAN_MIRROR:-$(host_mirror)}

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap and chroot need it)"
[ -n "$MIRROR" ] || die "no Debian archive in this machine's apt sources; set DEBIAN_MIRROR=URL"

want=$(cat "$SCRIPT_PATH" "$SCRIPT_DIR/qemu11-wrapper.sh" | sha256sum | cut -d' ' -f1)
if [ -f "$OUTDIR/stamp" ] && [ "$(cat "$OUTDIR/stamp")" = "$want" ] &&
  [ -x "$ROOT/usr/bin/qemu-system-x86_64" ] && [ -x "$OUTDIR/qemu-system-x86_64" ]; then
  exit 0
fi

mkdir -p "$OUTDIR"
# One builder at a time (tests may start several in parallel).
exec 9>"$OUTDIR/.lock"
flock 9

start=$(date +%s)
if ! command -v debootstrap >/dev/null 2>&1; then
  note "installing debootstrap on the host"
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null ||
    die "apt-get install debootstrap failed"
fi

# A half-built chroot from an interrupted run is not trusted: start over.
rm -f "$OUTDIR/stamp"
if [ -d "$ROOT" ] && [ ! -f "$ROOT/.debootstrap-done" ]; then
  note "removing an unfinished chroot"
  # Never delete through a mount a crashed run left behind.
  if grep -q " $ROOT/" /proc/mounts; then die "$ROOT has mounts under it; unmount them first"; fi
  rm -rf "$ROOT"
fi

if [ ! -f "$ROOT/.debootstrap-done" ]; then
  note "debootstrap trixie (minbase) into $ROOT"
  debootstrap --variant=minbase trixie "$ROOT" "$MIRROR" >"$OUTDIR/debootstrap.log" 2>&1 ||
    die "debootstrap failed; see $OUTDIR/debootstrap.log"
  touch "$ROOT/.debootstrap-done"
fi

echo "deb $MIRROR trixie-backports main" >"$ROOT/etc/apt/sources.list.d/backports.list"
note "installing qemu-system-x86 from trixie-backports"
# apt inside the chroot needs /proc and /dev; a private mount namespace drops these mounts
# when the command ends, whatever happens to it.
unshare --mount --propagation private sh -euc '
  mount -t proc proc "$1/proc"
  mount --rbind /dev "$1/dev"
  chroot "$1" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive chroot "$1" apt-get install -y -qq --no-install-recommends \
    -t trixie-backports qemu-system-x86
  chroot "$1" apt-get clean
' sh "$ROOT" >"$OUTDIR/apt.log" 2>&1 || die "apt-get in the chroot failed; see $OUTDIR/apt.log"

version=$(chroot "$ROOT" qemu-system-x86_64 --version | head -n1) ||
  die "the chroot's qemu-system-x86_64 does not run"
chroot "$ROOT" qemu-system-x86_64 -device help 2>/dev/null | grep -q vhost-user-test-device-pci ||
  die "$version has no vhost-user-test-device-pci (need QEMU >= 10.2)"

install -m 0755 "$SCRIPT_DIR/qemu11-wrapper.sh" "$OUTDIR/qemu-system-x86_64"
echo "$want" >"$OUTDIR/stamp"
note "ready: $version in $ROOT ($(($(date +%s) - start)) s)"
