/**
 * `deno task bench [--quick]`: the benchmark harness. It builds the guest kit, makes scratch
 * images, runs every comparison (back-end only, guest fio, net, memory, scale, sharing, migration)
 * and writes the raw
 * results as JSON plus a Markdown report with SVG charts.
 *
 * Full mode writes `bench/results/<DATE>.json`, `bench/results/<DATE>-*.svg` and BENCHMARKS.md.
 * `--quick` (one short run of each case: a smoke test of the harness, not figures) writes
 * `bench/results/quick-<DATE>.json`, `.md` and SVGs, and leaves BENCHMARKS.md alone.
 * Exits 1 with one `bench: FAILED: ...` line if any step failed.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { ensureKit } from "../tests/guest/qemu.ts";
import { backendOnly, type BackendOnlyConfig } from "./backend_only.ts";
import { type BackendLevers, DEFAULT_LEVERS, type Storage } from "./backends.ts";
import { type FioJob, guestFio, type GuestFioConfig, type GuestVariant } from "./guest_fio.ts";
import { guestIdle } from "./guest_idle.ts";
import { killAllStarted, progress, REPO_ROOT, StepError, writeRandomImage } from "./lib.ts";
import { cleanupMemorySync, memory, type MemoryConfig } from "./memory.ts";
import { migrationBench, type MigrationConfig } from "./migration.ts";
import {
  cleanupNetSync,
  defaultCpus,
  type NetConfig,
  netIperf,
  netResult,
  netTestpmd,
} from "./net.ts";
import { type BenchResult, charts, markdown } from "./report.ts";
import { systemInfo } from "./system.ts";
import { guestPlacement } from "./placement.ts";
import { scale, type ScaleConfig } from "./scale.ts";
import { sharing, type SharingConfig } from "./sharing.ts";

/** Comparisons that can be selected with `--only`. */
export type Comparison =
  | "backend"
  | "guest"
  | "net"
  | "memory"
  | "scale"
  | "sharing"
  | "migration";

/** How to run the harness. */
export interface BenchOptions {
  /** Smoke mode: one short run of each case. */
  quick: boolean;
  /** Comparisons to run (default all). */
  only: Comparison[];
  /** Repetitions (default 3 full, 1 quick). */
  runs?: number;
  /** Seconds per load-generator run (default 10 full, 1 quick). */
  loadSeconds?: number;
  /** Seconds per guest fio job (default 5 full, 3 quick). */
  guestSeconds?: number;
  /** Seconds an idle guest is measured for, after the guest fio (default 60 full, 10 quick). */
  idleSeconds?: number;
  /** Seconds of each testpmd window (default 10 full, 3 quick). */
  netSeconds?: number;
  /** Seconds of each guest iperf3 run (default 5 full, 3 quick). */
  iperfSeconds?: number;
  /** Directory for JSON, SVG (and quick Markdown); default bench/results. */
  resultsDir: string;
  /** Markdown report of a full run; default BENCHMARKS.md at the repository root. */
  markdownPath: string;
  /** Back-end I/O levers. */
  levers: BackendLevers;
  /** Pin guest vCPU threads to CPUs of their own, everything else to the rest (default on). */
  pinGuests: boolean;
  /** The command line shown in the report. */
  command: string;
}

/** Where a run put its output. */
export interface BenchOutput {
  /** The results. */
  result: BenchResult;
  /** The JSON file. */
  jsonPath: string;
  /** The Markdown file. */
  markdownPath: string;
  /** The SVG files. */
  chartPaths: string[];
}

const HELP = `Usage: deno task bench [--quick] [options]

Runs vhostd's benchmarks side by side with qemu-storage-daemon and QEMU's own virtio-blk, and
writes bench/results/<DATE>.json, SVG charts and BENCHMARKS.md (full mode), or
bench/results/quick-<DATE>.{json,md} (--quick: a smoke run of the harness, not figures).

Options:
  --quick               one short run of each case (CI smoke test; a few minutes)
  --only LIST           comma-separated: backend,guest,net,memory,scale,sharing,migration
                        (default all)
  --runs N              repetitions per case; medians are reported (default 3; quick 1)
  --seconds S           seconds per load-generator run (default 10; quick 1)
  --guest-seconds S     seconds per guest fio run; two rounds per boot (default 5; quick 3, one round)
  --idle-seconds S      seconds an idle guest's back-ends are measured for (default 60; quick 10)
  --net-seconds S       seconds per testpmd window (default 10; quick 3)
  --iperf-seconds S     seconds per guest iperf3 run; four rounds per boot (default 5; quick 3, one round)
  --qsd-disk-aio MODE   qemu-storage-daemon aio on disk: native, io_uring or threads (default native)
  --qsd-tmpfs-aio MODE  qemu-storage-daemon aio on tmpfs: threads or io_uring (default threads)
  --no-vhostd-direct    serve the disk image without O_DIRECT in vhostd (a lever, not a fair run)
  --vhostd-poll-us N    vhostd's busy-poll window in µs (default: vhostd's own default)
  --vhostd-io-engine E  vhostd's I/O engine on image files: auto, sync or uring (default auto)
  --no-pin              leave guest vCPU and back-end threads where Linux puts them (by default
                        the vCPU gets a CPU of its own, QEMU's other threads and back-ends the rest)
  --results-dir DIR     where JSON and SVG go (default bench/results)
  --markdown PATH       report of a full run (default BENCHMARKS.md)
  -h, --help            this text
`;

const MiB = 1 << 20;

/** Runs the selected comparisons and writes the outputs. Never throws for a failed step. */
export async function runBench(opts: BenchOptions): Promise<BenchOutput> {
  const t0 = performance.now();
  const startedAt = new Date().toISOString();
  const quick = opts.quick;
  const runs = opts.runs ?? (quick ? 1 : 3);
  const guestPlacementFor = (smp: number) => opts.pinGuests ? guestPlacement(smp) : null;
  const loadSeconds = opts.loadSeconds ?? (quick ? 1 : 10);
  // Two 5 s rounds per boot rather than one 10 s run: the same I/O time, twice the samples, and
  // each variant in more places of the rotation.
  const guestRounds = quick ? 1 : 2;
  const guestSeconds = opts.guestSeconds ?? (quick ? 3 : 5);
  const netSeconds = opts.netSeconds ?? (quick ? 3 : 10);
  // Four 5 s iperf3 rounds per boot rather than two of 10 s, as for fio: twice the samples in the
  // same time. A TCG guest's throughput swings by ±10% from run to run, more than the back-ends
  // differ, so the median needs the samples more than each run needs the length.
  const iperfRounds = quick ? 1 : 4;
  const iperfSeconds = opts.iperfSeconds ?? (quick ? 3 : 5);
  const imageBytes = quick ? 256 * MiB : 1024 * MiB;
  const failures: string[] = [];
  const stepSeconds: Record<string, number> = {};
  const system = await systemInfo();
  const result: BenchResult = {
    schema: 1,
    mode: quick ? "quick" : "full",
    startedAt,
    durationSeconds: 0,
    stepSeconds,
    command: opts.command,
    system,
    failures,
    only: opts.only,
  };
  const step = async (name: string, fn: () => Promise<void>) => {
    const s = performance.now();
    progress(`${name}: starting`);
    try {
      await fn();
      progress(`${name}: done in ${Math.round((performance.now() - s) / 1000)} s`);
    } catch (e) {
      const line = e instanceof StepError ? e.message : `${name}: ${(e as Error).message}`;
      failures.push(line.split("\n")[0]);
      progress(`FAILED: ${line.split("\n")[0]}`);
    }
    stepSeconds[name] = Math.round((performance.now() - s) / 100) / 10;
  };

  const shmDir = await Deno.makeTempDir({ dir: "/dev/shm", prefix: "vhostd-bench-" });
  const diskDir = await Deno.makeTempDir({ dir: "/var/tmp", prefix: "vhostd-bench-" });
  const tmpfsImage = `${shmDir}/tmpfs.img`;
  const diskImage = `${diskDir}/disk.img`;
  const cleanup = () => {
    for (const d of [shmDir, diskDir]) {
      try {
        Deno.removeSync(d, { recursive: true });
      } catch {
        // gone already
      }
    }
  };
  const onSignal = () => {
    killAllStarted();
    cleanupNetSync();
    cleanupMemorySync();
    cleanup();
    Deno.exit(130);
  };
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);
  try {
    await step("prepare", async () => {
      for (const tool of ["qemu-storage-daemon", "qemu-system-x86_64"]) {
        const key = tool === "qemu-storage-daemon" ? "qsd" : "qemu";
        if (!system[key]) {
          throw new StepError("prepare", `${tool} not found (apt-get install qemu-system-x86)`);
        }
      }
      if (["guest", "net", "migration"].some((c) => opts.only.includes(c as Comparison))) {
        progress("building the guest kit (tests/guest/build-kit.sh; quick when up to date)");
        try {
          await ensureKit();
        } catch (e) {
          throw new StepError(
            "prepare",
            `guest kit: ${(e as Error).message.split("\n").slice(-2).join(" ")}`,
          );
        }
        system.guestKit = (await systemInfo()).guestKit;
      }
      if (opts.only.some((c) => c !== "net")) {
        progress(`writing ${imageBytes / MiB} MiB scratch images (${tmpfsImage}, ${diskImage})`);
        writeRandomImage(tmpfsImage, imageBytes);
        writeRandomImage(diskImage, imageBytes);
      }
    });
    const prepared = failures.length === 0;

    if (prepared && opts.only.includes("backend")) {
      await step("backend", async () => {
        const cfg: BackendOnlyConfig = {
          storages: ["tmpfs", "disk", "null"] as Storage[],
          shapes: [
            { label: "1q-qd32", queues: 1, depth: 32 },
            { label: "4q-qd32", queues: 4, depth: 32 },
          ],
          backends: ["vhostd", "qsd"],
          runs,
          seconds: loadSeconds,
          blockSize: 4096,
          deviceQueues: 4,
          tmpfsImage,
          diskImage,
          nullSizeBytes: 1 << 30,
          socketDir: shmDir,
          levers: opts.levers,
        };
        const b = await backendOnly(cfg);
        result.backendOnly = b;
        if (opts.levers.vhostdPollUs !== 0) {
          // The busy-poll lever: vhostd again with it off, one queue (where it matters most).
          progress("back-end only: vhostd with --poll-us 0, to measure the busy-poll lever");
          const off = await backendOnly({
            ...cfg,
            shapes: cfg.shapes.slice(0, 1),
            backends: ["vhostd"],
            levers: { ...cfg.levers, vhostdPollUs: 0 },
          });
          b.noPoll = off.cases;
        }
      });
    }
    if (prepared && opts.only.includes("guest")) {
      // One TCG guest shape for the fio and the idle measurements.
      const guestSetup = {
        diskImage,
        socketDir: shmDir,
        smp: 1,
        memoryMiB: 512,
        deviceQueues: 1,
        levers: opts.levers,
        placement: guestPlacementFor(1),
      };
      await step("guest", async () => {
        const jobs: FioJob[] = [
          { name: "randread-4k-qd32", rw: "randread", bs: 4096, depth: 32 },
          { name: "randwrite-4k-qd32", rw: "randwrite", bs: 4096, depth: 32 },
          { name: "read-128k-qd32", rw: "read", bs: 128 * 1024, depth: 32 },
        ];
        const cfg: GuestFioConfig = {
          variants: ["in-qemu", "qsd", "vhostd", "vhostd-nopoll"] as GuestVariant[],
          jobs,
          runs,
          rounds: guestRounds,
          seconds: guestSeconds,
          ...guestSetup,
        };
        result.guestFio = await guestFio(cfg);
      });
      // The same guest setup, asleep: what each back-end costs when there is nothing to do.
      await step("guest idle", async () => {
        result.guestIdle = await guestIdle({
          variants: ["qsd", "vhostd", "vhostd-nopoll"],
          seconds: opts.idleSeconds ?? (quick ? 10 : 60),
          runs: 1,
          ...guestSetup,
        });
      });
    }
    if (prepared && opts.only.includes("net")) {
      const cfg: NetConfig = {
        backends: ["dpdk", "vhostd"],
        frameSizes: [64, 1500],
        runs,
        windowSeconds: netSeconds,
        warmupSeconds: quick ? 1 : 2,
        cpus: defaultCpus(system.nproc),
        testpmdMemoryMiB: 512,
        mbufs: 8192,
        queueSize: 1024,
        variants: ["in-qemu", "vhostd", "vhostd-poll"],
        iperfSeconds,
        iperfRounds,
        leverPollUs: 1000,
        smp: 1,
        placement: guestPlacementFor(1),
        memoryMiB: 512,
        socketDir: shmDir,
      };
      const net = netResult(cfg);
      result.net = net;
      await step("net testpmd", async () => {
        net.testpmd = await netTestpmd(cfg, net.commands);
      });
      await step("net guest", async () => {
        net.iperf = await netIperf(cfg, net.commands);
      });
    }
    if (prepared && opts.only.includes("migration")) {
      await step("migration", async () => {
        const cfg: MigrationConfig = {
          variants: ["vhostd", "qsd", "in-qemu"],
          runs,
          diskImage,
          socketDir: shmDir,
          memoryMiB: 512,
          bandwidthBytes: 64 * MiB,
          downtimeLimitMs: 300,
          warmupSeconds: quick ? 1 : 3,
          levers: opts.levers,
        };
        result.migration = await migrationBench(cfg);
      });
    }
    if (prepared && opts.only.includes("memory")) {
      await step("memory", async () => {
        const cfg: MemoryConfig = {
          scratchDir: `${shmDir}/memory`,
          queues: 4,
          deviceCounts: [1, 4, 16],
          queueCounts: [1, 16, 64],
          runs,
          // Issue 21 measured its figures 4 s after start-up.
          settleMs: quick ? 1000 : 4000,
        };
        result.memory = await memory(cfg);
      });
    }
    if (prepared && opts.only.includes("scale")) {
      await step("scale", async () => {
        const cfg: ScaleConfig = {
          counts: quick ? [1, 4] : [1, 8, 32],
          idleSeconds: quick ? 3 : 30,
          settleMs: quick ? 1000 : 3000,
          parallel: 4,
          queues: 4,
          scratchDir: `${shmDir}/scale`,
        };
        result.scale = await scale(cfg);
      });
    }
    if (prepared && opts.only.includes("sharing")) {
      await step("sharing", async () => {
        const cfg: SharingConfig = {
          storages: ["null", "tmpfs"],
          runs,
          // Two generators start together; a few seconds keep their start-up skew small.
          seconds: Math.max(3, loadSeconds),
          depth: 32,
          blockSize: 4096,
          tmpfsImage,
          nullSizeBytes: 1 << 30,
          socketDir: shmDir,
        };
        result.sharing = await sharing(cfg);
      });
    }
  } finally {
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
    cleanup();
  }

  system.loadavgEnd = Deno.readTextFileSync("/proc/loadavg").trim();
  result.durationSeconds = Math.round((performance.now() - t0) / 100) / 10;
  return writeOutputs(result, opts);
}

function writeOutputs(result: BenchResult, opts: BenchOptions): BenchOutput {
  const date = result.startedAt.slice(0, 10);
  const base = result.mode === "quick" ? `quick-${date}` : date;
  Deno.mkdirSync(opts.resultsDir, { recursive: true });
  const jsonPath = `${opts.resultsDir}/${base}.json`;
  Deno.writeTextFileSync(jsonPath, JSON.stringify(result, null, 2) + "\n");
  const svgs = charts(result, `${base}-`);
  const chartPaths: string[] = [];
  for (const [name, svg] of Object.entries(svgs)) {
    const p = `${opts.resultsDir}/${name}`;
    Deno.writeTextFileSync(p, svg);
    chartPaths.push(p);
  }
  const mdPath = result.mode === "quick" ? `${opts.resultsDir}/${base}.md` : opts.markdownPath;
  const mdDir = mdPath.includes("/") ? mdPath.slice(0, mdPath.lastIndexOf("/")) : ".";
  const rel = (p: string) => relativePath(mdDir, p);
  Deno.writeTextFileSync(mdPath, markdown(result, rel(opts.resultsDir), `${base}-`, rel(jsonPath)));
  // BENCHMARKS.md is kept `deno fmt` clean like the rest (bench/results/ is excluded).
  new Deno.Command(Deno.execPath(), { args: ["fmt", "--quiet", mdPath] }).outputSync();
  return { result, jsonPath, markdownPath: mdPath, chartPaths };
}

function relativePath(fromDir: string, to: string): string {
  const a = absolute(fromDir).split("/").filter(Boolean);
  const b = absolute(to).split("/").filter(Boolean);
  let i = 0;
  while (i < a.length && i < b.length && a[i] === b[i]) i++;
  const up = a.slice(i).map(() => "..");
  return [...up, ...b.slice(i)].join("/") || ".";
}

function absolute(p: string): string {
  return p.startsWith("/") ? p : `${Deno.cwd()}/${p}`;
}

/** Parses the command line; throws with a one-line message on bad input. */
export function parseBenchArgs(args: string[]): BenchOptions | null {
  const { values } = parseArgs({
    args,
    strict: true,
    options: {
      quick: { type: "boolean" },
      only: { type: "string" },
      runs: { type: "string" },
      seconds: { type: "string" },
      "guest-seconds": { type: "string" },
      "idle-seconds": { type: "string" },
      "net-seconds": { type: "string" },
      "iperf-seconds": { type: "string" },
      "qsd-disk-aio": { type: "string" },
      "qsd-tmpfs-aio": { type: "string" },
      "no-vhostd-direct": { type: "boolean" },
      "vhostd-poll-us": { type: "string" },
      "vhostd-io-engine": { type: "string" },
      "no-pin": { type: "boolean" },
      "results-dir": { type: "string" },
      markdown: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) return null;
  const count = (name: string, v: string | undefined): number | undefined => {
    if (v === undefined) return undefined;
    const n = Number(v);
    if (!Number.isInteger(n) || n < 1) throw new Error(`--${name} must be a whole number ≥ 1`);
    return n;
  };
  const all: Comparison[] = [
    "backend",
    "guest",
    "net",
    "memory",
    "scale",
    "sharing",
    "migration",
  ];
  const only = (values.only ?? all.join(",")).split(",").map((s) => s.trim()) as Comparison[];
  for (const o of only) if (!all.includes(o)) throw new Error(`--only: unknown comparison "${o}"`);
  const diskAio = values["qsd-disk-aio"] ?? DEFAULT_LEVERS.qsdDiskAio;
  if (!["native", "io_uring", "threads"].includes(diskAio)) {
    throw new Error("--qsd-disk-aio must be native, io_uring or threads");
  }
  const tmpfsAio = values["qsd-tmpfs-aio"] ?? DEFAULT_LEVERS.qsdTmpfsAio;
  if (!["threads", "io_uring"].includes(tmpfsAio)) {
    throw new Error("--qsd-tmpfs-aio must be threads or io_uring");
  }
  let pollUs: number | undefined;
  if (values["vhostd-poll-us"] !== undefined) {
    pollUs = Number(values["vhostd-poll-us"]);
    if (!Number.isInteger(pollUs) || pollUs < 0 || pollUs > 1000) {
      throw new Error("--vhostd-poll-us must be a whole number from 0 to 1000");
    }
  }
  const ioEngine = values["vhostd-io-engine"];
  if (ioEngine !== undefined && !["auto", "sync", "uring"].includes(ioEngine)) {
    throw new Error("--vhostd-io-engine must be auto, sync or uring");
  }
  return {
    quick: values.quick === true,
    only,
    runs: count("runs", values.runs),
    loadSeconds: count("seconds", values.seconds),
    guestSeconds: count("guest-seconds", values["guest-seconds"]),
    idleSeconds: count("idle-seconds", values["idle-seconds"]),
    netSeconds: count("net-seconds", values["net-seconds"]),
    iperfSeconds: count("iperf-seconds", values["iperf-seconds"]),
    resultsDir: values["results-dir"] ?? `${REPO_ROOT}/bench/results`,
    markdownPath: values.markdown ?? `${REPO_ROOT}/BENCHMARKS.md`,
    levers: {
      vhostdDirect: values["no-vhostd-direct"] !== true,
      qsdDiskAio: diskAio as BackendLevers["qsdDiskAio"],
      qsdTmpfsAio: tmpfsAio as BackendLevers["qsdTmpfsAio"],
      vhostdPollUs: pollUs,
      vhostdIoEngine: ioEngine as BackendLevers["vhostdIoEngine"],
    },
    pinGuests: values["no-pin"] !== true,
    command: ["deno task bench", ...args].join(" "),
  };
}

if (import.meta.main) {
  let opts: BenchOptions | null;
  try {
    opts = parseBenchArgs(Deno.args);
  } catch (e) {
    console.error(`bench: ${(e as Error).message.split("\n")[0]}`);
    Deno.exit(2);
  }
  if (!opts) {
    console.log(HELP);
    Deno.exit(0);
  }
  const out = await runBench(opts);
  const r = out.result;
  console.log(`bench: ${r.mode} run took ${Math.round(r.durationSeconds)} s`);
  console.log(
    `bench: wrote ${out.jsonPath}, ${out.markdownPath} and ${out.chartPaths.length} charts`,
  );
  if (r.failures.length) {
    const more = r.failures.length > 1
      ? ` (and ${r.failures.length - 1} more step(s); see above)`
      : "";
    console.error(`bench: FAILED: ${r.failures[0]}${more}`);
    Deno.exit(1);
  }
}
