/**
 * A hostile vhost-user front-end and guest: seeded cases, each on a fresh connection to one of
 * the target's devices (a block device, a switch port, a console), of four classes:
 *
 * - `protocol`: mutated, truncated and out-of-order messages, wrong payload sizes, too many or
 *   too few fds, absurd sizes and counts, the migration and announce messages (this file);
 * - `fds`: fds of the wrong kind or size (fd_cases.ts);
 * - `split`: messages in pieces, with pauses, fds on later pieces, headers without payloads
 *   (split_cases.ts);
 * - `ring`: a guest corrupting its rings (ring_cases.ts).
 *
 * Built on the project's own front-end (vhost-user/frontend).
 *
 * @module
 */

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
import { closeQuietly } from "../../sys/libc.ts";
import { createMemfd, Mapping } from "../../sys/mman.ts";
import {
  type CaseOutcome,
  drain,
  type FuzzCase,
  type FuzzContext,
  isConnectionGone,
} from "./case.ts";
import { fdCase } from "./fd_cases.ts";
import { fuzzConnect } from "./raw_guest.ts";
import { ringCase } from "./ring_cases.ts";
import { Rng } from "./rng.ts";
import { splitCase } from "./split_cases.ts";

export { Rng } from "./rng.ts";
export type { CaseOutcome, FuzzContext } from "./case.ts";

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
  switch (rng.below(17)) {
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
    case 13: {
      // The dirty log: sizes and offsets from none to absurd, any fds.
      const payload = new Uint8Array(16);
      const dv = new DataView(payload.buffer);
      dv.setBigUint64(
        0,
        rng.chance(0.5) ? BigInt(rng.pick([1, 4096, 136 * 1024])) : u64(rng),
        true,
      );
      dv.setBigUint64(8, rng.chance(0.5) ? BigInt(rng.pick([0, 8, 4096])) : u64(rng), true);
      return { request: Request.SET_LOG_BASE, flags: v, payload, fds: rng.below(3), memfd: true };
    }
    case 14:
      return {
        request: Request.SET_LOG_FD,
        flags: v,
        payload: rng.bytes(rng.pick([0, 8, 8, 16])),
        fds: rng.below(3),
      };
    case 15:
      // Announce a MAC (switch ports offer RARP; the others must refuse it).
      return {
        request: Request.SEND_RARP,
        flags: v,
        payload: rng.bytes(rng.pick([8, 8, 8, 6, 0])),
        fds: rng.below(2),
      };
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

/** The protocol class: a valid prefix of random length, then mutated or broken messages. */
export async function protocolCase(rng: Rng, ctx: FuzzContext): Promise<CaseOutcome> {
  const ram = new FuzzRam();
  const socket = rng.chance(0.7)
    ? ctx.sockets.blk
    : rng.pick([ctx.sockets.net, ctx.sockets.console]);
  const conn = await fuzzConnect(socket);
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
          ? createMemfd("fuzz", rng.pick([0, 4096, RAM_SIZE]))
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

/** The case classes, with how often each is picked. */
export const CASE_CLASSES: readonly { name: string; weight: number; run: FuzzCase }[] = [
  { name: "protocol", weight: 35, run: protocolCase },
  { name: "fds", weight: 20, run: fdCase },
  { name: "split", weight: 15, run: splitCase },
  { name: "ring", weight: 30, run: ringCase },
];

/** Runs the case of seed `seed` (its class is the seed's first draw); returns class and outcome. */
export async function runCase(
  ctx: FuzzContext,
  seed: number,
): Promise<{ name: string; outcome: CaseOutcome }> {
  const rng = new Rng(seed);
  const total = CASE_CLASSES.reduce((n, c) => n + c.weight, 0);
  let draw = rng.below(total);
  const c = CASE_CLASSES.find((c) => (draw -= c.weight) < 0)!;
  return { name: c.name, outcome: await c.run(rng, ctx) };
}
