/**
 * `vhostd load`: a load generator for any vhost-user-blk back-end, without a guest. It plays the
 * front-end (see vhost-user/frontend/), sets up one ring per queue, and drives each ring from its
 * own worker thread (daemon/load_worker.ts) that blocks on the call eventfd with synchronous FFI.
 *
 * It reports IOPS, MB/s and latency percentiles, plus its own CPU cost per request: the inverse
 * of that cost is the generator's ceiling on one core, so a result close to it means the
 * generator, not the back-end, was the limit.
 *
 * @module
 */

import { parseArgs } from "./args.ts";
import { usage } from "./cli.ts";
import { UsageError } from "../sys/errors.ts";
import { BlkFrontend } from "../vhost-user/frontend/blk_frontend.ts";
import {
  HIST_BUCKETS,
  histBucketLimit,
  type LoadJob,
  type LoadPattern,
  type LoadResult,
} from "./load_worker.ts";

const HELP = `Usage: vhostd load --socket PATH [options]

Drives the vhost-user-blk back-end at PATH from worker threads (one per queue) and reports
IOPS, MB/s and latency. Random writes overwrite the image with junk: use a scratch image.

Options:
  --socket PATH     back-end socket (required)
  --queues N        queues to drive, one thread each (default 1)
  --depth D         requests in flight per queue (default 32)
  --bs SIZE         bytes per request, a multiple of 512: 4k, 64k, 1m... (default 4k)
  --rw PATTERN      randread, randwrite or rw (50/50) (default randread)
  --seconds S       run time (default 5)
  --json            print the report as JSON
  -h, --help        show this text
`;

/** The report `load` prints. */
export interface LoadReport {
  /** Back-end socket. */
  socket: string;
  /** Queues driven. */
  queues: number;
  /** Depth per queue. */
  depth: number;
  /** Request size in bytes. */
  blockSize: number;
  /** Access pattern. */
  pattern: LoadPattern;
  /** Measured run time in seconds (longest queue). */
  seconds: number;
  /** Requests completed. */
  ios: number;
  /** Requests per second. */
  iops: number;
  /** Megabytes (10^6) per second. */
  mbPerSecond: number;
  /** Latency percentiles and extremes, in microseconds. */
  latencyUs: { mean: number; p50: number; p99: number; p999: number; max: number };
  /** Completions that failed (status not OK, or a wrong used length). */
  errors: number;
  /** Generator CPU time per request, in microseconds (all its threads). */
  generatorCpuUsPerIo: number;
  /** 1 / that: the most requests per second one core running the generator could issue. */
  generatorCeilingIopsPerCore: number;
  /** Per-queue details. */
  perQueue: { queue: number; ios: number; iops: number; kicks: number; waits: number }[];
  /** Fatal problems reported by the threads. */
  failures: string[];
}

function parseSize(s: string): number {
  const m = /^(\d+)([kKmM]?)$/.exec(s);
  if (!m) throw new UsageError(`--bs must be a size like 4k or 65536, not "${s}"`);
  const n = Number(m[1]) * (m[2] === "" ? 1 : /k/i.test(m[2]) ? 1024 : 1 << 20);
  if (n < 512 || n % 512 !== 0 || n > 1 << 20) {
    throw new UsageError(`--bs must be a multiple of 512 from 512 to 1m, not "${s}"`);
  }
  return n;
}

function parseCount(name: string, s: string | undefined, def: number, max: number): number {
  if (s === undefined) return def;
  const n = Number(s);
  if (!Number.isInteger(n) || n < 1 || n > max) {
    throw new UsageError(`--${name} must be a whole number from 1 to ${max}, not "${s}"`);
  }
  return n;
}

function percentile(hist: Uint32Array, total: number, p: number): number {
  const want = Math.ceil(total * p);
  let seen = 0;
  for (let b = 0; b < hist.length; b++) {
    seen += hist[b];
    if (seen >= want) return histBucketLimit(b);
  }
  return 0;
}

/** Runs a load against `socket` and returns the report. */
export async function runLoad(opts: {
  socket: string;
  queues: number;
  depth: number;
  blockSize: number;
  pattern: LoadPattern;
  seconds: number;
}): Promise<LoadReport> {
  // Three descriptors per request, and a power-of-two ring; 1024 is what back-ends accept.
  let queueSize = 128;
  while (queueSize < 3 * opts.depth) queueSize *= 2;
  if (queueSize > 1024) throw new UsageError(`--depth ${opts.depth} needs a ring over 1024`);
  const perQueue = opts.depth * (opts.blockSize + 32) + 16 * queueSize + 3 * 4096 + 8 * queueSize;
  const big = Math.ceil((perQueue * opts.queues + (4 << 20)) / (2 << 20)) * (2 << 20);
  const fe = await BlkFrontend.open({
    socket: opts.socket,
    queues: opts.queues,
    queueSize,
    indirect: false,
    layout: [{ guestPhysAddr: 0, size: 1 << 20 }, { guestPhysAddr: 0x1_0000_0000, size: big }],
    driver: { slotsPerQueue: 1, maxDataBytes: 4096 },
    connectRetryMs: 0,
  });
  const workers: Worker[] = [];
  try {
    const capacitySectors = fe.config.capacitySectors;
    if (capacitySectors * 512 < opts.blockSize) {
      throw new UsageError(`the device (${capacitySectors} sectors) is smaller than --bs`);
    }
    const eventIdx = fe.queues[0].eventIdx;
    const jobs: LoadJob[] = fe.queues.map((q, i) => ({
      ram: fe.ram.shared,
      queue: q.layout,
      eventIdx,
      depth: opts.depth,
      blockSize: opts.blockSize,
      pattern: opts.pattern,
      durationMs: opts.seconds * 1000,
      capacitySectors,
      headers: fe.ram.alloc(16 * opts.depth, 16),
      statuses: fe.ram.alloc(16 * opts.depth, 16),
      data: fe.ram.alloc(opts.blockSize * opts.depth, 4096),
      seed: 0x9e3779b9 ^ (i * 0x85ebca6b) ^ Date.now(),
    }));
    const results: Promise<LoadResult>[] = [];
    const ready: Promise<void>[] = [];
    for (const job of jobs) {
      const w = new Worker(new URL("./load_worker.ts", import.meta.url).href, { type: "module" });
      workers.push(w);
      let onReady!: () => void, onResult!: (r: LoadResult) => void, onError!: (e: Error) => void;
      ready.push(new Promise<void>((r) => onReady = r));
      results.push(new Promise<LoadResult>((res, rej) => [onResult, onError] = [res, rej]));
      w.onmessage = (e) => e.data === "ready" ? onReady() : onResult(e.data as LoadResult);
      w.onerror = (e) => {
        e.preventDefault();
        onError(new Error(`load worker failed: ${e.message}`));
      };
      w.postMessage(job);
    }
    await Promise.all(ready);
    for (const w of workers) w.postMessage("go");
    const rs = await Promise.all(results);
    // The rings are idle now: stop them the way QEMU does, and check the back-end consumed
    // exactly what the threads made available.
    const bases = fe.stop();
    const failures = rs.filter((r) => r.error !== "").map((r) => r.error);
    bases.forEach((b, i) => {
      const avail = fe.queues[i].publishedAvailIdx;
      if (b !== avail) {
        failures.push(`queue ${i}: GET_VRING_BASE ${b}, but the driver made ${avail} available`);
      }
    });
    return report(opts, rs, failures);
  } finally {
    for (const w of workers) w.terminate();
    fe.close();
  }
}

function report(
  opts: { socket: string; queues: number; depth: number; blockSize: number; pattern: LoadPattern },
  rs: LoadResult[],
  failures: string[],
): LoadReport {
  const hist = new Uint32Array(HIST_BUCKETS);
  let ios = 0, iops = 0, errors = 0, sumNs = 0, maxNs = 0, cpuMs = 0, seconds = 0;
  for (const r of rs) {
    for (let b = 0; b < HIST_BUCKETS; b++) hist[b] += r.histogram[b];
    ios += r.ios;
    iops += r.elapsedMs > 0 ? r.ios / (r.elapsedMs / 1000) : 0;
    errors += r.statusErrors + r.lengthErrors;
    sumNs += r.sumNs;
    maxNs = Math.max(maxNs, r.maxNs);
    cpuMs += r.cpuMs;
    seconds = Math.max(seconds, r.elapsedMs / 1000);
  }
  const us = (ns: number) => Math.round(ns / 10) / 100;
  const cpuUsPerIo = ios > 0 ? (cpuMs * 1000) / ios : 0;
  return {
    socket: opts.socket,
    queues: opts.queues,
    depth: opts.depth,
    blockSize: opts.blockSize,
    pattern: opts.pattern,
    seconds: Math.round(seconds * 1000) / 1000,
    ios,
    iops: Math.round(iops),
    mbPerSecond: Math.round((iops * opts.blockSize) / 1e4) / 100,
    latencyUs: {
      mean: ios > 0 ? us(sumNs / ios) : 0,
      p50: us(percentile(hist, ios, 0.5)),
      p99: us(percentile(hist, ios, 0.99)),
      p999: us(percentile(hist, ios, 0.999)),
      max: us(maxNs),
    },
    errors,
    generatorCpuUsPerIo: Math.round(cpuUsPerIo * 100) / 100,
    generatorCeilingIopsPerCore: cpuUsPerIo > 0 ? Math.round(1e6 / cpuUsPerIo) : 0,
    perQueue: rs.map((r) => ({
      queue: r.queue,
      ios: r.ios,
      iops: Math.round(r.elapsedMs > 0 ? r.ios / (r.elapsedMs / 1000) : 0),
      kicks: r.kicks,
      waits: r.waits,
    })),
    failures,
  };
}

function text(r: LoadReport): string {
  const kib = r.blockSize >= 1024 ? `${r.blockSize / 1024}k` : `${r.blockSize}`;
  return [
    `load: ${r.pattern} bs=${kib} queues=${r.queues} depth=${r.depth} on ${r.socket}`,
    `  ${r.iops} IOPS, ${r.mbPerSecond} MB/s, ${r.ios} requests in ${r.seconds} s, ` +
    `${r.errors} errors`,
    `  latency us: mean ${r.latencyUs.mean}  p50 ${r.latencyUs.p50}  p99 ${r.latencyUs.p99}  ` +
    `p99.9 ${r.latencyUs.p999}  max ${r.latencyUs.max}`,
    `  generator: ${r.generatorCpuUsPerIo} us CPU per request ` +
    `(ceiling about ${r.generatorCeilingIopsPerCore} IOPS per core)`,
    ...r.perQueue.map((q) =>
      `  queue ${q.queue}: ${q.iops} IOPS, ${q.kicks} kicks, ${q.waits} waits for a call`
    ),
    ...r.failures.map((f) => `  FAILED: ${f}`),
  ].join("\n");
}

/** `vhostd load`: returns 0 on a clean run, 1 if any request failed or a thread gave up. */
export async function cmdLoad(args: string[]): Promise<number> {
  const { values } = usage(() =>
    parseArgs({
      args,
      strict: true,
      options: {
        socket: { type: "string" },
        queues: { type: "string" },
        depth: { type: "string" },
        bs: { type: "string" },
        rw: { type: "string" },
        seconds: { type: "string" },
        json: { type: "boolean" },
        help: { type: "boolean", short: "h" },
      },
    })
  );
  if (values.help) {
    console.log(HELP);
    return 0;
  }
  if (!values.socket) throw new UsageError("load needs --socket PATH");
  const pattern = values.rw ?? "randread";
  if (pattern !== "randread" && pattern !== "randwrite" && pattern !== "rw") {
    throw new UsageError(`--rw must be randread, randwrite or rw, not "${pattern}"`);
  }
  const r = await runLoad({
    socket: values.socket,
    queues: parseCount("queues", values.queues, 1, 64),
    depth: parseCount("depth", values.depth, 32, 341),
    blockSize: parseSize(values.bs ?? "4k"),
    pattern,
    seconds: parseCount("seconds", values.seconds, 5, 3600),
  });
  console.log(values.json ? JSON.stringify(r, null, 2) : text(r));
  return r.errors === 0 && r.failures.length === 0 && r.ios > 0 ? 0 : 1;
}
