/**
 * A process's memory as Linux accounts it, for the footprint comparisons: the resident set split
 * by kind (/proc/PID/status) and the proportional set size (/proc/PID/smaps_rollup), plus the
 * arithmetic that turns several processes' figures into per-worker, per-device and per-queue
 * increments.
 *
 * RssFile is mostly the pages of the deno binary itself, mapped from the page cache and shared by
 * every Deno process on the host; PSS divides such shared pages among the processes mapping them,
 * so the PSS of N processes adds up to what they cost together.
 *
 * @module
 */

import { median } from "./lib.ts";

/** One process's memory, MiB (one decimal), and its thread count. */
export interface ProcMemory {
  /** VmRSS: everything resident. */
  rssMiB: number;
  /** RssAnon: private anonymous memory (heaps, stacks, buffers): what the process alone costs. */
  anonMiB: number;
  /** RssFile: resident file-backed pages (mostly the deno binary; shared between processes). */
  fileMiB: number;
  /** RssShmem: shared memory (memfds, /dev/shm mappings). */
  shmemMiB: number;
  /** Threads of the process. */
  threads: number;
}

const KiB_PER_MiB = 1024;

function tenth(x: number): number {
  return Math.round(x * 10) / 10;
}

/**
 * Reads the memory fields of a /proc/PID/status text. Throws naming the field if one is missing
 * or not a number of kB (a kernel without them, or the text of something else).
 */
export function parseProcStatus(text: string): ProcMemory {
  const kib = (field: string): number => {
    const m = new RegExp(`^${field}:\\s+(\\d+) kB$`, "m").exec(text);
    if (!m) throw new Error(`/proc status: no ${field} in kB`);
    return Number(m[1]);
  };
  const threads = /^Threads:\s+(\d+)$/m.exec(text);
  if (!threads) throw new Error("/proc status: no Threads");
  return {
    rssMiB: tenth(kib("VmRSS") / KiB_PER_MiB),
    anonMiB: tenth(kib("RssAnon") / KiB_PER_MiB),
    fileMiB: tenth(kib("RssFile") / KiB_PER_MiB),
    shmemMiB: tenth(kib("RssShmem") / KiB_PER_MiB),
    threads: Number(threads[1]),
  };
}

/** The Pss line of a /proc/PID/smaps_rollup text, in MiB (one decimal); throws without one. */
export function parsePssMiB(smapsRollup: string): number {
  const m = /^Pss:\s+(\d+) kB$/m.exec(smapsRollup);
  if (!m) throw new Error("/proc smaps_rollup: no Pss in kB");
  return tenth(Number(m[1]) / KiB_PER_MiB);
}

/** {@link ProcMemory} of a running process. */
export function procMemory(pid: number): ProcMemory {
  return parseProcStatus(Deno.readTextFileSync(`/proc/${pid}/status`));
}

/** Proportional set size of a running process, MiB. */
export function pssMiB(pid: number): number {
  return parsePssMiB(Deno.readTextFileSync(`/proc/${pid}/smaps_rollup`));
}

/**
 * What each step of something adds: `(to − from) / steps`, one decimal; NaN when either figure
 * is missing or there are no steps (e.g. 16 devices against 1: 15 steps).
 */
export function increment(from: number | undefined, to: number | undefined, steps: number): number {
  if (from === undefined || to === undefined || !(steps > 0)) return NaN;
  if (!Number.isFinite(from) || !Number.isFinite(to)) return NaN;
  return tenth((to - from) / steps);
}

/** Field-by-field {@link increment} of two {@link ProcMemory} figures (threads included). */
export function memoryIncrement(
  from: ProcMemory | undefined,
  to: ProcMemory | undefined,
  steps: number,
): ProcMemory {
  return {
    rssMiB: increment(from?.rssMiB, to?.rssMiB, steps),
    anonMiB: increment(from?.anonMiB, to?.anonMiB, steps),
    fileMiB: increment(from?.fileMiB, to?.fileMiB, steps),
    shmemMiB: increment(from?.shmemMiB, to?.shmemMiB, steps),
    threads: increment(from?.threads, to?.threads, steps),
  };
}

/** Field-by-field median of several samples of one case (NaN fields for none). */
export function medianMemory(samples: readonly ProcMemory[]): ProcMemory {
  const med = (pick: (m: ProcMemory) => number): number => tenth(median(samples.map(pick)));
  return {
    rssMiB: med((m) => m.rssMiB),
    anonMiB: med((m) => m.anonMiB),
    fileMiB: med((m) => m.fileMiB),
    shmemMiB: med((m) => m.shmemMiB),
    threads: med((m) => m.threads),
  };
}
