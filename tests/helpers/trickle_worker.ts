/**
 * A front-end that sends one message a byte at a time, from a worker: its pace does not depend on
 * what the test's main thread is blocked in (the project's front-end calls are synchronous).
 *
 * Post a {@link TrickleJob}; the worker connects, sends `bytes` one per `intervalMs`, and keeps
 * {@link TrickleState} in the shared `state` array, which the test reads with `Atomics.load`.
 *
 * @module
 */

/// <reference lib="deno.worker" />

import { FrontendConnection } from "../../vhost-user/frontend/connection.ts";

/** What the worker is asked to do. */
export interface TrickleJob {
  /** The back-end's socket. */
  socket: string;
  /** The bytes to send, one at a time. */
  bytes: Uint8Array;
  /** Pause between two bytes, in ms. */
  intervalMs: number;
  /** An Int32Array's buffer of {@link TrickleState.SIZE} slots. */
  state: SharedArrayBuffer;
}

/** Slots of the shared state. */
export const TrickleState = {
  /** Bytes sent so far. */
  SENT: 0,
  /** 0 while sending, then one of {@link TrickleState.FINISHED} or {@link TrickleState.REFUSED}. */
  DONE: 1,
  /** Every byte was sent. */
  FINISHED: 1,
  /** A send failed: the back-end had hung up. */
  REFUSED: 2,
  /** Number of slots. */
  SIZE: 2,
} as const;

self.onmessage = async (e: MessageEvent<TrickleJob>) => {
  const job = e.data;
  const state = new Int32Array(job.state);
  const conn = await FrontendConnection.connect(job.socket, { retryMs: 5000 });
  let outcome: number = TrickleState.FINISHED;
  try {
    for (let i = 0; i < job.bytes.length; i++) {
      if (i > 0) await new Promise((r) => setTimeout(r, job.intervalMs));
      try {
        conn.sendBytes(job.bytes.slice(i, i + 1));
      } catch {
        outcome = TrickleState.REFUSED;
        break;
      }
      Atomics.store(state, TrickleState.SENT, i + 1);
    }
  } finally {
    conn.close();
    Atomics.store(state, TrickleState.DONE, outcome);
    self.close();
  }
};
