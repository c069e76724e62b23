/**
 * Unit tests of the vhost-user front-end library (vhost-user/frontend/) and of the pieces of
 * `probe` and `load` that can be checked on their own. Protocol tests run against a real vhostd
 * blk back-end spawned on a temporary image.
 *
 * @module
 */

import assert from "node:assert/strict";
import { openFdCount } from "./helpers/daemon.ts";
import { BlkStatus } from "../devices/blk/device.ts";
import { UsageError } from "../sys/errors.ts";
import { Flags, Request, u64Payload } from "../vhost-user/message.ts";
import {
  BlkFrontend,
  DriverQueue,
  FrontendConnection,
  GuestRam,
  NackError,
  UsedRingError,
} from "../vhost-user/frontend/mod.ts";
import { cmdProbe } from "../daemon/probe.ts";
import { histBucket, histBucketLimit } from "../daemon/load_worker.ts";
import { type RunningBackend, startBackend } from "./conformance/backends.ts";

async function withVhostd(fn: (b: RunningBackend) => Promise<void> | void): Promise<void> {
  const b = await startBackend("vhostd", { queues: 2 });
  try {
    await fn(b);
  } catch (e) {
    (e as Error).message += `\n--- vhostd output ---\n${b.output()}`;
    throw e;
  } finally {
    await b.stop();
  }
}

Deno.test("GuestRam: regions, allocation and translation", () => {
  const ram = GuestRam.create([
    { guestPhysAddr: 0, size: 1 << 20 },
    { guestPhysAddr: 0x1_0000_0000, size: 2 << 20 },
  ]);
  try {
    assert.equal(ram.regions.length, 2);
    assert.equal(ram.regions[1].mmapOffset, 1 << 20, "second region follows in the memfd");
    assert.equal(ram.regions[1].userspaceAddr, ram.address + (1 << 20));
    const a = ram.alloc(100, 4096);
    assert.equal(a.gpa % 4096, 0);
    assert.ok(a.gpa >= 0x1_0000_0000, "default allocations come from the last region");
    const b = ram.alloc(10, 16);
    assert.ok(b.gpa >= a.gpa + 100 && b.gpa % 16 === 0, "no overlap, aligned");
    assert.equal(ram.offsetOf(a.gpa), a.offset);
    assert.equal(ram.offsetOf(0x100), 0x100);
    assert.throws(() => ram.offsetOf(1 << 20), RangeError, "the hole between regions");
    assert.throws(() => ram.offsetOf((1 << 20) - 4, 8), RangeError, "straddling a region end");
    assert.throws(() => ram.alloc(4 << 20), RangeError, "region full");
    // A second view (as a worker makes) aliases the same memory.
    const view = GuestRam.attach(ram.shared);
    ram.bytes(a)[5] = 0x77;
    assert.equal(view.u8[a.offset + 5], 0x77);
  } finally {
    ram.close();
  }
});

Deno.test("DriverQueue: chains, used-ring checks, free-list accounting", () => {
  const ram = GuestRam.create([{ guestPhysAddr: 0x4000_0000, size: 1 << 20 }]);
  const q = DriverQueue.create(ram, 0, 8, { indirectEntries: 4 });
  try {
    const buf = ram.alloc(64);
    const head = q.add3(buf.gpa, 16, buf.gpa + 16, 32, true, buf.gpa + 48);
    assert.equal(q.freeCount, 5);
    assert.equal(q.outstanding, 1);
    q.publish();
    assert.equal(q.publishedAvailIdx, 1);
    assert.equal(q.poll(), -1, "nothing used yet");
    // Play the device by hand: a used element for a head that is not outstanding is refused.
    const used = q.layout.used.offset;
    ram.u32[(used + 4) >> 2] = (head + 1) % 8;
    ram.u32[(used + 8) >> 2] = 1;
    Atomics.store(ram.u16, (used + 2) >> 1, 1);
    assert.throws(() => q.poll(), UsedRingError);
    // A length beyond the chain's 33 writable bytes is refused too.
    ram.u32[(used + 4) >> 2] = head;
    ram.u32[(used + 8) >> 2] = 34;
    assert.throws(() => q.poll(), UsedRingError);
    ram.u32[(used + 8) >> 2] = 33;
    assert.equal(q.poll(), head);
    assert.equal(q.lastLen, 33);
    assert.equal(q.freeCount, 8, "all three descriptors back on the free list");
    // An indirect chain takes one ring descriptor.
    const h2 = q.add([{ gpa: buf.gpa, length: 16, writable: false }, {
      gpa: buf.gpa + 48,
      length: 1,
      writable: true,
    }], true);
    assert.ok(h2 >= 0);
    assert.equal(q.freeCount, 7);
    // Without room, add reports -1 instead of corrupting the ring.
    const segs = [0, 1, 2, 3, 4, 5, 6, 7].map((i) => ({
      gpa: buf.gpa + i,
      length: 1,
      writable: true,
    }));
    assert.equal(q.add(segs), -1);
  } finally {
    q.close();
    ram.close();
  }
});

Deno.test("DriverQueue: EVENT_IDX kick decision follows avail_event", () => {
  const ram = GuestRam.create([{ guestPhysAddr: 0, size: 1 << 20 }]);
  const q = DriverQueue.create(ram, 0, 16);
  try {
    q.eventIdx = true;
    const b = ram.alloc(64);
    const availEventSlot = (q.layout.used.offset + 4 + 8 * 16) >> 1;
    ram.u16[availEventSlot] = 0; // the device wants a kick when avail passes 0
    q.add3(b.gpa, 16, 0, 0, false, b.gpa + 16);
    q.publish();
    assert.equal(q.kick(), true);
    ram.u16[availEventSlot] = 5; // the device is busy until index 5: no kick for index 2
    q.add3(b.gpa, 16, 0, 0, false, b.gpa + 16);
    q.publish();
    assert.equal(q.kick(), false);
    assert.equal(q.kicks, 1);
  } finally {
    q.close();
    ram.close();
  }
});

Deno.test("load histogram: buckets are monotonic and bound their values", () => {
  let last = -1;
  for (const ns of [0, 1, 15, 16, 17, 100, 1000, 4095, 4096, 123456, 1e9, 5e11]) {
    const b = histBucket(ns);
    assert.ok(b >= last, `bucket of ${ns}`);
    last = b;
    assert.ok(histBucketLimit(b) >= ns, `limit of bucket ${b} >= ${ns}`);
    if (ns >= 16 && ns < 2 ** 40) assert.ok(histBucketLimit(b) <= ns * 1.07 + 1, `${ns} tight`);
  }
});

Deno.test("probe: a socket nobody listens on is a usage error", async () => {
  await assert.rejects(() => cmdProbe(["--socket", "/nonexistent/vhostd.sock"]), UsageError);
  await assert.rejects(() => cmdProbe([]), UsageError);
  await assert.rejects(() => cmdProbe(["--bogus"]), UsageError);
});

Deno.test("FrontendConnection: typed requests, REPLY_ACK acks and nacks (vhostd)", async () => {
  await withVhostd(async (b) => {
    const c = await FrontendConnection.connect(b.socket, { retryMs: 5000 });
    try {
      const f = c.getFeatures();
      assert.ok(f & (1n << 30n));
      const pf = c.getProtocolFeatures();
      c.setProtocolFeatures(pf);
      assert.ok(c.replyAck);
      c.setOwner(); // acked with 0
      assert.equal(c.getQueueNum(), 2);
      assert.equal(c.getConfig(0, 8).length, 8);
      // capacity is read-only: SET_CONFIG is refused with a non-zero ack.
      assert.throws(() => c.setConfig(0, new Uint8Array(8)), NackError);
      // wce is writable.
      c.setConfig(32, new Uint8Array([0]));
      assert.equal(c.getConfig(32, 1)[0], 0);
      assert.equal(c.getStatus(), 0);
      c.setStatus(0xb);
      assert.equal(c.getStatus(), 0xb);
    } finally {
      c.close();
    }
  });
});

Deno.test("raw messages: hostile input drops the connection, the daemon serves on", async () => {
  await withVhostd(async (b) => {
    const hostile: [string, (c: FrontendConnection) => void][] = [
      ["unknown request id", (c) => c.sendRaw(99, Flags.VERSION)],
      ["wrong version bits", (c) => c.sendRaw(Request.GET_FEATURES, 0x2)],
      ["payload larger than the limit", (c) => c.sendRaw(Request.SET_OWNER, 1, undefined, [], 1e6)],
      ["short SET_FEATURES payload", (c) => c.sendRaw(Request.SET_FEATURES, 1, new Uint8Array(4))],
      ["SET_FEATURES with bits not offered", (c) => {
        c.sendRaw(Request.SET_FEATURES, 1, u64Payload(1n << 63n));
      }],
      ["fds on a message that takes none", (c) => {
        const ram = GuestRam.create([{ guestPhysAddr: 0, size: 4096 }]);
        try {
          c.sendRaw(Request.SET_OWNER, 1, undefined, [ram.fd]);
        } finally {
          ram.close();
        }
      }],
    ];
    const before = openFdCount();
    for (const [what, send] of hostile) {
      const c = await FrontendConnection.connect(b.socket, { retryMs: 5000 });
      try {
        send(c);
        assert.ok(c.waitClosed(2000), `${what}: connection dropped`);
      } finally {
        c.close();
      }
    }
    assert.equal(openFdCount(), before, "no fds leaked on our side");
    // A well-behaved front-end still gets served.
    const s = await BlkFrontend.open({ socket: b.socket, queues: 2 });
    try {
      assert.equal(s.blk.read(0, 4096).status, BlkStatus.OK);
    } finally {
      s.close();
    }
  });
});

Deno.test("BlkFrontend: open/close leaves no fds behind; I/O on both queues", async () => {
  await withVhostd(async (b) => {
    const before = openFdCount();
    const s = await BlkFrontend.open({ socket: b.socket, queues: 2, record: true });
    try {
      const data = new Uint8Array(4096).map((_, i) => i & 0xff);
      assert.equal(s.blk.write(40, data, 1).status, BlkStatus.OK);
      const r = s.blk.read(40, 4096, 0);
      assert.deepEqual(r.data, data);
      assert.equal(r.usedLen, 4097);
      // ackMode "all": every request without a reply body carried NEED_REPLY.
      const setOwner = s.sent.find((m) => m.request === Request.SET_OWNER);
      assert.equal(setOwner?.flags, Flags.VERSION | Flags.NEED_REPLY);
      s.conn.resetDevice();
      assert.equal(s.conn.getStatus(), 0, "RESET_DEVICE clears the status");
    } finally {
      s.close();
    }
    assert.equal(openFdCount(), before);
  });
});
