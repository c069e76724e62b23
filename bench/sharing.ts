/**
 * The sharing comparison: what it costs two busy disks to share one data-plane worker, against a
 * worker each. One process serves two blk devices (bench/blk_targets.ts, `--workers 1`: both on
 * one worker; `--workers 0`: a worker per device), and two load generators (`vhostd load`, one
 * per device, one queue each) drive them at the same time. Total IOPS and the back-end's CPU per
 * I/O are compared; the variants alternate run by run.
 *
 * The two generators start together but each measures its own window, so the windows overlap by
 * all but the generators' start-up skew (well under a second).
 *
 * @module
 */

import { loadCommand } from "./backend_only.ts";
import {
  commandLine,
  DENO,
  lastLines,
  median,
  processCpuSeconds,
  progress,
  REPO_ROOT,
  type RunningBackend,
  runOrder,
  sig,
  socketExists,
  startProcess,
  StepError,
} from "./lib.ts";
import { sharedWorkersAvailable } from "./memory.ts";

/** Worker placements compared. */
export type SharingVariant = "shared" | "own";

/** Settings of the sharing comparison. */
export interface SharingConfig {
  /** `null` (no I/O: the worker's own cost) and/or `tmpfs` (buffered reads of a page-cached image). */
  storages: ("null" | "tmpfs")[];
  /** Repetitions (variants alternate). */
  runs: number;
  /** Seconds per load run. */
  seconds: number;
  /** Requests in flight per device (one queue each). */
  depth: number;
  /** Request size in bytes. */
  blockSize: number;
  /** Image on tmpfs for the `tmpfs` storage (the second device reads a copy of it). */
  tmpfsImage: string;
  /** Size of the null targets. */
  nullSizeBytes: number;
  /** Directory for sockets. */
  socketDir: string;
}

/** One run of two loads at once. */
export interface SharingSample {
  /** IOPS of each device. */
  iops: number[];
  /** Their sum. */
  totalIops: number;
  /** Back-end CPU µs per I/O over both. */
  cpuUsPerIo: number;
}

/** All runs of one (storage, variant). */
export interface SharingCase {
  /** Storage. */
  storage: "null" | "tmpfs";
  /** Placement. */
  variant: SharingVariant;
  /** Median total IOPS. */
  totalIops: number;
  /** Median back-end CPU µs per I/O. */
  cpuUsPerIo: number;
  /** Every run. */
  samples: SharingSample[];
  /** Back-end command. */
  backendCommand: string;
}

/** Result of the sharing comparison. */
export interface SharingResult {
  /** What was measured. */
  description: string;
  /** Settings used. */
  config: SharingConfig;
  /** Whether this build has shared workers; without them nothing was measured. */
  available: boolean;
  /** Every case. */
  cases: SharingCase[];
  /** shared / own per storage (total IOPS, and CPU per I/O). */
  ratios: { storage: string; iopsRatio: number; cpuPerIoRatio: number }[];
  /** Load-generator command (one per device, run together). */
  loadCommands: string[];
}

/** The argv of the two-device back-end of `variant`. */
export function sharingBackendArgv(
  cfg: SharingConfig,
  storage: "null" | "tmpfs",
  variant: SharingVariant,
  sockets: string[],
  images: string[],
): string[] {
  // An image each: a device locks its image, so a second device on the same one would fail.
  const what = storage === "null"
    ? ["--null", "--size", String(cfg.nullSizeBytes)]
    : images.flatMap((i) => ["--image", i]);
  return [
    DENO,
    "run",
    "-A",
    "bench/blk_targets.ts",
    ...what,
    "--queues",
    "1",
    "--workers",
    variant === "shared" ? "1" : "0",
    ...sockets,
  ];
}

/** Runs the load generators at the same time; their IOPS and requests completed. */
async function loadTogether(argvs: string[][]): Promise<{ iops: number; ios: number }[]> {
  const outs = await Promise.all(argvs.map((argv) =>
    new Deno.Command(argv[0], {
      args: argv.slice(1),
      cwd: REPO_ROOT,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1" },
    }).output()
  ));
  return outs.map((out) => {
    const stdout = new TextDecoder().decode(out.stdout);
    if (!out.success) {
      throw new Error(
        `load exited ${out.code}: ${lastLines(new TextDecoder().decode(out.stderr) + stdout)}`,
      );
    }
    const r = JSON.parse(stdout.slice(stdout.indexOf("{")));
    if (!(r.ios > 0) || r.errors !== 0) {
      throw new Error(`load reported ${r.ios} I/Os and ${r.errors} errors`);
    }
    return { iops: r.iops as number, ios: r.ios as number };
  });
}

/** Runs the sharing comparison. */
export async function sharing(cfg: SharingConfig): Promise<SharingResult> {
  const description = "two blk devices in one process (bench/blk_targets.ts), each driven by " +
    "its own `vhostd load` " +
    `(1 queue, depth ${cfg.depth}, ${cfg.blockSize / 1024} KiB random reads, ${cfg.seconds} s) ` +
    "at the same time; both devices on one worker (shared) or a worker each (own)";
  let available: boolean;
  try {
    available = await sharedWorkersAvailable(cfg.socketDir, cfg.tmpfsImage);
  } catch (e) {
    throw new StepError("sharing: probing for shared workers", (e as Error).message);
  }
  const sockets = [0, 1].map((i) => `${cfg.socketDir}/share-${i}.sock`);
  const shape = { label: "1q", queues: 1, depth: cfg.depth };
  const loads = sockets.map((s) => loadCommand(s, shape, cfg.seconds, cfg.blockSize));
  const result: SharingResult = {
    description,
    config: cfg,
    available,
    cases: [],
    ratios: [],
    loadCommands: loads.map(commandLine),
  };
  if (!available) {
    progress("sharing: this build has no shared workers; nothing to compare");
    return result;
  }
  const copy = `${cfg.socketDir}/sharing-copy.img`;
  if (cfg.storages.includes("tmpfs")) Deno.copyFileSync(cfg.tmpfsImage, copy);
  try {
    result.cases = await measure(cfg, sockets, [cfg.tmpfsImage, copy], loads);
  } finally {
    try {
      Deno.removeSync(copy);
    } catch {
      // never made
    }
  }
  for (const storage of cfg.storages) {
    const sh = result.cases.find((c) => c.storage === storage && c.variant === "shared");
    const own = result.cases.find((c) => c.storage === storage && c.variant === "own");
    if (sh && own) {
      result.ratios.push({
        storage,
        iopsRatio: sig(sh.totalIops / own.totalIops, 3),
        cpuPerIoRatio: sig(sh.cpuUsPerIo / own.cpuUsPerIo, 3),
      });
    }
  }
  return result;
}

async function measure(
  cfg: SharingConfig,
  sockets: string[],
  images: string[],
  loads: string[][],
): Promise<SharingCase[]> {
  const cases = new Map<string, SharingCase>();
  for (let run = 0; run < cfg.runs; run++) {
    for (const storage of cfg.storages) {
      for (const variant of runOrder<SharingVariant>(["shared", "own"], run)) {
        const step = `sharing: ${storage}, ${variant}`;
        for (const s of sockets) {
          try {
            Deno.removeSync(s);
          } catch {
            // not there
          }
        }
        const argv = sharingBackendArgv(cfg, storage, variant, sockets, images);
        let be: RunningBackend;
        try {
          be = await startProcess(
            argv,
            (out) => out.includes("vhostd: serving") && sockets.every(socketExists),
          );
        } catch (e) {
          throw new StepError(step, `could not start: ${(e as Error).message}`);
        }
        try {
          const before = processCpuSeconds(be.pid);
          const reports = await loadTogether(loads);
          const cpu = processCpuSeconds(be.pid) - before;
          const totalIops = Math.round(reports.reduce((a, r) => a + r.iops, 0));
          const ios = reports.reduce((a, r) => a + r.ios, 0);
          const s: SharingSample = {
            iops: reports.map((r) => Math.round(r.iops)),
            totalIops,
            cpuUsPerIo: sig((cpu * 1e6) / ios, 4),
          };
          const key = `${storage}|${variant}`;
          if (!cases.has(key)) {
            cases.set(key, {
              storage,
              variant,
              totalIops: 0,
              cpuUsPerIo: 0,
              samples: [],
              backendCommand: commandLine(argv),
            });
          }
          cases.get(key)!.samples.push(s);
          progress(
            `${step} run ${run + 1}: ${s.iops.join(" + ")} = ${totalIops} IOPS, ` +
              `${s.cpuUsPerIo} µs CPU/IO`,
          );
        } catch (e) {
          throw new StepError(step, (e as Error).message);
        } finally {
          await be.stop();
        }
      }
    }
  }
  for (const c of cases.values()) {
    c.totalIops = Math.round(median(c.samples.map((s) => s.totalIops)));
    c.cpuUsPerIo = sig(median(c.samples.map((s) => s.cpuUsPerIo)), 3);
  }
  return [...cases.values()];
}
