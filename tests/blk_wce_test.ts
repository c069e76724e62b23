/**
 * The write-cache setting (CONFIG_WCE) is honoured: with the cache on, writes are not synced one
 * by one (FLUSH makes them durable); with the guest turning it off, every write is followed by
 * fdatasync before it completes. Observed with strace on the real daemon (sync engine: the
 * io_uring engine issues its syncs through the ring, not as syscalls).
 */

import assert from "node:assert/strict";
import { DaemonProcess, sparseFile } from "./helpers/daemon.ts";
import { BlkFrontend } from "../vhost-user/frontend/mod.ts";
import { BlkStatus } from "../devices/blk/device.ts";
import { straceDuring } from "./helpers/strace.ts";

const WRITES = 20;

/** Runs `fn` while strace counts the daemon's fdatasync calls; returns the count. */
async function countSyncs(pid: number, fn: () => void): Promise<number> {
  const lines = await straceDuring(pid, ["-e", "trace=fdatasync"], fn);
  return lines.filter((l) => l.includes("fdatasync(") && !l.includes("<unfinished")).length;
}

Deno.test("CONFIG_WCE: write-back syncs on FLUSH only; write-through syncs every write", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-wce-" });
  sparseFile(`${dir}/d.img`, 16 << 20);
  const d = await DaemonProcess.start([
    "blk",
    "--socket",
    `${dir}/s.sock`,
    "--image",
    `${dir}/d.img`,
    // The synchronous engine's syncs are syscalls strace sees; io_uring's go through the ring.
    "--io-engine",
    "sync",
  ]);
  const s = await BlkFrontend.open({ socket: `${dir}/s.sock` });
  try {
    const data = new Uint8Array(4096).fill(7);
    const writes = () => {
      for (let i = 0; i < WRITES; i++) assert.equal(s.blk.write(8 * i, data).status, BlkStatus.OK);
    };
    assert.equal(s.conn.getConfig(32, 1)[0], 1, "write-back by default");
    const writeBack = await countSyncs(d.child.pid, writes);
    assert.equal(writeBack, 0, "no per-write sync with the write cache on");
    const flushed = await countSyncs(d.child.pid, () => {
      assert.equal(s.blk.flush().status, BlkStatus.OK);
    });
    assert.equal(flushed, 1, "FLUSH is one fdatasync");
    s.conn.setConfig(32, new Uint8Array([0]));
    assert.equal(s.conn.getConfig(32, 1)[0], 0);
    const writeThrough = await countSyncs(d.child.pid, writes);
    assert.ok(
      writeThrough >= WRITES,
      `every write synced: ${writeThrough} fdatasync for ${WRITES}`,
    );
  } finally {
    s.close();
    assert.equal(await d.stop(), 0, d.stderr);
    await Deno.remove(dir, { recursive: true });
  }
});
