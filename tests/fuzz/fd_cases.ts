/**
 * Fds of the wrong kind or size wherever the protocol hands the back-end one: pipes, sockets and
 * memfds where an eventfd belongs; pipes, sockets and eventfds where memory belongs; memfds too
 * small for the region, inflight buffer or dirty log they are said to hold; guest RAM far into
 * its memfd. What the daemon accepts is then used as QEMU would use it: the rings start and
 * requests run, which is when a short mapping used to turn into SIGBUS.
 *
 * Some answers are certain, and checked: a wrong kind of fd, or a memfd smaller than what it is
 * said to hold, must be refused; good memory far into its memfd must serve requests.
 *
 * @module
 */

import { wrongFd, type WrongKind } from "../helpers/fds.ts";
import { closeQuietly } from "../../sys/libc.ts";
import { createMemfd, Mapping } from "../../sys/mman.ts";
import { inflightQueueSize } from "../../ring/inflight.ts";
import {
  bit,
  ProtocolFeature,
  Request,
  requestName,
  u64Payload,
  VirtioFeature,
} from "../../vhost-user/message.ts";
import {
  type CaseOutcome,
  type FuzzContext,
  FuzzFinding,
  isConnectionGone,
  KINDS,
  unlessDropped,
} from "./case.ts";
import { RawGuest } from "./raw_guest.ts";
import { NackError } from "../../vhost-user/frontend/connection.ts";
import type { Rng } from "./rng.ts";

const MiB = 1 << 20;
/** Offsets into a memfd, up to far beyond any real guest's. */
const OFFSETS = [0, 8, 4096, 2 ** 40, 2 ** 46, 2 ** 47 - 64 * MiB];
/** Kinds of fd, with memfds (right or wrong in size) the likeliest. */
const KINDS_OF_FD: readonly WrongKind[] = ["pipe", "socket", "eventfd", "memfd", "memfd", "memfd"];

/**
 * Runs `fn`, which sends a request; false when the daemon dropped the connection for it, or
 * refused it (a NACK: a request the device does not support).
 */
function accepted(fn: () => void): boolean {
  try {
    fn();
    return true;
  } catch (e) {
    if (isConnectionGone(e) || e instanceof NackError) return false;
    throw e;
  }
}

/** A memfd of `size` bytes, zero or (for small ones) random, or an fd of another kind. */
function fdOf(kind: WrongKind, size: number, rng: Rng): { fd: number; all: number[] } {
  if (kind !== "memfd") return wrongFd(kind);
  const fd = createMemfd("vhostd-fuzz", size);
  if (size > 0 && size <= MiB && rng.chance(0.5)) {
    // What an earlier back-end, or a hostile front-end, may have left in a shared buffer.
    const m = Mapping.map(fd, size);
    new Uint8Array(m.buffer).set(rng.bytes(Math.min(size, 64 * 1024)));
    m.unmap();
  }
  return { fd, all: [fd] };
}

/** Starts every ring and checks the queues the driver sends on still serve (if `strict`). */
function run(g: RawGuest, strict: boolean, what: string): void {
  for (const q of g.queues) g.startQueue(q);
  for (const q of g.queues) {
    if (!g.sends(q)) continue;
    if (g.serve(q) === false && strict) {
      throw new FuzzFinding(`${g.kind} queue ${q.index} does not serve after ${what}`);
    }
  }
}

/** Vring eventfd slots, SET_LOG_FD and SET_BACKEND_REQ_FD given fds of any kind. */
async function eventFds(rng: Rng, ctx: FuzzContext): Promise<CaseOutcome> {
  const kind = rng.pick(KINDS);
  const g = await RawGuest.open(ctx.sockets[kind], kind, rng, { noStart: true });
  const request = rng.pick([
    Request.SET_VRING_KICK,
    Request.SET_VRING_CALL,
    Request.SET_VRING_ERR,
    Request.SET_LOG_FD,
    Request.SET_BACKEND_REQ_FD,
  ]);
  const fdKind = rng.pick(["pipe", "socket", "memfd", "eventfd"] as const);
  const { fd, all } = wrongFd(fdKind, rng.pick([0, 4096]));
  const what = `${requestName(request)} with a ${fdKind}`;
  try {
    return await unlessDropped(() => {
      const index = rng.pick(g.queues).index;
      const took = accepted(() => g.conn.request(request, u64Payload(BigInt(index)), [fd]));
      // The back-end offers no back-end channel: that request is refused either way.
      if (request !== Request.SET_BACKEND_REQ_FD && took !== (fdKind === "eventfd")) {
        throw new FuzzFinding(`${what}: ${took ? "accepted" : "refused"}`);
      }
      run(g, true, what);
      return "survived";
    });
  } finally {
    for (const f of all) closeQuietly(f);
    g.close();
  }
}

/** A memory region whose fd is of the wrong kind, too small, or far into a memfd. */
async function memory(rng: Rng, ctx: FuzzContext): Promise<CaseOutcome> {
  const kind = rng.pick(KINDS);
  const g = await RawGuest.open(ctx.sockets[kind], kind, rng, { noStart: true });
  const size = rng.pick([4096, 16 * MiB]);
  const offset = rng.pick(OFFSETS);
  const fdKind = rng.pick(KINDS_OF_FD);
  const fileSize = Math.max(0, offset + size + rng.pick([0, 0, 4096, -4096, -size]));
  const { fd, all } = fdOf(fdKind, fileSize, rng);
  const region = {
    guestPhysAddr: 2 ** 33,
    memorySize: size,
    userspaceAddr: 2 ** 45,
    mmapOffset: offset,
  };
  const valid = fdKind === "memfd" && fileSize >= offset + size;
  const replace = rng.chance(0.4);
  const what = `${replace ? "SET_MEM_TABLE" : "ADD_MEM_REG"} of ${size} bytes at offset ` +
    `${offset} of a ${fdKind} of ${fileSize} bytes`;
  try {
    return await unlessDropped(() => {
      const took = accepted(() => {
        if (!replace) return g.conn.addMemReg(region, fd);
        const regions = [...g.ram.regions, region];
        g.conn.setMemTable(regions, [...g.ram.fds, fd]);
      });
      if (took !== valid) throw new FuzzFinding(`${what}: ${took ? "accepted" : "refused"}`);
      if (!took) return "dropped";
      run(g, true, what);
      return "survived";
    });
  } finally {
    for (const f of all) closeQuietly(f);
    g.close();
  }
}

/** Guest RAM that lies far into its memfd: it must serve like any other. */
async function farRam(rng: Rng, ctx: FuzzContext): Promise<CaseOutcome> {
  const kind = rng.pick(KINDS);
  const ramFileOffset = rng.pick([2 ** 40, 2 ** 46, 2 ** 47 - 128 * MiB]);
  const g = await RawGuest.open(ctx.sockets[kind], kind, rng, { ramFileOffset, noStart: true });
  try {
    return await unlessDropped(() => {
      run(g, true, `guest RAM at offset ${ramFileOffset} of its memfd`);
      return "survived";
    });
  } finally {
    g.close();
  }
}

/** SET_INFLIGHT_FD with any description and fd; the rings start on what was accepted. */
async function inflight(rng: Rng, ctx: FuzzContext): Promise<CaseOutcome> {
  const kind = rng.chance(0.8) ? "blk" : rng.pick(KINDS);
  const g = await RawGuest.open(ctx.sockets[kind], kind, rng, {
    noStart: true,
    protocolFeatures: [ProtocolFeature.INFLIGHT_SHMFD],
  });
  const numQueues = rng.pick([1, g.queues.length, g.queues.length, g.queues.length + 1, 0]);
  const queueSize = rng.pick([1, 16, 64, 128, 256, 1024, 32768, 32769]);
  const need = numQueues * inflightQueueSize(queueSize);
  const mmapOffset = rng.pick([0, 64, 4096, 2 ** 40]);
  const mmapSize = rng.pick([need, need, need - 64, 0, 2 ** 40]);
  const fdKind = rng.pick(KINDS_OF_FD);
  const fileSize = Math.max(0, mmapOffset + need + rng.pick([0, 0, 4096, -64, -need]));
  const { fd, all } = fdOf(fdKind, fileSize, rng);
  const what = `SET_INFLIGHT_FD for ${numQueues} queues of ${queueSize} (${mmapSize} bytes at ` +
    `${mmapOffset}) with a ${fdKind} of ${fileSize} bytes`;
  try {
    return await unlessDropped(() => {
      const info = { mmapSize, mmapOffset, numQueues, queueSize };
      const took = accepted(() => g.conn.setInflightFd(info, fd));
      const short = fdKind !== "memfd" || fileSize < mmapOffset + need || mmapSize < need;
      if (took && short) throw new FuzzFinding(`${what}: accepted`);
      if (!took) return "dropped";
      // A buffer of random bytes makes the rings resubmit whatever it names: no promise then.
      run(g, false, what);
      return "survived";
    });
  } finally {
    for (const f of all) closeQuietly(f);
    g.close();
  }
}

/** SET_LOG_BASE with any size, offset and fd, then dirty logging on and the rings running. */
async function dirtyLog(rng: Rng, ctx: FuzzContext): Promise<CaseOutcome> {
  const kind = rng.pick(KINDS);
  const shmfd = rng.chance(0.9) ? [ProtocolFeature.LOG_SHMFD] : [];
  const g = await RawGuest.open(ctx.sockets[kind], kind, rng, {
    noStart: true,
    protocolFeatures: shmfd,
  });
  // 136 KiB of bits cover the default guest RAM (up to 4 GiB + 48 MiB).
  const size = rng.pick([0, 1, 4096, 136 * 1024, 256 * MiB, 256 * MiB + 1, 2 ** 40]);
  const offset = rng.pick([0, 8, 4096, 2 ** 40]);
  const fdKind = rng.pick(KINDS_OF_FD);
  const fileSize = Math.max(0, offset + rng.pick([size, size, size - 1, 0]));
  const { fd, all } = fdOf(fdKind, fileSize, rng);
  const logAll = g.features | bit(VirtioFeature.LOG_ALL);
  const early = rng.chance(0.3);
  const what = `SET_LOG_BASE of ${size} bytes at ${offset} of a ${fdKind} of ${fileSize} bytes`;
  try {
    return await unlessDropped(() => {
      // QEMU turns LOG_ALL on before the log arrives when it reconnects during a migration.
      if (early) g.conn.setFeatures(logAll);
      const took = accepted(() => g.conn.setLogBase(fd, size, offset));
      const negotiated = (g.conn.protocolFeatures & bit(ProtocolFeature.LOG_SHMFD)) !== 0n;
      const short = fdKind !== "memfd" || fileSize < offset + size || size < 1 ||
        size > 256 * MiB || !negotiated;
      if (took && short) throw new FuzzFinding(`${what}: accepted`);
      if (!took) return "dropped";
      if (!early) g.conn.setFeatures(logAll);
      run(g, true, what);
      return "survived";
    });
  } finally {
    for (const f of all) closeQuietly(f);
    g.close();
  }
}

/** One case of fds of the wrong kind or size. */
export function fdCase(rng: Rng, ctx: FuzzContext): Promise<CaseOutcome> {
  return rng.pick([eventFds, memory, farRam, inflight, dirtyLog])(rng, ctx);
}
