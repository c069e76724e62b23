/**
 * Messages that arrive in pieces: a session's messages cut at random places and sent in several
 * writes with pauses, their fds attached to any piece of the message they belong to (or, hostile,
 * to a piece of another message); a header whose payload never comes; a stream cut off part-way.
 *
 * The daemon assembles messages across wake-ups, so pieces alone must change nothing: a session
 * whose messages are only cut up must be answered exactly as if it had been sent whole, which
 * these cases check. A message left part-way must cost its connection (after the time limit) and
 * its fds, nothing else.
 *
 * @module
 */

import { createEventFd } from "../../sys/event.ts";
import { closeQuietly } from "../../sys/libc.ts";
import { setSocketTimeouts } from "../../sys/socket.ts";
import type { FrontendConnection } from "../../vhost-user/frontend/connection.ts";
import { GuestRam } from "../../vhost-user/frontend/memory.ts";
import {
  bit,
  encodeMessage,
  Flags,
  HEADER_SIZE,
  memTablePayload,
  ProtocolFeature,
  Request,
  requestName,
  u64Payload,
} from "../../vhost-user/message.ts";
import {
  type CaseOutcome,
  drain,
  type FuzzContext,
  FuzzFinding,
  isConnectionGone,
  KINDS,
  sleep,
} from "./case.ts";
import { fuzzConnect } from "./raw_guest.ts";
import type { Rng } from "./rng.ts";

/** One message of the session, where it starts in the stream, and its fds. */
interface Part {
  request: number;
  bytes: Uint8Array;
  start: number;
  fds: number[];
  /** Whether the back-end answers it with a reply body. */
  replies: boolean;
}

/** How a case sends its stream. */
type Mode = "whole messages in pieces" | "fds on another message" | "cut off";

/** A session's opening, as QEMU sends it, with fds of its own. */
function session(ram: GuestRam, eventFd: number): Part[] {
  const v = Flags.VERSION;
  const list: [number, Uint8Array, number[], boolean][] = [
    [Request.GET_FEATURES, encodeMessage(Request.GET_FEATURES, v), [], true],
    [Request.GET_PROTOCOL_FEATURES, encodeMessage(Request.GET_PROTOCOL_FEATURES, v), [], true],
    [
      Request.SET_PROTOCOL_FEATURES,
      encodeMessage(Request.SET_PROTOCOL_FEATURES, v, u64Payload(bit(ProtocolFeature.MQ))),
      [],
      false,
    ],
    [Request.SET_OWNER, encodeMessage(Request.SET_OWNER, v), [], false],
    [Request.GET_QUEUE_NUM, encodeMessage(Request.GET_QUEUE_NUM, v), [], true],
    [
      Request.SET_MEM_TABLE,
      encodeMessage(Request.SET_MEM_TABLE, v, memTablePayload([...ram.regions])),
      ram.fds,
      false,
    ],
    [Request.SET_VRING_CALL, encodeMessage(Request.SET_VRING_CALL, v, u64Payload(0n)), [
      eventFd,
    ], false],
    [Request.GET_FEATURES, encodeMessage(Request.GET_FEATURES, v), [], true],
  ];
  let start = 0;
  return list.map(([request, bytes, fds, replies]) => {
    const p = { request, bytes, start, fds, replies };
    start += bytes.length;
    return p;
  });
}

/** Sends a session cut into pieces, with pauses; checks the replies where it can. */
export async function splitCase(rng: Rng, ctx: FuzzContext): Promise<CaseOutcome> {
  const kind = rng.pick(KINDS);
  const conn = await fuzzConnect(ctx.sockets[kind]);
  const ram = GuestRam.create([{ guestPhysAddr: 0, size: 1 << 20 }, {
    guestPhysAddr: 1 << 30,
    size: 1 << 20,
  }]);
  const eventFd = createEventFd();
  try {
    const parts = session(ram, eventFd);
    const mode = rng.pick<Mode>([
      "whole messages in pieces",
      "whole messages in pieces",
      "fds on another message",
      "cut off",
    ]);
    const stream = new Uint8Array(parts.reduce((n, p) => n + p.bytes.length, 0));
    for (const p of parts) stream.set(p.bytes, p.start);
    // Where each piece starts: random cuts, and for each message with fds one cut inside it.
    const cuts = new Set<number>([0]);
    for (let n = rng.below(24); n > 0; n--) cuts.add(1 + rng.below(stream.length - 1));
    for (const p of parts) {
      if (p.fds.length > 0) cuts.add(p.start + rng.below(p.bytes.length));
    }
    const starts = [...cuts].sort((a, b) => a - b);
    // Which piece carries each message's fds: one that starts inside the message (its first
    // byte or a later one), or, hostile, one that starts inside a later message.
    const fdsAt = new Map<number, number[]>();
    const misplace = mode === "fds on another message";
    for (const [i, p] of parts.entries()) {
      if (p.fds.length === 0) continue;
      const later = misplace && i + 1 < parts.length;
      const from = later ? parts[i + 1].start : p.start;
      const end = later ? stream.length : p.start + p.bytes.length;
      const inside = starts.filter((s) => s >= from && s < end);
      const at = inside.length > 0 ? rng.pick(inside) : p.start;
      cuts.add(at);
      fdsAt.set(at, [...(fdsAt.get(at) ?? []), ...p.fds]);
    }
    const pieces = [...cuts].sort((a, b) => a - b);
    let stop = stream.length;
    if (mode === "cut off") {
      // Part-way into a random message: inside its header, or just before its end.
      const p = rng.pick(parts);
      const into = rng.pick([1, HEADER_SIZE - 1, HEADER_SIZE, p.bytes.length - 1]);
      stop = p.start + Math.max(1, Math.min(into, p.bytes.length - 1));
    }
    try {
      for (const [k, s] of pieces.entries()) {
        if (s >= stop) break;
        const e = Math.min(k + 1 < pieces.length ? pieces[k + 1] : stream.length, stop);
        if (e <= s) continue;
        conn.sendBytes(stream.slice(s, e), fdsAt.get(s) ?? []);
        const pause = rng.pick([0, 0, 0, 1, 3, 10]);
        if (pause > 0) await sleep(pause);
      }
    } catch (e) {
      if (isConnectionGone(e)) return "dropped";
      throw e;
    }
    if (mode === "cut off") return await cutOff(conn, rng);
    if (mode === "fds on another message") return drain(conn);
    // Only cut up: every reply comes, in order, and the connection stays.
    for (const p of parts) {
      if (!p.replies) continue;
      try {
        conn.receiveReply(p.request, 8);
      } catch (e) {
        throw new FuzzFinding(
          `a session sent in ${pieces.length} pieces: no reply to ${requestName(p.request)} ` +
            `(${(e as Error).message})`,
        );
      }
    }
    return "survived";
  } finally {
    conn.close();
    closeQuietly(eventFd);
    ram.close();
  }
}

/**
 * A message left part-way: mostly the front-end hangs up; once in a while it waits, and the
 * daemon must drop it when the message's time is up (2 s).
 */
async function cutOff(conn: FrontendConnection, rng: Rng): Promise<CaseOutcome> {
  if (!rng.chance(0.03)) return drain(conn);
  // Replies to the whole messages before it may come first.
  setSocketTimeouts(conn.fd, 100);
  for (let waited = 0; waited < 4000; waited += 100) {
    if (drain(conn) === "dropped") return "dropped";
    await sleep(100);
  }
  throw new FuzzFinding("a message left part-way for 4 s was not dropped");
}
