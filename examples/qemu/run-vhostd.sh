#!/usr/bin/env bash
# Serves vm1's devices without systemd, for trying things out: a scratch socket folder and
# sparse images in $DIR (default /tmp/vhostd-vm1), metrics on 127.0.0.1:61910.
#   examples/qemu/run-vhostd.sh &   then   SOCKETS=/tmp/vhostd-vm1 examples/qemu/vm1.sh KERNEL
# and in a third terminal: vhostd status --socket-dir /tmp/vhostd-vm1
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${DIR:-/tmp/vhostd-vm1}
mkdir -p "$DIR"
[ -e "$DIR/root.img" ] || truncate -s 4G "$DIR/root.img"
[ -e "$DIR/data.img" ] || truncate -s 1G "$DIR/data.img"
# The example config with this folder's images and sockets, and the caller's group on the sockets;
# its TAP-backed NIC only for root (creating a TAP needs CAP_NET_ADMIN).
VHOSTD_VM1_DIR=$DIR deno eval '
  const dir = Deno.env.get("VHOSTD_VM1_DIR");
  const config = JSON.parse(Deno.readTextFileSync("examples/config/vm1.json"));
  config.socketGroup = String(Deno.gid());
  config.devices = config.devices
    .filter((d) => d.type !== "net" || Deno.uid() === 0)
    .map((d) => d.image ? { ...d, image: d.image.replace("/var/lib/vhostd/vm1/", dir + "/") } : d);
  Deno.writeTextFileSync(dir + "/vm1.json", JSON.stringify(config, null, 2));
'
exec deno run -A daemon/main.ts run --config "$DIR/vm1.json" --socket-dir "$DIR" --log-format text
