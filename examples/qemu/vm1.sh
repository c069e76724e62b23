#!/usr/bin/env bash
# Starts VM vm1 with its disks served by vhostd ("vhostd run --config examples/config/vm1.json").
#
#   examples/qemu/vm1.sh KERNEL [INITRD]       # or set QEMU_EXTRA for a disk-booted guest
#
# vhostd must be running first (systemctl start vhostd@vm1, or run-vhostd.sh in another
# terminal): QEMU connects to its sockets as a client. reconnect=1 lets QEMU survive a vhostd
# restart: it redials every second and in-flight requests are resubmitted.
# Guest RAM must be shared with vhostd: a memfd backend with share=on, the same size as -m.
set -euo pipefail

SOCKETS=${SOCKETS:-/run/vhostd/vm1}
MEM=${MEM:-1G}
CPUS=${CPUS:-2}
ACCEL=${ACCEL:-kvm:tcg}   # tcg where nested KVM misbehaves
kernel=${1:-}
initrd=${2:-}

for s in root data; do
  [ -S "$SOCKETS/$s.sock" ] || { echo "no vhostd socket $SOCKETS/$s.sock: start vhostd first" >&2; exit 1; }
done

args=(
  -machine q35,accel="$ACCEL",memory-backend=mem -cpu max -smp "$CPUS" -m "$MEM"
  -object memory-backend-memfd,id=mem,size="$MEM",share=on
  # num-queues as "vhostd run --check" prints them: the config's 2 for root, the default 16 for
  # data. Without num-queues QEMU asks for one queue per vCPU and refuses a device with fewer.
  -chardev socket,id=root,path="$SOCKETS/root.sock",reconnect=1
  -device vhost-user-blk-pci,chardev=root,num-queues=2,bootindex=1
  -chardev socket,id=data,path="$SOCKETS/data.sock",reconnect=1
  -device vhost-user-blk-pci,chardev=data,num-queues=16
  -nographic -serial mon:stdio
)
# The config's "net0" (a TAP on the host), when served. vectors=0: QEMU 7.2 under TCG needs it;
# with KVM, drop it.
if [ -S "$SOCKETS/net0.sock" ]; then
  args+=(
    -chardev socket,id=net0c,path="$SOCKETS/net0.sock",reconnect=1
    -netdev vhost-user,id=net0,chardev=net0c,queues=1
    -device virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,vectors=0
  )
fi
if [ -n "$kernel" ]; then
  args+=(-kernel "$kernel" -append "console=ttyS0 root=/dev/vda rw")
  [ -n "$initrd" ] && args+=(-initrd "$initrd")
fi
# shellcheck disable=SC2086
exec qemu-system-x86_64 "${args[@]}" ${QEMU_EXTRA:-}
