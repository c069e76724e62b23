#!/usr/bin/env bash
# qemu-system-x86_64 from the QEMU 11 chroot that build-qemu11.sh makes, usable wherever a QEMU
# binary is expected (`runGuest({ qemuBinary: ".cache/qemu11/qemu-system-x86_64" })`).
#
# It runs QEMU inside the chroot in a private mount namespace, with /dev, /proc, /sys, /tmp and
# the directory of every absolute path named in the arguments (kernel, initrd, sockets, logs)
# bind-mounted at the same paths. The namespace dies with QEMU, and its mounts with it, however
# QEMU ends (even SIGKILL): nothing is left mounted on the host.
set -euo pipefail
HERE=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
ROOT=${VHOSTD_QEMU11_ROOT:-$HERE/root}
[ -x "$ROOT/usr/bin/qemu-system-x86_64" ] ||
  { echo "qemu11: no chroot at $ROOT (run tests/guest/build-qemu11.sh)" >&2; exit 1; }

# Directories to share: those of absolute paths inside arguments such as
# "socket,id=c0,path=/tmp/x/con.sock" or "-kernel /repo/.cache/guest-kit/vmlinux".
dirs=()
for arg in "$@"; do
  IFS=',=' read -r -a words <<<"$arg"
  for w in "${words[@]}"; do
    case "$w" in
      /*) d=$(dirname "$w"); [ -d "$d" ] && dirs+=("$d") ;;
    esac
  done
done

exec unshare --mount --propagation private bash -euc '
  root=$1; shift
  n=$1; shift
  mount --rbind /dev "$root/dev"
  mount -t proc proc "$root/proc"
  mount --rbind /sys "$root/sys"
  mount --bind /tmp "$root/tmp"
  for ((i = 0; i < n; i++)); do
    d=$1; shift
    case "$d" in /dev|/dev/*|/proc|/proc/*|/sys|/sys/*|/tmp|/tmp/*) continue ;; esac
    mkdir -p "$root$d"
    mount --bind "$d" "$root$d"
  done
  exec chroot "$root" /usr/bin/qemu-system-x86_64 "$@"
' qemu11 "$ROOT" "${#dirs[@]}" "${dirs[@]}" "$@"
