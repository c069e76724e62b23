import assert from "node:assert/strict";
import { createEventFd, drainEventFd } from "../sys/event.ts";
import { createMemfd } from "../sys/mman.ts";
import { GuestMemory } from "./guest_memory.ts";
import { inflightQueueSize, InflightRegion } from "./inflight.ts";
import { DirtyLog } from "./dirty_log.ts";
import {
  SplitQueue,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VRING_USED_F_NO_NOTIFY,
} from "./split_queue.ts";

const GPA = 0x100000;
const UVA = 0x7f0000000000;
const SIZE = 1 << 20;
const QSIZE = 8;
// Guest-physical layout inside the one region.
const DESC = GPA;
const AVAIL = GPA + 0x1000;
const USED = GPA + 0x2000;
const DATA = GPA + 0x10000;

/** A guest with one memory region and one queue, written from the driver's side. */
class TestGuest {
  readonly memory = new GuestMemory();
  readonly queue = new SplitQueue(0, 256);
  readonly view: DataView;
  #availIdx = 0;

  constructor() {
    const fd = createMemfd("guest", SIZE);
    const region = this.memory.add(
      { guestPhysAddr: GPA, memorySize: SIZE, userspaceAddr: UVA, mmapOffset: 0 },
      fd,
    );
    this.view = region.view;
    const q = this.queue;
    q.configure(QSIZE);
    q.setAddresses({
      desc: UVA + (DESC - GPA),
      avail: UVA + (AVAIL - GPA),
      used: UVA + (USED - GPA),
    });
    assert.equal(q.attach(this.memory), null);
    q.start();
    q.enable(true);
    q.setFeatures(false, true);
  }

  desc(i: number, addr: number, len: number, flags: number, next = 0, table = DESC): void {
    const o = table - GPA + i * 16;
    this.view.setBigUint64(o, BigInt(addr), true);
    this.view.setUint32(o + 8, len, true);
    this.view.setUint16(o + 12, flags, true);
    this.view.setUint16(o + 14, next, true);
  }

  makeAvailable(head: number): void {
    this.view.setUint16(AVAIL - GPA + 4 + 2 * (this.#availIdx % QSIZE), head, true);
    this.#availIdx = (this.#availIdx + 1) & 0xffff;
    this.view.setUint16(AVAIL - GPA + 2, this.#availIdx, true);
  }

  setAvailIdx(idx: number): void {
    this.view.setUint16(AVAIL - GPA + 2, idx, true);
  }

  usedIdx(): number {
    return this.view.getUint16(USED - GPA + 2, true);
  }

  usedElem(i: number): [number, number] {
    const o = USED - GPA + 4 + 8 * i;
    return [this.view.getUint32(o, true), this.view.getUint32(o + 4, true)];
  }

  close(): void {
    this.queue.reset();
    this.memory.clear();
  }
}

function withGuest(fn: (g: TestGuest) => void): () => void {
  return () => {
    const g = new TestGuest();
    try {
      fn(g);
    } finally {
      g.close();
    }
  };
}

Deno.test(
  "a three-part blk-like chain is split into readable and writable segments",
  withGuest((g) => {
    g.desc(0, DATA, 16, VIRTQ_DESC_F_NEXT, 1);
    g.desc(1, DATA + 0x1000, 4096, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2);
    g.desc(2, DATA + 0x3000, 1, VIRTQ_DESC_F_WRITE);
    g.makeAvailable(0);
    const c = g.queue.pop();
    assert.ok(c);
    assert.equal(c.head, 0);
    assert.equal(c.readableCount, 1);
    assert.equal(c.writableCount, 2);
    assert.equal(c.readableBytes, 16);
    assert.equal(c.writableBytes, 4097);
    assert.equal(g.queue.pop(), null, "ring is empty afterwards");
  }),
);

Deno.test(
  "chain accessors copy across segment boundaries and stay inside the chain",
  withGuest((g) => {
    g.desc(0, DATA, 3, VIRTQ_DESC_F_NEXT, 1);
    g.desc(1, DATA + 0x100, 5, VIRTQ_DESC_F_NEXT, 2);
    g.desc(2, DATA + 0x200, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 3);
    g.desc(3, DATA + 0x300, 4, VIRTQ_DESC_F_WRITE);
    const bytes = [1, 2, 3];
    bytes.forEach((b, i) => g.view.setUint8(DATA - GPA + i, b));
    [4, 5, 6, 7, 8].forEach((b, i) => g.view.setUint8(DATA - GPA + 0x100 + i, b));
    g.makeAvailable(0);
    const c = g.queue.pop()!;
    const got = new Uint8Array(6);
    assert.equal(c.read(got, 1), 6);
    assert.deepEqual([...got], [2, 3, 4, 5, 6, 7]);
    assert.equal(c.write(new Uint8Array([9, 9, 9, 9, 9, 9, 9, 9, 9, 9])), 8, "stops at the end");
    assert.equal(g.view.getUint8(DATA - GPA + 0x303), 9);
    assert.equal(g.view.getUint8(DATA - GPA + 0x304), 0, "nothing written past the chain");
    assert.equal(c.writeByte(8, 1), false);
    assert.equal(c.writeByte(7, 42), true);
    assert.equal(g.view.getUint8(DATA - GPA + 0x303), 42);
  }),
);

Deno.test(
  "push publishes the used element and index",
  withGuest((g) => {
    g.desc(3, DATA, 8, VIRTQ_DESC_F_WRITE);
    g.makeAvailable(3);
    const c = g.queue.pop()!;
    g.queue.push(c, 5);
    assert.equal(g.usedIdx(), 1);
    assert.deepEqual(g.usedElem(0), [3, 5]);
  }),
);

Deno.test(
  "an indirect table is followed",
  withGuest((g) => {
    const table = DATA + 0x8000;
    g.desc(0, DATA, 16, VIRTQ_DESC_F_NEXT, 1, table);
    g.desc(1, DATA + 0x1000, 512, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2, table);
    g.desc(2, DATA + 0x2000, 1, VIRTQ_DESC_F_WRITE, 0, table);
    g.desc(5, table, 48, VIRTQ_DESC_F_INDIRECT);
    g.makeAvailable(5);
    const c = g.queue.pop();
    assert.ok(c);
    assert.equal(c.head, 5);
    assert.equal(c.segmentCount, 3);
    assert.equal(c.writableBytes, 513);
  }),
);

/** Hostile chains: each must break the queue (and signal the error fd), never touch memory. */
const hostile: [string, (g: TestGuest) => void, RegExp][] = [
  ["a descriptor loop", (g) => {
    g.desc(0, DATA, 8, VIRTQ_DESC_F_NEXT, 1);
    g.desc(1, DATA, 8, VIRTQ_DESC_F_NEXT, 0);
    g.makeAvailable(0);
  }, /loops/],
  ["a buffer outside guest memory", (g) => {
    g.desc(0, GPA + SIZE - 4, 8, 0);
    g.makeAvailable(0);
  }, /outside guest memory/],
  ["a buffer below guest memory", (g) => {
    g.desc(0, GPA - 8, 16, 0);
    g.makeAvailable(0);
  }, /outside guest memory/],
  ["an address above 2^53", (g) => {
    g.desc(0, 0, 8, 0);
    g.view.setBigUint64(DESC - GPA, 0xfffffffffffff000n, true);
    g.makeAvailable(0);
  }, /outside guest memory/],
  ["a head index out of range", (g) => g.makeAvailable(QSIZE + 3), /head descriptor/],
  ["a next index out of range", (g) => {
    g.desc(0, DATA, 8, VIRTQ_DESC_F_NEXT, 200);
    g.makeAvailable(0);
  }, /next descriptor/],
  ["indirect inside indirect", (g) => {
    const table = DATA + 0x8000;
    g.desc(0, table, 32, VIRTQ_DESC_F_INDIRECT, 0, table);
    g.desc(1, DATA, 8, 0);
    g.desc(2, table, 32, VIRTQ_DESC_F_INDIRECT);
    g.makeAvailable(2);
  }, /indirect descriptor inside/],
  ["an indirect table of bad length", (g) => {
    g.desc(0, DATA, 20, VIRTQ_DESC_F_INDIRECT);
    g.makeAvailable(0);
  }, /bad length/],
  ["an indirect table outside memory", (g) => {
    g.desc(0, GPA + SIZE - 16, 32, VIRTQ_DESC_F_INDIRECT);
    g.makeAvailable(0);
  }, /outside guest memory/],
  ["a loop inside an indirect table", (g) => {
    const table = DATA + 0x8000;
    g.desc(0, DATA, 8, VIRTQ_DESC_F_NEXT, 1, table);
    g.desc(1, DATA, 8, VIRTQ_DESC_F_NEXT, 0, table);
    g.desc(0, table, 32, VIRTQ_DESC_F_INDIRECT);
    g.makeAvailable(0);
  }, /loops/],
  ["a readable buffer after a writable one", (g) => {
    g.desc(0, DATA, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1);
    g.desc(1, DATA, 8, 0);
    g.makeAvailable(0);
  }, /readable buffer after/],
  ["an available index that jumps by more than the queue size", (g) => {
    g.setAvailIdx(QSIZE + 1);
  }, /jumped/],
  ["a zero-length descriptor", (g) => {
    g.desc(0, DATA, 0, VIRTQ_DESC_F_NEXT, 1);
    g.desc(1, DATA, 8, VIRTQ_DESC_F_WRITE);
    g.makeAvailable(0);
  }, /length 0/],
  ["an indirect table far longer than the queue, walked link by link", (g) => {
    // 4096 one-byte buffers chained in one table: the budget is the queue's (and at least the
    // 128 a block request needs), never the table's length.
    const table = DATA + 0x10000;
    for (let i = 0; i < 4096; i++) g.desc(i, DATA, 1, VIRTQ_DESC_F_NEXT, i + 1, table);
    g.desc(0, table, 4096 * 16, VIRTQ_DESC_F_INDIRECT);
    g.makeAvailable(0);
  }, /loops or is longer than the queue/],
  ["a buffer at guest address 2^53 - 1 in a region that ends at 2^53", (g) => {
    // A sum near 2^53 rounds; the bounds check must not let the byte past the end through.
    const top = 2 ** 53;
    g.memory.add(
      { guestPhysAddr: top - SIZE, memorySize: SIZE, userspaceAddr: UVA + 2 * SIZE, mmapOffset: 0 },
      createMemfd("top", SIZE),
    );
    g.desc(0, top - 1, 2, VIRTQ_DESC_F_WRITE);
    g.makeAvailable(0);
  }, /outside guest memory|above 2\^53/],
];

for (const [what, build, message] of hostile) {
  Deno.test(
    `hostile guest: ${what} breaks only the queue`,
    withGuest((g) => {
      const err = createEventFd();
      try {
        g.queue.setErrFd(err);
        build(g);
        assert.equal(g.queue.pop(), null);
        assert.ok(g.queue.broken);
        assert.match(g.queue.error, message);
        assert.equal(drainEventFd(err), 1, "the front-end was told through the error eventfd");
        assert.equal(g.queue.ready, false);
        assert.equal(g.usedIdx(), 0, "nothing was completed");
      } finally {
        g.queue.setErrFd(-1);
      }
    }),
  );
}

Deno.test(
  "indirect descriptors are refused unless negotiated",
  withGuest((g) => {
    g.queue.setFeatures(false, false);
    g.desc(0, DATA, 32, VIRTQ_DESC_F_INDIRECT);
    g.makeAvailable(0);
    assert.equal(g.queue.pop(), null);
    assert.match(g.queue.error, /without VIRTIO_F_INDIRECT_DESC/);
  }),
);

Deno.test(
  "a chain longer than 4 GiB is refused",
  () => {
    const memory = new GuestMemory();
    const big = 5 * 2 ** 30;
    memory.add(
      { guestPhysAddr: 0, memorySize: big, userspaceAddr: UVA, mmapOffset: 0 },
      createMemfd("big", big),
    );
    const q = new SplitQueue(0, 256);
    try {
      q.configure(4);
      q.setAddresses({ desc: UVA, avail: UVA + 0x1000, used: UVA + 0x2000 });
      assert.equal(q.attach(memory), null);
      q.start();
      q.enable(true);
      const v = memory.regions[0].view;
      const desc = (i: number, addr: number, len: number, flags: number, next: number) => {
        v.setBigUint64(i * 16, BigInt(addr), true);
        v.setUint32(i * 16 + 8, len, true);
        v.setUint16(i * 16 + 12, flags, true);
        v.setUint16(i * 16 + 14, next, true);
      };
      desc(0, 0x10000, 0xffffffff, VIRTQ_DESC_F_NEXT, 1);
      desc(1, 0x10000, 0xffffffff, 0, 0);
      v.setUint16(0x1000 + 4, 0, true);
      v.setUint16(0x1000 + 2, 1, true);
      assert.equal(q.pop(), null);
      assert.match(q.error, /longer than 4 GiB/);
    } finally {
      q.reset();
      memory.clear();
    }
  },
);

Deno.test(
  "without EVENT_IDX, NO_NOTIFY and NO_INTERRUPT flags are honoured",
  withGuest((g) => {
    const call = createEventFd();
    try {
      g.queue.setCallFd(call);
      g.queue.disableNotification();
      assert.equal(g.view.getUint16(USED - GPA, true), VRING_USED_F_NO_NOTIFY);
      g.desc(0, DATA, 8, VIRTQ_DESC_F_WRITE);
      g.makeAvailable(0);
      assert.equal(g.queue.enableNotification(), true, "reports the chain that arrived");
      assert.equal(g.view.getUint16(USED - GPA, true), 0);
      g.queue.push(g.queue.pop()!, 0);
      g.queue.notify();
      assert.equal(drainEventFd(call), 1);
      g.view.setUint16(AVAIL - GPA, 1, true); // VRING_AVAIL_F_NO_INTERRUPT
      g.makeAvailable(0);
      g.queue.push(g.queue.pop()!, 0);
      g.queue.notify();
      assert.equal(drainEventFd(call), 0, "driver asked for no interrupt");
    } finally {
      g.queue.setCallFd(-1);
    }
  }),
);

Deno.test(
  "with EVENT_IDX, interrupts follow used_event and kicks follow avail_event",
  withGuest((g) => {
    const call = createEventFd();
    try {
      g.queue.setFeatures(true, true);
      g.queue.setCallFd(call);
      const usedEvent = (v: number) => g.view.setUint16(AVAIL - GPA + 4 + 2 * QSIZE, v, true);
      const complete = () => {
        g.desc(0, DATA, 8, VIRTQ_DESC_F_WRITE);
        g.makeAvailable(0);
        g.queue.push(g.queue.pop()!, 0);
      };
      complete();
      g.queue.notify();
      assert.equal(drainEventFd(call), 1, "first notification always goes out");
      usedEvent(2); // interrupt me when used idx passes 2, i.e. becomes 3
      complete(); // used idx 2
      g.queue.notify();
      assert.equal(drainEventFd(call), 0);
      complete(); // used idx 3
      g.queue.notify();
      assert.equal(drainEventFd(call), 1);
      g.queue.enableNotification();
      assert.equal(g.view.getUint16(USED - GPA + 4 + 8 * QSIZE, true), 3, "avail_event published");
    } finally {
      g.queue.setCallFd(-1);
    }
  }),
);

Deno.test("ring parts outside guest memory are refused at attach", () => {
  const memory = new GuestMemory();
  memory.add(
    { guestPhysAddr: 0, memorySize: 65536, userspaceAddr: UVA, mmapOffset: 0 },
    createMemfd("m", 65536),
  );
  const q = new SplitQueue(1, 256);
  try {
    q.configure(256);
    q.setAddresses({ desc: UVA + 65536 - 16, avail: UVA, used: UVA + 0x1000 });
    assert.match(q.attach(memory) ?? "", /descriptor table .* outside guest memory/);
    q.setAddresses({ desc: UVA, avail: UVA + 0x1001, used: UVA + 0x2000 });
    assert.match(q.attach(memory) ?? "", /misaligned/);
    const empty = new GuestMemory();
    assert.match(q.attach(empty) ?? "", /memory-backend-memfd,id=mem,size=<RAM>,share=on/);
  } finally {
    memory.clear();
  }
});

Deno.test(
  "inflight tracking: a restarted back-end resubmits what the dead one took, oldest first",
  withGuest((g) => {
    const buf = new DataView(new ArrayBuffer(inflightQueueSize(QSIZE)));
    g.queue.trackInflight(new InflightRegion(buf, 0, QSIZE));
    assert.equal(g.queue.start(), 0, "a fresh buffer has nothing pending");
    for (const head of [4, 1, 6]) {
      g.desc(head, DATA + head * 64, 8, VIRTQ_DESC_F_WRITE);
      g.makeAvailable(head);
    }
    const taken = [g.queue.pop()!.head, g.queue.pop()!.head, g.queue.pop()!.head];
    assert.deepEqual(taken, [4, 1, 6]);
    g.queue.pushHead(1, 8); // completed out of order; 4 and 6 die with the back-end

    // A new back-end process: fresh queue state, same guest memory and inflight buffer.
    const q = new SplitQueue(0, 256);
    q.configure(QSIZE);
    q.setAddresses(g.queue.addresses!);
    assert.equal(q.attach(g.memory), null);
    q.enable(true);
    q.setFeatures(false, true);
    q.setBase(1); // what QEMU restores: the used index
    q.trackInflight(new InflightRegion(buf, 0, QSIZE));
    assert.equal(q.start(), 2);
    assert.equal(q.lastAvailIdx, 3, "new requests start after the three taken ones");
    assert.deepEqual([q.pop()!.head, q.pop()!.head], [4, 6]);
    assert.equal(q.pop(), null);
    q.pushHead(6, 8);
    q.pushHead(4, 8);
    const again = new SplitQueue(0, 256);
    again.configure(QSIZE);
    again.setAddresses(g.queue.addresses!);
    again.attach(g.memory);
    again.trackInflight(new InflightRegion(buf, 0, QSIZE));
    assert.equal(again.start(), 0, "nothing pending once all were completed");
  }),
);

Deno.test(
  "dirty logging: completed chains mark the buffers the device wrote and the used ring",
  withGuest((g) => {
    const log = new DirtyLog();
    try {
      log.map(createMemfd("log", 4096), 4096, 0);
      const page = (gpa: number) => Math.floor(gpa / 4096);
      // Readable header on one page, writable data over two more.
      g.desc(0, DATA, 16, VIRTQ_DESC_F_NEXT, 1);
      g.desc(1, DATA + 0x3000, 0x1800, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2);
      g.desc(2, DATA + 0x6000, 1, VIRTQ_DESC_F_WRITE);
      g.makeAvailable(0);
      // Off: nothing is marked.
      g.queue.push(g.queue.pop()!, 1);
      assert.equal([...Array(1024).keys()].some((p) => log.isMarked(p)), false);
      // On, with the used ring logged at its guest address.
      g.queue.logWrites(log);
      g.queue.logUsedRingAt(USED);
      g.makeAvailable(0);
      g.queue.push(g.queue.pop()!, 0x1801);
      const marked = [...Array(1024).keys()].filter((p) => log.isMarked(p));
      assert.deepEqual(marked, [
        page(USED),
        page(DATA + 0x3000),
        page(DATA + 0x4000),
        page(DATA + 0x6000),
      ]);
      assert.equal(log.isMarked(page(DATA)), false, "the readable header was not written");
    } finally {
      log.close();
    }
  }),
);

Deno.test(
  "dirty logging: a chain completed by head index (async I/O) is walked again and marked",
  withGuest((g) => {
    const log = new DirtyLog();
    try {
      log.map(createMemfd("log", 4096), 4096, 0);
      const table = DATA + 0x8000;
      g.desc(0, DATA + 0x20000, 512, VIRTQ_DESC_F_WRITE, 0, table);
      g.desc(3, table, 16, VIRTQ_DESC_F_INDIRECT);
      g.makeAvailable(3);
      const head = g.queue.pop()!.head;
      g.queue.logWrites(log);
      g.queue.pushHead(head, 512);
      assert.ok(log.isMarked(Math.floor((DATA + 0x20000) / 4096)));
      assert.equal(g.usedElem(0)[0], 3);
    } finally {
      log.close();
    }
  }),
);

Deno.test(
  "dirty logging: a queue waiting for the log is not ready until the log comes",
  withGuest((g) => {
    const log = new DirtyLog();
    try {
      log.map(createMemfd("log", 4096), 4096, 0);
      assert.equal(g.queue.ready, true);
      g.queue.awaitLog();
      assert.equal(g.queue.ready, false);
      g.queue.logWrites(log);
      assert.equal(g.queue.ready, true);
      assert.equal(g.queue.logging, true);
    } finally {
      log.close();
    }
  }),
);

Deno.test(
  "a chain given back (unpop) is popped again; a count beyond the chains out is refused",
  withGuest((g) => {
    for (const head of [2, 5]) {
      g.desc(head, DATA + head * 64, 8, VIRTQ_DESC_F_WRITE);
      g.makeAvailable(head);
    }
    assert.equal(g.queue.pop()!.head, 2);
    assert.equal(g.queue.pop()!.head, 5);
    g.queue.unpop(1);
    assert.equal(g.queue.pop()!.head, 5, "the chain given back comes first");
    g.queue.pushHead(2, 8);
    assert.throws(() => g.queue.unpop(2), RangeError, "only one chain is still out");
    assert.throws(() => g.queue.unpop(-1), RangeError);
    assert.throws(() => g.queue.unpop(0.5), RangeError);
    assert.equal(g.queue.inFlight, 1, "a refused give-back changes nothing");
    g.queue.trackInflight(
      new InflightRegion(new DataView(new ArrayBuffer(inflightQueueSize(QSIZE))), 0, QSIZE),
    );
    assert.throws(() => g.queue.unpop(1), /inflight/, "inflight tracking already records it");
  }),
);

Deno.test(
  "used elements pushed without publishing become visible together at publishUsed",
  withGuest((g) => {
    for (const head of [0, 1, 2]) {
      g.desc(head, DATA + head * 64, 8, VIRTQ_DESC_F_WRITE);
      g.makeAvailable(head);
    }
    const heads = [g.queue.pop()!.head, g.queue.pop()!.head, g.queue.pop()!.head];
    for (const head of heads) g.queue.pushHead(head, 4, false);
    assert.equal(g.usedIdx(), 0, "the driver sees none yet");
    g.queue.publishUsed();
    assert.equal(g.usedIdx(), 3);
    assert.deepEqual([0, 1, 2].map((i) => g.usedElem(i)), [[0, 4], [1, 4], [2, 4]]);
  }),
);

Deno.test(
  "kickSelf signals the queue's own kick fd, and reports a stopped queue",
  withGuest((g) => {
    assert.equal(g.queue.kickSelf(), false, "no kick fd yet");
    const kick = createEventFd();
    g.queue.setKickFd(kick);
    assert.equal(g.queue.kickSelf(), true);
    assert.equal(drainEventFd(kick), 1);
    g.queue.stop();
    assert.equal(g.queue.started, false);
    assert.equal(g.queue.kickFd, -1, "stopping closes the kick fd");
    assert.equal(g.queue.kickSelf(), false);
  }),
);

Deno.test("configure refuses sizes the ring or the inflight region cannot hold", () => {
  const q = new SplitQueue(0, 256);
  for (const bad of [0, 3, 512, 2 ** 32 - 1]) {
    assert.throws(() => q.configure(bad), RangeError, `size ${bad}`);
  }
  assert.equal(q.size, 0, "a refused size changes nothing");
  q.trackInflight(new InflightRegion(new DataView(new ArrayBuffer(inflightQueueSize(64))), 0, 64));
  assert.throws(() => q.configure(128), /larger than the inflight buffer's 64/);
  q.configure(64);
  assert.equal(q.size, 64);
});

Deno.test("a queue costs its per-request buffers only once configured, sized to that size", () => {
  // Many of a device's queues are never used (a Linux guest enables one per vCPU): they must not
  // hold buffers sized for the largest queue. ArrayBuffers count in `external`, exactly.
  const before = Deno.memoryUsage().external;
  const queues = Array.from({ length: 256 }, (_, i) => new SplitQueue(i, 1024));
  const unconfigured = Deno.memoryUsage().external - before;
  assert.ok(unconfigured < 256 * 1024, `256 unconfigured queues hold ${unconfigured} bytes`);
  assert.equal(queues[0].pop(), null, "an unconfigured queue has nothing to pop");
  for (const q of queues) q.configure(128);
  const configured = Deno.memoryUsage().external - before;
  // The chain object keeps room for the longest chain (indirect tables may exceed the queue size);
  // the per-head bookkeeping follows the negotiated 128, not the maximum 1024.
  assert.ok(configured < 256 * 24 * 1024, `256 queues of 128 hold ${configured} bytes`);
});
