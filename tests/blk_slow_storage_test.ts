/**
 * A slow image must not stall the rest of the data-plane worker: with io_uring (the default
 * engine for buffered images as for O_DIRECT ones), reads waiting for slow storage wait in the
 * kernel, and the worker goes on serving other queues. The storage is genuinely slow: a FUSE
 * export of qemu-storage-daemon throttled to a few reads a second (tests/helpers/slow_image.ts).
 * The device runs in this process (tests/helpers/in_process.ts) and the front-end library drives
 * it. Completions are counted, never timed.
 *
 * With `ioEngine: "sync"` for the slow image the tests fail: the worker sits in preadv on the slow
 * reads one after the other, and serves the other queue, or the other disk, only once all of them
 * are done.
 *
 * @module
 */

import assert from "node:assert/strict";
import { BlkRequestType, BlkStatus } from "../devices/blk/device.ts";
import { type BlkFrontend, rangesPayload } from "../vhost-user/frontend/mod.ts";
import { withInProcessBlk } from "./helpers/in_process.ts";
import { WorkerPool } from "../daemon/worker_pool.ts";
import { slowImageUnavailable, startSlowImage } from "./helpers/slow_image.ts";
import { ioWqWorkerCap } from "../devices/blk/uring.ts";

const MiB = 1 << 20;
const SECTOR = 512;
/** Reads kept outstanding on the slow queue. */
const SLOW_READS = 8;
/** Reads the other queue must complete meanwhile. */
const FAST_READS = 32;
const unavailable = slowImageUnavailable();

/** Submits {@link SLOW_READS} reads 1 MiB apart on queue 0 of `s` (each misses the page cache). */
function submitSlowReads(s: BlkFrontend) {
  return Array.from(
    { length: SLOW_READS },
    (_, i) =>
      s.blk.submit({
        type: BlkRequestType.IN,
        sector: (i * MiB) / SECTOR,
        inBytes: 4096,
        queue: 0,
      }),
  );
}

/** These tests need a FUSE export; a machine without one fails them, saying why (no silent skip). */
function assertSlowImageAvailable(): void {
  if (unavailable !== null) throw new Error(`slow storage cannot be made here: ${unavailable}`);
}

Deno.test({
  name: "blk (io_uring, buffered): reads waiting on slow storage on one queue do not stall " +
    "another queue of the device",
  async fn() {
    assertSlowImageAvailable();
    // 4 reads a second: the slow reads take about 2 s in all, far longer than the fast ones.
    const slow = await startSlowImage(16 * MiB, 4, 0x5a);
    try {
      // `auto`: the engine the daemon picks by default (io_uring, for a buffered FUSE file).
      await withInProcessBlk({ image: slow.path, ioEngine: "auto", queues: 2 }, async (blk) => {
        const s = await blk.open();
        // Queue 1 reads one region first (one throttled read), so that later reads of it come
        // from the page cache of the FUSE file; the slow reads, 1 MiB apart, miss it.
        const warm = s.blk.read(15 * MiB / SECTOR, 4096, 1);
        assert.equal(warm.status, BlkStatus.OK);
        const q0 = s.queues[0];
        const used0 = q0.usedIdx;
        const pending = submitSlowReads(s);
        for (let i = 0; i < FAST_READS; i++) {
          const r = s.blk.read(15 * MiB / SECTOR, 4096, 1);
          assert.equal(r.status, BlkStatus.OK, `fast read ${i}`);
          assert.ok(r.data.every((b) => b === 0x5a), "the image's data");
        }
        const slowDone = (q0.usedIdx - used0) & 0xffff;
        assert.ok(
          slowDone < SLOW_READS,
          `all ${SLOW_READS} slow reads of queue 0 completed before the ${FAST_READS} reads of ` +
            "queue 1 did: the worker waited for the slow storage",
        );
        for (const p of pending) {
          const r = s.blk.wait(p, 60_000);
          assert.equal(r.status, BlkStatus.OK, "the slow reads complete too");
          assert.ok(r.data.every((b) => b === 0x5a));
        }
      });
    } finally {
      await slow.stop();
    }
  },
});

Deno.test({
  name: "blk (io_uring, buffered): a write-zeroes waiting on slow storage does not stall " +
    "another queue of the device",
  async fn() {
    assertSlowImageAvailable();
    const slow = await startSlowImage(16 * MiB, 4, 0x5a);
    try {
      await withInProcessBlk({ image: slow.path, ioEngine: "auto", queues: 2 }, async (blk) => {
        const s = await blk.open();
        assert.equal(s.blk.read(15 * MiB / SECTOR, 4096, 1).status, BlkStatus.OK, "warm");
        const q0 = s.queues[0];
        const used0 = q0.usedIdx;
        // Two ranges, each a throttled operation at least (fallocate, or writes of zeros).
        const ranges = [{ sector: 0, sectors: 128 }, { sector: 4 * MiB / SECTOR, sectors: 128 }];
        const zeroing = s.blk.submit({
          type: BlkRequestType.WRITE_ZEROES,
          out: rangesPayload(ranges, false),
          queue: 0,
        });
        for (let i = 0; i < FAST_READS; i++) {
          assert.equal(s.blk.read(15 * MiB / SECTOR, 4096, 1).status, BlkStatus.OK);
        }
        assert.equal(
          q0.usedIdx,
          used0,
          `the write-zeroes completed before the ${FAST_READS} reads of queue 1 did: the worker ` +
            "waited for the slow storage",
        );
        assert.equal(s.blk.wait(zeroing, 60_000).status, BlkStatus.OK, "the zeroing succeeds");
        for (const r of ranges) {
          const back = s.blk.read(r.sector, 4096, 1);
          assert.ok(back.data.every((b) => b === 0), `sector ${r.sector} reads back as zeros`);
        }
      });
    } finally {
      await slow.stop();
    }
  },
});

Deno.test({
  name: "blk (io_uring, buffered): reads waiting on a slow disk do not stall another disk " +
    "sharing its worker",
  async fn() {
    assertSlowImageAvailable();
    const slow = await startSlowImage(16 * MiB, 4, 0x5a);
    // One shared worker, as `vhostd run` gives a VM's devices by default.
    const pool = new WorkerPool({ workers: 1 });
    try {
      await withInProcessBlk(
        { image: slow.path, pool, ioEngine: "auto", queues: 1 },
        async (slowBlk) => {
          // The other disk: a fresh image on the test's file system, the default engine for it.
          await withInProcessBlk({ pool, queues: 1, ioEngine: "auto" }, async (fastBlk) => {
            assert.equal(pool.sharedWorkers, 1, "both disks on one worker");
            // The other disk's data, written on the host. It only reads: on ext4 a buffered read
            // completes inline or through the file system's own asynchronous read, whereas a
            // buffered write goes to the worker's io-wq threads, which the slow disk's reads may
            // all be holding (see IOWQ_MAX_WORKERS in devices/blk/uring.ts).
            const data = new Uint8Array(64 * 1024).map((_, i) => (i * 7) & 0xff);
            using image = await Deno.open(fastBlk.image, { write: true });
            await image.write(data);
            const a = await slowBlk.open();
            const b = await fastBlk.open();
            const q0 = a.queues[0];
            const used0 = q0.usedIdx;
            const pending = submitSlowReads(a);
            for (let i = 0; i < FAST_READS; i++) {
              const at = (i % 16) * 4096;
              const r = b.blk.read(at / SECTOR, 4096);
              assert.equal(r.status, BlkStatus.OK, `fast read ${i}`);
              assert.deepEqual(r.data, data.subarray(at, at + 4096));
            }
            const slowDone = (q0.usedIdx - used0) & 0xffff;
            assert.ok(
              slowDone < SLOW_READS,
              `all ${SLOW_READS} slow reads of the slow disk completed before the other disk's ` +
                `${FAST_READS} reads did: the shared worker waited for the slow storage`,
            );
            for (const p of pending) assert.equal(a.blk.wait(p, 60_000).status, BlkStatus.OK);
          });
        },
      );
    } finally {
      await slow.stop();
    }
  },
});

/** io-wq threads of this process by the thread they work for (named `iou-wrk-<its tid>`). */
function ioWqThreads(): Map<string, number> {
  const byOwner = new Map<string, number>();
  for (const t of Deno.readDirSync("/proc/self/task")) {
    let name: string;
    try {
      name = Deno.readTextFileSync(`/proc/self/task/${t.name}/comm`).trim();
    } catch {
      continue; // exited meanwhile
    }
    if (name.startsWith("iou-wrk-")) byOwner.set(name, (byOwner.get(name) ?? 0) + 1);
  }
  return byOwner;
}

Deno.test({
  name: "blk (io_uring, buffered): a guest keeping every slot of every queue on slow storage " +
    "gets at most the capped number of io-wq threads, and every read completes",
  async fn() {
    assertSlowImageAvailable();
    const QUEUES = 4;
    const PER_QUEUE = 16;
    const slow = await startSlowImage(16 * MiB, 16, 0x3c);
    try {
      await withInProcessBlk(
        { image: slow.path, ioEngine: "uring", queues: QUEUES },
        async (blk) => {
          const s = await blk.open();
          // 64 reads 256 KiB apart: each misses the cache (readahead would not reach the next).
          const pending = Array.from({ length: QUEUES * PER_QUEUE }, (_, i) =>
            s.blk.submit({
              type: BlkRequestType.IN,
              sector: (i * 256 * 1024) / SECTOR,
              inBytes: 4096,
              queue: i % QUEUES,
            }));
          // Threads are counted while the throttle (16 reads a second) holds most reads back.
          let most = 0;
          for (let i = 0; i < 40; i++) {
            for (const n of ioWqThreads().values()) most = Math.max(most, n);
            await new Promise((r) => setTimeout(r, 25));
          }
          assert.ok(most >= 2, `the slow reads ran in parallel in io-wq threads (${most} seen)`);
          assert.ok(most <= ioWqWorkerCap(), `${most} io-wq threads, cap ${ioWqWorkerCap()}`);
          for (const p of pending) {
            const r = s.blk.wait(p, 60_000);
            assert.equal(r.status, BlkStatus.OK);
            assert.ok(r.data.every((b) => b === 0x3c));
          }
        },
      );
    } finally {
      await slow.stop();
    }
  },
});

if (unavailable !== null) console.warn(`blk_slow_storage_test: skipped: ${unavailable}`);
