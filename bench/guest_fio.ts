/**
 * Comparison 2, guest fio: one guest (the kit of tests/guest) has a disk per variant, all on the
 * same image file on disk: QEMU's own virtio-blk-pci (aio=native, cache.direct=on),
 * qemu-storage-daemon's vhost-user-blk export, and vhostd. The guest runs each fio job on every
 * disk in turn, rotating the order from job to job, so that the variants share the boot's speed
 * (under TCG one boot can be several per cent faster than the next). The image is open in all
 * three at once; only one does I/O at a time, and QEMU and qsd skip their image locks.
 *
 * The guest prints a marker before and after every fio job; the harness samples CPU times from
 * /proc when it sees them, so each job gets its own CPU figures. For the vhost-user back-ends the
 * back-end's CPU is its whole process; for in-QEMU virtio-blk it is QEMU's threads other than the
 * vCPU threads (`CPU n/TCG` or `CPU n/KVM`) (QEMU names threads because of `-name ...,debug-threads=on`): the main loop and AIO threads that do the I/O. QEMU's
 * total CPU is reported for all three as well (under TCG it is dominated by the emulated guest).
 *
 * @module
 */

import {
  accelerator,
  describeGuestRun,
  type GuestOptions,
  GuestTimeoutError,
  runGuest,
} from "../tests/guest/qemu.ts";
import { type BackendLevers, startBackend } from "./backends.ts";
import { type CpuPlacement, VCPU_THREAD, VcpuPinning } from "./placement.ts";
import {
  commandLine,
  lastLines,
  median,
  processCpuSeconds,
  progress,
  type RunningBackend,
  runOrder,
  sig,
  StepError,
  threadCpuSeconds,
} from "./lib.ts";

/**
 * The ways of serving the guest's disk: QEMU itself, qemu-storage-daemon, vhostd, and vhostd with
 * busy-polling off (`--poll-us 0`, the lever against its default).
 */
export type GuestVariant = "in-qemu" | "qsd" | "vhostd" | "vhostd-nopoll";

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
  /** Guest boots (medians over every run of every boot are reported). */
  runs: number;
  /**
   * Rounds per boot: each round runs every job on every disk once, so a variant gets
   * `runs × rounds` samples per job.
   */
  rounds: number;
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
  /** vCPU threads on CPUs of their own, everything else on the rest; null leaves it to Linux. */
  placement: CpuPlacement | null;
}

/** One fio run of one job on one disk. */
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

/** Every run of one (job, variant), with medians. */
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
  /** Every run, boot by boot. */
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
  /** Boots whose guest stopped making progress and were made again: what each was doing. */
  hangs: string[];
}

/** Boots made again after a hang, at most, per boot. */
const MAX_HANG_RETRIES = 3;

/** A boot whose guest stopped making progress before its script finished. */
class GuestHangError extends StepError {}

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

/**
 * The guest's /test.sh: `rounds` rounds, each running every job on every variant's disk
 * (`devices`, by variant). The variants' order rotates from round to round, starting at rotation
 * `first`, and is offset per job, so that over consecutive rotations every variant takes every
 * place in the order. Markers (`job variant round`) around each fio run, and one parsable line
 * per run.
 */
export function guestScript(
  jobs: FioJob[],
  seconds: number,
  devices: ReadonlyMap<GuestVariant, string>,
  first: number,
  rounds: number,
): string {
  const lines = ["set -e", ...[...devices.values()].map((d) => `waitfor ${d} 20`)];
  for (let round = 0; round < rounds; round++) {
    jobs.forEach((j, i) => {
      for (const v of runOrder([...devices.keys()], first + round + i)) {
        const key = `${j.name} ${v} ${round}`;
        lines.push(
          `echo "BENCH-BEGIN ${key}"`,
          "sleep 1",
          `out=$(${fioCommand(j, seconds, devices.get(v))})`,
          `echo "BENCH-END ${key}"`,
          `echo "BENCH-FIO ${key} $out"`,
          "sleep 1",
        );
      }
    });
  }
  return lines.join("\n") + "\n";
}

/**
 * The guest's disks: the vhost-user ones first, as {@link runGuest} attaches them, then the
 * in-QEMU one; `/dev/vda`, `/dev/vdb`... in that order.
 */
export function guestDevices(variants: readonly GuestVariant[]): Map<GuestVariant, string> {
  const ordered = [
    ...variants.filter((v) => v !== "in-qemu"),
    ...variants.filter((v) => v === "in-qemu"),
  ];
  return new Map(ordered.map((v, i) => [v, `/dev/vd${String.fromCharCode(97 + i)}`]));
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

interface CpuPoint {
  backend: number;
  qemuTotal: number;
}

/** What one boot measured: a sample per (job, variant) and round, keyed `job|variant`. */
interface BootResult {
  samples: Map<string, FioSample[]>;
  qemu: string;
  backends: Map<GuestVariant, string>;
}

/** The last errors and warnings each back-end printed (` | qsd: ...`), for a failed boot. */
function backendOutput(backends: Map<GuestVariant, RunningBackend>): string {
  let out = "";
  for (const [variant, be] of backends) {
    const complaints = be.output().split("\n").filter((l) =>
      /\[(ERR|WRN)\]|error|warning/i.test(l)
    );
    if (complaints.length) out += ` | ${variant}: ${lastLines(complaints.join("\n"), 3)}`;
  }
  return out;
}

/** One guest with a disk per variant, all on the same image; every job on every disk in turn. */
/**
 * Starts the vhost-user back-end of `variant` (qsd, vhostd, or vhostd with `--poll-us 0`) on the
 * shared disk image, for a guest that has a disk on each back-end.
 */
export async function startGuestDiskBackend(
  cfg: Pick<GuestFioConfig, "diskImage" | "deviceQueues" | "levers" | "placement">,
  variant: "qsd" | "vhostd" | "vhostd-nopoll",
  socket: string,
  step: string,
): Promise<RunningBackend> {
  const levers = variant === "vhostd-nopoll" ? { ...cfg.levers, vhostdPollUs: 0 } : cfg.levers;
  try {
    return await startBackend(
      variant === "qsd" ? "qsd" : "vhostd",
      {
        image: cfg.diskImage,
        storage: "disk",
        nullSizeBytes: 0,
        queues: cfg.deviceQueues,
        socket,
        shared: true,
      },
      levers,
      cfg.placement?.housekeeping,
    );
  } catch (e) {
    throw new StepError(step, `could not start ${variant}: ${(e as Error).message}`);
  }
}

async function bootOnce(cfg: GuestFioConfig, run: number): Promise<BootResult> {
  const step = `guest fio: boot ${run + 1}`;
  const rounds = cfg.rounds;
  const devices = guestDevices(cfg.variants);
  const backends = new Map<GuestVariant, RunningBackend>();
  const tag = `vhostd-bench-${crypto.randomUUID()}`;
  const pinning = new VcpuPinning(cfg.placement);
  const opts: GuestOptions = {
    script: guestScript(cfg.jobs, cfg.seconds, devices, run * rounds, rounds),
    smp: cfg.smp,
    memoryMiB: cfg.memoryMiB,
    extraArgs: ["-name", `${tag},debug-threads=on`],
    timeoutMs: 120_000 + rounds * cfg.jobs.length * devices.size * (cfg.seconds + 10) * 1000,
    vhostUserBlk: [],
    commandPrefix: pinning.commandPrefix,
    onSpawn: pinning.onSpawn,
  };
  try {
    for (const variant of devices.keys()) {
      if (variant === "in-qemu") {
        // The vhost-user back-ends have the image open too; each disk is used in turn.
        opts.virtioBlkImages = [{ path: cfg.diskImage, shared: true }];
        continue;
      }
      const socket = `${cfg.socketDir}/guest-${variant}.sock`;
      opts.vhostUserBlk!.push({ socket, numQueues: cfg.deviceQueues });
      backends.set(variant, await startGuestDiskBackend(cfg, variant, socket, step));
    }
    const begins = new Map<string, CpuPoint>();
    const ends = new Map<string, CpuPoint>();
    let qemuPid: number | null = null;
    let pending = "";
    const sample = (variant: GuestVariant): CpuPoint => {
      qemuPid ??= findQemuPid(tag);
      if (qemuPid === null) throw new Error("QEMU's process was not found");
      const q = threadCpuSeconds(qemuPid, VCPU_THREAD);
      const be = backends.get(variant);
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
        const m = /^BENCH-(BEGIN|END) (\S+) (\S+) (\d+)/.exec(raw.replace(/\r$/, ""));
        if (!m) continue;
        try {
          (m[1] === "BEGIN" ? begins : ends).set(
            `${m[2]} ${m[3]} ${m[4]}`,
            sample(m[3] as GuestVariant),
          );
        } catch (e) {
          sampleError = (e as Error).message;
        }
      }
    };
    let r;
    try {
      r = await runGuest(opts);
    } catch (e) {
      const E = e instanceof GuestTimeoutError ? GuestHangError : StepError;
      throw new E(step, lastLines((e as Error).message, 4) + backendOutput(backends));
    }
    if (r.exitStatus !== 0 || r.qemuExitCode !== 0) {
      const detail = describeGuestRun(r);
      throw new StepError(
        step,
        `guest exit ${r.exitStatus}, QEMU exit ${r.qemuExitCode}: ${lastLines(detail, 4)}` +
          backendOutput(backends),
      );
    }
    try {
      await pinning.finished();
    } catch (e) {
      throw new StepError(step, `pinning the vCPU: ${(e as Error).message}`);
    }
    if (sampleError) throw new StepError(step, `CPU sampling failed: ${sampleError}`);
    const samples = new Map<string, FioSample[]>();
    const fioLines = r.console.split("\n").filter((l) => l.startsWith("BENCH-FIO "));
    for (let round = 0; round < rounds; round++) {
      for (const job of cfg.jobs) {
        const parts: string[] = [];
        for (const variant of cfg.variants) {
          const key = `${job.name} ${variant} ${round}`;
          const line = fioLines.find((l) => l.startsWith(`BENCH-FIO ${key} `));
          const b = begins.get(key), e = ends.get(key);
          if (!line || !b || !e) throw new StepError(step, `no result or markers for ${key}`);
          let parsed;
          try {
            parsed = parseTerse(line.slice(`BENCH-FIO ${key} `.length), job.bs);
          } catch (err) {
            throw new StepError(`${step} ${key}`, (err as Error).message);
          }
          if (!(parsed.ios > 0)) throw new StepError(`${step} ${key}`, "fio did no I/O");
          const s: FioSample = {
            iops: parsed.iops,
            ios: parsed.ios,
            backendCpuUsPerIo: sig(((e.backend - b.backend) * 1e6) / parsed.ios, 4),
            qemuTotalCpuUsPerIo: sig(((e.qemuTotal - b.qemuTotal) * 1e6) / parsed.ios, 4),
          };
          const k = `${job.name}|${variant}`;
          samples.set(k, [...samples.get(k) ?? [], s]);
          parts.push(
            `${variant} ${s.iops.toLocaleString("en-US")} IOPS (${s.backendCpuUsPerIo} µs CPU/IO)`,
          );
        }
        const label = rounds > 1 ? ` round ${round + 1}` : "";
        progress(`guest boot ${run + 1}${label} ${job.name}: ${parts.join(", ")}`);
      }
    }
    return {
      samples,
      qemu: commandLine(r.command),
      backends: new Map([...backends].map(([v, be]) => [v, commandLine(be.command)])),
    };
  } finally {
    for (const be of backends.values()) await be.stop();
  }
}

/**
 * Runs comparison 2: `cfg.runs` boots of one guest with a disk per variant, every job run on
 * every disk in turn, `cfg.rounds` times per boot (interleaved, so that the variants share the
 * boot's ups and downs).
 */
export async function guestFio(cfg: GuestFioConfig): Promise<GuestFioResult> {
  const hangs: string[] = [];
  const cases = new Map<string, GuestCaseResult>();
  const commands: GuestFioResult["commands"] = {};
  for (let run = 0; run < cfg.runs; run++) {
    progress(
      `[${run + 1}/${cfg.runs}] guest fio: booting a ${accelerator().toUpperCase()} guest with ` +
        `${cfg.variants.length} disks (${cfg.variants.join(", ")})`,
    );
    let b: BootResult | null = null;
    for (let attempt = 1; b === null; attempt++) {
      try {
        b = await bootOnce(cfg, run);
      } catch (e) {
        // A TCG guest has been seen to stop in the middle of a run (on 2026-12-07, about one
        // boot in two at times: no kick or interrupt pending anywhere, the vCPU idle, as if a
        // timer never fired); a hang must not cost the comparison. It is reported, with what
        // the guest was doing, and the boot made again, up to three times.
        if (!(e instanceof GuestHangError) || attempt > MAX_HANG_RETRIES) throw e;
        hangs.push(`boot ${run + 1}: ${e.message.replaceAll("\n", " | ").slice(-300)}`);
        progress(`guest fio: boot ${run + 1} hung; booting it again`);
      }
    }
    for (const v of cfg.variants) commands[v] = { qemu: b.qemu, backend: b.backends.get(v) };
    for (const job of cfg.jobs) {
      for (const variant of cfg.variants) {
        const key = `${job.name}|${variant}`;
        let c = cases.get(key);
        if (!c) {
          c = {
            job: job.name,
            variant,
            iops: 0,
            cpuUsPerIo: 0,
            qemuTotalCpuUsPerIo: 0,
            samples: [],
          };
          cases.set(key, c);
        }
        c.samples.push(...b.samples.get(key)!);
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
    description: "fio in one guest (libaio, direct, one job at a time) against a disk per " +
      "variant, all three served from the same image on disk, the variants taking turns. " +
      "Back-end CPU: the back-end process for qsd and vhostd; for in-QEMU virtio-blk, QEMU's " +
      "non-vCPU threads (main loop + AIO). QEMU total includes the vCPU threads (the emulated " +
      "guest under TCG).",
    accelerator: accelerator(),
    config: cfg,
    cases: [...cases.values()],
    ratios,
    fioCommands: Object.fromEntries(
      cfg.jobs.map((j) => [j.name, fioCommand(j, cfg.seconds, "/dev/vdX")]),
    ),
    commands,
    hangs,
  };
}
