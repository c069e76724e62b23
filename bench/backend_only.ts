/**
 * Comparison 1, back-end only: vhostd's load generator (`vhostd load`, which plays QEMU and the
 * guest driver) drives each back-end with 4k random reads, and the back-end's CPU time is read
 * from /proc/PID/stat before and after. No guest, so the guest's emulated CPU is out of the way.
 *
 * @module
 */

import {
  type BackendLevers,
  type BackendName,
  type BlkTarget,
  startBackend,
  type Storage,
} from "./backends.ts";
import {
  commandLine,
  DENO,
  lastLines,
  median,
  processCpuSeconds,
  progress,
  type RunningBackend,
  sig,
  StepError,
} from "./lib.ts";

/** One load shape. */
export interface LoadShape {
  /** Label, e.g. `1q-qd32`. */
  label: string;
  /** Queues driven (one generator thread each). */
  queues: number;
  /** Requests in flight per queue. */
  depth: number;
}

/** Settings of comparison 1. */
export interface BackendOnlyConfig {
  /** Storage kinds to measure. */
  storages: Storage[];
  /** Load shapes. */
  shapes: LoadShape[];
  /** Back-ends side by side. */
  backends: BackendName[];
  /** Repetitions of every case (medians are reported). */
  runs: number;
  /** Seconds per load run. */
  seconds: number;
  /** Request size in bytes. */
  blockSize: number;
  /** Queues every back-end offers (at least the largest shape's). */
  deviceQueues: number;
  /** Image on tmpfs (e.g. under /dev/shm). */
  tmpfsImage: string;
  /** Image on a disk file system that supports O_DIRECT. */
  diskImage: string;
  /** Size of the null targets. */
  nullSizeBytes: number;
  /** Directory for sockets. */
  socketDir: string;
  /** I/O levers of the back-ends. */
  levers: BackendLevers;
}

/** One load run against one back-end. */
export interface LoadSample {
  /** Requests per second, as the generator measured them. */
  iops: number;
  /** Requests completed. */
  ios: number;
  /** Back-end CPU seconds (utime+stime, all threads) during the run. */
  backendCpuSeconds: number;
  /** Back-end CPU microseconds per request. */
  backendCpuUsPerIo: number;
  /** Generator CPU microseconds per request (its ceiling is 1e6 / this per core). */
  generatorCpuUsPerIo: number;
  /** Median latency in microseconds. */
  p50Us: number;
  /** 99th percentile latency in microseconds. */
  p99Us: number;
}

/** All runs of one (storage, shape, back-end) case, with medians. */
export interface BackendCaseResult {
  /** Storage kind. */
  storage: Storage;
  /** Load shape label. */
  shape: string;
  /** Back-end. */
  backend: BackendName;
  /** Median IOPS over the runs. */
  iops: number;
  /** Median back-end CPU µs per I/O over the runs. */
  cpuUsPerIo: number;
  /** Median p99 latency (µs). */
  p99Us: number;
  /** Every run. */
  samples: LoadSample[];
  /** Command that started the back-end. */
  backendCommand: string;
  /** Command of the load generator. */
  loadCommand: string;
}

/** Result of comparison 1. */
export interface BackendOnlyResult {
  /** What was measured. */
  description: string;
  /** Settings used (levers included). */
  config: BackendOnlyConfig;
  /** Every case. */
  cases: BackendCaseResult[];
  /** vhostd / qsd per (storage, shape): IOPS ratio (≥ 1 is the target) and CPU/IO ratio (≤ 1). */
  ratios: { storage: Storage; shape: string; iopsRatio: number; cpuPerIoRatio: number }[];
  /**
   * vhostd alone with busy-polling off (`--poll-us 0`), same shapes' first entry, to show what
   * that lever is worth; absent when not measured.
   */
  noPoll?: BackendCaseResult[];
}

/** The argv of one load-generator run. */
export function loadCommand(
  socket: string,
  shape: LoadShape,
  seconds: number,
  bs: number,
): string[] {
  return [
    DENO,
    "run",
    "-A",
    "daemon/main.ts",
    "load",
    "--socket",
    socket,
    "--queues",
    String(shape.queues),
    "--depth",
    String(shape.depth),
    "--bs",
    String(bs),
    "--rw",
    "randread",
    "--seconds",
    String(seconds),
    "--json",
  ];
}

/** The back-end's CPU seconds; if it has exited, an error with the last lines it printed. */
function backendCpu(be: RunningBackend): number {
  try {
    return processCpuSeconds(be.pid);
  } catch {
    throw new Error(`the back-end (pid ${be.pid}) is gone: ${lastLines(be.output(), 4)}`);
  }
}

async function runOnce(
  be: RunningBackend,
  argv: string[],
): Promise<LoadSample> {
  const before = backendCpu(be);
  const out = await new Deno.Command(argv[0], {
    args: argv.slice(1),
    cwd: new URL("..", import.meta.url).pathname,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).output();
  const after = backendCpu(be);
  const stdout = new TextDecoder().decode(out.stdout);
  const stderr = new TextDecoder().decode(out.stderr);
  if (!out.success) {
    throw new Error(`load exited ${out.code}: ${lastLines(stderr + stdout)}`);
  }
  // deno may print a task banner or warnings before the JSON; the report is the last object.
  const r = JSON.parse(stdout.slice(stdout.indexOf("{")));
  if (!(r.ios > 0) || r.errors !== 0) {
    throw new Error(`load reported ${r.ios} I/Os and ${r.errors} errors`);
  }
  const cpu = after - before;
  return {
    iops: r.iops,
    ios: r.ios,
    backendCpuSeconds: sig(cpu, 4),
    backendCpuUsPerIo: sig((cpu * 1e6) / r.ios, 4),
    generatorCpuUsPerIo: r.generatorCpuUsPerIo,
    p50Us: r.latencyUs.p50,
    p99Us: r.latencyUs.p99,
  };
}

/**
 * Runs comparison 1. The repetition loop is outermost and each back-end is started fresh for
 * its storage, so slow drift of a shared machine spreads over every back-end alike.
 */
export async function backendOnly(cfg: BackendOnlyConfig): Promise<BackendOnlyResult> {
  const cases = new Map<string, BackendCaseResult>();
  const total = cfg.runs * cfg.storages.length * cfg.backends.length * cfg.shapes.length;
  let n = 0;
  for (let run = 0; run < cfg.runs; run++) {
    for (const storage of cfg.storages) {
      for (const backend of cfg.backends) {
        const target: BlkTarget = {
          image: storage === "disk" ? cfg.diskImage : cfg.tmpfsImage,
          storage,
          nullSizeBytes: cfg.nullSizeBytes,
          queues: cfg.deviceQueues,
          socket: `${cfg.socketDir}/${backend}-${storage}.sock`,
        };
        const step = `back-end only: ${backend} on ${storage}`;
        let be: RunningBackend;
        try {
          be = await startBackend(backend, target, cfg.levers);
        } catch (e) {
          throw new StepError(step, `could not start: ${(e as Error).message}`);
        }
        try {
          for (const shape of cfg.shapes) {
            n++;
            const argv = loadCommand(target.socket, shape, cfg.seconds, cfg.blockSize);
            let s: LoadSample;
            try {
              s = await runOnce(be, argv);
            } catch (e) {
              throw new StepError(`${step} ${shape.label}`, (e as Error).message);
            }
            progress(
              `[${n}/${total}] back-end ${storage} ${shape.label} ${backend} run ${run + 1}: ` +
                `${s.iops.toLocaleString("en-US")} IOPS, ${s.backendCpuUsPerIo} µs CPU/IO`,
            );
            const key = `${storage}|${shape.label}|${backend}`;
            let c = cases.get(key);
            if (!c) {
              c = {
                storage,
                shape: shape.label,
                backend,
                iops: 0,
                cpuUsPerIo: 0,
                p99Us: 0,
                samples: [],
                backendCommand: commandLine(be.command),
                loadCommand: commandLine(argv),
              };
              cases.set(key, c);
            }
            c.samples.push(s);
          }
        } finally {
          await be.stop();
        }
      }
    }
  }
  for (const c of cases.values()) {
    c.iops = Math.round(median(c.samples.map((s) => s.iops)));
    c.cpuUsPerIo = sig(median(c.samples.map((s) => s.backendCpuUsPerIo)), 3);
    c.p99Us = sig(median(c.samples.map((s) => s.p99Us)), 3);
  }
  const ratios: BackendOnlyResult["ratios"] = [];
  for (const storage of cfg.storages) {
    for (const shape of cfg.shapes) {
      const v = cases.get(`${storage}|${shape.label}|vhostd`);
      const q = cases.get(`${storage}|${shape.label}|qsd`);
      if (v && q) {
        ratios.push({
          storage,
          shape: shape.label,
          iopsRatio: sig(v.iops / q.iops, 3),
          cpuPerIoRatio: sig(v.cpuUsPerIo / q.cpuUsPerIo, 3),
        });
      }
    }
  }
  return {
    description: "4k random read from vhostd's load generator (no guest); IOPS and the " +
      "back-end process's CPU seconds (utime+stime, all threads) per I/O",
    config: cfg,
    cases: [...cases.values()],
    ratios,
  };
}
