/**
 * The scale comparison: the cost of N idle daemons on one host, as an operator running N VMs
 * sees it. N `vhostd blk` processes, each with its own socket and image, against N
 * qemu-storage-daemon processes exporting one image each; total RSS, total PSS (shared pages,
 * mostly the deno binary's, divided among the processes that map them, so the sum is what the N
 * cost together) and total CPU seconds over an idle window.
 *
 * Daemons start a few at a time and each is waited for until it listens; every one started is
 * stopped again, also when a start fails.
 *
 * @module
 */

import { type BackendName, type BlkTarget, DEFAULT_LEVERS, startBackend } from "./backends.ts";
import {
  commandLine,
  processCpuSeconds,
  progress,
  type RunningBackend,
  sig,
  sleep,
  StepError,
} from "./lib.ts";
import { sparseImage } from "./memory.ts";
import { procMemory, pssMiB } from "./procmem.ts";

/** Settings of the scale comparison. */
export interface ScaleConfig {
  /** How many daemons at once, e.g. 1, 8, 32. */
  counts: number[];
  /** Seconds of the idle window whose CPU time is summed. */
  idleSeconds: number;
  /** Settle time after the last daemon listens, before the window, in ms. */
  settleMs: number;
  /** Daemons starting at the same time, at most. */
  parallel: number;
  /** Queues each device offers. */
  queues: number;
  /** Scratch directory for sockets and sparse images. */
  scratchDir: string;
}

/** N daemons of one kind, idle together. */
export interface ScaleCase {
  /** Which daemon. */
  backend: BackendName;
  /** How many ran at once. */
  daemons: number;
  /** Sum of VmRSS, MiB. */
  totalRssMiB: number;
  /** Sum of RssAnon (private memory), MiB. */
  totalAnonMiB: number;
  /** Sum of PSS, MiB: what the N cost together. */
  totalPssMiB: number;
  /** Sum of utime+stime over the idle window, seconds. */
  cpuSeconds: number;
  /** Threads of all of them. */
  threads: number;
  /** Wall seconds from the first start to the last daemon listening. */
  startSeconds: number;
}

/** Result of the scale comparison. */
export interface ScaleResult {
  /** What was measured. */
  description: string;
  /** Settings used. */
  config: ScaleConfig;
  /** Every (backend, N). */
  cases: ScaleCase[];
  /** vhostd / qsd per N. */
  ratios: { daemons: number; rssRatio: number; pssRatio: number; cpuRatio: number }[];
  /** One daemon's command of each kind (the others differ in socket and image). */
  commands: string[];
}

/**
 * Runs `start(i)` for i in 0..count-1, at most `parallel` at a time, and returns what they
 * started, in index order. If any fails, waits for the others to finish starting, stops every
 * one that started, and throws the first failure.
 */
export async function startBounded(
  count: number,
  parallel: number,
  start: (i: number) => Promise<RunningBackend>,
): Promise<RunningBackend[]> {
  const started: (RunningBackend | undefined)[] = new Array(count);
  let next = 0;
  let failure: unknown;
  const lane = async () => {
    while (failure === undefined && next < count) {
      const i = next++;
      try {
        started[i] = await start(i);
      } catch (e) {
        failure ??= e;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(parallel, count)) }, lane));
  if (failure !== undefined) {
    await stopAll(started.filter((b): b is RunningBackend => b !== undefined));
    throw failure;
  }
  return started as RunningBackend[];
}

async function stopAll(backends: readonly RunningBackend[]): Promise<void> {
  await Promise.all(backends.map((b) => b.stop()));
}

function sum(xs: readonly number[]): number {
  return xs.reduce((a, b) => a + b, 0);
}

/** Runs the scale comparison. */
export async function scale(cfg: ScaleConfig): Promise<ScaleResult> {
  Deno.mkdirSync(cfg.scratchDir, { recursive: true });
  const most = Math.max(...cfg.counts);
  const images = Array.from(
    { length: most },
    (_, i) => sparseImage(`${cfg.scratchDir}/scale${i}.img`, 64 << 20),
  );
  const target = (backend: BackendName, i: number): BlkTarget => ({
    image: images[i],
    storage: "tmpfs", // buffered file I/O; idle daemons do none
    nullSizeBytes: 0,
    queues: cfg.queues,
    socket: `${cfg.scratchDir}/scale-${backend}-${i}.sock`,
  });
  const cases: ScaleCase[] = [];
  const commands = new Map<BackendName, string>();
  for (const [k, n] of cfg.counts.entries()) {
    // Alternate which kind goes first, so neither always meets the page cache warmer.
    const order: BackendName[] = k % 2 ? ["qsd", "vhostd"] : ["vhostd", "qsd"];
    for (const backend of order) {
      const step = `scale: ${n} × ${backend}`;
      const t0 = performance.now();
      let all: RunningBackend[];
      try {
        all = await startBounded(
          n,
          cfg.parallel,
          (i) => startBackend(backend, target(backend, i), DEFAULT_LEVERS),
        );
      } catch (e) {
        throw new StepError(step, `could not start: ${(e as Error).message}`);
      }
      try {
        const startSeconds = sig((performance.now() - t0) / 1000, 3);
        commands.set(backend, commandLine(all[0].command));
        await sleep(cfg.settleMs);
        const cpu0 = all.map((b) => processCpuSeconds(b.pid));
        await sleep(cfg.idleSeconds * 1000);
        const cpu1 = all.map((b) => processCpuSeconds(b.pid));
        const mem = all.map((b) => procMemory(b.pid));
        const pss = all.map((b) => pssMiB(b.pid));
        const c: ScaleCase = {
          backend,
          daemons: n,
          totalRssMiB: sig(sum(mem.map((m) => m.rssMiB)), 4),
          totalAnonMiB: sig(sum(mem.map((m) => m.anonMiB)), 4),
          totalPssMiB: sig(sum(pss), 4),
          cpuSeconds: sig(sum(cpu1.map((x, i) => x - cpu0[i])), 3),
          threads: sum(mem.map((m) => m.threads)),
          startSeconds,
        };
        cases.push(c);
        progress(
          `${step}: RSS ${c.totalRssMiB} MiB, PSS ${c.totalPssMiB} MiB, ` +
            `${c.cpuSeconds} CPU s in ${cfg.idleSeconds} s idle (started in ${startSeconds} s)`,
        );
      } catch (e) {
        throw new StepError(step, (e as Error).message);
      } finally {
        await stopAll(all);
      }
    }
  }
  const ratios: ScaleResult["ratios"] = [];
  for (const n of cfg.counts) {
    const v = cases.find((c) => c.backend === "vhostd" && c.daemons === n);
    const q = cases.find((c) => c.backend === "qsd" && c.daemons === n);
    if (v && q) {
      ratios.push({
        daemons: n,
        rssRatio: sig(v.totalRssMiB / q.totalRssMiB, 3),
        pssRatio: sig(v.totalPssMiB / q.totalPssMiB, 3),
        // Idle CPU can be 0 on both sides: no ratio then.
        cpuRatio: q.cpuSeconds > 0 ? sig(v.cpuSeconds / q.cpuSeconds, 3) : NaN,
      });
    }
  }
  return {
    description: "N idle daemons at once (listening, no front-end): total VmRSS and RssAnon " +
      "(/proc/PID/status), total Pss (/proc/PID/smaps_rollup) and total utime+stime over " +
      `${cfg.idleSeconds} s`,
    config: cfg,
    cases,
    ratios,
    commands: [...commands.values()],
  };
}
