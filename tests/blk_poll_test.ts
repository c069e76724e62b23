/**
 * Busy-polling (`--poll-us`): while the worker polls a queue it keeps the driver's kicks switched
 * off (EVENT_IDX avail_event left behind), and with polling off every request is kicked. The
 * driver is vhostd's own front-end (`vhostd load`), which kicks only when avail_event asks it to.
 */

import assert from "node:assert/strict";
import { DaemonProcess, runVhostd, sparseFile, withDir } from "./helpers/daemon.ts";

interface LoadReport {
  ios: number;
  errors: number;
  perQueue: { queue: number; ios: number; kicks: number }[];
}

async function loadOnce(socket: string): Promise<LoadReport> {
  const r = await runVhostd([
    "load",
    "--socket",
    socket,
    "--queues",
    "1",
    "--depth",
    "1",
    "--seconds",
    "1",
    "--rw",
    "rw",
    "--json",
  ]);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout) as LoadReport;
}

for (const pollUs of [0, 1000]) {
  Deno.test(`blk --poll-us ${pollUs}: kicks ${pollUs ? "suppressed while polling" : "per request"}`, () =>
    withDir("vhostd-poll-", async (dir) => {
      sparseFile(`${dir}/d.img`, 64 << 20);
      const socket = `${dir}/blk.sock`;
      const d = await DaemonProcess.start([
        "blk",
        "--socket",
        socket,
        "--image",
        `${dir}/d.img`,
        "--queues",
        "1",
        "--poll-us",
        String(pollUs),
        // One request served at a time, completed before the device looks at its queue again:
        // io_uring completes a cached read inside that pass and interrupts the driver at once,
        // whose next request then needs no kick.
        "--io-engine",
        "sync",
      ]);
      try {
        const r = await loadOnce(socket);
        assert.equal(r.errors, 0);
        assert.ok(r.ios > 200, `only ${r.ios} requests`);
        const kicks = r.perQueue[0].kicks;
        if (pollUs === 0) {
          // One request in flight at a time: each one is made available to an idle device.
          assert.ok(kicks >= r.ios * 0.99, `${kicks} kicks for ${r.ios} requests`);
        } else {
          // QD1 round trips take tens of µs, well inside a 1 ms window: the device is still
          // polling when the next request comes, so the driver is not asked to kick.
          assert.ok(kicks < r.ios / 4, `${kicks} kicks for ${r.ios} requests`);
        }
      } finally {
        assert.equal(await d.stop(), 0);
      }
    }));
}

Deno.test("blk --direct, polling: more requests than io_uring slots are all served", async () => {
  // O_DIRECT needs a disk file system; the default temp dir may be tmpfs.
  const dir = await Deno.makeTempDir({ dir: "/var/tmp", prefix: "vhostd-poll-" });
  try {
    sparseFile(`${dir}/d.img`, 64 << 20);
    const socket = `${dir}/blk.sock`;
    const d = await DaemonProcess.start(
      ["blk", "--socket", socket, "--image", `${dir}/d.img`, "--direct", "--queues", "4"],
    );
    try {
      // 4 x 120 requests in flight against 256 io_uring slots: queues wait for free slots while
      // the loop polls. A loop that kept polling the waiting queues would never reap a completion.
      const r = await runVhostd([
        "load",
        "--socket",
        socket,
        "--queues",
        "4",
        "--depth",
        "120",
        "--seconds",
        "1",
        "--json",
      ]);
      assert.equal(r.code, 0, r.stderr);
      const report = JSON.parse(r.stdout) as LoadReport;
      assert.equal(report.errors, 0);
      assert.ok(report.ios > 1000, `only ${report.ios} requests`);
    } finally {
      assert.equal(await d.stop(), 0);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
