/**
 * What every fuzz case shares: the devices it may attack, what it reports, and how it tells a
 * connection the daemon dropped from one that is still open.
 *
 * @module
 */

import { Errno, SysError } from "../../sys/libc.ts";
import { PeerClosedError, setSocketTimeouts } from "../../sys/socket.ts";
import { closeQuietly } from "../../sys/libc.ts";
import type { FrontendConnection } from "../../vhost-user/frontend/connection.ts";
import type { DeviceKind } from "./raw_guest.ts";
import type { Rng } from "./rng.ts";

/** What happened to a case: the daemon dropped it, stopped a queue it broke, or served it. */
export type CaseOutcome = "dropped" | "broken" | "survived";

/** What a case may use. */
export interface FuzzContext {
  /** The socket of the device of each kind that cases attack. */
  sockets: Record<DeviceKind, string>;
  /**
   * Floods a frame through the switch from a bystander port, and checks that the other bystander
   * port receives it: port 0, which cases attack, then has a frame to receive too.
   */
  poke(): void;
}

/** A fuzz case: it attacks one device of the target and says what became of it. */
export type FuzzCase = (rng: Rng, ctx: FuzzContext) => Promise<CaseOutcome>;

/**
 * The daemon did something no hostile input may make it do (accept a pipe as an eventfd, stop
 * serving a queue nobody broke, drop a connection that sent nothing wrong): the run stops here.
 */
export class FuzzFinding extends Error {
  /** Builds the finding. */
  constructor(message: string) {
    super(message);
    this.name = "FuzzFinding";
  }
}

/** The device kinds the target serves to cases. */
export const KINDS: readonly DeviceKind[] = ["blk", "net", "console"];

/** Whether `e` says the daemon closed the connection. */
export function isConnectionGone(e: unknown): boolean {
  return e instanceof PeerClosedError ||
    (e instanceof SysError &&
      (e.errno === Errno.EPIPE || e.errno === Errno.ECONNRESET || e.errno === Errno.ENOTCONN));
}

/** Reads replies until the daemon hangs up or goes quiet; "dropped" if it hung up. */
export function drain(conn: FrontendConnection): CaseOutcome {
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

/** Runs `fn`; a connection the daemon dropped meanwhile makes it "dropped". */
export async function unlessDropped(
  fn: () => Promise<CaseOutcome> | CaseOutcome,
): Promise<CaseOutcome> {
  try {
    return await fn();
  } catch (e) {
    if (isConnectionGone(e)) return "dropped";
    throw e;
  }
}

/** Waits `ms` without blocking the event loop (the harness reads the daemon's log meanwhile). */
export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
