/**
 * A hostile vhost-user front-end: seeded cases of mutated, truncated and out-of-order messages,
 * wrong payload sizes, too many or too few fds, and absurd sizes and counts, each on a fresh
 * connection. Built on the project's own front-end (vhost-user/frontend).
 *
 * @module
 */

import { FrontendConnection } from "../../vhost-user/frontend/connection.ts";
import {
  configPayload,
  encodeMessage,
  Flags,
  HEADER_SIZE,
  inflightPayload,
  memTablePayload,
  Request,
  singleRegionPayload,
  u64Payload,
  vringAddrPayload,
  vringStatePayload,
} from "../../vhost-user/message.ts";
import { createEventFd } from "../../sys/event.ts";
import { closeQuietly, Errno, SysError } from "../../sys/libc.ts";
import { createMemfd, Mapping } from "../../sys/mman.ts";
import { PeerClosedError, setSocketTimeouts } from "../../sys/socket.ts";

/** A small, fast, seeded PRNG (mulberry32), so any failing case can be replayed from its seed. */
export class Rng {
  #s: number;
  /** Seeds the generator. */
  constructor(seed: number) {
    this.#s = seed >>> 0;
  }
  /** A uniform 32-bit value. */
  u32(): number {
    let t = (this.#s = (this.#s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }
  /** An integer in [0, n). */
  below(n: number): number {
    return this.u32() % n;
  }
  /** One of `items`. */
  pick<T>(items: readonly T[]): T {
    return items[this.below(items.length)];
  }
  /** True with probability `p`. */
  chance(p: number): boolean {
    return this.u32() / 4294967296 < p;
  }
  /** `n` random bytes. */
  bytes(n: number): Uint8Array<ArrayBuffer> {
    const out = new Uint8Array(n);
    for (let i = 0; i < n; i++) out[i] = this.u32() & 0xff;
    return out;
  }
}

const RAM_SIZE = 16 << 20;

/** Guest RAM the fuzzer shares when a case wants a plausible memory table. */
class FuzzRam {
  readonly fd = createMemfd("fuzz-ram", RAM_SIZE);
  readonly mapping = Mapping.map(this.fd, RAM_SIZE);
  region(gpa = 0) {
    return {
      guestPhysAddr: gpa,
      memorySize: RAM_SIZE,
      userspaceAddr: this.mapping.address,
      mmapOffset: 0,
    };
  }
  close(): void {
    this.mapping.unmap();
    closeQuietly(this.fd);
  }
}

/** Extreme values for 32- and 64-bit fields. */
const U32S = [0, 1, 2, 7, 8, 127, 128, 256, 1024, 32768, 65535, 65536, 0x7fffffff, 0xffffffff];
const U64S = [0n, 1n, 4096n, 1n << 32n, (1n << 53n) + 1n, 1n << 63n, (1n << 64n) - 1n];

/** One message to send: request, flags, payload, how many fds, and an optional lying size. */
interface FuzzMessage {
  request: number;
  flags: number;
  payload: Uint8Array;
  fds: number;
  /** memfd to attach instead of eventfds (memory messages). */
  memfd?: boolean;
  size?: number;
}

function u64(rng: Rng): bigint {
  return rng.chance(0.5) ? rng.pick(U64S) : (BigInt(rng.u32()) << 32n) | BigInt(rng.u32());
}

function addr(rng: Rng, ram: FuzzRam): number {
  return rng.chance(0.6)
    ? ram.mapping.address + rng.below(RAM_SIZE + 8192) - 4096
    : Number(u64(rng) & ((1n << 52n) - 1n));
}

/** A structurally plausible message with hostile field values. */
function mutated(rng: Rng, ram: FuzzRam): FuzzMessage {
  const v = Flags.VERSION | (rng.chance(0.3) ? Flags.NEED_REPLY : 0);
  const q = () => rng.chance(0.8) ? rng.below(4) : rng.pick(U32S);
  switch (rng.below(14)) {
    case 0:
      return { request: Request.SET_FEATURES, flags: v, payload: u64Payload(u64(rng)), fds: 0 };
    case 1:
      return {
        request: Request.SET_VRING_NUM,
        flags: v,
        payload: vringStatePayload({ index: q(), num: rng.pick(U32S) }),
        fds: 0,
      };
    case 2:
      return {
        request: Request.SET_VRING_ADDR,
        flags: v,
        payload: vringAddrPayload({
          index: q(),
          flags: rng.below(2),
          desc: addr(rng, ram),
          used: addr(rng, ram),
          avail: addr(rng, ram),
          log: addr(rng, ram),
        }),
        fds: 0,
      };
    case 3:
      return {
        request: rng.pick([
          Request.SET_VRING_BASE,
          Request.GET_VRING_BASE,
          Request.SET_VRING_ENABLE,
        ]),
        flags: v,
        payload: vringStatePayload({ index: q(), num: rng.pick(U32S) }),
        fds: 0,
      };
    case 4: {
      const nofd = rng.chance(0.3) ? 0x100n : 0n;
      return {
        request: rng.pick([Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR]),
        flags: v,
        payload: u64Payload(BigInt(q() & 0xff) | nofd | (rng.chance(0.1) ? u64(rng) : 0n)),
        fds: rng.below(3),
      };
    }
    case 5: {
      const n = rng.chance(0.8) ? rng.below(10) : rng.pick(U32S);
      const regions = Array.from(
        { length: Math.min(n, 10) },
        (_, i) =>
          rng.chance(0.5) ? ram.region(i * RAM_SIZE) : {
            guestPhysAddr: Number(u64(rng) & ((1n << 52n) - 1n)),
            memorySize: rng.pick([0, 4096, RAM_SIZE, RAM_SIZE * 2, 2 ** 40]),
            userspaceAddr: addr(rng, ram),
            mmapOffset: rng.pick([0, 4096, 3, RAM_SIZE]),
          },
      );
      const payload = memTablePayload(regions);
      if (n !== regions.length) new DataView(payload.buffer).setUint32(0, n, true);
      return { request: Request.SET_MEM_TABLE, flags: v, payload, fds: rng.below(11), memfd: true };
    }
    case 6:
      return {
        request: rng.pick([Request.ADD_MEM_REG, Request.REM_MEM_REG]),
        flags: v,
        payload: singleRegionPayload(
          rng.chance(0.5) ? ram.region(rng.pick([0, 4096, RAM_SIZE])) : {
            guestPhysAddr: Number(u64(rng) & ((1n << 52n) - 1n)),
            memorySize: rng.pick([0, 1, RAM_SIZE, 2 ** 44]),
            userspaceAddr: addr(rng, ram),
            mmapOffset: rng.pick([0, 8, RAM_SIZE - 4096]),
          },
        ),
        fds: rng.below(3),
        memfd: true,
      };
    case 7: {
      const size = rng.pick([0, 1, 57, 60, 256, 257, 0xffffffff]);
      const data = rng.bytes(Math.min(size, 300));
      const payload = configPayload({ offset: rng.pick(U32S), size, flags: rng.below(3), data });
      return {
        request: rng.pick([Request.GET_CONFIG, Request.SET_CONFIG]),
        flags: v,
        payload,
        fds: 0,
      };
    }
    case 8:
      return {
        request: rng.pick([Request.GET_INFLIGHT_FD, Request.SET_INFLIGHT_FD]),
        flags: v,
        payload: inflightPayload({
          mmapSize: rng.pick([0, 4096, 2 ** 40]),
          mmapOffset: rng.pick([0, 4096, 2 ** 40]),
          numQueues: rng.pick([0, 1, 2, 255, 65535]),
          queueSize: rng.pick([0, 1, 128, 32768, 65535]),
        }),
        fds: rng.below(2),
        memfd: true,
      };
    case 9:
      return {
        request: rng.pick([
          Request.SET_STATUS,
          Request.SET_PROTOCOL_FEATURES,
          Request.SET_LOG_BASE,
        ]),
        flags: v,
        payload: u64Payload(u64(rng)),
        fds: rng.below(2),
      };
    case 10:
      return {
        request: rng.pick([Request.GET_FEATURES, Request.GET_QUEUE_NUM, Request.GET_STATUS]),
        flags: v,
        payload: rng.bytes(rng.pick([0, 0, 8, 13])),
        fds: 0,
      };
    case 11:
      // Fixed-size requests with the wrong payload size.
      return {
        request: rng.pick([Request.SET_VRING_ADDR, Request.SET_VRING_NUM, Request.ADD_MEM_REG]),
        flags: v,
        payload: rng.bytes(rng.pick([0, 4, 7, 39, 41, 200])),
        fds: 0,
      };
    case 12:
      // Too many fds: more than the control buffer takes.
      return { request: Request.SET_VRING_CALL, flags: v, payload: u64Payload(0n), fds: 20 };
    default:
      return {
        request: rng.chance(0.8) ? rng.below(46) : rng.pick(U32S),
        flags: rng.chance(0.85) ? v : rng.u32(),
        payload: rng.bytes(rng.pick([0, 8, 12, 24, 40, 64, 268, rng.below(600)])),
        fds: rng.below(4),
        size: rng.chance(0.15) ? rng.pick([0, 3, 4095, 4096, 4097, 0xffffffff]) : undefined,
      };
  }
}

/** What happened to a case. */
export type CaseOutcome = "dropped" | "survived";

/** Runs one case on a fresh connection; returns whether the daemon dropped it. */
export async function runCase(socket: string, seed: number): Promise<CaseOutcome> {
  const rng = new Rng(seed);
  const ram = new FuzzRam();
  const conn = await connect(socket);
  const fds: number[] = [];
  try {
    // A valid prefix of random length, so hostile messages meet every protocol state.
    const prefix = rng.below(6);
    if (prefix > 0) conn.getFeatures();
    if (prefix > 1) conn.setProtocolFeatures(conn.getProtocolFeatures());
    if (prefix > 2) conn.setOwner();
    if (prefix > 3) conn.setMemTable([ram.region()], [ram.fd]);
    if (prefix > 4) conn.setVringNum(0, 128);
    const count = 1 + rng.below(4);
    for (let i = 0; i < count; i++) {
      const kind = rng.below(10);
      if (kind === 0) {
        // Truncated: a header promising more than is ever sent, then hang up.
        const m = encodeMessage(rng.below(45), Flags.VERSION, rng.bytes(rng.below(40)));
        new DataView(m.buffer).setUint32(8, m.length - HEADER_SIZE + 1 + rng.below(100), true);
        conn.sendBytes(m.slice(0, HEADER_SIZE + rng.below(m.length - HEADER_SIZE + 1)));
        break;
      }
      if (kind === 1) {
        conn.sendBytes(rng.bytes(1 + rng.below(64)));
        break;
      }
      const m = mutated(rng, ram);
      const attach: number[] = [];
      for (let k = 0; k < m.fds; k++) {
        const fd = m.memfd && rng.chance(0.7)
          ? createMemfd("fuzz", rng.pick([4096, RAM_SIZE]))
          : createEventFd();
        fds.push(fd);
        attach.push(fd);
      }
      conn.sendRaw(m.request, m.flags, m.payload, attach, m.size);
    }
    return drain(conn);
  } catch (e) {
    if (isConnectionGone(e)) return "dropped";
    throw e;
  } finally {
    conn.close();
    for (const fd of fds) closeQuietly(fd);
    ram.close();
  }
}

async function connect(socket: string): Promise<FrontendConnection> {
  for (let attempt = 0;; attempt++) {
    try {
      return await FrontendConnection.connect(socket, { timeoutMs: 2000 });
    } catch (e) {
      if (attempt > 50) throw e;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

/** Reads replies until the daemon hangs up or goes quiet; "dropped" if it hung up. */
function drain(conn: FrontendConnection): CaseOutcome {
  setSocketTimeouts(conn.fd, 100);
  try {
    for (;;) {
      const r = conn.receiveRaw();
      for (const fd of r.fds) closeQuietly(fd);
    }
  } catch (e) {
    if (isConnectionGone(e)) return "dropped";
    if (e instanceof SysError && (e.errno === Errno.EAGAIN || e.errno === Errno.ETIMEDOUT)) {
      return "survived";
    }
    // A reply the codec refuses (the daemon never sends one) would be a bug worth seeing.
    throw e;
  }
}

function isConnectionGone(e: unknown): boolean {
  return e instanceof PeerClosedError ||
    (e instanceof SysError &&
      (e.errno === Errno.EPIPE || e.errno === Errno.ECONNRESET || e.errno === Errno.ENOTCONN));
}
