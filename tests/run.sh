#!/usr/bin/env bash
# Runs vhostd's whole test suite, guests included, installing what it needs first:
#   Debian packages (QEMU 7.2, qemu-storage-daemon, the guest kit's busybox/fio/iperf3),
#   Deno from the npm registry (when no deno 2.x is on PATH), and the guest kit itself.
# Usage: bash tests/run.sh [extra `deno test` arguments, e.g. a file or --filter NAME]
# Ends with the line "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."

DENO_VERSION=2.9.6
# QEMU 7.2 and qemu-storage-daemon; the guest kit (busybox, fio, iperf3, cpio); the QEMU 11.1 chroot
# (debootstrap); net tests (iproute2 for namespaces, ping for the migration tests, DPDK testpmd
# with its virtio-user PMD); operations tests (systemd-analyze, xmllint, virt-xml-validate);
# strace (the write-cache test).
PACKAGES="qemu-system-x86 qemu-system-common qemu-utils busybox-static fio iperf3 cpio debootstrap
  iproute2 iputils-ping dpdk-dev librte-net-virtio23 systemd libxml2-utils libvirt-clients strace"
# libvirtd and its QEMU driver for the libvirt guest test, without recommends (lvm2, other drivers)
# and without libvirt-daemon-system, whose postinst adds users and starts services: the test runs
# a libvirtd of its own (tests/helpers/libvirtd.ts).
LIBVIRT_PACKAGES="libvirt-daemon libvirt-daemon-driver-qemu"

step() { printf '\n==> %s\n' "$*"; }

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

missing_of() {
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || printf ' %s' "$p"
  done
}
updated=""
install_missing() { # [apt-get install options] -- packages
  local opts=()
  while [ "$1" != "--" ]; do opts+=("$1"); shift; done
  shift
  local missing
  missing=$(missing_of "$@")
  [ -n "$missing" ] || return 0
  step "installing Debian packages:$missing"
  if [ -z "$updated" ]; then
    $sudo apt-get update -qq || { echo "apt-get update failed"; exit 1; }
    updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${opts[@]}" $missing >/dev/null ||
    { echo "apt-get install$missing failed"; exit 1; }
}
install_missing -- $PACKAGES
install_missing --no-install-recommends -- $LIBVIRT_PACKAGES

if command -v deno >/dev/null 2>&1 && deno --version | grep -q '^deno 2\.'; then
  DENO=$(command -v deno)
else
  DENO="$PWD/.cache/deno/node_modules/.bin/deno"
  if [ ! -x "$DENO" ]; then
    step "installing deno $DENO_VERSION from npm into .cache/deno"
    npm install --silent --no-audit --no-fund --prefix .cache/deno "deno@$DENO_VERSION" ||
      { echo "npm install deno failed"; exit 1; }
  fi
  export PATH="$(dirname "$DENO"):$PATH"
fi
echo "deno: $("$DENO" --version | head -n1)"

step "building the guest kit (Debian kernel, busybox, fio, iperf3)"
bash tests/guest/build-kit.sh || { echo "guest kit build failed"; echo "0 passed, 1 failed"; exit 1; }

step "building the QEMU 11.1 chroot (the only stock QEMU with a vhost-user console front-end)"
bash tests/guest/build-qemu11.sh || { echo "QEMU 11.1 chroot build failed"; echo "0 passed, 1 failed"; exit 1; }

step "running the test suite"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
NO_COLOR=1 "$DENO" test -A "$@" 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
summary=$(grep -E '^(ok|FAILED) \| [0-9]+ passed' "$out" | tail -n 1)
passed=$(sed -nE 's/.*\| ([0-9]+) passed.*/\1/p' <<<"$summary")
failed=$(sed -nE 's/.*\| ([0-9]+) failed.*/\1/p' <<<"$summary")
if [ -z "$passed" ]; then
  echo "the test runner did not finish (exit code $rc)"
  passed=0
  failed=$((failed + 1))
elif [ "$rc" -ne 0 ] && [ "${failed:-0}" -eq 0 ]; then
  failed=1
fi
echo "${passed} passed, ${failed:-0} failed"
exit "$rc"
