/**
 * Comparison 2, guest fio: the same guest kit (tests/guest) runs fio against one disk, served by
 * QEMU's own virtio-blk-pci (aio=native, cache.direct=on), by qemu-storage-daemon's
 * vhost-user-blk export, or by vhostd, all on the same image file on disk.
 *
 * The guest prints a marker before and after every fio job; the harness samples CPU times from
 * /proc when it sees them, so each job gets its own CPU figures. For the vhost-user back-ends the
 * back-end's CPU is its whole process; for in-QEMU virtio-blk it is QEMU's threads other than the
 * vCPU threads (`CPU n/TCG` or `CPU n/KVM`) (QEMU names threads because of `-name ...,debug-threads=on`): the main loop and AIO threads that do the I/O. QEMU's
 * total CPU is reported for all three as well (under TCG it is dominated by the emulated guest).
 *
 * @module
 */

import { accelerator, describeGuestRun, type GuestOptions, runGuest } from "../tests/guest/qemu.ts";
import { type BackendLevers, startBackend } from "./backends.ts";
import {
  commandLine,
  lastLines,
  median,
  processCpuSeconds,
  progress,
  type RunningBackend,
  sig,
  StepError,
  threadCpuSeconds,
} from "./lib.ts";

/** The three ways of serving the guest's disk. */
export type GuestVariant = "in-qemu" | "qsd" | "vhostd";

/** One fio job. */
export interface FioJob {
  /** Name, e.g. `randread-4k`. */
  name: string;
  /** fio `--rw`. */
  rw: "randread" | "randwrite" | "read";
  /** Block size in bytes. */
  bs: number;
  /** fio `--iodepth`. */
  depth: number;
}

/** Settings of comparison 2. */
export interface GuestFioConfig {
  /** Variants side by side; the first is the anchor for ratios. */
  variants: GuestVariant[];
  /** fio jobs, run one after another in each guest boot. */
  jobs: FioJob[];
  /** Boots per variant (medians are reported). */
  runs: number;
  /** fio runtime per job in seconds. */
  seconds: number;
  /** Image on a disk file system with O_DIRECT (aio=native needs it). */
  diskImage: string;
  /** Directory for sockets. */
  socketDir: string;
  /** Guest vCPUs. */
  smp: number;
  /** Guest RAM in MiB. */
  memoryMiB: number;
  /** Queues of the vhost-user-blk device (in-QEMU virtio-blk gets one per vCPU by default). */
  deviceQueues: number;
  /** Back-end I/O levers. */
  levers: BackendLevers;
}

/** One fio job in one boot. */
export interface FioSample {
  /** IOPS fio reported (read + write). */
  iops: number;
  /** Requests fio completed. */
  ios: number;
  /** Back-end CPU µs per I/O (see the module doc for what counts as the back-end). */
  backendCpuUsPerIo: number;
  /** QEMU's whole-process CPU µs per I/O (vCPU threads included). */
  qemuTotalCpuUsPerIo: number;
}

/** Every boot of one (job, variant), with medians. */
export interface GuestCaseResult {
  /** fio job name. */
  job: string;
  /** Variant. */
  variant: GuestVariant;
  /** Median IOPS. */
  iops: number;
  /** Median back-end CPU µs per I/O. */
  cpuUsPerIo: number;
  /** Median QEMU whole-process CPU µs per I/O. */
  qemuTotalCpuUsPerIo: number;
  /** Every boot. */
  samples: FioSample[];
}

/** Result of comparison 2. */
export interface GuestFioResult {
  /** What was measured. */
  description: string;
  /** `tcg` or `kvm`. */
  accelerator: string;
  /** Settings used. */
  config: GuestFioConfig;
  /** Every case. */
  cases: GuestCaseResult[];
  /** IOPS and CPU/IO of each variant relative to the anchor (the first variant). */
  ratios: { job: string; variant: GuestVariant; iopsRatio: number; cpuPerIoRatio: number }[];
  /** The fio command each job ran in the guest. */
  fioCommands: Record<string, string>;
  /** Exact commands: the QEMU command line and back-end per variant (from the last boot). */
  commands: Record<string, { qemu: string; backend?: string }>;
}

/** The fio command line of a job, as the guest runs it. */
export function fioCommand(job: FioJob, seconds: number, device = "/dev/vda"): string {
  return [
    "fio",
    `--name=${job.name}`,
    `--filename=${device}`,
    "--ioengine=libaio",
    "--direct=1",
    `--rw=${job.rw}`,
    `--bs=${job.bs}`,
    `--iodepth=${job.depth}`,
    "--numjobs=1",
    "--norandommap",
    "--randrepeat=0",
    `--runtime=${seconds}`,
    "--time_based",
    "--output-format=terse",
    "--terse-version=3",
  ].join(" ");
}

/** The guest's /test.sh: markers around each fio job, and one parsable line per job. */
export function guestScript(jobs: FioJob[], seconds: number): string {
  const lines = ["set -e", "waitfor /dev/vda 20"];
  for (const j of jobs) {
    lines.push(
      `echo "BENCH-BEGIN ${j.name}"`,
      "sleep 1",
      `out=$(${fioCommand(j, seconds)})`,
      `echo "BENCH-END ${j.name}"`,
      `echo "BENCH-FIO ${j.name} $out"`,
      "sleep 1",
    );
  }
  return lines.join("\n") + "\n";
}

/** IOPS and I/O count from a fio terse (version 3) line. */
export function parseTerse(line: string, bs: number): { iops: number; ios: number } {
  const f = line.trim().split(";");
  if (f[0] !== "3" || f.length < 50) {
    throw new Error(`not a fio terse v3 line: ${line.slice(0, 80)}`);
  }
  if (f[4] !== "0") throw new Error(`fio reported error ${f[4]}`);
  const readKb = Number(f[5]), readIops = Number(f[7]);
  const writeKb = Number(f[46]), writeIops = Number(f[48]);
  return {
    iops: Math.round(readIops + writeIops),
    ios: Math.round(((readKb + writeKb) * 1024) / bs),
  };
}

function findQemuPid(tag: string): number | null {
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      const cmd = Deno.readTextFileSync(`/proc/${e.name}/cmdline`);
      const argv0 = cmd.slice(0, cmd.indexOf("\0"));
      if (cmd.includes(tag) && /(^|\/)qemu-system-[^/]*$/.test(argv0)) return Number(e.name);
    } catch {
      // gone
    }
  }
  return null;
}

const VCPU_THREAD = /^CPU \d+\/(TCG|KVM)$/;

interface CpuPoint {
  backend: number;
  qemuTotal: number;
}

async function bootOnce(
  cfg: GuestFioConfig,
  variant: GuestVariant,
  run: number,
): Promise<{ samples: Map<string, FioSample>; qemu: string; backend?: string }> {
  const step = `guest fio: ${variant} run ${run + 1}`;
  const socket = `${cfg.socketDir}/guest-${variant}.sock`;
  let be: RunningBackend | null = null;
  const tag = `vhostd-bench-${crypto.randomUUID()}`;
  const opts: GuestOptions = {
    script: guestScript(cfg.jobs, cfg.seconds),
    smp: cfg.smp,
    memoryMiB: cfg.memoryMiB,
    extraArgs: ["-name", `${tag},debug-threads=on`],
    timeoutMs: 120_000 + cfg.jobs.length * (cfg.seconds + 10) * 1000,
  };
  if (variant === "in-qemu") {
    opts.virtioBlkImages = [{ path: cfg.diskImage }];
  } else {
    opts.vhostUserBlk = [{ socket, numQueues: cfg.deviceQueues }];
    try {
      be = await startBackend(variant, {
        image: cfg.diskImage,
        storage: "disk",
        nullSizeBytes: 0,
        queues: cfg.deviceQueues,
        socket,
      }, cfg.levers);
    } catch (e) {
      throw new StepError(step, `could not start the back-end: ${(e as Error).message}`);
    }
  }
  const begins = new Map<string, CpuPoint>();
  const ends = new Map<string, CpuPoint>();
  let qemuPid: number | null = null;
  let pending = "";
  const sample = (): CpuPoint => {
    qemuPid ??= findQemuPid(tag);
    if (qemuPid === null) throw new Error("QEMU's process was not found");
    const q = threadCpuSeconds(qemuPid, VCPU_THREAD);
    return {
      backend: be ? processCpuSeconds(be.pid) : q.other,
      qemuTotal: q.matching + q.other,
    };
  };
  let sampleError = "";
  opts.onConsole = (chunk) => {
    pending += chunk;
    const lines = pending.split("\n");
    pending = lines.pop() ?? "";
    for (const raw of lines) {
      const m = /^BENCH-(BEGIN|END) (\S+)/.exec(raw.replace(/\r$/, ""));
      if (!m) continue;
      try {
        (m[1] === "BEGIN" ? begins : ends).set(m[2], sample());
      } catch (e) {
        sampleError = (e as Error).message;
      }
    }
  };
  try {
    let r;
    try {
      r = await runGuest(opts);
    } catch (e) {
      throw new StepError(step, lastLines((e as Error).message, 4));
    }
    if (r.exitStatus !== 0 || r.qemuExitCode !== 0) {
      const detail = describeGuestRun(r);
      throw new StepError(
        step,
        `guest exit ${r.exitStatus}, QEMU exit ${r.qemuExitCode}: ${lastLines(detail, 4)}`,
      );
    }
    if (sampleError) throw new StepError(step, `CPU sampling failed: ${sampleError}`);
    const samples = new Map<string, FioSample>();
    for (const job of cfg.jobs) {
      const line = r.console.split("\n").find((l) => l.startsWith(`BENCH-FIO ${job.name} `));
      const b = begins.get(job.name), e = ends.get(job.name);
      if (!line || !b || !e) throw new StepError(step, `no result or markers for ${job.name}`);
      let parsed;
      try {
        parsed = parseTerse(line.slice(`BENCH-FIO ${job.name} `.length), job.bs);
      } catch (err) {
        throw new StepError(`${step} ${job.name}`, (err as Error).message);
      }
      if (!(parsed.ios > 0)) throw new StepError(`${step} ${job.name}`, "fio did no I/O");
      const s: FioSample = {
        iops: parsed.iops,
        ios: parsed.ios,
        backendCpuUsPerIo: sig(((e.backend - b.backend) * 1e6) / parsed.ios, 4),
        qemuTotalCpuUsPerIo: sig(((e.qemuTotal - b.qemuTotal) * 1e6) / parsed.ios, 4),
      };
      samples.set(job.name, s);
      progress(
        `guest ${job.name} ${variant} run ${run + 1}: ${s.iops.toLocaleString("en-US")} IOPS, ` +
          `back-end ${s.backendCpuUsPerIo} µs CPU/IO, QEMU total ${s.qemuTotalCpuUsPerIo} µs/IO ` +
          `(boot+jobs ${Math.round(r.durationMs / 1000)} s)`,
      );
    }
    return {
      samples,
      qemu: commandLine(r.command),
      backend: be ? commandLine(be.command) : undefined,
    };
  } finally {
    await be?.stop();
  }
}

/** Runs comparison 2; boots are interleaved across variants, repetition loop outermost. */
export async function guestFio(cfg: GuestFioConfig): Promise<GuestFioResult> {
  const cases = new Map<string, GuestCaseResult>();
  const commands: GuestFioResult["commands"] = {};
  let n = 0;
  const total = cfg.runs * cfg.variants.length;
  for (let run = 0; run < cfg.runs; run++) {
    for (const variant of cfg.variants) {
      n++;
      progress(
        `[${n}/${total}] guest fio: booting a ${accelerator().toUpperCase()} guest, ${variant}`,
      );
      const b = await bootOnce(cfg, variant, run);
      commands[variant] = { qemu: b.qemu, backend: b.backend };
      for (const [job, s] of b.samples) {
        const key = `${job}|${variant}`;
        let c = cases.get(key);
        if (!c) {
          c = { job, variant, iops: 0, cpuUsPerIo: 0, qemuTotalCpuUsPerIo: 0, samples: [] };
          cases.set(key, c);
        }
        c.samples.push(s);
      }
    }
  }
  for (const c of cases.values()) {
    c.iops = Math.round(median(c.samples.map((s) => s.iops)));
    c.cpuUsPerIo = sig(median(c.samples.map((s) => s.backendCpuUsPerIo)), 3);
    c.qemuTotalCpuUsPerIo = sig(median(c.samples.map((s) => s.qemuTotalCpuUsPerIo)), 3);
  }
  const anchor = cfg.variants[0];
  const ratios: GuestFioResult["ratios"] = [];
  for (const job of cfg.jobs) {
    const a = cases.get(`${job.name}|${anchor}`);
    for (const v of cfg.variants.slice(1)) {
      const c = cases.get(`${job.name}|${v}`);
      if (a && c) {
        ratios.push({
          job: job.name,
          variant: v,
          iopsRatio: sig(c.iops / a.iops, 3),
          cpuPerIoRatio: sig(c.cpuUsPerIo / a.cpuUsPerIo, 3),
        });
      }
    }
  }
  return {
    description: "fio in a guest (libaio, direct, one job) against /dev/vda served three ways " +
      "from the same image on disk. Back-end CPU: the back-end process for qsd and vhostd; for " +
      "in-QEMU virtio-blk, QEMU's non-vCPU threads (main loop + AIO). QEMU total includes the " +
      "vCPU threads (the emulated guest under TCG).",
    accelerator: accelerator(),
    config: cfg,
    cases: [...cases.values()],
    ratios,
    fioCommands: Object.fromEntries(cfg.jobs.map((j) => [j.name, fioCommand(j, cfg.seconds)])),
    commands,
  };
}
