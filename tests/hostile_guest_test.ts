/**
 * A hostile guest against a real daemon process: crafted chains on one queue stop that queue (the
 * front-end is told through the vring error eventfd), while the device's other queue and another
 * device in the same process go on serving I/O. The parser's full catalogue of hostile chains is
 * in ring/split_queue_test.ts; this checks the whole daemon's behaviour around it.
 */

import assert from "node:assert/strict";
import { DaemonProcess, sparseFile } from "./helpers/daemon.ts";
import { BlkFrontend, type Segment } from "../vhost-user/frontend/mod.ts";
import { NetDriver } from "../vhost-user/frontend/net_driver.ts";
import { run } from "./helpers/net.ts";

const TARGET = new URL("./fuzz/two_blk.ts", import.meta.url).pathname;
const MiB = 1 << 20;

/** Chains a guest driver would never build; each must be refused without touching memory. */
const hostileChains: [string, (hdr: number, data: number, status: number) => Segment[]][] = [
  ["a buffer in the hole between RAM regions", (hdr, _data, st) => [
    { gpa: hdr, length: 16, writable: false },
    { gpa: 0x2000_0000, length: 4096, writable: true },
    { gpa: st, length: 1, writable: true },
  ]],
  ["a buffer far beyond guest RAM", (hdr, _data, st) => [
    { gpa: hdr, length: 16, writable: false },
    { gpa: 2 ** 50, length: 4096, writable: true },
    { gpa: st, length: 1, writable: true },
  ]],
  ["a buffer straddling the end of a region", (hdr, _data, st) => [
    { gpa: hdr, length: 16, writable: false },
    { gpa: 16 * MiB - 100, length: 4096, writable: true },
    { gpa: st, length: 1, writable: true },
  ]],
  ["a readable buffer after a writable one", (hdr, data, st) => [
    { gpa: hdr, length: 16, writable: false },
    { gpa: st, length: 1, writable: true },
    { gpa: data, length: 512, writable: false },
  ]],
];

Deno.test("hostile guest: a bad chain stops its queue only; the other queue and device serve on", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-hostile-" });
  sparseFile(`${dir}/a.img`, 16 * MiB);
  sparseFile(`${dir}/b.img`, 16 * MiB);
  const d = await DaemonProcess.start(
    [`${dir}/a.sock`, `${dir}/a.img`, `${dir}/b.sock`, `${dir}/b.img`],
    undefined,
    false,
    TARGET,
  );
  const other = await BlkFrontend.open({ socket: `${dir}/b.sock` });
  try {
    const brokenLines = () =>
      d.stderr.split("\n").filter((l) => l.includes("stopped until the device is reset")).length;
    for (const [n, [what, build]] of hostileChains.entries()) {
      const s = await BlkFrontend.open({ socket: `${dir}/a.sock`, queues: 2 });
      try {
        const hdr = s.ram.alloc(16);
        const data = s.ram.alloc(4096);
        const status = s.ram.alloc(1);
        // A read request header: type IN, sector 0.
        new DataView(s.ram.bytes(hdr).buffer, s.ram.bytes(hdr).byteOffset, 16).setUint32(
          0,
          0,
          true,
        );
        const q0 = s.queues[0];
        assert.notEqual(q0.add(build(hdr.gpa, data.gpa, status.gpa)), -1);
        q0.publish();
        q0.kickNow();
        const deadline = Date.now() + 3000;
        let signalled = false;
        while (!signalled && Date.now() < deadline) {
          signalled = q0.errorSignalled();
          if (!signalled) await new Promise((r) => setTimeout(r, 20));
        }
        assert.ok(signalled, `${what}: the error eventfd was signalled`);
        assert.equal(q0.usedIdx, 0, `${what}: nothing was completed on the broken queue`);
        const pattern = new Uint8Array(4096).fill(0xa5);
        assert.equal(s.blk.write(64, pattern, 1).status, 0, `${what}: queue 1 still writes`);
        assert.equal(s.blk.read(64, 4096, 1).data[4095], 0xa5, `${what}: queue 1 still reads`);
        assert.equal(other.blk.read(0, 4096).status, 0, `${what}: the other device still reads`);
      } finally {
        s.close();
      }
      await d.waitFor(() => brokenLines() === n + 1, 3000, "one log line for this queue");
    }
    assert.doesNotMatch(d.stderr, /data plane stopped|worker crashed|event handler failed/);
    assert.equal(brokenLines(), hostileChains.length, "one log line per broken queue");
  } finally {
    other.close();
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name:
    "hostile guest: a broken receive ring on net --tap, frames arriving, does not spin the worker",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vhostd-hostile-rx-" });
    const tap = `vhrx${Deno.pid % 10000}`;
    const sock = `${dir}/net.sock`;
    const d = await DaemonProcess.start(["net", "--socket", sock, "--tap", tap]);
    let driver: NetDriver | null = null;
    try {
      await run("ip", "addr", "add", "198.18.75.1/24", "dev", tap);
      await run("ip", "link", "set", tap, "up");
      await run("ip", "neigh", "replace", "198.18.75.2", "lladdr", "52:54:00:75:00:02", "dev", tap);
      driver = await NetDriver.connect(sock);
      driver.breakReceiveRing();
      // Frames for the guest arrive while its receive ring claims buffers it does not have.
      await run(
        "bash",
        "-c",
        "for i in $(seq 50); do echo x > /dev/udp/198.18.75.2/9; done 2>/dev/null || true",
      );
      // Before the fix the worker spun for ever here and never answered again.
      const started = Date.now();
      driver.conn.getFeatures();
      assert.ok(Date.now() - started < 5000);
      await d.waitFor(() => /available index jumped/.test(d.stderr), 10_000, "the queue stop");
      const stops = d.stderr.match(/available index jumped/g) ?? [];
      assert.equal(stops.length, 1, `one line for the broken ring\n${d.stderr}`);
    } finally {
      driver?.close();
      assert.equal(await d.stopWithin(15_000), 0, `stopped cleanly on SIGTERM\n${d.stderr}`);
      await Deno.remove(dir, { recursive: true });
    }
  },
});
