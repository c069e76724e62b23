/**
 * A description of the machine and software a benchmark ran on, for the results.
 *
 * @module
 */

import { accelerator, kitDir } from "../tests/guest/qemu.ts";
import { commandOutput } from "./lib.ts";

/** Machine and versions. */
export interface SystemInfo {
  /** CPU model from /proc/cpuinfo. */
  cpuModel: string;
  /** `nproc`. */
  nproc: number;
  /** Whether the CPU shows vmx or svm. */
  hardwareVirtualization: boolean;
  /** Accelerator the guests use (`tcg` or `kvm`). */
  accelerator: string;
  /** MemTotal in GiB. */
  memoryGiB: number;
  /** Host kernel release. */
  kernel: string;
  /** OS name from /etc/os-release. */
  os: string;
  /** `qemu-system-x86_64 --version`, first line. */
  qemu: string;
  /** `qemu-storage-daemon --version`, first line. */
  qsd: string;
  /** Deno, V8 and TypeScript versions. */
  deno: string;
  /** Host fio (the guest kit copies the same binary). */
  fio: string;
  /** DPDK (Debian package `dpdk-dev`: testpmd and the vhost/virtio PMDs), if installed. */
  dpdk: string;
  /** Host iperf3 (the guest kit copies the same binary). */
  iperf3: string;
  /** Guest kit stamp (guest kernel package and tool versions), if built. */
  guestKit: string;
  /** /proc/loadavg when the run started and ended: a busy machine skews every figure. */
  loadavgStart: string;
  /** Filled in at the end. */
  loadavgEnd: string;
}

function readOr(path: string, fallback = ""): string {
  try {
    return Deno.readTextFileSync(path);
  } catch {
    return fallback;
  }
}

/** Reads /proc, /etc/os-release and the tools' version output. */
export async function systemInfo(): Promise<SystemInfo> {
  const cpuinfo = readOr("/proc/cpuinfo");
  const model = /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1]?.trim() ?? "unknown";
  const memKb = Number(/^MemTotal:\s+(\d+)/m.exec(readOr("/proc/meminfo"))?.[1] ?? 0);
  const os = /^PRETTY_NAME="?([^"\n]+)"?/m.exec(readOr("/etc/os-release"))?.[1] ?? "unknown";
  const first = (s: string) => s.split("\n")[0] ?? "";
  return {
    cpuModel: model,
    nproc: navigator.hardwareConcurrency,
    hardwareVirtualization: /^flags\s*:.*\b(vmx|svm)\b/m.test(cpuinfo),
    accelerator: accelerator(),
    memoryGiB: Math.round(memKb / 1024 / 1024),
    kernel: Deno.osRelease(),
    os,
    qemu: first(await commandOutput(["qemu-system-x86_64", "--version"])),
    qsd: first(await commandOutput(["qemu-storage-daemon", "--version"])),
    deno: `deno ${Deno.version.deno}, v8 ${Deno.version.v8}, typescript ${Deno.version.typescript}`,
    fio: first(await commandOutput(["fio", "--version"])),
    dpdk: first(await commandOutput(["dpkg-query", "-W", "-f=${Version}", "dpdk-dev"])),
    iperf3: first(await commandOutput(["iperf3", "--version"])),
    guestKit: readOr(`${kitDir()}/stamp`).trim().split("\n").filter((l) => !l.startsWith("script"))
      .join("; "),
    loadavgStart: readOr("/proc/loadavg").trim(),
    loadavgEnd: "",
  };
}
