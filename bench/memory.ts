/**
 * Comparison 4, memory: what an idle vhostd costs, and where it goes. Every case is one process
 * started fresh, listening with no front-end, measured after a settling time:
 *
 * - the VM of issue 21: `vhostd run --config` with 2 blk + 1 net (TAP) + 1 console, inside a
 *   network namespace of its own (so its TAP never touches the host's network), and the same with
 *   a worker per device (`"ownWorker": true`) when the build has shared workers;
 * - one blk device through the CLI (`vhostd blk`), and qemu-storage-daemon exporting one image;
 * - the Deno floor: a main thread alone, and with one idle worker (bench/deno_floor.ts);
 * - growth: `vhostd run` with 1, 4 and 16 blk devices (default worker placement, and a worker per
 *   device), and one device with 1, 16 and 64 queues.
 *
 * From those it derives the increments (per worker, per device, per queue) of the report.
 *
 * @module
 */

import { DEFAULT_LEVERS, startBackend } from "./backends.ts";
import {
  commandLine,
  DENO,
  lastLines,
  median,
  progress,
  type RunningBackend,
  sleep,
  socketExists,
  startProcess,
  StepError,
} from "./lib.ts";
import { medianMemory, memoryIncrement, type ProcMemory, procMemory, pssMiB } from "./procmem.ts";

/** Settings of comparison 4. */
export interface MemoryConfig {
  /** Scratch directory: configs, sockets and sparse images go here (idle devices do no I/O). */
  scratchDir: string;
  /** Queues per blk device (the queue-growth cases aside). */
  queues: number;
  /** Device counts of the device-growth cases (the first is the base of the increments). */
  deviceCounts: number[];
  /** Queue counts of the queue-growth cases (the first is the base). */
  queueCounts: number[];
  /** Samples per case (median reported). */
  runs: number;
  /** Settle time after start-up before reading /proc, in ms. */
  settleMs: number;
}

/** Which part of the report a case belongs to. */
export type MemoryGroup = "headline" | "floor" | "devices" | "queues";

/** One measured process shape. */
export interface MemoryCaseResult {
  /** Stable key, e.g. `vm`, `floor-1`, `run-blk-16-own`, `run-q-64`. */
  id: string;
  /** What it is, for people. */
  label: string;
  /** Report section. */
  group: MemoryGroup;
  /** Devices served (0 for the floor). */
  devices: number;
  /** Queues per blk device (0 when not applicable). */
  queues: number;
  /** `default` placement or a worker per device (`own`); absent where it does not apply. */
  workers?: "default" | "own";
  /** Median of the samples, field by field. */
  memory: ProcMemory;
  /** Median PSS, MiB. */
  pssMiB: number;
  /** Every sample. */
  samples: (ProcMemory & { pssMiB: number })[];
  /** The command that started it. */
  command: string;
}

/** One derived increment: (to − from) / steps, field by field. */
export interface MemoryIncrement {
  /** What it is, for people. */
  label: string;
  /** Case id it starts from. */
  from: string;
  /** Case id it ends at. */
  to: string;
  /** Steps between them (devices, queues or workers added). */
  steps: number;
  /** The increment per step. */
  memory: ProcMemory;
}

/** Issue 21's targets, MiB of RSS. */
export const MEMORY_TARGETS = {
  /** `vhostd run` of the VM (2 blk + net + console). */
  vmMiB: 56,
  /** `vhostd blk`, one device. */
  oneBlkMiB: 50,
  /** Each extra device on a shared worker. */
  perDeviceMiB: 2,
} as const;

/** Result of comparison 4. */
export interface MemoryResult {
  /** What was measured. */
  description: string;
  /** Settings used. */
  config: MemoryConfig;
  /** Whether the build had shared workers (a config accepting `"ownWorker"`). */
  sharedWorkers: boolean;
  /** Every case, in report order. */
  cases: MemoryCaseResult[];
  /** Derived increments. */
  increments: MemoryIncrement[];
  /** The targets the report checks. */
  targets: typeof MEMORY_TARGETS;
  /** The VM config of the `vm` case (its paths are this run's). */
  vmConfig: Record<string, unknown>;
  /** Commands run, one per case. */
  commands: string[];
}

/** What {@link vmConfig} builds. */
export interface VmConfigSpec {
  /** VM name. */
  name: string;
  /** Folder of the sockets. */
  socketDir: string;
  /** One blk device per image. */
  images: string[];
  /** Queues per blk device. */
  queues: number;
  /** A net device on this TAP, if given. */
  tap?: string;
  /** A console device. */
  console?: boolean;
  /** Every device gets a worker of its own (`"ownWorker": true`). */
  ownWorker?: boolean;
}

/** A `vhostd run --config` file (see examples/config/vm1.json) for a {@link VmConfigSpec}. */
export function vmConfig(spec: VmConfigSpec): Record<string, unknown> {
  const own = spec.ownWorker ? { ownWorker: true } : {};
  const devices: Record<string, unknown>[] = spec.images.map((image, i) => ({
    type: "blk",
    id: `disk${i}`,
    image,
    queues: spec.queues,
    ...own,
  }));
  if (spec.tap !== undefined) devices.push({ type: "net", id: "net0", tap: spec.tap, ...own });
  if (spec.console) devices.push({ type: "console", id: "con0", ...own });
  return {
    name: spec.name,
    socketDir: spec.socketDir,
    log: { level: "warning", format: "text" },
    devices,
  };
}

/** Device sockets of a config from {@link vmConfig} (each device's `<id>.sock`). */
export function configSockets(config: Record<string, unknown>): string[] {
  const dir = config.socketDir as string;
  return (config.devices as { id: string }[]).map((d) => `${dir}/${d.id}.sock`);
}

/** The increments the report shows, from the cases measured (none where a case is missing). */
export function deriveIncrements(
  cases: readonly MemoryCaseResult[],
  cfg: Pick<MemoryConfig, "deviceCounts" | "queueCounts">,
): MemoryIncrement[] {
  const byId = new Map(cases.map((c) => [c.id, c.memory]));
  const out: MemoryIncrement[] = [];
  const add = (label: string, from: string, to: string, steps: number) => {
    // Cases not measured in this build (a worker each, before shared workers) give no row.
    if (!byId.has(from) || !byId.has(to)) return;
    out.push({
      label,
      from,
      to,
      steps,
      memory: memoryIncrement(byId.get(from), byId.get(to), steps),
    });
  };
  add("Deno: one idle worker (main thread + worker − main thread)", "floor-0", "floor-1", 1);
  const d0 = cfg.deviceCounts[0];
  add(
    `vhostd's code and state over the Deno floor (\`vhostd run\` with ${d0} blk device − ` +
      "main thread + one idle worker)",
    "floor-1",
    `run-blk-${d0}`,
    1,
  );
  for (const n of cfg.deviceCounts.slice(1)) {
    add(
      `per extra blk device, default placement (${d0} → ${n})`,
      `run-blk-${d0}`,
      `run-blk-${n}`,
      n - d0,
    );
  }
  for (const n of cfg.deviceCounts.slice(1)) {
    add(
      `per extra blk device, a worker each (${d0} → ${n})`,
      `run-blk-${d0}-own`,
      `run-blk-${n}-own`,
      n - d0,
    );
  }
  const q0 = cfg.queueCounts[0];
  for (const q of cfg.queueCounts.slice(1)) {
    add(`per extra queue of one blk device (${q0} → ${q})`, `run-q-${q0}`, `run-q-${q}`, q - q0);
  }
  return out;
}

/** Network namespaces made for the VM case and not yet removed (for signal exits). */
const PENDING_NAMESPACES = new Set<string>();

/** Removes, synchronously, the namespaces a memory run made and has not removed (signal exits). */
export function cleanupMemorySync(): void {
  for (const ns of PENDING_NAMESPACES) {
    try {
      new Deno.Command("ip", { args: ["netns", "del", ns], stdout: "null", stderr: "null" })
        .outputSync();
    } catch {
      // gone already
    }
  }
  PENDING_NAMESPACES.clear();
}

async function ip(args: string[]): Promise<void> {
  const out = await new Deno.Command("ip", { args, stdout: "piped", stderr: "piped" }).output();
  if (!out.success) {
    const text = new TextDecoder().decode(out.stderr).trim();
    throw new Error(`ip ${args.join(" ")} failed: ${text}`);
  }
}

/** Writes a sparse image of `bytes` (idle devices never read it, so holes cost nothing). */
export function sparseImage(path: string, bytes: number): string {
  const f = Deno.openSync(path, { create: true, write: true, truncate: true });
  try {
    f.truncateSync(bytes);
  } finally {
    f.close();
  }
  return path;
}

/** The argv of `vhostd run --config FILE`. */
function runArgv(configPath: string): string[] {
  return [DENO, "run", "-A", "daemon/main.ts", "run", "--config", configPath];
}

/**
 * Starts `vhostd run` on `config` (written to `configPath`), under `prefix` (e.g. `ip netns exec
 * NS`), and waits until it says it serves and every device socket exists.
 */
export async function startVm(
  config: Record<string, unknown>,
  configPath: string,
  prefix: string[] = [],
  timeoutMs = 60_000,
): Promise<RunningBackend> {
  Deno.mkdirSync(config.socketDir as string, { recursive: true });
  const sockets = configSockets(config);
  for (const s of sockets) {
    try {
      Deno.removeSync(s);
    } catch {
      // not there
    }
  }
  Deno.writeTextFileSync(configPath, JSON.stringify(config, null, 2) + "\n");
  return await startProcess(
    [...prefix, ...runArgv(configPath)],
    (out) => out.includes("vhostd: serving") && sockets.every(socketExists),
    timeoutMs,
  );
}

/**
 * Whether this build's `vhostd run` has shared workers: it accepts a device's `"ownWorker"`
 * (checked with `--check`, which starts nothing). Throws if the check fails for another reason.
 */
export async function sharedWorkersAvailable(scratchDir: string, image: string): Promise<boolean> {
  const dir = `${scratchDir}/probe`;
  Deno.mkdirSync(dir, { recursive: true });
  const path = `${dir}/probe.json`;
  const config = vmConfig({
    name: "probe",
    socketDir: dir,
    images: [image],
    queues: 1,
    ownWorker: true,
  });
  Deno.writeTextFileSync(path, JSON.stringify(config));
  const argv = [...runArgv(path), "--check"];
  const out = await new Deno.Command(argv[0], {
    args: argv.slice(1),
    cwd: new URL("..", import.meta.url).pathname,
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  if (out.success) return true;
  if (/ownWorker: unknown field/.test(text)) return false;
  throw new Error(`vhostd run --check: ${lastLines(text)}`);
}

interface CasePlan {
  id: string;
  label: string;
  group: MemoryGroup;
  devices: number;
  queues: number;
  workers?: "default" | "own";
  /** Starts it; `setup` are the commands run before it (shown in the report). */
  start(): Promise<{ be: RunningBackend; cleanup?: () => Promise<void>; setup?: string[] }>;
}

/** Runs comparison 4. */
export async function memory(cfg: MemoryConfig): Promise<MemoryResult> {
  const dir = cfg.scratchDir;
  Deno.mkdirSync(dir, { recursive: true });
  const maxDevices = Math.max(2, ...cfg.deviceCounts);
  const images = Array.from(
    { length: maxDevices },
    (_, i) => sparseImage(`${dir}/disk${i}.img`, 64 << 20),
  );
  let shared: boolean;
  try {
    shared = await sharedWorkersAvailable(dir, images[0]);
  } catch (e) {
    throw new StepError("memory: probing for shared workers", (e as Error).message);
  }
  if (!shared) {
    progress('memory: this build has no shared workers (no "ownWorker"): a worker per device');
  }
  let nsCount = 0;
  const vmCase = (own: boolean): CasePlan => ({
    id: own ? "vm-own" : "vm",
    label: `\`vhostd run\`: VM with 2 blk + net (TAP) + console${own ? ", a worker each" : ""}`,
    group: "headline",
    devices: 4,
    queues: cfg.queues,
    workers: own ? "own" : "default",
    async start() {
      const ns = `vhostd-mem-${Deno.pid}-${nsCount++}`;
      // The daemon makes its TAP in a namespace of its own, which goes with the TAP afterwards.
      PENDING_NAMESPACES.add(ns);
      await ip(["netns", "add", ns]);
      const removeNs = async () => {
        await ip(["netns", "del", ns]).catch(() => undefined);
        PENDING_NAMESPACES.delete(ns);
      };
      try {
        const config = vmConfig({
          name: "vm",
          socketDir: `${dir}/vm${own ? "-own" : ""}`,
          images: images.slice(0, 2),
          queues: cfg.queues,
          tap: "vm-net0",
          console: true,
          ownWorker: own,
        });
        const be = await startVm(config, `${dir}/vm${own ? "-own" : ""}.json`, [
          "ip",
          "netns",
          "exec",
          ns,
        ]);
        return { be, cleanup: removeNs, setup: [`ip netns add ${ns}`] };
      } catch (e) {
        await removeNs();
        throw e;
      }
    },
  });
  const runCase = (
    id: string,
    label: string,
    group: MemoryGroup,
    devices: number,
    queues: number,
    own: boolean,
  ): CasePlan => ({
    id,
    label,
    group,
    devices,
    queues,
    workers: own ? "own" : "default",
    async start() {
      const config = vmConfig({
        name: id,
        socketDir: `${dir}/${id}`,
        images: images.slice(0, devices),
        queues,
        ownWorker: own,
      });
      return { be: await startVm(config, `${dir}/${id}.json`) };
    },
  });
  const floor = (workers: number): CasePlan => ({
    id: `floor-${workers}`,
    label: workers === 0
      ? "Deno floor: main thread only (bench/deno_floor.ts --workers 0)"
      : "Deno floor: main thread + one idle worker (bench/deno_floor.ts)",
    group: "floor",
    devices: 0,
    queues: 0,
    async start() {
      const argv = [DENO, "run", "-A", "bench/deno_floor.ts"];
      if (workers !== 1) argv.push("--workers", String(workers));
      return { be: await startProcess(argv, (out) => out.includes("deno floor: ready")) };
    },
  });
  const oneTarget = (name: string) => ({
    image: images[0],
    storage: "tmpfs" as const, // plain buffered file I/O; the image's place does not matter idle
    nullSizeBytes: 0,
    queues: cfg.queues,
    socket: `${dir}/${name}.sock`,
  });
  const plans: CasePlan[] = [
    vmCase(false),
    ...(shared ? [vmCase(true)] : []),
    {
      id: "blk-cli",
      label: "`vhostd blk`, 1 device",
      group: "headline",
      devices: 1,
      queues: cfg.queues,
      start: async () => ({ be: await startBackend("vhostd", oneTarget("cli"), DEFAULT_LEVERS) }),
    },
    {
      id: "qsd",
      label: "qemu-storage-daemon, 1 export (reference)",
      group: "headline",
      devices: 1,
      queues: cfg.queues,
      start: async () => ({ be: await startBackend("qsd", oneTarget("qsd"), DEFAULT_LEVERS) }),
    },
    floor(0),
    floor(1),
    ...cfg.deviceCounts.map((n) =>
      runCase(`run-blk-${n}`, `\`vhostd run\`, ${n} blk device(s)`, "devices", n, cfg.queues, false)
    ),
    ...(shared
      ? cfg.deviceCounts.map((n) =>
        runCase(
          `run-blk-${n}-own`,
          `\`vhostd run\`, ${n} blk device(s), a worker each`,
          "devices",
          n,
          cfg.queues,
          true,
        )
      )
      : []),
    ...cfg.queueCounts.map((q) =>
      runCase(`run-q-${q}`, `\`vhostd run\`, 1 blk device, ${q} queue(s)`, "queues", 1, q, false)
    ),
  ];
  const samples = new Map<string, MemoryCaseResult["samples"]>();
  const commands = new Map<string, string>();
  for (let run = 0; run < cfg.runs; run++) {
    for (const plan of plans) {
      let started: Awaited<ReturnType<CasePlan["start"]>>;
      try {
        started = await plan.start();
      } catch (e) {
        throw new StepError(`memory: ${plan.id}`, `could not start: ${(e as Error).message}`);
      }
      const { be, cleanup, setup } = started;
      try {
        await sleep(cfg.settleMs);
        let m: ProcMemory, pss: number;
        try {
          m = procMemory(be.pid);
          pss = pssMiB(be.pid);
        } catch (e) {
          throw new StepError(
            `memory: ${plan.id}`,
            `cannot read /proc/${be.pid} (${(e as Error).message}): ${lastLines(be.output())}`,
          );
        }
        if (!samples.has(plan.id)) samples.set(plan.id, []);
        samples.get(plan.id)!.push({ ...m, pssMiB: pss });
        commands.set(plan.id, [...(setup ?? []), commandLine(be.command)].join("\n"));
        progress(
          `memory run ${run + 1}: ${plan.id}: ${m.rssMiB} MiB RSS (anon ${m.anonMiB}, ` +
            `file ${m.fileMiB}), PSS ${pss}, ${m.threads} threads`,
        );
      } finally {
        await be.stop();
        await cleanup?.();
      }
    }
  }
  const cases: MemoryCaseResult[] = plans.map((p) => {
    const s = samples.get(p.id) ?? [];
    return {
      id: p.id,
      label: p.label,
      group: p.group,
      devices: p.devices,
      queues: p.queues,
      ...(p.workers ? { workers: p.workers } : {}),
      memory: medianMemory(s),
      pssMiB: Math.round(median(s.map((x) => x.pssMiB)) * 10) / 10,
      samples: s,
      command: commands.get(p.id) ?? "",
    };
  });
  const vm = vmConfig({
    name: "vm",
    socketDir: `${dir}/vm`,
    images: images.slice(0, 2),
    queues: cfg.queues,
    tap: "vm-net0",
    console: true,
  });
  return {
    description: "VmRSS, RssAnon, RssFile and RssShmem from /proc/PID/status and Pss from " +
      "/proc/PID/smaps_rollup of idle processes (listening, no front-end), after " +
      `${cfg.settleMs} ms of settling`,
    config: cfg,
    sharedWorkers: shared,
    cases,
    increments: deriveIncrements(cases, cfg),
    targets: MEMORY_TARGETS,
    vmConfig: vm,
    commands: plans.map((p) => commands.get(p.id) ?? "").filter(Boolean),
  };
}
