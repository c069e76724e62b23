/**
 * A hostile guest: rings a driver would never build, on the block device, a switch port or the
 * console. Chains with buffers outside guest RAM, zero-length or absurdly long descriptors,
 * loops, indices past the ring, indirect tables that are huge, nested or outside RAM, available
 * indices that jump, rings that overlap or move, all mixed with correct requests.
 *
 * Whatever a queue gets, the daemon may stop that queue (and tell the front-end through its error
 * eventfd) or serve it; the device's other queues must go on serving, which each case checks.
 *
 * @module
 */

import { drainEventFd } from "../../sys/event.ts";
import type { DriverQueue } from "../../vhost-user/frontend/driver_queue.ts";
import {
  type CaseOutcome,
  type FuzzContext,
  FuzzFinding,
  KINDS,
  sleep,
  unlessDropped,
} from "./case.ts";
import { DescFlag, RawGuest } from "./raw_guest.ts";
import type { Rng } from "./rng.ts";

const MiB = 1 << 20;
/** Guest-physical addresses no RAM is at (the default layout: 16 MiB at 0, 48 MiB at 4 GiB). */
const OUTSIDE: readonly (number | bigint)[] = [
  16 * MiB,
  0x2000_0000,
  0xffff_f000,
  0x1_0000_0000 + 48 * MiB,
  2 ** 40,
  2 ** 52,
  2n ** 63n,
  2n ** 64n - 4096n,
];
/** Lengths, from none to absurd. */
const LENGTHS = [0, 1, 12, 512, 4096, 65536, 64 * MiB, 2 ** 31, 0xffff_ffff];

/** Builds one kind of bad input on queue `q` (the caller publishes it and kicks). */
type Corruption = (g: RawGuest, q: DriverQueue, rng: Rng) => void;

/**
 * Corruptions after which the device may write, as told, into other parts of guest RAM (rings
 * that overlap, random descriptors): other queues' rings among them, which is the guest's own
 * doing. After those, the other queues are not held to serving.
 */
const UNCONTAINED = new Set(["rings that overlap", "a descriptor table of random bytes"]);

/** A buffer somewhere in the guest's scratch area. */
function buffer(g: RawGuest, rng: Rng): number {
  return g.data.gpa + 512 * rng.below(120);
}

/** Random descriptor flags: mostly plain, sometimes anything. */
function flags(rng: Rng, next: boolean): number {
  const f = (rng.chance(0.5) ? DescFlag.WRITE : 0) | (next ? DescFlag.NEXT : 0);
  return rng.chance(0.9) ? f : rng.u32() & 0xffff;
}

/**
 * Writes a chain of `segs` at descriptors `first`, `first + 1`, ... (wrapping round the table,
 * so a chain longer than the queue loops) and offers its head.
 */
function chain(
  g: RawGuest,
  q: DriverQueue,
  first: number,
  segs: readonly { gpa: number | bigint; len: number; flags: number }[],
): void {
  segs.forEach((s, k) => {
    const last = k === segs.length - 1;
    const f = last ? s.flags & ~DescFlag.NEXT : s.flags | DescFlag.NEXT;
    g.desc(q, first + k, s.gpa, s.len, f, (first + k + 1) & (q.size - 1));
  });
  g.offer(q, first & (q.size - 1));
}

/** A chain of `n` plausible segments with one bad one among them. */
function withBadSegment(
  g: RawGuest,
  q: DriverQueue,
  rng: Rng,
  bad: { gpa: number | bigint; len: number; flags: number },
): void {
  const n = 1 + rng.below(3);
  const segs: { gpa: number | bigint; len: number; flags: number }[] = Array.from(
    { length: n },
    () => ({ gpa: buffer(g, rng), len: 512, flags: flags(rng, true) }),
  );
  segs.splice(rng.below(n + 1), 0, bad);
  chain(g, q, rng.below(q.size), segs);
}

/** Room for an indirect table of `entries` entries (at most 1 MiB), in the scratch region. */
function table(g: RawGuest, entries: number): { gpa: number; offset: number } {
  const b = g.ram.alloc(16 * Math.min(entries, 65536), 16);
  return { gpa: b.gpa, offset: b.offset };
}

const CORRUPTIONS: readonly [string, Corruption][] = [
  ["a buffer outside guest RAM", (g, q, rng) => {
    withBadSegment(g, q, rng, {
      gpa: rng.pick(OUTSIDE),
      len: rng.pick(LENGTHS),
      flags: flags(rng, true),
    });
  }],
  ["a buffer straddling the end of a region", (g, q, rng) => {
    const end = rng.chance(0.5) ? 16 * MiB : 0x1_0000_0000 + 48 * MiB;
    withBadSegment(g, q, rng, { gpa: end - 1 - rng.below(4096), len: 4096, flags: 0 });
  }],
  ["zero-length descriptors", (g, q, rng) => {
    const n = 1 + rng.below(4);
    const segs = Array.from({ length: n }, () => ({
      gpa: rng.chance(0.5) ? 0 : buffer(g, rng),
      len: rng.chance(0.7) ? 0 : 512,
      flags: flags(rng, true),
    }));
    chain(g, q, rng.below(q.size), segs);
  }],
  ["huge lengths", (g, q, rng) => {
    withBadSegment(g, q, rng, { gpa: buffer(g, rng), len: rng.pick(LENGTHS), flags: 0 });
  }],
  ["a descriptor loop", (g, q, rng) => {
    const a = rng.below(q.size), b = rng.below(q.size);
    g.desc(q, a, buffer(g, rng), 512, DescFlag.NEXT, b);
    g.desc(q, b, buffer(g, rng), 512, DescFlag.NEXT | DescFlag.WRITE, a);
    g.offer(q, a);
  }],
  ["a chain longer than the ring", (g, q, rng) => {
    const n = q.size + 1 + rng.below(2 * q.size + 200);
    const segs = Array.from({ length: n }, () => ({ gpa: buffer(g, rng), len: 16, flags: 0 }));
    chain(g, q, rng.below(q.size), segs);
  }],
  ["a next index past the table", (g, q, rng) => {
    const a = rng.below(q.size);
    g.desc(q, a, buffer(g, rng), 512, DescFlag.NEXT, q.size + rng.below(65536 - q.size));
    g.offer(q, a);
  }],
  ["a head index past the ring", (g, q, rng) => {
    g.offer(q, q.size + rng.below(65536 - q.size));
  }],
  ["an available index that jumps", (g, q, rng) => {
    g.validRequest(q);
    q.availIdx = (q.availIdx + q.size + 1 + rng.below(60000)) & 0xffff;
  }],
  ["an available index that goes back", (g, q, rng) => {
    g.validRequest(q);
    q.publish();
    q.kickNow();
    q.availIdx = (q.availIdx - 1 - rng.below(q.size + 2)) & 0xffff;
  }],
  ["an indirect table outside guest RAM", (g, q, rng) => {
    const len = 16 * (1 + rng.below(8));
    g.desc(q, 0, rng.pick(OUTSIDE), len, DescFlag.INDIRECT, 0);
    g.offer(q, 0);
  }],
  ["an indirect table of a length that is not whole entries", (g, q, rng) => {
    const t = table(g, 4);
    g.entry(t.offset, buffer(g, rng), 512, 0, 0);
    g.desc(q, 0, t.gpa, rng.pick([0, 1, 8, 15, 17, 33]), DescFlag.INDIRECT, 0);
    g.offer(q, 0);
  }],
  ["a huge indirect table", (g, q, rng) => {
    const entries = rng.pick([129, 1024, 4096, 65536, 2 ** 20, 2 ** 27]);
    const t = table(g, entries);
    // Its first entries chain on, then what follows is whatever RAM holds (zeros).
    const filled = Math.min(entries, 64 + rng.below(300));
    for (let k = 0; k < filled; k++) {
      const next = rng.chance(0.95) ? k + 1 : rng.below(entries);
      g.entry(t.offset + 16 * k, buffer(g, rng), 64, flags(rng, true), next);
    }
    g.desc(q, 0, t.gpa, Math.min(16 * entries, 0xffff_fff0), DescFlag.INDIRECT, 0);
    g.offer(q, 0);
  }],
  ["an indirect table inside an indirect table", (g, q, rng) => {
    const outer = table(g, 2), inner = table(g, 2);
    g.entry(inner.offset, buffer(g, rng), 512, 0, 0);
    g.entry(outer.offset, inner.gpa, 32, DescFlag.INDIRECT | (rng.chance(0.5) ? 1 : 0), 1);
    g.entry(outer.offset + 16, buffer(g, rng), 1, DescFlag.WRITE, 0);
    g.desc(q, 0, outer.gpa, 32, DescFlag.INDIRECT, 0);
    g.offer(q, 0);
  }],
  ["an indirect descriptor that also chains on", (g, q, rng) => {
    const t = table(g, 2);
    g.entry(t.offset, buffer(g, rng), 512, 0, 0);
    g.desc(q, 0, t.gpa, 16, DescFlag.INDIRECT | DescFlag.NEXT | flags(rng, false), 1);
    g.desc(q, 1, buffer(g, rng), 1, DescFlag.WRITE, 0);
    g.offer(q, 0);
  }],
  ["indirect entries outside guest RAM or looping", (g, q, rng) => {
    const n = 2 + rng.below(6);
    const t = table(g, n);
    for (let k = 0; k < n; k++) {
      const gpa = rng.chance(0.3) ? rng.pick(OUTSIDE) : buffer(g, rng);
      g.entry(t.offset + 16 * k, gpa, rng.pick(LENGTHS), flags(rng, true), rng.below(n + 2));
    }
    g.desc(q, 0, t.gpa, 16 * n, DescFlag.INDIRECT, 0);
    g.offer(q, 0);
  }],
  ["readable buffers after writable ones", (g, q, rng) => {
    const segs = [
      { gpa: buffer(g, rng), len: 16, flags: DescFlag.WRITE },
      { gpa: buffer(g, rng), len: 512, flags: 0 },
      { gpa: buffer(g, rng), len: 1, flags: DescFlag.WRITE },
    ];
    chain(g, q, rng.below(q.size), segs);
  }],
  ["a descriptor table of random bytes", (g, q, rng) => {
    g.ram.u8.set(rng.bytes(16 * q.size), q.layout.desc.offset);
    for (let n = 1 + rng.below(4); n > 0; n--) g.offer(q, rng.below(q.size + 4));
  }],
  ["random notification fields", (g, q, rng) => {
    // avail->flags and used_event (the driver's), and what the device keeps in the used ring.
    g.ram.u16[q.layout.avail.offset >> 1] = rng.u32() & 0xffff;
    g.ram.u16[(q.layout.avail.offset + 4 + 2 * q.size) >> 1] = rng.u32() & 0xffff;
    g.ram.u8.set(rng.bytes(4), q.layout.used.offset);
    g.validRequest(q);
  }],
  ["rings that overlap", (g, q, rng) => {
    const a = q.vringAddr();
    const moved = rng.chance(0.5) ? { ...a, used: a.desc } : { ...a, avail: a.used };
    g.conn.setVringAddr(moved);
    g.validRequest(q);
  }],
  ["a ring moved outside guest RAM", (g, q, rng) => {
    const a = q.vringAddr();
    const end = g.ram.regions[1].userspaceAddr + g.ram.regions[1].memorySize;
    const at = rng.pick([end - 8, end + 4096, 1, a.desc + 1, 2 ** 47]);
    const part = rng.pick(["desc", "avail", "used"] as const);
    g.conn.setVringAddr({ ...a, [part]: at });
  }],
  ["a ring restarted at a random index", (g, q, rng) => {
    g.validRequest(q);
    g.conn.getVringBase(q.index);
    g.conn.setVringBase(q.index, rng.u32() & 0xffff);
    g.conn.setVringKick(q.index, q.layout.kickFd);
  }],
];

/** Corrupts one or more queues of one device; the others must keep serving. */
export async function ringCase(rng: Rng, ctx: FuzzContext): Promise<CaseOutcome> {
  const kind = rng.pick(KINDS);
  const g = await RawGuest.open(ctx.sockets[kind], kind, rng);
  try {
    return await unlessDropped(async () => {
      const victims = g.queues.filter(() => rng.chance(0.3));
      if (victims.length === 0) victims.push(rng.pick(g.queues));
      const what: string[] = [];
      let contained = true;
      for (const q of victims) {
        const [name, corrupt] = rng.pick(CORRUPTIONS);
        what.push(`queue ${q.index}: ${name}`);
        if (UNCONTAINED.has(name)) contained = false;
        if (rng.chance(0.3)) g.validRequest(q);
        corrupt(g, q, rng);
        if (rng.chance(0.3)) g.validRequest(q);
        q.publish();
        q.kickNow();
      }
      // Receive queues see their chains only when there is something to receive.
      if (kind === "net") ctx.poke();
      await settle(g, victims);
      g.conn.sync();
      let broken = false;
      for (const q of victims) broken = drainEventFd(q.layout.errFd) > 0 || broken;
      for (const q of g.queues) {
        if (!contained || victims.includes(q) || !g.sends(q)) continue;
        if (g.serve(q) === false) {
          throw new FuzzFinding(
            `${kind} queue ${q.index} stopped serving after ${what.join("; ")}`,
          );
        }
      }
      return broken ? "broken" : "survived";
    });
  } finally {
    g.close();
  }
}

/** Waits briefly until every victim queue was consumed from or stopped. */
async function settle(g: RawGuest, victims: readonly DriverQueue[]): Promise<void> {
  const before = victims.map((q) => q.lastUsedIdx);
  for (let i = 0; i < 10; i++) {
    if (victims.every((q, k) => q.usedIdx !== before[k] || !g.sends(q))) return;
    await sleep(2);
  }
}
