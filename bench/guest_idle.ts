/**
 * Idle cost: what a back-end spends while its guest does nothing. One guest has a vhost-user disk
 * per variant (qemu-storage-daemon, vhostd at its defaults, and any other vhostd variant); it reads
 * a little from each disk, as a booting system does, then sleeps. The harness samples each
 * back-end process's CPU time when the guest says it starts and stops sleeping: a back-end that
 * keeps polling, or wakes on timers, shows it here.
 *
 * @module
 */

import { accelerator, describeGuestRun, type GuestOptions, runGuest } from "../tests/guest/qemu.ts";
import { type GuestFioConfig, startGuestDiskBackend } from "./guest_fio.ts";
import { VcpuPinning } from "./placement.ts";
import {
  commandLine,
  lastLines,
  median,
  processCpuSeconds,
  progress,
  type RunningBackend,
  sig,
  StepError,
} from "./lib.ts";

/** The vhost-user back-ends whose idle cost is measured (in-QEMU virtio-blk has no process). */
export type IdleVariant = "qsd" | "vhostd" | "vhostd-nopoll";

/** Settings of the idle measurement: the guest fio settings it shares, and its own. */
export interface GuestIdleConfig extends
  Pick<
    GuestFioConfig,
    "diskImage" | "socketDir" | "smp" | "memoryMiB" | "deviceQueues" | "levers" | "placement"
  > {
  /** Back-ends, one disk each. */
  variants: IdleVariant[];
  /** Seconds the guest sleeps while the CPU is measured. */
  seconds: number;
  /** Guest boots; the median of each back-end's CPU seconds is reported. */
  runs: number;
}

/** One back-end's CPU over the idle window. */
export interface GuestIdleCase {
  /** Variant. */
  variant: IdleVariant;
  /** Median CPU seconds (user + system) of the back-end process over the window. */
  cpuSeconds: number;
  /** The same as a share of one CPU, in per cent. */
  cpuPercent: number;
  /** CPU seconds of every boot. */
  samples: number[];
}

/** Result of the idle measurement. */
export interface GuestIdleResult {
  /** What was measured. */
  description: string;
  /** `tcg` or `kvm`. */
  accelerator: string;
  /** Settings used. */
  config: GuestIdleConfig;
  /** A case per variant. */
  cases: GuestIdleCase[];
  /** Exact commands: the QEMU command line and each back-end's (from the last boot). */
  commands: Record<string, { qemu: string; backend: string }>;
}

/** The guest's /test.sh: some reads from every disk, a pause, then the measured sleep. */
export function idleScript(devices: readonly string[], seconds: number): string {
  return [
    "set -e",
    ...devices.map((d) => `waitfor ${d} 20`),
    // Each back-end serves some requests first, so that an adaptive poll window has had reason
    // to open: the window must close again by itself once the guest is quiet.
    ...devices.map((d) => `dd if=${d} of=/dev/null bs=4k count=256 iflag=direct 2>/dev/null`),
    "sleep 1",
    'echo "BENCH-IDLE-BEGIN"',
    `sleep ${seconds}`,
    'echo "BENCH-IDLE-END"',
  ].join("\n") + "\n";
}

/** One boot: CPU seconds of each back-end over the guest's sleep. */
async function bootOnce(
  cfg: GuestIdleConfig,
  run: number,
): Promise<{ cpu: Map<IdleVariant, number>; qemu: string; backends: Map<IdleVariant, string> }> {
  const step = `guest idle: boot ${run + 1}`;
  const devices = cfg.variants.map((_, i) => `/dev/vd${String.fromCharCode(97 + i)}`);
  const backends = new Map<IdleVariant, RunningBackend>();
  const pinning = new VcpuPinning(cfg.placement);
  const opts: GuestOptions = {
    script: idleScript(devices, cfg.seconds),
    smp: cfg.smp,
    memoryMiB: cfg.memoryMiB,
    // Named threads, which the vCPU pinning looks for.
    extraArgs: ["-name", `vhostd-bench-idle-${crypto.randomUUID()},debug-threads=on`],
    timeoutMs: 180_000 + cfg.seconds * 1000,
    vhostUserBlk: [],
    commandPrefix: pinning.commandPrefix,
    onSpawn: pinning.onSpawn,
  };
  try {
    for (const variant of cfg.variants) {
      const socket = `${cfg.socketDir}/idle-${variant}.sock`;
      opts.vhostUserBlk!.push({ socket, numQueues: cfg.deviceQueues });
      backends.set(variant, await startGuestDiskBackend(cfg, variant, socket, step));
    }
    const sample = () => new Map([...backends].map(([v, be]) => [v, processCpuSeconds(be.pid)]));
    let begin: Map<IdleVariant, number> | null = null;
    let end: Map<IdleVariant, number> | null = null;
    let pending = "";
    opts.onConsole = (chunk) => {
      pending += chunk;
      const lines = pending.split("\n");
      pending = lines.pop() ?? "";
      for (const line of lines) {
        if (line.startsWith("BENCH-IDLE-BEGIN")) begin = sample();
        else if (line.startsWith("BENCH-IDLE-END")) end = sample();
      }
    };
    let r;
    try {
      r = await runGuest(opts);
    } catch (e) {
      throw new StepError(step, lastLines((e as Error).message, 4));
    }
    if (r.exitStatus !== 0 || r.qemuExitCode !== 0) {
      throw new StepError(
        step,
        `guest exit ${r.exitStatus}, QEMU exit ${r.qemuExitCode}: ` +
          lastLines(describeGuestRun(r), 4),
      );
    }
    await pinning.finished();
    const b = begin as Map<IdleVariant, number> | null, e = end as Map<IdleVariant, number> | null;
    if (b === null || e === null) throw new StepError(step, "the guest printed no idle markers");
    const cpu = new Map(cfg.variants.map((v) => [v, e.get(v)! - b.get(v)!]));
    progress(
      `guest idle boot ${run + 1}: ` +
        cfg.variants.map((v) => `${v} ${sig(cpu.get(v)!, 3)} CPU s`).join(", ") +
        ` over ${cfg.seconds} s`,
    );
    return {
      cpu,
      qemu: commandLine(r.command),
      backends: new Map([...backends].map(([v, be]) => [v, commandLine(be.command)])),
    };
  } finally {
    for (const be of backends.values()) await be.stop();
  }
}

/** Measures each variant's CPU over `cfg.seconds` of an idle guest, `cfg.runs` boots. */
export async function guestIdle(cfg: GuestIdleConfig): Promise<GuestIdleResult> {
  const samples = new Map<IdleVariant, number[]>(cfg.variants.map((v) => [v, []]));
  const commands: GuestIdleResult["commands"] = {};
  for (let run = 0; run < cfg.runs; run++) {
    progress(
      `[${run + 1}/${cfg.runs}] guest idle: a ${accelerator().toUpperCase()} guest with ` +
        `${cfg.variants.length} disks (${cfg.variants.join(", ")}), ${cfg.seconds} s asleep`,
    );
    const b = await bootOnce(cfg, run);
    for (const [v, s] of b.cpu) samples.get(v)!.push(s);
    for (const v of cfg.variants) commands[v] = { qemu: b.qemu, backend: b.backends.get(v)! };
  }
  return {
    description: "CPU seconds (user + system) of each back-end process while its guest sleeps, " +
      "after reading a little from every disk.",
    accelerator: accelerator(),
    config: cfg,
    cases: cfg.variants.map((variant) => {
      const xs = samples.get(variant)!;
      const cpuSeconds = sig(median(xs), 3);
      return {
        variant,
        cpuSeconds,
        cpuPercent: sig((cpuSeconds / cfg.seconds) * 100, 3),
        samples: xs.map((x) => sig(x, 3)),
      };
    }),
    commands,
  };
}
