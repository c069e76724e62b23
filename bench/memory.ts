/**
 * Comparison 4, memory: resident set size of an idle `vhostd blk` (the real CLI), and the
 * increment per extra device, from one process serving 1 and then N devices
 * (bench/blk_targets.ts, one data-plane worker per device). qemu-storage-daemon serving the same
 * image is measured alongside for reference.
 *
 * @module
 */

import { DEFAULT_LEVERS, startBackend } from "./backends.ts";
import {
  commandLine,
  DENO,
  median,
  progress,
  rssBytes,
  type RunningBackend,
  sleep,
  socketExists,
  startProcess,
  StepError,
  threadCount,
} from "./lib.ts";

/** Settings of comparison 4. */
export interface MemoryConfig {
  /** Image the devices serve (a sparse file is fine: idle devices do no I/O). */
  image: string;
  /** Devices in the multi-device process. */
  devices: number;
  /** Queues per device. */
  queues: number;
  /** Samples per figure (median reported). */
  runs: number;
  /** Directory for sockets. */
  socketDir: string;
  /** Settle time after start-up before reading RSS, in ms. */
  settleMs: number;
}

/** Result of comparison 4. */
export interface MemoryResult {
  /** What was measured. */
  description: string;
  /** Settings used. */
  config: MemoryConfig;
  /** Idle RSS of `vhostd blk` (CLI), MiB, median. */
  cliOneDeviceMiB: number;
  /** Threads of that process. */
  cliThreads: number;
  /** RSS of bench/blk_targets.ts with 1 device, MiB, median. */
  oneDeviceMiB: number;
  /** RSS of bench/blk_targets.ts with `devices` devices, MiB, median. */
  manyDevicesMiB: number;
  /** (many − one) / (devices − 1), MiB. */
  perExtraDeviceMiB: number;
  /** Idle RSS of qemu-storage-daemon exporting the same image, MiB, for reference. */
  qsdOneDeviceMiB: number;
  /** RSS of Deno itself in vhostd's shape (main thread + one idle worker, no vhostd code), MiB. */
  denoFloorMiB: number;
  /** The target for one blk device, MiB. */
  targetMiB: number;
  /** Commands run. */
  commands: string[];
  /** Every sample, MiB. */
  samples: { cli: number[]; one: number[]; many: number[]; qsd: number[]; floor: number[] };
}

const MiB = 1 << 20;

async function idleRss(be: RunningBackend, settleMs: number): Promise<number> {
  await sleep(settleMs);
  return Math.round((rssBytes(be.pid) / MiB) * 10) / 10;
}

/** Runs comparison 4. */
export async function memory(cfg: MemoryConfig): Promise<MemoryResult> {
  const samples = {
    cli: [] as number[],
    one: [] as number[],
    many: [] as number[],
    qsd: [] as number[],
    floor: [] as number[],
  };
  const commands: string[] = [];
  let cliThreads = 0;
  const target = (name: string) => ({
    image: cfg.image,
    storage: "tmpfs" as const, // plain buffered file I/O; the image's place does not matter idle
    nullSizeBytes: 0,
    queues: cfg.queues,
    socket: `${cfg.socketDir}/mem-${name}.sock`,
  });
  const sockets = (k: number) =>
    Array.from({ length: k }, (_, i) => `${cfg.socketDir}/mem-${k}-${i}.sock`);
  const multi = async (k: number): Promise<RunningBackend> => {
    const socks = sockets(k);
    for (const s of socks) {
      try {
        Deno.removeSync(s);
      } catch {
        // not there
      }
    }
    const argv = [
      DENO,
      "run",
      "-A",
      "bench/blk_targets.ts",
      "--image",
      cfg.image,
      "--queues",
      String(cfg.queues),
      ...socks,
    ];
    return await startProcess(
      argv,
      (out) => out.includes("vhostd: serving") && socks.every(socketExists),
    );
  };
  for (let run = 0; run < cfg.runs; run++) {
    const plan: [string, () => Promise<RunningBackend>, number[]][] = [
      [
        "vhostd blk (CLI), 1 device",
        () => startBackend("vhostd", target("cli"), DEFAULT_LEVERS),
        samples.cli,
      ],
      ["bench/blk_targets.ts, 1 device", () => multi(1), samples.one],
      [`bench/blk_targets.ts, ${cfg.devices} devices`, () => multi(cfg.devices), samples.many],
      [
        "qemu-storage-daemon, 1 export",
        () => startBackend("qsd", target("qsd"), DEFAULT_LEVERS),
        samples.qsd,
      ],
      [
        "Deno floor (main thread + one idle worker)",
        () =>
          startProcess(
            [DENO, "run", "-A", "bench/deno_floor.ts"],
            (out) => out.includes("deno floor: ready"),
          ),
        samples.floor,
      ],
    ];
    for (const [what, start, into] of plan) {
      let be: RunningBackend;
      try {
        be = await start();
      } catch (e) {
        throw new StepError(`memory: ${what}`, `could not start: ${(e as Error).message}`);
      }
      try {
        const rss = await idleRss(be, cfg.settleMs);
        if (into === samples.cli) cliThreads = threadCount(be.pid);
        into.push(rss);
        if (run === 0) commands.push(commandLine(be.command));
        progress(`memory run ${run + 1}: ${what}: ${rss} MiB RSS`);
      } finally {
        await be.stop();
      }
    }
  }
  const one = median(samples.one), many = median(samples.many);
  return {
    description: "VmRSS from /proc/PID/status of idle back-ends (listening, no front-end), after " +
      `${cfg.settleMs} ms of settling`,
    config: cfg,
    cliOneDeviceMiB: median(samples.cli),
    cliThreads,
    oneDeviceMiB: one,
    manyDevicesMiB: many,
    perExtraDeviceMiB: Math.round(((many - one) / (cfg.devices - 1)) * 10) / 10,
    qsdOneDeviceMiB: median(samples.qsd),
    denoFloorMiB: median(samples.floor),
    targetMiB: 64,
    commands,
    samples,
  };
}
