/**
 * One load-generator thread: drives one virtqueue of a blk back-end as fast as the back-end
 * completes requests. It keeps `depth` requests in flight, blocks on the queue's call eventfd
 * with synchronous FFI (no postMessage, no event loop on the hot path), checks every completion
 * and records its latency in a preallocated log-linear histogram. Nothing is allocated per request.
 *
 * @module
 */

/// <reference lib="deno.worker" />

import { DriverQueue, type QueueLayout } from "../vhost-user/frontend/driver_queue.ts";
import { type GuestBuffer, GuestRam, type SharedRam } from "../vhost-user/frontend/memory.ts";

/** Sub-buckets per power of two in the latency histogram (relative error under 1/16). */
export const HIST_SUB = 16;
/** Histogram buckets: latencies in ns up to 2^40. */
export const HIST_BUCKETS = 41 * HIST_SUB;

/** The histogram bucket of a latency in nanoseconds. */
export function histBucket(ns: number): number {
  if (ns < HIST_SUB) return ns < 0 ? 0 : ns;
  const msb = Math.floor(Math.log2(ns));
  const sub = Math.floor(ns / 2 ** (msb - 4)) - HIST_SUB;
  return Math.min(HIST_BUCKETS - 1, (msb - 3) * HIST_SUB + sub);
}

/** The upper bound (ns) of latencies in bucket `b`. */
export function histBucketLimit(b: number): number {
  if (b < HIST_SUB) return b;
  const msb = Math.floor(b / HIST_SUB) + 3;
  const sub = b % HIST_SUB;
  return (HIST_SUB + sub + 1) * 2 ** (msb - 4);
}

/** Access pattern. */
export type LoadPattern = "randread" | "randwrite" | "rw";

/** What the main thread tells a worker. */
export interface LoadJob {
  /** Guest RAM to attach to. */
  ram: SharedRam;
  /** The queue to drive. */
  queue: QueueLayout;
  /** Whether EVENT_IDX was negotiated. */
  eventIdx: boolean;
  /** Requests in flight. */
  depth: number;
  /** Bytes per request. */
  blockSize: number;
  /** Access pattern. */
  pattern: LoadPattern;
  /** Run time in ms. */
  durationMs: number;
  /** Device capacity in 512-byte sectors. */
  capacitySectors: number;
  /** Request headers (16 bytes each), status bytes (16-byte stride) and data buffers. */
  headers: GuestBuffer;
  /** Status bytes. */
  statuses: GuestBuffer;
  /** Data buffers (`blockSize` each). */
  data: GuestBuffer;
  /** Random seed. */
  seed: number;
}

/** What a worker reports at the end. */
export interface LoadResult {
  /** Queue index. */
  queue: number;
  /** Requests completed within the run time. */
  ios: number;
  /** Of which reads. */
  reads: number;
  /** Completions with a status other than OK. */
  statusErrors: number;
  /** Completions whose used length was not what the request implies. */
  lengthErrors: number;
  /** Measured run time in ms. */
  elapsedMs: number;
  /** Latency histogram (see {@link histBucket}). */
  histogram: Uint32Array<ArrayBuffer>;
  /** Largest latency in ns. */
  maxNs: number;
  /** Sum of latencies in ns. */
  sumNs: number;
  /** CPU time this thread used, in ms (from /proc/thread-self/stat). */
  cpuMs: number;
  /** Kicks sent. */
  kicks: number;
  /** Times the thread slept on the call eventfd. */
  waits: number;
  /** A fatal problem (stall, bad used element), or "". */
  error: string;
}

function threadCpuMs(): number {
  const stat = Deno.readTextFileSync("/proc/thread-self/stat");
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name; 100 ticks/s.
  return (Number(f[11]) + Number(f[12])) * 10;
}

function run(job: LoadJob): LoadResult {
  const ram = GuestRam.attach(job.ram);
  const q = DriverQueue.attach(ram, job.queue);
  q.eventIdx = job.eventIdx;
  const u8 = ram.u8, u32 = ram.u32;
  const depth = job.depth, bs = job.blockSize;
  const sectorsPerBlock = bs / 512;
  const blocks = Math.floor(job.capacitySectors / sectorsPerBlock);
  const headToSlot = new Int32Array(q.size).fill(-1);
  const isWrite = new Uint8Array(depth);
  const started = new Float64Array(depth);
  const hist = new Uint32Array(HIST_BUCKETS);
  const mode = job.pattern === "randread" ? 0 : job.pattern === "randwrite" ? 1 : 2;
  let seed = job.seed | 0 || 1;
  let ios = 0, reads = 0, statusErrors = 0, lengthErrors = 0, maxNs = 0, sumNs = 0, waits = 0;
  let error = "";

  const submit = (slot: number, now: number): void => {
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    const r = seed >>> 0;
    const write = mode === 1 || (mode === 2 && (r & 1) === 1);
    const sector = (r % blocks) * sectorsPerBlock;
    const h = (job.headers.offset + 16 * slot) >> 2;
    u32[h] = write ? 1 : 0;
    u32[h + 1] = 0;
    u32[h + 2] = sector >>> 0;
    u32[h + 3] = Math.floor(sector / 4294967296);
    u8[job.statuses.offset + 16 * slot] = 0xa5;
    const head = q.add3(
      job.headers.gpa + 16 * slot,
      16,
      job.data.gpa + bs * slot,
      bs,
      !write,
      job.statuses.gpa + 16 * slot,
    );
    headToSlot[head] = slot;
    isWrite[slot] = write ? 1 : 0;
    started[slot] = now;
  };

  const cpu0 = threadCpuMs();
  const t0 = performance.now();
  const deadline = t0 + job.durationMs;
  for (let s = 0; s < depth; s++) submit(s, t0);
  q.publish();
  q.kick();
  let stopping = false;
  let lastProgress = t0;
  let end = deadline;
  try {
    while (q.outstanding > 0) {
      let n = 0;
      let now = performance.now();
      for (let head = q.poll(); head >= 0; head = q.poll()) {
        const slot = headToSlot[head];
        headToSlot[head] = -1;
        if (!stopping) {
          const ns = Math.round((now - started[slot]) * 1e6);
          hist[histBucket(ns)]++;
          if (ns > maxNs) maxNs = ns;
          sumNs += ns;
          ios++;
          if (isWrite[slot] === 0) reads++;
          if (u8[job.statuses.offset + 16 * slot] !== 0) statusErrors++;
          if (q.lastLen !== (isWrite[slot] ? 1 : bs + 1)) lengthErrors++;
          submit(slot, now);
        }
        n++;
      }
      if (n > 0) {
        lastProgress = now;
        if (!stopping) {
          q.publish();
          q.kick();
        }
      } else {
        waits++;
        q.waitCall(200);
        now = performance.now();
        if (now - lastProgress > 5000) {
          error = `queue ${q.index}: no completion for 5 s (${q.outstanding} outstanding)`;
          break;
        }
      }
      if (!stopping && now >= deadline) {
        stopping = true;
        end = now;
      }
    }
  } catch (e) {
    error = (e as Error).message;
  }
  const cpuMs = threadCpuMs() - cpu0;
  q.close();
  return {
    queue: q.index,
    ios,
    reads,
    statusErrors,
    lengthErrors,
    elapsedMs: end - t0,
    histogram: hist,
    maxNs,
    sumNs,
    cpuMs,
    kicks: q.kicks,
    waits,
    error,
  };
}

let job: LoadJob | null = null;
self.onmessage = (e: MessageEvent<LoadJob | "go">) => {
  if (e.data === "go") {
    const result = run(job!);
    self.postMessage(result, [result.histogram.buffer]);
    return;
  }
  job = e.data;
  self.postMessage("ready");
};
