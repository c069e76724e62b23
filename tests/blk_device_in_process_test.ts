/**
 * In-process tests of {@link BlkDevice}: the device runs in a worker of the test process (the
 * daemon's own worker, event loop and vhost-user back-end; see tests/helpers/in_process.ts) and
 * the in-repo front-end library drives it through a real socket, guest RAM in a real memfd and a
 * real image file. Each request type and each way a request can be malformed, on both I/O
 * engines, in milliseconds.
 *
 * @module
 */

import assert from "node:assert/strict";
import { BLK_ID_BYTES, BlkFeature, BlkRequestType, BlkStatus } from "../devices/blk/device.ts";
import { bit } from "../vhost-user/message.ts";
import { QueueStat } from "../ring/queue_stats.ts";
import type { BlkFrontend, Segment } from "../vhost-user/frontend/mod.ts";
import { type InProcessBlk, withInProcessBlk } from "./helpers/in_process.ts";

const SECTOR = 512;

/** Bytes of the image file at `offset`, read on the host. */
function imageBytes(blk: InProcessBlk, offset: number, length: number): Uint8Array {
  const f = Deno.openSync(blk.image);
  try {
    const out = new Uint8Array(length);
    f.seekSync(offset, Deno.SeekMode.Start);
    let got = 0;
    while (got < length) got += f.readSync(out.subarray(got)) ?? length;
    return out;
  } finally {
    f.close();
  }
}

/** Errors the back-end counted on queue `q`. */
function errors(blk: InProcessBlk, q = 0): number {
  return blk.snapshot().queues[q].counters[QueueStat.ERRORS];
}

/**
 * Puts a hand-built chain on queue 0: a header of `headerBytes` bytes (type, sector), then the
 * given extra segments; returns the used length and the status byte the device left (0xff when
 * it wrote none).
 */
function rawRequest(
  s: BlkFrontend,
  type: number,
  headerBytes: number,
  extra: (status: number) => Segment[],
): { usedLen: number; status: number } {
  const q = s.queues[0];
  const header = s.ram.alloc(16, 16);
  const status = s.ram.alloc(1, 1);
  const view = new DataView(s.ram.u8.buffer);
  view.setUint32(header.offset, type, true);
  s.ram.u8[status.offset] = 0xff;
  const head = q.add([
    { gpa: header.gpa, length: headerBytes, writable: false },
    ...extra(status.gpa),
  ]);
  assert.ok(head >= 0, "descriptors free");
  q.publish();
  q.kickNow();
  assert.equal(q.waitUsed(5000), head);
  return { usedLen: q.lastLen, status: s.ram.u8[status.offset] };
}

for (const ioEngine of ["sync", "uring"] as const) {
  Deno.test(`BlkDevice (${ioEngine}): read, write, flush, GET_ID, discard, write-zeroes`, () =>
    withInProcessBlk({ ioEngine, queues: 2 }, async (blk) => {
      const s = await blk.open();
      const data = new Uint8Array(8192).map((_, i) => (i * 13 + 7) & 0xff);
      for (const q of [0, 1]) {
        const sector = 64 + q * 32;
        const w = s.blk.write(sector, data, q);
        assert.equal(w.status, BlkStatus.OK, "write");
        assert.equal(w.usedLen, 1, "a write reports its status byte alone");
        assert.deepEqual(imageBytes(blk, sector * SECTOR, data.length), data, "on the image");
        const r = s.blk.read(sector, data.length, q);
        assert.equal(r.status, BlkStatus.OK, "read");
        assert.equal(r.usedLen, data.length + 1, "a read reports its data and status");
        assert.deepEqual(r.data, data, "read back");
        assert.equal(s.blk.flush(q).status, BlkStatus.OK, "flush");
      }
      const id = s.blk.getId();
      assert.equal(id.status, BlkStatus.OK);
      assert.equal(id.usedLen, BLK_ID_BYTES + 1);
      assert.equal(new TextDecoder().decode(id.data).replace(/\0+$/, ""), "vhostd-disk.img");
      assert.equal(s.blk.discard([{ sector: 64, sectors: 16 }]).status, BlkStatus.OK);
      const z = s.blk.writeZeroes([{ sector: 96, sectors: 16 }]);
      assert.equal(z.status, BlkStatus.OK, "write zeroes");
      assert.deepEqual(imageBytes(blk, 96 * SECTOR, 8192), new Uint8Array(8192), "zeroed");
      assert.equal(errors(blk, 0) + errors(blk, 1), 0, "no request failed");
    }));

  Deno.test(`BlkDevice (${ioEngine}): a discard of several ranges punches every one`, () =>
    withInProcessBlk({ ioEngine, queues: 1 }, async (blk) => {
      const s = await blk.open();
      const data = new Uint8Array(4096).fill(0xa5);
      for (const sector of [0, 64, 128]) assert.equal(s.blk.write(sector, data).status, 0);
      const d = s.blk.discard([{ sector: 0, sectors: 8 }, { sector: 128, sectors: 8 }]);
      assert.equal(d.status, BlkStatus.OK);
      assert.deepEqual(imageBytes(blk, 0, 4096), new Uint8Array(4096), "first range punched");
      assert.deepEqual(imageBytes(blk, 64 * SECTOR, 4096), data, "between them: kept");
      assert.deepEqual(imageBytes(blk, 128 * SECTOR, 4096), new Uint8Array(4096), "second");
      assert.equal(errors(blk), 0);
    }));

  Deno.test(`BlkDevice (${ioEngine}): write-zeroes of several ranges, with and without unmap`, () =>
    withInProcessBlk({ ioEngine, queues: 1 }, async (blk) => {
      const s = await blk.open();
      const data = new Uint8Array(4096).fill(0xa5);
      for (const sector of [0, 64, 128, 192]) assert.equal(s.blk.write(sector, data).status, 0);
      const ranges = [{ sector: 0, sectors: 8 }, { sector: 128, sectors: 8 }];
      for (const unmap of [false, true]) {
        if (unmap) { for (const r of ranges) s.blk.write(r.sector, data); }
        assert.equal(s.blk.writeZeroes(ranges, unmap).status, BlkStatus.OK, `unmap ${unmap}`);
        for (const r of ranges) {
          assert.deepEqual(imageBytes(blk, r.sector * SECTOR, 4096), new Uint8Array(4096));
        }
        assert.deepEqual(imageBytes(blk, 64 * SECTOR, 4096), data, "between them: kept");
        assert.deepEqual(imageBytes(blk, 192 * SECTOR, 4096), data, "after them: kept");
      }
      assert.equal(errors(blk), 0);
    }));

  Deno.test(`BlkDevice (${ioEngine}): with the write cache off, writes complete synced`, () =>
    withInProcessBlk({ ioEngine, queues: 1 }, async (blk) => {
      const s = await blk.open();
      s.conn.setConfig(32, new Uint8Array([0]));
      assert.equal(s.conn.getConfig(32, 1)[0], 0, "write-through");
      const data = new Uint8Array(8192).fill(0x3d);
      for (let i = 0; i < 8; i++) assert.equal(s.blk.write(i * 16, data).status, BlkStatus.OK);
      assert.deepEqual(imageBytes(blk, 7 * 16 * SECTOR, data.length), data);
      assert.equal(s.blk.flush().status, BlkStatus.OK);
      assert.equal(errors(blk), 0);
    }));

  Deno.test(`BlkDevice (${ioEngine}): malformed requests get their status and are counted`, () =>
    withInProcessBlk({ ioEngine, queues: 1, sizeBytes: 1 << 20 }, async (blk) => {
      const s = await blk.open();
      // A header shorter than 16 bytes.
      const short = rawRequest(s, BlkRequestType.IN, 8, (st) => [
        { gpa: st, length: 1, writable: true },
      ]);
      assert.deepEqual(short, { usedLen: 1, status: BlkStatus.IOERR }, "short header");
      assert.equal(errors(blk), 1);
      // No writable byte at all: nowhere to put a status; completed with nothing written.
      const data = s.ram.alloc(512, 512);
      const none = rawRequest(s, BlkRequestType.OUT, 16, () => [
        { gpa: data.gpa, length: 512, writable: false },
      ]);
      assert.deepEqual(none, { usedLen: 0, status: 0xff }, "no status byte");
      assert.equal(errors(blk), 2);
      // An unknown type, a read past the end, a read of a partial sector.
      const unknown = s.blk.run({ type: 99, inBytes: 512 });
      assert.equal(unknown.status, BlkStatus.UNSUPP, "unknown type");
      assert.equal(unknown.usedLen, 1, "a failed request reports its status byte alone");
      assert.equal(s.blk.read((1 << 20) / SECTOR, 512).status, BlkStatus.IOERR, "past the end");
      assert.equal(s.blk.read(0, 100).status, BlkStatus.IOERR, "partial sector");
      assert.equal(errors(blk), 5, "every failed request counted once");
      // The queue still serves.
      assert.equal(s.blk.write(0, new Uint8Array(512).fill(1)).status, BlkStatus.OK);
      assert.equal(errors(blk), 5);
    }));

  Deno.test(`BlkDevice (${ioEngine}): a read-only disk refuses writes, discards and zeroing`, () =>
    withInProcessBlk({ ioEngine, queues: 1, readOnly: true }, async (blk) => {
      const s = await blk.open();
      assert.ok(s.offeredFeatures & bit(BlkFeature.RO), "VIRTIO_BLK_F_RO offered");
      assert.equal(s.blk.write(0, new Uint8Array(512).fill(9)).status, BlkStatus.IOERR);
      assert.equal(s.blk.discard([{ sector: 0, sectors: 1 }]).status, BlkStatus.IOERR);
      assert.equal(s.blk.writeZeroes([{ sector: 0, sectors: 1 }]).status, BlkStatus.IOERR);
      assert.deepEqual(imageBytes(blk, 0, 512), new Uint8Array(512), "the image is untouched");
      assert.equal(s.blk.read(0, 512).status, BlkStatus.OK, "reads are served");
      assert.equal(errors(blk), 3);
    }));
}
