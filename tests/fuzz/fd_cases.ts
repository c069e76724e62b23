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
import { type DeviceKind, RawGuest, type RawGuestOptions } from "./raw_guest.ts";
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

/** What a case does with its session; `keep` takes fds to close afterwards, and gives the one to send. */
type Attack = (g: RawGuest, keep: (made: { fd: number; all: number[] }) => number) => CaseOutcome;

/**
 * Opens a session (rings not started) on a device of `kind` (default: any), runs `attack` in it,
 * and cleans up: the session, and every fd the attack made.
 */
async function attack(
  rng: Rng,
  ctx: FuzzContext,
  options: RawGuestOptions & { kind?: DeviceKind },
  fn: Attack,
): Promise<CaseOutcome> {
  const kind = options.kind ?? rng.pick(KINDS);
  const g = await RawGuest.open(ctx.sockets[kind], kind, rng, { ...options, noStart: true });
  const fds: number[] = [];
  try {
    return await unlessDropped(() =>
      fn(g, (made) => {
        fds.push(...made.all);
        return made.fd;
      })
    );
  } finally {
    for (const fd of fds) closeQuietly(fd);
    g.close();
  }
}

/**
 * Checks the daemon's answer where it is certain (`expected`: true, must take it; false, must
 * refuse it; null, either), then, if it took it, starts the rings and runs requests.
 */
function verdict(g: RawGuest, took: boolean, expected: boolean | null, what: string): CaseOutcome {
  if (expected !== null && took !== expected) {
    throw new FuzzFinding(`${what}: ${took ? "accepted" : "refused"}`);
  }
  if (!took) return "dropped";
  run(g, expected === true, what);
  return "survived";
}

/** Vring eventfd slots, SET_LOG_FD and SET_BACKEND_REQ_FD given fds of any kind. */
function eventFds(rng: Rng, ctx: FuzzContext): Promise<CaseOutcome> {
  return attack(rng, ctx, {}, (g, keep) => {
    const request = rng.pick([
      Request.SET_VRING_KICK,
      Request.SET_VRING_CALL,
      Request.SET_VRING_ERR,
      Request.SET_LOG_FD,
      Request.SET_BACKEND_REQ_FD,
    ]);
    const fdKind = rng.pick(["pipe", "socket", "memfd", "eventfd"] as const);
    const fd = keep(wrongFd(fdKind, rng.pick([0, 4096])));
    const index = rng.pick(g.queues).index;
    const took = accepted(() => g.conn.request(request, u64Payload(BigInt(index)), [fd]));
    // A raw guest never negotiates BACKEND_REQ: that request is refused whatever its fd.
    const backend = request === Request.SET_BACKEND_REQ_FD;
    const what = `${requestName(request)} with a ${fdKind}`;
    return verdict(g, took || backend, backend ? null : fdKind === "eventfd", what);
  });
}

/** A memory region whose fd is of the wrong kind, too small, or far into a memfd. */
function memory(rng: Rng, ctx: FuzzContext): Promise<CaseOutcome> {
  return attack(rng, ctx, {}, (g, keep) => {
    const size = rng.pick([4096, 16 * MiB]);
    const offset = rng.pick(OFFSETS);
    const fdKind = rng.pick(KINDS_OF_FD);
    const fileSize = Math.max(0, offset + size + rng.pick([0, 0, 4096, -4096, -size]));
    const fd = keep(fdOf(fdKind, fileSize, rng));
    // Beside guest RAM (8 GiB up), wherever its memfd puts it.
    const region = {
      guestPhysAddr: 2 ** 33,
      memorySize: size,
      userspaceAddr: 2 ** 45,
      mmapOffset: offset,
    };
    const replace = rng.chance(0.4);
    const took = accepted(() => {
      if (!replace) return g.conn.addMemReg(region, fd);
      g.conn.setMemTable([...g.ram.regions, region], [...g.ram.fds, fd]);
    });
    const what = `${replace ? "SET_MEM_TABLE" : "ADD_MEM_REG"} of ${size} bytes at offset ` +
      `${offset} of a ${fdKind} of ${fileSize} bytes`;
    return verdict(g, took, fdKind === "memfd" && fileSize >= offset + size, what);
  });
}

/** Guest RAM that lies far into its memfd: it must serve like any other. */
function farRam(rng: Rng, ctx: FuzzContext): Promise<CaseOutcome> {
  const ramFileOffset = rng.pick([2 ** 40, 2 ** 46, 2 ** 47 - 128 * MiB]);
  return attack(
    rng,
    ctx,
    { ramFileOffset },
    (g) => verdict(g, true, true, `guest RAM at offset ${ramFileOffset} of its memfd`),
  );
}

/** SET_INFLIGHT_FD with any description and fd; the rings start on what was accepted. */
function inflight(rng: Rng, ctx: FuzzContext): Promise<CaseOutcome> {
  const options = {
    kind: rng.chance(0.8) ? "blk" as const : undefined,
    protocolFeatures: [ProtocolFeature.INFLIGHT_SHMFD],
  };
  return attack(rng, ctx, options, (g, keep) => {
    const n = g.queues.length;
    const numQueues = rng.pick([1, n, n, n + 1, 0]);
    const queueSize = rng.pick([1, 16, 64, 128, 256, 1024, 32768, 32769]);
    const need = numQueues * inflightQueueSize(queueSize);
    const mmapOffset = rng.pick([0, 64, 4096, 2 ** 40]);
    const mmapSize = rng.pick([need, need, need - 64, 0, 2 ** 40]);
    const fdKind = rng.pick(KINDS_OF_FD);
    const fileSize = Math.max(0, mmapOffset + need + rng.pick([0, 0, 4096, -64, -need]));
    const fd = keep(fdOf(fdKind, fileSize, rng));
    const info = { mmapSize, mmapOffset, numQueues, queueSize };
    const took = accepted(() => g.conn.setInflightFd(info, fd));
    const short = fdKind !== "memfd" || fileSize < mmapOffset + need || mmapSize < need;
    const what = `SET_INFLIGHT_FD for ${numQueues} queues of ${queueSize} (${mmapSize} bytes ` +
      `at ${mmapOffset}) with a ${fdKind} of ${fileSize} bytes`;
    // A buffer of random bytes makes the rings resubmit whatever it names: no promise then.
    return verdict(g, took, short ? false : null, what);
  });
}

/** SET_LOG_BASE with any size, offset and fd, then dirty logging on and the rings running. */
function dirtyLog(rng: Rng, ctx: FuzzContext): Promise<CaseOutcome> {
  const protocolFeatures = rng.chance(0.9) ? [ProtocolFeature.LOG_SHMFD] : [];
  return attack(rng, ctx, { protocolFeatures }, (g, keep) => {
    // 136 KiB of bits cover the default guest RAM (up to 4 GiB + 48 MiB).
    const size = rng.pick([0, 1, 4096, 136 * 1024, 256 * MiB, 256 * MiB + 1, 2 ** 40]);
    const offset = rng.pick([0, 8, 4096, 2 ** 40]);
    const fdKind = rng.pick(KINDS_OF_FD);
    const fileSize = Math.max(0, offset + rng.pick([size, size, size - 1, 0]));
    const fd = keep(fdOf(fdKind, fileSize, rng));
    const logAll = g.features | bit(VirtioFeature.LOG_ALL);
    // QEMU turns LOG_ALL on before the log arrives when it reconnects during a migration.
    const early = rng.chance(0.3);
    if (early) g.conn.setFeatures(logAll);
    const took = accepted(() => g.conn.setLogBase(fd, size, offset));
    if (took && !early) g.conn.setFeatures(logAll);
    const negotiated = (g.conn.protocolFeatures & bit(ProtocolFeature.LOG_SHMFD)) !== 0n;
    const short = fdKind !== "memfd" || fileSize < offset + size || size < 1 ||
      size > 256 * MiB || !negotiated;
    const what = `SET_LOG_BASE of ${size} bytes at ${offset} of a ${fdKind} of ${fileSize} bytes`;
    return verdict(g, took, short ? false : true, what);
  });
}

/** One case of fds of the wrong kind or size. */
export function fdCase(rng: Rng, ctx: FuzzContext): Promise<CaseOutcome> {
  return rng.pick([eventFds, memory, farRam, inflight, dirtyLog])(rng, ctx);
}
