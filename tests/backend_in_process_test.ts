/**
 * In-process tests of the vhost-user back-end state machine ({@link VhostUserBackend} behind
 * {@link VhostUserServer}): the daemon's worker serves a block device inside the test process
 * (tests/helpers/in_process.ts) and the in-repo front-end library plays QEMU's side over a real
 * socket, with guest RAM in a real memfd. What the back-end holds is read from the counters and
 * state it publishes, as `vhostd status` reads them.
 *
 * @module
 */

import assert from "node:assert/strict";
import { bit, ProtocolFeature, Request, VirtioFeature } from "../vhost-user/message.ts";
import { BlkStatus } from "../devices/blk/device.ts";
import { QueueFlag } from "../daemon/stats.ts";
import { QueueStat } from "../ring/queue_stats.ts";
import { DeviceStatus } from "../vhost-user/frontend/mod.ts";
import type { BlkFrontend } from "../vhost-user/frontend/mod.ts";
import { type InProcessBlk, waitUntil, withInProcessBlk } from "./helpers/in_process.ts";

const READY = QueueFlag.ENABLED | QueueFlag.STARTED | QueueFlag.READY;

/** The published flags of queue `q`, once every message `s` sent is published. */
function flags(blk: InProcessBlk, s: BlkFrontend, q: number): number {
  return blk.snapshot(s).queues[q].flags;
}

/** Writes and reads back one sector on queue `q`: the ring serves. */
function roundTrip(s: BlkFrontend, q: number, fill: number): void {
  const data = new Uint8Array(512).fill(fill);
  assert.equal(s.blk.write(q * 8, data, q).status, BlkStatus.OK, `queue ${q} writes`);
  assert.deepEqual(s.blk.read(q * 8, 512, q).data, data, `queue ${q} reads back`);
}

/** Makes a chain on queue `q` whose data buffer lies far outside guest RAM, and kicks. */
function breakRing(s: BlkFrontend, q: number): void {
  const ring = s.queues[q];
  const hdr = s.ram.alloc(16);
  const status = s.ram.alloc(1);
  assert.notEqual(
    ring.add([
      { gpa: hdr.gpa, length: 16, writable: false },
      { gpa: 2 ** 50, length: 4096, writable: true },
      { gpa: status.gpa, length: 1, writable: true },
    ]),
    -1,
  );
  ring.publish();
  ring.kickNow();
}

Deno.test("VhostUserBackend: feature negotiation is what the back-end holds", () =>
  withInProcessBlk({ queues: 2 }, async (blk) => {
    const s = await blk.open({ eventIdx: false });
    const offered = s.offeredFeatures;
    for (const f of ["PROTOCOL_FEATURES", "VERSION_1", "RING_EVENT_IDX", "LOG_ALL"] as const) {
      assert.ok(offered & bit(VirtioFeature[f]), `${f} offered`);
    }
    for (const f of ["MQ", "REPLY_ACK", "CONFIG", "RESET_DEVICE", "STATUS"] as const) {
      assert.ok(s.offeredProtocolFeatures & bit(ProtocolFeature[f]), `${f} offered`);
    }
    const snap = blk.snapshot(s);
    assert.equal(snap.connected, true);
    assert.equal(snap.deviceId, 2, "a block device");
    assert.equal(snap.offeredFeatures, offered);
    assert.equal(snap.ackedFeatures, s.features, "SET_FEATURES taken as sent");
    assert.equal(snap.ackedFeatures & bit(VirtioFeature.RING_EVENT_IDX), 0n, "EVENT_IDX declined");
    assert.equal(snap.protocolFeatures, s.conn.protocolFeatures);
    assert.equal(s.queueNum, 2, "GET_QUEUE_NUM");
    assert.ok(snap.status & DeviceStatus.DRIVER_OK, "SET_STATUS kept");
    assert.equal(s.conn.getStatus(), snap.status, "GET_STATUS answers it");
    // A feature the back-end never offered is refused: the connection is dropped.
    s.conn.sendRaw(Request.SET_FEATURES, 1, new Uint8Array(new BigUint64Array([1n << 60n]).buffer));
    assert.ok(s.conn.waitClosed(5000), "a SET_FEATURES beyond the offer ends the connection");
    await waitUntil(() => !blk.snapshot().connected, "the back-end to forget the front-end");
    assert.equal(blk.snapshot().ackedFeatures, 0n, "and its negotiation");
  }));

for (const memSlots of [true, false]) {
  const path = memSlots ? "ADD_MEM_REG" : "SET_MEM_TABLE";
  Deno.test(`VhostUserBackend: guest memory by ${path}, rings set up and served`, () =>
    withInProcessBlk({ queues: 3 }, async (blk) => {
      const s = await blk.open({ queues: 3, memSlots, startedQueues: [0, 2] });
      assert.equal(
        (s.conn.protocolFeatures & bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)) !== 0n,
        memSlots,
      );
      assert.equal(flags(blk, s, 0), READY, "a started queue is ready");
      assert.equal(flags(blk, s, 1), QueueFlag.ENABLED, "a queue only enabled is not started");
      assert.equal(flags(blk, s, 2), READY);
      assert.equal(blk.snapshot(s).queues[0].size, 128, "SET_VRING_NUM");
      roundTrip(s, 0, 0x11);
      roundTrip(s, 2, 0x22);
      assert.equal(blk.snapshot(s).queues[2].counters[QueueStat.REQUESTS], 2);
      // GET_VRING_BASE stops a ring and reports where the device is.
      assert.deepEqual(s.stop(), [2, 2], "GET_VRING_BASE: two requests each");
      assert.equal(flags(blk, s, 0) & QueueFlag.STARTED, 0, "stopped");
      s.start();
      roundTrip(s, 0, 0x33);
    }));
}

Deno.test("VhostUserBackend: a broken ring stops only that ring; RESET_DEVICE revives it", () =>
  withInProcessBlk({ queues: 2 }, async (blk) => {
    const s = await blk.open();
    breakRing(s, 0);
    await waitUntil(() => s.queues[0].errorSignalled(), "queue 0's error eventfd");
    assert.ok(flags(blk, s, 0) & QueueFlag.BROKEN, "queue 0 broken");
    assert.equal(flags(blk, s, 1), READY, "queue 1 untouched");
    roundTrip(s, 1, 0x44);
    assert.equal(s.queues[1].errorSignalled(), false);
    assert.ok(blk.snapshot(s).connected, "the connection stays");
    // RESET_DEVICE: every ring and the status back to their initial state, memory kept.
    s.conn.resetDevice();
    assert.equal(s.conn.getStatus(), 0, "status cleared");
    assert.equal(flags(blk, s, 0), 0, "queue 0 reset");
    assert.equal(flags(blk, s, 1), 0, "queue 1 reset");
    for (const q of s.queues) q.reset();
    s.base.fill(0);
    s.start();
    roundTrip(s, 0, 0x55);
    roundTrip(s, 1, 0x66);
  }));
