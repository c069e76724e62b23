/**
 * A driver reset hands the device over. At boot, firmware (SeaBIOS) drives every virtio disk
 * through rings of its own; Linux reuses that memory and only later resets each device and sets up
 * new rings. A busy-polling back-end that still read the old rings after the reset saw garbage,
 * called the ring broken, and kept it broken on the new rings: the guest hung at boot. Three vhostd
 * disks in one guest were enough to hit it every time.
 */

import assert from "node:assert/strict";
import { DaemonProcess, sha256, sparseFile } from "./helpers/daemon.ts";
import { BlkFrontend } from "../vhost-user/frontend/mod.ts";
import { assertGuestSuccess, describeGuestRun, parseResults, runGuest } from "./guest/qemu.ts";

const MiB = 1 << 20;
const BROKEN = "stopped until the device is reset";

/** Resets the driver's rings to zero and starts the device again, as a new driver would. */
function restartWithFreshRings(s: BlkFrontend): void {
  s.stop();
  for (const q of s.queues) q.reset();
  s.base.fill(0);
  s.start();
}

/** Runs `fn` against `vhostd blk` at its defaults (busy-polling on) on a 16 MiB image. */
async function withDevice(fn: (s: BlkFrontend, d: DaemonProcess) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-reset-" });
  sparseFile(`${dir}/disk.img`, 16 * MiB);
  const d = await DaemonProcess.start([
    "blk",
    "--socket",
    `${dir}/blk.sock`,
    "--image",
    `${dir}/disk.img`,
  ]);
  const s = await BlkFrontend.open({ socket: `${dir}/blk.sock`, queues: 1 });
  try {
    await fn(s, d);
  } finally {
    s.close();
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("driver reset: the old rings are not read after SET_STATUS(0), whatever they hold", () =>
  withDevice((s, d) => {
    const pattern = new Uint8Array(4096).fill(0x5a);
    assert.equal(s.blk.write(8, pattern).status, 0, "the first driver writes");
    // The next owner of that memory scribbles over the available index, with no kick. With
    // busy-polling on, the loop arms (and reads) its rings after every message.
    const avail = s.ram.bytes(s.queues[0].layout.avail);
    avail[2] = 0x30;
    avail[3] = 0x37;
    restartWithFreshRings(s);
    const r = s.blk.read(8, 4096);
    assert.equal(r.status, 0, "the new driver reads");
    assert.deepEqual(r.data, pattern, "and sees what the first one wrote");
    assert.ok(!d.stderr.includes(BROKEN), `no ring was declared broken:\n${d.stderr}`);
    return Promise.resolve();
  }));

Deno.test("driver reset: a ring broken by a bad chain serves again once the driver restarts it", () =>
  withDevice(async (s, d) => {
    const q = s.queues[0];
    const hdr = s.ram.alloc(16);
    const status = s.ram.alloc(1);
    // A read whose data buffer lies far beyond guest RAM.
    assert.notEqual(
      q.add([
        { gpa: hdr.gpa, length: 16, writable: false },
        { gpa: 2 ** 50, length: 4096, writable: true },
        { gpa: status.gpa, length: 1, writable: true },
      ]),
      -1,
    );
    q.publish();
    q.kickNow();
    await d.waitFor(() => q.errorSignalled(), 5000, "the error eventfd");
    await d.waitFor(() => d.stderr.includes(BROKEN), 5000, "the broken-ring log line");
    restartWithFreshRings(s);
    const pattern = new Uint8Array(512).fill(0xc3);
    assert.equal(s.blk.write(0, pattern).status, 0, "the restarted ring writes");
    assert.deepEqual(s.blk.read(0, 512).data, pattern, "and reads");
  }));

Deno.test("guest: three busy-polling vhostd disks survive SeaBIOS handing them to Linux", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-reset-" });
  const daemons: DaemonProcess[] = [];
  const sums: string[] = [];
  try {
    for (let i = 0; i < 3; i++) {
      const img = `${dir}/disk${i}.img`;
      const head = crypto.getRandomValues(new Uint8Array(64 * 1024));
      sparseFile(img, 64 * MiB);
      const f = await Deno.open(img, { write: true });
      await f.write(head);
      f.close();
      sums.push(await sha256(head));
      daemons.push(
        await DaemonProcess.start(["blk", "--socket", `${dir}/blk${i}.sock`, "--image", img]),
      );
    }
    const r = await runGuest({
      vhostUserBlk: daemons.map((_, i) => ({ socket: `${dir}/blk${i}.sock` })),
      timeoutMs: 150_000,
      script: ["a", "b", "c"].map((x) =>
        `echo "RESULT vd${x}=$(dd if=/dev/vd${x} bs=64k count=1 iflag=direct 2>/dev/null | ` +
        "sha256sum | cut -d' ' -f1)\""
      ).join("\n") + "\n",
    });
    assertGuestSuccess(r);
    const got = parseResults(r.console, "RESULT ");
    assert.deepEqual(
      [got.vda, got.vdb, got.vdc],
      sums,
      `each disk reads back its own first 64 KiB\n${describeGuestRun(r)}`,
    );
    for (const [i, d] of daemons.entries()) {
      assert.ok(!d.stderr.includes(BROKEN), `daemon ${i} declared no ring broken:\n${d.stderr}`);
    }
  } finally {
    for (const d of daemons) await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
