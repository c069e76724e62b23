/**
 * The vhost-user-blk conformance suite. Every test runs unchanged against each back-end in
 * {@link BACKENDS} (vhostd blk and qemu-storage-daemon's vhost-user-blk export), each spawned on
 * a temporary image and killed afterwards. Where a back-end departs from the spec, the test
 * asserts the recorded deviation (deviations.ts) instead, so it fails if that ever changes.
 *
 * Run: deno test -A tests/conformance/
 *
 * @module
 */

import assert from "node:assert/strict";
import { BlkRequestType, BlkStatus } from "../../devices/blk/device.ts";
import { bit, ProtocolFeature, Request, VirtioFeature } from "../../vhost-user/message.ts";
import {
  BlkFrontend,
  type BlkFrontendOptions,
  NackError,
  QEMU72_BLK_CONFIG_SIZE,
} from "../../vhost-user/frontend/mod.ts";
import {
  type BackendKind,
  type BackendOptions,
  BACKENDS,
  isVhostd,
  readImage,
  REPO,
  type RunningBackend,
  startBackend,
} from "./backends.ts";
import { deviates } from "./deviations.ts";
import { PeerClosedError } from "../../sys/socket.ts";
import { readTrace, render } from "./traces.ts";

const SECTOR = 512;

/** Runs `fn` with a fresh back-end, stopping it (and showing its output on failure) afterwards. */
async function withBackend(
  kind: BackendKind,
  options: BackendOptions,
  fn: (b: RunningBackend) => Promise<void> | void,
): Promise<void> {
  const b = await startBackend(kind, options);
  try {
    await fn(b);
  } catch (e) {
    (e as Error).message += `\n--- ${kind} output ---\n${b.output()}`;
    throw e;
  } finally {
    await b.stop();
  }
}

/** Runs `fn` with a back-end and a started front-end session on it. */
function withSession(
  kind: BackendKind,
  options: BackendOptions,
  fe: Omit<BlkFrontendOptions, "socket">,
  fn: (s: BlkFrontend, b: RunningBackend) => Promise<void> | void,
): Promise<void> {
  return withBackend(kind, options, async (b) => {
    const s = await BlkFrontend.open({ socket: b.socket, ...fe });
    try {
      await fn(s, b);
    } finally {
      s.close();
    }
  });
}

function pattern(bytes: number, seed: number): Uint8Array {
  const out = new Uint8Array(bytes);
  for (let i = 0; i < bytes; i++) out[i] = (i * 31 + seed * 17 + (i >> 8)) & 0xff;
  return out;
}

function test(name: string, fn: (kind: BackendKind) => Promise<void>): void {
  for (const kind of BACKENDS) Deno.test(`${kind}: ${name}`, () => fn(kind));
}

// ---- negotiation --------------------------------------------------------------------------

test("feature negotiation: bit 30 and VERSION_1 offered, acked set accepted", async (kind) => {
  await withSession(kind, { queues: 1 }, {}, (s) => {
    const f = s.offeredFeatures;
    assert.ok(f & bit(VirtioFeature.PROTOCOL_FEATURES), "bit 30 (PROTOCOL_FEATURES) offered");
    assert.ok(f & bit(VirtioFeature.VERSION_1), "VERSION_1 offered");
    assert.ok(f & bit(VirtioFeature.RING_INDIRECT_DESC), "INDIRECT_DESC offered");
    assert.ok(f & bit(VirtioFeature.RING_EVENT_IDX), "EVENT_IDX offered");
    assert.equal(f & bit(VirtioFeature.RING_PACKED), 0n, "no packed ring (split only)");
    // SET_FEATURES was acknowledged (REPLY_ACK) with the driver's choice; GET_FEATURES still
    // reports the offer, unchanged by negotiation.
    assert.equal(s.conn.getFeatures(), f);
    assert.ok(s.features & bit(VirtioFeature.PROTOCOL_FEATURES), "bit 30 echoed in SET_FEATURES");
  });
});

test("protocol features: MQ, REPLY_ACK, CONFIG and BACKEND_REQ offered; REPLY_ACK acks", async (kind) => {
  await withSession(kind, { queues: 2 }, { queues: 2 }, (s) => {
    const pf = s.offeredProtocolFeatures;
    // BACKEND_REQ: the channel a config change (a disk grown online) reaches QEMU by.
    for (const f of ["MQ", "REPLY_ACK", "CONFIG", "CONFIGURE_MEM_SLOTS", "BACKEND_REQ"] as const) {
      assert.ok(pf & bit(ProtocolFeature[f]), `${f} offered`);
    }
    // Nothing above bit 16 that QEMU 7.2 would have to mask off silently.
    assert.equal(pf >> 17n, 0n, "no protocol bits above QEMU 7.2's mask");
    // NEED_REPLY on a request without a reply body gets a u64 0.
    s.conn.request(Request.SET_OWNER, undefined, [], true);
    assert.ok(s.maxMemSlots >= 8, `GET_MAX_MEM_SLOTS ${s.maxMemSlots} >= 8`);
    // Which optional features each one has (documents the difference; fails if it changes).
    const status = (pf & bit(ProtocolFeature.STATUS)) !== 0n;
    const inflight = (pf & bit(ProtocolFeature.INFLIGHT_SHMFD)) !== 0n;
    assert.deepEqual(
      { status, inflight },
      isVhostd(kind) ? { status: true, inflight: true } : { status: false, inflight: false },
    );
  });
});

test("GET_QUEUE_NUM reports the configured queue count", async (kind) => {
  await withSession(kind, { queues: 3 }, { queues: 1 }, (s) => {
    assert.equal(s.queueNum, 3);
    assert.equal(s.conn.getQueueNum(), 3);
  });
});

test("GET_CONFIG: exact size (QEMU's 57 and the full 60) and contents", async (kind) => {
  await withSession(kind, { queues: 2, sizeBytes: 48 << 20 }, { queues: 2 }, (s, b) => {
    assert.equal(s.configBytes.length, QEMU72_BLK_CONFIG_SIZE);
    const c = s.config;
    assert.equal(c.capacitySectors, b.sizeBytes / SECTOR, "capacity = image size / 512");
    assert.equal(c.capacityBytes, b.sizeBytes);
    assert.equal(c.blkSize, 512);
    assert.equal(c.numQueues, 2);
    assert.ok(c.segMax >= 1, `seg_max ${c.segMax}`);
    assert.ok(c.maxDiscardSectors > 0 && c.maxDiscardSeg >= 1);
    assert.ok(c.maxWriteZeroesSectors > 0 && c.maxWriteZeroesSeg >= 1);
    if (deviates(kind, "SIZE_MAX_ZERO")) assert.equal(c.sizeMax, 0);
    else assert.ok(c.sizeMax >= 4096, `size_max ${c.sizeMax}`);
    const full = s.conn.getConfig(0, 60);
    assert.equal(full.length, 60);
    assert.deepEqual(full.subarray(0, 57), s.configBytes);
    // A partial read at an offset returns exactly that slice.
    const part = s.conn.getConfig(20, 4);
    if (deviates(kind, "GET_CONFIG_IGNORES_OFFSET")) {
      assert.deepEqual(part, s.configBytes.subarray(0, 4), "bytes from offset 0 instead");
    } else assert.deepEqual(part, s.configBytes.subarray(20, 24));
  });
});

// ---- QEMU 7.2 sequences from the traces ---------------------------------------------------

test("QEMU 7.2 start/stop sequence replayed message for message", async (kind) => {
  // qsd: the trace was taken against qsd itself (BACKEND_REQ, ADD_MEM_REG, no STATUS).
  // vhostd: compare with the tracer trace (STATUS, INFLIGHT_SHMFD), taken without BACKEND_REQ:
  // the front-end does not ask for it.
  const qsd = kind === "qsd";
  const trace = qsd
    ? readTrace("trace-qemu72-blk-start-stop.log")[0]
    : readTrace("trace-qemu72-blk-status-inflight.log")[0];
  // The trace's back-end had no CONFIGURE_MEM_SLOTS in the tracer case: QEMU used SET_MEM_TABLE.
  const options = { queues: 2, startedQueues: [0], ackMode: "qemu" as const, record: true };
  await withSession(kind, { queues: 2 }, {
    ...options,
    backendChannel: qsd,
    memSlots: qsd,
  }, (s) => {
    const stopAt = trace.findLastIndex((m) =>
      m.request === Request.SET_STATUS && m.flags === 1 && qsd === false
    );
    const startPart = qsd ? trace.slice(0, -3) : trace.slice(0, stopAt);
    const stopPart = qsd ? trace.slice(-3) : trace.slice(stopAt);
    const sent = s.sent.splice(0);
    assert.deepEqual(sent.at(-1)?.request, Request.GET_FEATURES, "open() ends with a barrier");
    assert.deepEqual(render(sent.slice(0, -1)), render(startPart));
    const w = s.blk.write(100, pattern(4096, 1));
    assert.equal(w.status, BlkStatus.OK);
    assert.deepEqual(s.blk.read(100, 4096).data, pattern(4096, 1));
    s.stop();
    assert.deepEqual(render(s.sent.splice(0)), render(stopPart));
    assert.equal(s.base[0], 2, "GET_VRING_BASE after two requests");
  });
});

test("QEMU 7.2 reconnect after a back-end crash: replay with the restored index", async (kind) => {
  const trace = readTrace("trace-qemu72-blk-reconnect.log");
  const qsd = kind === "qsd";
  await withSession(kind, { queues: 2 }, {
    queues: 2,
    startedQueues: [0],
    ackMode: "qemu",
    record: true,
    backendChannel: qsd,
    // Without inflight tracking the replay is exactly the traced one (qsd has none).
    inflight: false,
  }, async (s, b) => {
    for (let i = 0; i < 5; i++) {
      assert.equal(s.blk.write(200 + 8 * i, pattern(4096, i)).status, BlkStatus.OK);
    }
    await b.crash();
    await b.restart();
    s.sent.length = 0;
    await s.reconnect(true);
    assert.equal(s.base[0], 5, "SET_VRING_BASE carries the used index found in guest memory");
    const sent = s.sent.splice(0);
    assert.equal(sent.pop()?.request, Request.GET_FEATURES);
    const expected = trace[1].slice(0, -3); // the rest is QEMU's stop after the test
    if (qsd) assert.deepEqual(render(sent), render(expected));
    else {
      // Without BACKEND_REQ asked for, and with STATUS: the same sequence with those edits.
      assert.ok(!render(sent).includes("SET_BACKEND_REQ_FD/0x9"));
      assert.ok(!sent.some((m) => m.request === Request.GET_CONFIG), "no GET_CONFIG (cached)");
    }
    for (let i = 0; i < 5; i++) {
      const r = s.blk.read(200 + 8 * i, 4096);
      assert.equal(r.status, BlkStatus.OK);
      assert.deepEqual(r.data, pattern(4096, i), "data written before the crash survives");
    }
    assert.equal(s.stop()[0], 10);
  });
});

test("stop (SET_STATUS(0) first when STATUS is on) keeps the ring index; restart goes on", async (kind) => {
  await withSession(kind, { queues: 1 }, { queues: 1, record: true }, (s) => {
    for (let i = 0; i < 7; i++) assert.equal(s.blk.read(8 * i, 4096).status, BlkStatus.OK);
    s.sent.length = 0;
    const [base] = s.stop();
    const names = render(s.sent);
    if (s.hasProtocol(ProtocolFeature.STATUS)) {
      assert.equal(names[0], "SET_STATUS/0x9", "SET_STATUS(0) comes before GET_VRING_BASE");
      assert.ok(names.indexOf("GET_VRING_BASE/0x1") > 0);
    }
    assert.equal(base, 7, "GET_VRING_BASE = requests consumed, not reset by SET_STATUS(0)");
    // Restart on the same connection with SET_VRING_BASE = 7 and carry on.
    s.start();
    for (let i = 0; i < 3; i++) {
      const w = s.blk.write(8 * i, pattern(4096, i));
      assert.equal(w.status, BlkStatus.OK);
    }
    assert.deepEqual(s.stop(), [10]);
  });
});

test("SET_VRING_ENABLE for queues never set up; the others serve", async (kind) => {
  await withSession(kind, { queues: 4 }, { queues: 4, startedQueues: [0, 2] }, (s, b) => {
    // start() enabled all four queues, as QEMU does; queues 1 and 3 have no rings.
    s.conn.setVringEnable(3, true);
    s.conn.setVringEnable(1, false);
    s.conn.sync();
    assert.equal(s.blk.write(16, pattern(4096, 3), 0).status, BlkStatus.OK);
    const r = s.blk.read(16, 4096, 2);
    assert.equal(r.status, BlkStatus.OK);
    assert.deepEqual(r.data, pattern(4096, 3));
    assert.deepEqual(readImage(b.image, 16 * SECTOR, 4096), pattern(4096, 3));
    assert.deepEqual(s.stop(), [1, 1]);
  });
});

test("GET_VRING_BASE across 16-bit index wrap-around", async (kind) => {
  await withBackend(kind, { queues: 1 }, async (b) => {
    const s = await BlkFrontend.connect({ socket: b.socket, queues: 1, queueSize: 8 });
    try {
      s.queues[0].presetIndices(65530);
      s.base[0] = 65530;
      s.start();
      // 20 requests on an 8-entry ring: the ring wraps, and the 16-bit index wraps past 65535.
      for (let i = 0; i < 20; i++) {
        assert.equal(s.blk.read(i * 8, 4096).status, BlkStatus.OK, `request ${i}`);
      }
      assert.equal(s.queues[0].usedIdx, (65530 + 20) & 0xffff);
      assert.deepEqual(s.stop(), [(65530 + 20) & 0xffff]);
    } finally {
      s.close();
    }
  });
});

test("disconnect and reconnect with the index replayed from GET_VRING_BASE", async (kind) => {
  await withSession(kind, { queues: 2 }, { queues: 2 }, async (s, b) => {
    for (let i = 0; i < 4; i++) s.blk.write(300 + i * 8, pattern(4096, 10 + i), i % 2);
    assert.deepEqual(s.stop(), [2, 2]);
    await s.reconnect(false);
    for (let i = 0; i < 4; i++) {
      const r = s.blk.read(300 + i * 8, 4096, (i + 1) % 2);
      assert.equal(r.status, BlkStatus.OK);
      assert.deepEqual(r.data, pattern(4096, 10 + i));
    }
    assert.deepEqual(s.stop(), [4, 4]);
    assert.deepEqual(readImage(b.image, 300 * SECTOR, 4096), pattern(4096, 10));
  });
});

// ---- requests -----------------------------------------------------------------------------

test("read/write round trip, data checked on the host image", async (kind) => {
  await withSession(kind, { queues: 1 }, {}, (s, b) => {
    // The image starts with a known pattern: reads see it.
    const head = s.blk.read(0, 8192);
    assert.equal(head.status, BlkStatus.OK);
    assert.equal(head.usedLen, head.expectedUsedLen, "used length = data + status byte");
    assert.deepEqual(head.data, readImage(b.image, 0, 8192));
    // A 64 KiB write split over 16 descriptors lands on the image at the right place.
    const data = pattern(65536, 5);
    const w = s.blk.run({ type: BlkRequestType.OUT, sector: 1024, out: data, dataSegments: 16 });
    assert.equal(w.status, BlkStatus.OK);
    assert.equal(w.usedLen, 1);
    assert.deepEqual(readImage(b.image, 1024 * SECTOR, 65536), data);
    const r = s.blk.run({ type: BlkRequestType.IN, sector: 1024, inBytes: 65536, dataSegments: 7 });
    assert.equal(r.status, BlkStatus.OK);
    assert.deepEqual(r.data, data);
    // The last sector of the device.
    const last = b.sizeBytes / SECTOR - 1;
    assert.equal(s.blk.write(last, pattern(512, 9)).status, BlkStatus.OK);
    assert.deepEqual(readImage(b.image, last * SECTOR, 512), pattern(512, 9));
  });
});

test("dirty log: while logging, reads mark the pages they filled and the used ring", async (kind) => {
  await withSession(kind, { queues: 1 }, {}, (s) => {
    const page = (gpa: number) => Math.floor(gpa / 4096) * 4096;
    const usedRing = s.queues[0].layout.used.gpa;
    const offered = s.offeredFeatures & bit(VirtioFeature.LOG_ALL);
    assert.notEqual(offered, 0n, "VHOST_F_LOG_ALL offered (else QEMU refuses to migrate)");
    assert.ok(s.hasProtocol(ProtocolFeature.LOG_SHMFD), "LOG_SHMFD negotiated");
    // Before logging starts, nothing is marked anywhere.
    assert.equal(s.blk.read(0, 8192).status, BlkStatus.OK);
    const log = s.startMigration();
    log.sync();
    const r = s.blk.run({
      type: BlkRequestType.IN,
      sector: 64,
      inBytes: 3 * 4096,
      dataSegments: 3,
    });
    assert.equal(r.status, BlkStatus.OK);
    const dirty = new Set(log.sync());
    for (let off = 0; off < 3 * 4096; off += 4096) {
      assert.ok(
        dirty.has(page(r.dataGpa + off)),
        `data page at 0x${(r.dataGpa + off).toString(16)}`,
      );
    }
    assert.ok(dirty.has(page(r.statusGpa)), "the status byte's page");
    assert.ok(dirty.has(page(usedRing)), "the used ring's page");
    // A write fills no guest buffer but its status byte.
    const w = s.blk.write(128, pattern(4096, 4));
    assert.equal(w.status, BlkStatus.OK);
    const afterWrite = new Set(log.sync());
    assert.ok(afterWrite.has(page(w.statusGpa)));
    // Logging off: nothing more is marked.
    s.stopMigration();
    assert.equal(s.blk.read(0, 4096).status, BlkStatus.OK);
  });
});

test("flush", async (kind) => {
  await withSession(kind, { queues: 1 }, {}, (s) => {
    assert.equal(s.blk.write(8, pattern(4096, 2)).status, BlkStatus.OK);
    const f = s.blk.flush();
    assert.equal(f.status, BlkStatus.OK);
    assert.equal(f.usedLen, 1);
  });
});

test("discard and write-zeroes: zeroes read back", async (kind) => {
  await withSession(kind, { queues: 1 }, {}, (s, b) => {
    for (const sector of [2048, 4096]) {
      assert.equal(s.blk.write(sector, pattern(65536, 3)).status, BlkStatus.OK);
    }
    const d = s.blk.discard([{ sector: 2048, sectors: 128 }]);
    assert.equal(d.status, BlkStatus.OK, "discard of one range");
    // Discarded data is unspecified; write-zeroes must read back as zeroes.
    const z = s.blk.writeZeroes([{ sector: 4096, sectors: 64 }]);
    assert.equal(z.status, BlkStatus.OK, "write-zeroes");
    const r = s.blk.read(4096, 65536);
    assert.deepEqual(r.data.subarray(0, 32768), new Uint8Array(32768));
    assert.deepEqual(r.data.subarray(32768), pattern(65536, 3).subarray(32768), "rest untouched");
    assert.deepEqual(readImage(b.image, 4096 * SECTOR, 32768), new Uint8Array(32768));
    if (s.config.writeZeroesMayUnmap) {
      const u = s.blk.writeZeroes([{ sector: 4160, sectors: 8 }], true);
      assert.equal(u.status, BlkStatus.OK, "write-zeroes with UNMAP");
      assert.deepEqual(readImage(b.image, 4160 * SECTOR, 4096), new Uint8Array(4096));
    }
  });
});

test("GET_ID returns the 20-byte serial", async (kind) => {
  await withSession(kind, { queues: 1 }, {}, (s) => {
    const id = s.blk.getId();
    assert.equal(id.status, BlkStatus.OK);
    assert.equal(id.usedLen, 21);
    const text = new TextDecoder().decode(id.data).replace(/\0.*$/s, "");
    assert.ok(text.length > 0, "a non-empty serial");
    const nul = id.data.indexOf(0);
    if (deviates(kind, "GET_ID_PARTIAL_WRITE")) {
      // The bytes after the NUL still hold what the driver put there (0x5a).
      assert.equal(text, "vhost_user_blk");
      assert.deepEqual([...id.data.subarray(nul + 1)], new Array(19 - nul).fill(0x5a));
    } else {
      assert.ok(nul < 0 || id.data.subarray(nul).every((x) => x === 0), "NUL-padded to 20");
    }
  });
});

test("read-only export refuses writes with IOERR", async (kind) => {
  await withSession(kind, { queues: 1, readOnly: true }, {}, (s, b) => {
    assert.ok(s.offeredFeatures & bit(5), "VIRTIO_BLK_F_RO offered");
    const before = readImage(b.image, 0, 4096);
    const w = s.blk.write(0, pattern(4096, 4));
    assert.equal(w.status, BlkStatus.IOERR);
    const z = s.blk.writeZeroes([{ sector: 0, sectors: 8 }]);
    assert.equal(z.status, BlkStatus.IOERR, "write-zeroes refused too");
    assert.deepEqual(readImage(b.image, 0, 4096), before, "image unchanged");
    assert.equal(s.blk.read(0, 4096).status, BlkStatus.OK, "reads still work");
  });
});

test("out-of-range sectors give IOERR", async (kind) => {
  await withSession(kind, { queues: 1 }, {}, (s, b) => {
    const sectors = b.sizeBytes / SECTOR;
    assert.equal(s.blk.read(sectors, 512).status, BlkStatus.IOERR, "read past the end");
    assert.equal(s.blk.read(sectors - 4, 4096).status, BlkStatus.IOERR, "read across the end");
    assert.equal(s.blk.write(sectors + 100, pattern(512, 1)).status, BlkStatus.IOERR);
    assert.equal(s.blk.read(2 ** 40, 512).status, BlkStatus.IOERR, "huge sector");
    assert.equal(s.blk.read(0, 512).status, BlkStatus.OK, "the queue still works");
  });
});

test("multi-queue: four queues busy at once", async (kind) => {
  await withSession(kind, { queues: 4 }, { queues: 4 }, (s, b) => {
    const pending = [];
    for (let round = 0; round < 8; round++) {
      for (let q = 0; q < 4; q++) {
        const sector = 8192 + (round * 4 + q) * 8;
        pending.push(s.blk.submit({
          type: BlkRequestType.OUT,
          sector,
          out: pattern(4096, round * 4 + q),
          queue: q,
        }));
      }
    }
    for (const p of pending) assert.equal(s.blk.wait(p).status, BlkStatus.OK);
    for (let i = 0; i < 32; i++) {
      assert.deepEqual(readImage(b.image, (8192 + i * 8) * SECTOR, 4096), pattern(4096, i));
    }
    assert.deepEqual(s.stop(), [8, 8, 8, 8]);
  });
});

test("indirect descriptors", async (kind) => {
  await withSession(kind, { queues: 1 }, { indirect: true }, (s, b) => {
    assert.ok(s.features & bit(VirtioFeature.RING_INDIRECT_DESC));
    const data = pattern(32768, 8);
    const w = s.blk.run({
      type: BlkRequestType.OUT,
      sector: 512,
      out: data,
      dataSegments: 8,
      indirect: true,
    });
    assert.equal(w.status, BlkStatus.OK);
    assert.deepEqual(readImage(b.image, 512 * SECTOR, 32768), data);
    const r = s.blk.run({
      type: BlkRequestType.IN,
      sector: 512,
      inBytes: 32768,
      dataSegments: 5,
      indirect: true,
    });
    assert.equal(r.status, BlkStatus.OK);
    assert.equal(r.usedLen, 32769);
    assert.deepEqual(r.data, data);
  });
});

test("EVENT_IDX: avail_event kept current, interrupt at used_event", async (kind) => {
  await withSession(kind, { queues: 1 }, { eventIdx: true }, (s) => {
    const q = s.queues[0];
    assert.ok(q.eventIdx, "EVENT_IDX negotiated");
    for (let i = 0; i < 5; i++) assert.equal(s.blk.read(i * 8, 4096).status, BlkStatus.OK);
    // Once idle, the device asks to be kicked for the next request: avail_event = its next avail
    // index. (A device that busy-polls sets it when its poll window closes, a moment later.)
    const until = Date.now() + 2000;
    while (q.availEvent !== 5 && Date.now() < until) sleepSync(1);
    assert.equal(q.availEvent, 5);
    // waitUsed only returns after a call: every request above got its interrupt (used_event
    // was always the next used index). Now a batch of four: one interrupt covers them.
    const ps = [0, 1, 2, 3].map((i) =>
      s.blk.submit({ type: BlkRequestType.IN, sector: i * 8, inBytes: 4096 })
    );
    for (const p of ps) assert.equal(s.blk.wait(p).status, BlkStatus.OK);
    assert.deepEqual(s.stop(), [9]);
  });
});

test("without EVENT_IDX: flags-based notification works", async (kind) => {
  await withSession(kind, { queues: 1 }, { eventIdx: false }, (s) => {
    assert.equal(s.features & bit(VirtioFeature.RING_EVENT_IDX), 0n);
    for (let i = 0; i < 5; i++) assert.equal(s.blk.read(i * 8, 4096).status, BlkStatus.OK);
    const until = Date.now() + 2000;
    while ((s.queues[0].usedFlags & 1) !== 0 && Date.now() < until) sleepSync(1);
    assert.equal(s.queues[0].usedFlags & 1, 0, "device wants kicks while idle");
  });
});

test("SET_MEM_TABLE path (CONFIGURE_MEM_SLOTS not negotiated)", async (kind) => {
  await withSession(kind, { queues: 1 }, { memSlots: false, record: true }, (s) => {
    assert.ok(s.sent.some((m) => m.request === Request.SET_MEM_TABLE));
    assert.ok(!s.sent.some((m) => m.request === Request.ADD_MEM_REG));
    assert.equal(s.blk.write(64, pattern(4096, 6)).status, BlkStatus.OK);
    assert.deepEqual(s.blk.read(64, 4096).data, pattern(4096, 6));
  });
});

test("hostile input: a message for a queue that does not exist is refused", async (kind) => {
  await withBackend(kind, { queues: 2 }, async (b) => {
    const s = await BlkFrontend.connect({ socket: b.socket, queues: 1 });
    let outcome: "nack" | "closed" | "acked";
    try {
      // SET_VRING_NUM for queue 7 of 2, with NEED_REPLY (REPLY_ACK is negotiated).
      s.conn.setVringNum(7, 128);
      outcome = s.conn.waitClosed(500) ? "closed" : "acked";
    } catch (e) {
      if (e instanceof NackError) outcome = "nack";
      else if (e instanceof PeerClosedError) outcome = "closed";
      else throw e;
    } finally {
      s.close();
    }
    // The spec has no valid meaning for a queue index past GET_QUEUE_NUM: refuse it.
    if (deviates(kind, "UNCHECKED_QUEUE_INDEX")) assert.equal(outcome, "acked");
    else assert.ok(outcome === "nack" || outcome === "closed", outcome);
    // Either way it still serves the next front-end.
    const t = await BlkFrontend.open({ socket: b.socket, queues: 1 });
    try {
      assert.equal(t.blk.read(0, 512).status, BlkStatus.OK);
    } finally {
      t.close();
    }
  });
});

// ---- the CLI tools against each back-end --------------------------------------------------

async function vhostd(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const o = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${REPO}daemon/main.ts`, ...args],
    cwd: REPO,
    stdin: "null",
  }).output();
  const dec = new TextDecoder();
  return { code: o.code, stdout: dec.decode(o.stdout), stderr: dec.decode(o.stderr) };
}

test("vhostd probe: capacity equals the image size", async (kind) => {
  await withBackend(kind, { queues: 3, sizeBytes: 40 << 20 }, async (b) => {
    const j = await vhostd(["probe", "--socket", b.socket, "--json"]);
    assert.equal(j.code, 0, j.stderr);
    const r = JSON.parse(j.stdout);
    assert.equal(r.blk.capacityBytes, b.sizeBytes);
    assert.equal(r.blk.capacitySectors, b.sizeBytes / SECTOR);
    assert.equal(r.queues, 3);
    assert.ok(r.featureNames.includes("VERSION_1"));
    assert.ok(r.protocolFeatureNames.includes("CONFIG"));
    assert.equal(r.blk.readOnly, false);
    const t = await vhostd(["probe", "--socket", b.socket]);
    assert.equal(t.code, 0, t.stderr);
    assert.match(t.stdout, new RegExp(`capacity\\s+${b.sizeBytes / SECTOR} sectors`));
    assert.match(t.stdout, /protocol features\s+0x[0-9a-f]+: .*MQ/);
  });
});

test("vhostd load: non-zero IOPS and zero errors in a short run", async (kind) => {
  await withBackend(kind, { queues: 2 }, async (b) => {
    const j = await vhostd([
      "load",
      "--socket",
      b.socket,
      "--queues",
      "2",
      "--depth",
      "8",
      "--rw",
      "rw",
      "--seconds",
      "1",
      "--json",
    ]);
    assert.equal(j.code, 0, j.stdout + j.stderr);
    const r = JSON.parse(j.stdout);
    assert.ok(r.iops > 0, `iops ${r.iops}`);
    assert.equal(r.errors, 0);
    assert.deepEqual(r.failures, []);
    assert.ok(r.latencyUs.p50 > 0 && r.latencyUs.p50 <= r.latencyUs.p99);
    assert.ok(r.latencyUs.p99 <= r.latencyUs.max * 1.07 + 0.01, "p99 within the max bucket");
    assert.equal(r.perQueue.length, 2);
  });
});

/** Blocks the thread for `ms` (the session's calls are synchronous). */
function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}
