/**
 * CPU placement for the guest comparisons: the guest's vCPU threads get CPUs of their own, and
 * everything else (QEMU's main loop and I/O threads, every back-end, iperf3's server) shares the
 * rest. That is how hosts that run vhost-user back-ends are set up (vCPUs pinned, back-ends on
 * housekeeping cores), and it treats every variant alike.
 *
 * Why the bench does it at all: on this 2-CPU machine, left to the scheduler, a back-end's worker
 * sometimes lands on the vCPU's CPU and takes time from the guest. vhostd's guest randread then
 * ranged from 4,350 to 6,831 IOPS between boots of the same set-up; with the placement below it
 * stayed between 6,138 and 6,862.
 *
 * @module
 */

import { sleep } from "./lib.ts";

/** Which CPUs the vCPU threads get, and which everything else gets. */
export interface CpuPlacement {
  /** One CPU per vCPU thread (`CPU n/...` goes to `vcpus[n]`). */
  vcpus: number[];
  /** CPUs for every other thread of QEMU and for the back-ends. */
  housekeeping: number[];
}

/** Parses a kernel CPU list such as `0-3,8,10-11`. */
export function parseCpuList(list: string): number[] {
  const cpus: number[] = [];
  for (const part of list.trim().split(",")) {
    if (part === "") continue;
    const m = /^(\d+)(?:-(\d+))?$/.exec(part);
    if (!m) throw new Error(`not a CPU list: ${list}`);
    const first = Number(m[1]);
    const last = m[2] === undefined ? first : Number(m[2]);
    for (let c = first; c <= last; c++) cpus.push(c);
  }
  return cpus;
}

/** The CPUs this process may run on (`Cpus_allowed_list` of /proc/self/status). */
export function allowedCpus(): number[] {
  const status = Deno.readTextFileSync("/proc/self/status");
  const m = /^Cpus_allowed_list:\s*(\S+)$/m.exec(status);
  if (!m) throw new Error("/proc/self/status has no Cpus_allowed_list");
  return parseCpuList(m[1]);
}

/**
 * The first `smp` allowed CPUs for the vCPUs, the others for the rest; null when there are not
 * more CPUs than vCPUs (nothing would be left for the back-ends).
 */
export function guestPlacement(smp: number, cpus: number[] = allowedCpus()): CpuPlacement | null {
  if (cpus.length <= smp) return null;
  return { vcpus: cpus.slice(0, smp), housekeeping: cpus.slice(smp) };
}

/** `argv` run under `taskset` on `cpus` (its threads, and threads they start, inherit the set). */
export function pinnedArgv(argv: string[], cpus: number[] | undefined): string[] {
  return cpus === undefined ? argv : ["taskset", "-c", cpus.join(","), ...argv];
}

/** One line for the report, e.g. `vCPU on CPU 0; QEMU's other threads and back-ends on CPU 1`. */
export function describePlacement(p: CpuPlacement | null): string {
  if (p === null) return "not pinned (no more CPUs than vCPUs)";
  const list = (c: number[]) => `CPU${c.length > 1 ? "s" : ""} ${c.join(",")}`;
  return `vCPU threads on ${list(p.vcpus)}; QEMU's other threads and every back-end on ${
    list(p.housekeeping)
  }`;
}

/** Name of a QEMU vCPU thread under `-name ...,debug-threads=on`; group 1 is its index. */
export const VCPU_THREAD = /^CPU (\d+)\/(TCG|KVM)$/;

/**
 * Moves each vCPU thread of QEMU process `pid` (named `CPU n/TCG` or `CPU n/KVM`, which needs
 * `-name ...,debug-threads=on`) onto its CPU. Waits until `vcpuCount` such threads exist; throws
 * if they do not appear within `timeoutMs` or `taskset` fails.
 */
export async function pinVcpuThreads(
  pid: number,
  p: CpuPlacement,
  timeoutMs = 20_000,
): Promise<void> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const found = new Map<number, number>();
    try {
      for (const t of Deno.readDirSync(`/proc/${pid}/task`)) {
        let comm = "";
        try {
          comm = Deno.readTextFileSync(`/proc/${pid}/task/${t.name}/comm`).trim();
        } catch {
          continue; // the thread ended
        }
        const m = VCPU_THREAD.exec(comm);
        if (m) found.set(Number(m[1]), Number(t.name));
      }
    } catch {
      throw new Error(`QEMU (pid ${pid}) exited before its vCPU threads could be pinned`);
    }
    if (found.size >= p.vcpus.length) {
      for (const [n, tid] of found) {
        const cpu = p.vcpus[n % p.vcpus.length];
        const out = await new Deno.Command("taskset", {
          args: ["-pc", String(cpu), String(tid)],
          stdout: "null",
          stderr: "piped",
        }).output();
        if (!out.success) {
          throw new Error(
            `taskset -pc ${cpu} ${tid}: ${new TextDecoder().decode(out.stderr).trim()}`,
          );
        }
      }
      return;
    }
    if (Date.now() > end) {
      throw new Error(
        `QEMU (pid ${pid}) has ${found.size} of ${p.vcpus.length} vCPU threads named ` +
          `after ${timeoutMs} ms (is -name ...,debug-threads=on given?)`,
      );
    }
    await sleep(20);
  }
}

/**
 * The pinning of one guest boot: `commandPrefix` and `onSpawn` go into `GuestOptions`; after the
 * run, {@link finished} rejects if the vCPU threads could not be pinned. Without a placement it
 * does nothing.
 */
export class VcpuPinning {
  readonly #placement: CpuPlacement | null;
  #done: Promise<void> = Promise.resolve();

  /** Pinning for `placement` (null: none). */
  constructor(placement: CpuPlacement | null) {
    this.#placement = placement;
  }

  /** For `GuestOptions.commandPrefix`: QEMU starts on the housekeeping CPUs. */
  get commandPrefix(): string[] {
    return pinnedArgv([], this.#placement?.housekeeping);
  }

  /** For `GuestOptions.onSpawn`: moves the vCPU threads once they exist. */
  readonly onSpawn = (pid: number): void => {
    if (this.#placement === null) return;
    this.#done = pinVcpuThreads(pid, this.#placement);
    this.#done.catch(() => {}); // reported by finished()
  };

  /** Settles when the pinning did; rejects with why it failed. */
  finished(): Promise<void> {
    return this.#done;
  }
}
