/**
 * Per-queue counters, written by the data plane on the hot path and read by the main thread.
 *
 * A queue's counters are one `Float64Array` (in vhostd, a slice of a SharedArrayBuffer that the
 * main thread's metrics and status endpoints read). Float64 counts exactly up to 2^53 without
 * BigInt, and one writer per array (the worker that owns the queue) means plain increments are
 * enough: the reader may see a value one request old, never a torn one (aligned 8-byte stores).
 *
 * @module
 */

/** Slot of each counter in a queue's array. */
export const QueueStat = {
  /** Requests completed (chains pushed to the used ring). */
  REQUESTS: 0,
  /** Bytes in completed chains: what the driver supplied plus what the device wrote back. */
  BYTES: 1,
  /** Requests the device failed, plus ring errors. */
  ERRORS: 2,
  /** Kicks (driver notifications) received. */
  KICKS: 3,
  /** Interrupts (call eventfd writes) sent. */
  INTERRUPTS: 4,
  /** Chains popped and not yet pushed (a gauge). */
  IN_FLIGHT: 5,
  /** Sum of request latencies in seconds. */
  LATENCY_SUM: 6,
  /** First latency histogram bucket; {@link LATENCY_BUCKETS} buckets follow. */
  LATENCY_BUCKET0: 7,
} as const;

/**
 * Latency histogram buckets: bucket `i` counts requests that took less than 2^i µs (bucket 0:
 * under 1 µs), the last one everything slower. Powers of two make the bucket one `Math.clz32`
 * instead of a search.
 */
export const LATENCY_BUCKETS = 24;

/** Number of float64 slots one queue uses. */
export const QUEUE_STAT_SLOTS: number = QueueStat.LATENCY_BUCKET0 + LATENCY_BUCKETS;

/** Upper bound of bucket `i` in seconds (`Infinity` for the last). */
export function latencyBucketLimit(i: number): number {
  return i >= LATENCY_BUCKETS - 1 ? Infinity : 2 ** i / 1e6;
}

/** The bucket of a latency given in milliseconds (as `performance.now()` differences are). */
export function latencyBucket(ms: number): number {
  // Whole microseconds; 32 - clz32(us) is the bit length, i.e. the smallest i with us < 2^i.
  const us = ms < 1e6 ? (ms * 1000) >>> 0 : 0x7fffffff;
  const b = 32 - Math.clz32(us);
  return b < LATENCY_BUCKETS ? b : LATENCY_BUCKETS - 1;
}

/**
 * What a device's request was, for the read/write split of its metrics ({@link IoStat}): set by
 * the device when it completes a request, 0 for anything else (flushes, discards, frames).
 */
export const IoDirection = { READ: 1 as const, WRITE: 2 as const } as const;

/**
 * Slot of each counter of one direction in a device's read/write accounting. All queues of a
 * device (one worker) share one array: reads in the first {@link IO_DIRECTION_SLOTS} slots,
 * writes in the next.
 */
export const IoStat = {
  /** Requests of this direction completed. */
  REQUESTS: 0,
  /** Data bytes they moved (request headers and status bytes not included). */
  BYTES: 1,
  /** Sum of their latencies in seconds. */
  LATENCY_SUM: 2,
  /** First latency histogram bucket (as {@link latencyBucket}); {@link LATENCY_BUCKETS} follow. */
  LATENCY_BUCKET0: 3,
} as const;

/** Float64 slots of one direction. */
export const IO_DIRECTION_SLOTS: number = IoStat.LATENCY_BUCKET0 + LATENCY_BUCKETS;

/** Float64 slots of a device's read/write accounting (reads, then writes). */
export const IO_STAT_SLOTS: number = 2 * IO_DIRECTION_SLOTS;

/** Where direction `direction` ({@link IoDirection}) starts in the read/write array. */
export function ioSlotBase(direction: number): number {
  return (direction - 1) * IO_DIRECTION_SLOTS;
}
