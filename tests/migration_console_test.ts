/**
 * Consoles across a live migration.
 *
 * - Character-device mode (QEMU's own virtio-console with a chardev socket to `vhostd console
 *   --chardev`, QEMU 7.2): QEMU migrates the device itself, and one console server serves both
 *   sides. The destination QEMU connects to the same socket while the source still runs; the
 *   attach client stays connected throughout and sees the guest's output from before and after
 *   the move, what it types reaches the guest on the destination, and the log and scrollback run
 *   on without a gap.
 * - vhost-user mode (QEMU 11.1's vhost-user-test-device): QEMU refuses to migrate the VM, with a
 *   message naming the device; the test shows that message (the README says so).
 *
 * @module
 */

import assert from "node:assert/strict";
import { DaemonProcess, withDir } from "./helpers/daemon.ts";
import { AttachClient } from "./helpers/attach.ts";
import { ensureQemu11 } from "./guest/qemu.ts";
import { Vm } from "./guest/vm.ts";

/** The guest: a tick on hvc0 every half second; echoes lines typed into hvc0; stops on STOP. */
const TICKER = `
for i in $(seq 100); do [ -e /dev/hvc0 ] && break; sleep 0.1; done
(
  while read -r line; do
    echo "got: $line" > /dev/hvc0
    [ "$line" = STOP ] && touch /tmp/stop
  done < /dev/hvc0
) &
n=0
while [ ! -f /tmp/stop ]; do
  n=$((n + 1)); echo "tick $n" > /dev/hvc0; sleep 0.5
done
echo "RESULT ticks=$n"
`;

function consoleArgs(sock: string): string[] {
  return [
    "-device",
    "virtio-serial-pci",
    "-chardev",
    `socket,id=vc0,path=${sock},reconnect=1`,
    "-device",
    "virtconsole,chardev=vc0",
  ];
}

/** The highest tick number in `text`. */
function lastTick(text: string): number {
  return Math.max(0, ...[...text.matchAll(/tick (\d+)/g)].map((m) => Number(m[1])));
}

Deno.test({
  name: "migration (QEMU 7.2, character device): one console server keeps log, scrollback and " +
    "an attached client across the move",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    await withDir("vhostd-migcon-", async (dir) => {
      const sock = `${dir}/con.sock`;
      const log = `${dir}/console.log`;
      const d = await DaemonProcess.start([
        "console",
        "--chardev",
        "--socket",
        sock,
        "--log",
        log,
      ]);
      const vms: Vm[] = [];
      const clients: AttachClient[] = [];
      try {
        const base = { dir, script: TICKER, memoryMiB: 384, extraArgs: consoleArgs(sock) };
        const src = await Vm.start({ ...base, name: "src" });
        vms.push(src);
        const client = await AttachClient.connect(`${sock}.console`);
        clients.push(client);
        await client.waitFor(/tick 3\r?\n/, 240_000);
        const dst = await Vm.start({
          ...base,
          name: "dst",
          incoming: `unix:${dir}/mig`,
          initrdPath: src.initrd,
        });
        vms.push(dst);
        await src.startMigration(`unix:${dir}/mig`, 512 * 1024 * 1024, 300);
        const info = await src.waitMigration();
        assert.equal(info.status, "completed", JSON.stringify(info));
        const before = lastTick(client.text);
        await src.quit();
        // The same client, never reconnected, sees the guest go on from the destination.
        await client.waitFor(new RegExp(`tick ${before + 3}\\r?\\n`), 120_000);
        await client.send("typed after the move\n");
        await client.waitFor(/got: typed after the move/, 60_000);
        // A client attaching now gets the scrollback from before the move, then live output.
        const late = await AttachClient.connect(`${sock}.console`);
        clients.push(late);
        await late.waitFor(/tick 1\r?\n[^]*got: typed after the move/, 30_000);
        await client.send("STOP\n");
        const exit = await dst.exited;
        assert.equal(exit.code, 0, exit.stderr);
        assert.match(dst.console(), /RESULT ticks=\d+/);
        // The log has the whole run, from the first tick to the last, without a gap.
        const text = await Deno.readTextFile(log);
        const ticks = [...text.matchAll(/tick (\d+)/g)].map((m) => Number(m[1]));
        assert.deepEqual(ticks, ticks.map((_, i) => i + 1), "every tick logged once, in order");
        assert.ok(ticks.length > before, "ticks from after the move were logged");
        assert.match(d.stderr, /input goes to it from now on/, "the destination took the input");
      } catch (e) {
        (e as Error).message += `\n--- daemon ---\n${d.stderr}`;
        for (const v of vms) (e as Error).message += `\n--- ${v.options.name} ---\n${v.console()}`;
        throw e;
      } finally {
        for (const c of clients) await c.close();
        for (const v of vms) await v.kill();
        await d.stop();
      }
    });
  },
});

Deno.test({
  name: "migration (QEMU 11.1, vhost-user console): QEMU refuses, naming the device",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const qemu = await ensureQemu11();
    await withDir("vhostd-migvuc-", async (dir) => {
      const sock = `${dir}/con.sock`;
      const d = await DaemonProcess.start(["console", "--socket", sock]);
      let vm: Vm | null = null;
      try {
        vm = await Vm.start({
          dir,
          name: "src",
          qemuBinary: qemu,
          qemuMajor: 11,
          memoryMiB: 384,
          script: "sleep 600",
          extraArgs: [
            "-chardev",
            `socket,id=vcon0,path=${sock}`,
            "-device",
            "vhost-user-test-device-pci,chardev=vcon0,virtio-id=3,num_vqs=2,config_size=12",
          ],
        });
        const refused = await vm.qmp.execute("migrate", { uri: `unix:${dir}/mig` }).then(
          () => null,
          (e: Error) => e.message,
        );
        const info = await vm.migrationInfo();
        const why = refused ?? info.errorDesc ?? "";
        assert.match(why, /non-migratable device.*vhost-user-test-device/);
        console.log(`QEMU 11.1: ${why}`);
      } finally {
        await vm?.kill();
        await d.stop();
      }
    });
  },
});
