/**
 * Hot-adding a disk to a running QEMU 7.2 guest, the way `virsh attach-device` does it with a
 * vhost-user disk: the disk is added to the VM's config, `vhostd run` is told with SIGHUP, and
 * QEMU attaches it over QMP (chardev-add, device_add). The guest sees the new disk and reads and
 * writes it; the first disk keeps working throughout, on its first connection.
 */

import assert from "node:assert/strict";
import { DaemonProcess, sha256, sparseFile, withDir } from "./helpers/daemon.ts";
import { Vm } from "./guest/vm.ts";
import { requestStatus } from "../daemon/control.ts";

const MiB = 1 << 20;

Deno.test("guest: SIGHUP plus QMP hot-plug gives a running guest a second vhostd disk; the first never stops", () =>
  withDir("vhostd-hotplug-", async (dir) => {
    sparseFile(`${dir}/a.img`, 32 * MiB);
    sparseFile(`${dir}/b.img`, 16 * MiB);
    const config = `${dir}/vm.json`;
    const write = (devices: Record<string, unknown>[]) =>
      Deno.writeTextFileSync(config, JSON.stringify({ name: "hotvm", socketDir: dir, devices }));
    const a = { type: "blk", id: "a", image: `${dir}/a.img`, queues: 1 };
    write([a]);
    const d = await DaemonProcess.start(["run", "--config", config]);
    let vm: Vm | null = null;
    try {
      vm = await Vm.start({
        dir,
        name: "guest",
        vhostUserBlk: [{ socket: `${dir}/a.sock`, numQueues: 1 }],
        // A PCIe root port with a free slot, for the disk plugged in later (q35).
        extraArgs: ["-device", "pcie-root-port,id=hp0,bus=pcie.0,chassis=1"],
        timeoutMs: 600_000,
        // Writes and checks the first disk every second until the second one appears, then
        // writes a pattern to the second disk and reads both back.
        script: `
dd if=/dev/urandom of=/tmp/p bs=64k count=8 2>/dev/null
p=$(sha256sum /tmp/p | cut -d' ' -f1)
echo "RESULT pattern=$p"
echo WAITING-FOR-VDB
i=0
while [ ! -b /dev/vdb ]; do
  [ $i -lt 900 ] || { echo "RESULT vdb=missing"; exit 1; }
  dd if=/tmp/p of=/dev/vda bs=64k seek=$((i % 32 * 8)) oflag=direct 2>/dev/null || echo VDA-FAILED
  r=$(dd if=/dev/vda bs=64k skip=$((i % 32 * 8)) count=8 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
  [ "$r" = "$p" ] || echo VDA-FAILED
  i=$((i + 1))
  sleep 1
done
echo "RESULT rounds=$i"
echo "RESULT vdb_sectors=$(cat /sys/block/vdb/size)"
echo "RESULT vdb_serial=$(cat /sys/block/vdb/serial 2>/dev/null)"
dd if=/tmp/p of=/dev/vdb bs=64k seek=16 oflag=direct 2>/dev/null || echo VDB-FAILED
b=$(dd if=/dev/vdb bs=64k skip=16 count=8 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
a=$(dd if=/dev/vda bs=64k count=8 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$b" = "$p" ] && echo "RESULT vdb_io=ok"
[ "$a" = "$p" ] && echo "RESULT vda_io=ok"
echo HOTPLUG-DONE
`,
      });
      const guest = vm;
      await guest.waitConsole(/WAITING-FOR-VDB/, 300_000);
      // Let the first disk work a few rounds, then add the second to the config and reload.
      await new Promise((r) => setTimeout(r, 3000));
      write([a, { type: "blk", id: "b", image: `${dir}/b.img`, queues: 1, serial: "hot-b" }]);
      Deno.kill(d.child.pid, "SIGHUP");
      await d.waitFor(() => d.stderr.includes("reloaded:"), 60_000, "the reload");
      assert.match(d.stderr, /reloaded: 1 device\(s\) kept, 1 started, 0 stopped/);
      // What libvirt sends for <disk type='vhostuser'> on attach-device.
      await guest.qmp.execute("chardev-add", {
        id: "hotb",
        backend: {
          type: "socket",
          data: { addr: { type: "unix", data: { path: `${dir}/b.sock` } }, server: false },
        },
      });
      await guest.qmp.execute("device_add", {
        driver: "vhost-user-blk-pci",
        id: "diskb",
        chardev: "hotb",
        bus: "hp0",
        "num-queues": 1,
      });
      await guest.waitConsole(/HOTPLUG-DONE/, 300_000);
      const out = guest.console();
      const result = (key: string) => new RegExp(`RESULT ${key}=(\\S*)`).exec(out)?.[1];
      assert.equal(result("vdb_sectors"), String(16 * MiB / 512), out);
      assert.equal(result("vdb_serial"), "hot-b", out);
      assert.equal(result("vdb_io"), "ok", out);
      assert.equal(result("vda_io"), "ok", out);
      assert.ok(Number(result("rounds")) >= 3, out);
      assert.doesNotMatch(out, /VDA-FAILED|VDB-FAILED/, out);
      // The guest's pattern is on the new disk's image, where it wrote it.
      const image = Deno.readFileSync(`${dir}/b.img`).subarray(16 * 65536, 24 * 65536);
      assert.equal(await sha256(image), result("pattern"));
      // The first disk kept its one connection through the reload.
      const status = await requestStatus(`${dir}/control.sock`);
      assert.deepEqual(status.devices.map((x) => [x.name, x.connects]), [["a", 1], ["b", 1]]);
      assert.doesNotMatch(d.stderr, /\[(ERR|FTL)\]/);
    } finally {
      await vm?.kill();
      await d.stop();
    }
  }));
