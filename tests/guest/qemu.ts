/**
 * Boot a throw-away QEMU guest that runs one shell script and reports its
 * exit status. The guest kit (kernel + busybox initramfs with virtio/ext4
 * modules, fio and iperf3) comes from `tests/guest/build-kit.sh`; the
 * initramfs `/init` runs `/test.sh`, prints `VHOSTD-GUEST-EXIT <status>` on
 * the serial console and powers off.
 *
 * Environment knobs (all optional):
 * - `VHOSTD_GUEST_KIT`: kit directory (default `<repo>/.cache/guest-kit`).
 * - `VHOSTD_GUEST_ACCEL`: `kvm` or `tcg`, overriding {@link accelerator}.
 * - `VHOSTD_GUEST_ECHO=1`: copy the guest console to stderr while it runs.
 * - `VHOSTD_GUEST_KEEP=1`: keep each run's temp dir (initrd, console log).
 * - `VHOSTD_GUEST_BOOT=bzimage`: boot `vmlinuz` + `initrd.cpio.gz` instead
 *   of the faster uncompressed `vmlinux` (PVH) + `initrd.cpio`.
 *
 * @module
 */

import { fileURLToPath } from "node:url";

/** A vhost-user-blk device: QEMU connects to `socket` as a client. */
export interface VhostUserBlkDevice {
  /** Path of the back-end's listening unix socket. */
  socket: string;
  /** `num-queues` of the device (QEMU's default: one per vCPU). */
  numQueues?: number;
  /** `queue-size` of every virtqueue (QEMU's default: 128). */
  queueSize?: number;
  /** `packed=on`: ask for packed rings (QEMU settles on split ones if the back-end lacks them). */
  packed?: boolean;
}

/** A disk image served by QEMU's own virtio-blk-pci (for comparison runs). */
export interface VirtioBlkImage {
  /** Raw image path. Its file system must support O_DIRECT (not tmpfs). */
  path: string;
  /** Attach read-only. */
  readOnly?: boolean;
  /** Other processes have the image open too: skip QEMU's image lock (`file.locking=off`). */
  shared?: boolean;
}

/** What to boot and how. */
export interface GuestOptions {
  /** Shell script run as `/test.sh` (with busybox `sh`) in the guest. */
  script: string;
  /**
   * vhost-user-blk devices, attached before {@link virtioBlkImages}: the
   * guest sees them as `/dev/vda`, `/dev/vdb`, ... in this order.
   */
  vhostUserBlk?: VhostUserBlkDevice[];
  /**
   * In-QEMU virtio-blk-pci disks (`aio=native,cache.direct=on`), named after
   * the vhost-user-blk devices (`/dev/vd<next letter>`...).
   */
  virtioBlkImages?: VirtioBlkImage[];
  /**
   * More files for the guest, keyed by absolute guest path (not under
   * /tmp, /run, /proc, /sys or /dev, which are mounted over at boot).
   * Strings are written as UTF-8. Files are mode 0755.
   */
  files?: Record<string, string | Uint8Array>;
  /** Any further QEMU arguments, appended last (e.g. more vhost-user devices). */
  extraArgs?: string[];
  /** Guest RAM in MiB (default 512); always a shared memfd backend. */
  memoryMiB?: number;
  /** vCPUs (default 1). */
  smp?: number;
  /** Kill QEMU and throw {@link GuestTimeoutError} after this (default 180000). */
  timeoutMs?: number;
  /** QEMU binary (default `qemu-system-x86_64`). */
  qemuBinary?: string;
  /** Machine type (default `q35`, the QEMU's own newest q35). */
  machine?: string;
  /**
   * Major version of {@link qemuBinary} (default 7), where options are spelled differently:
   * QEMU 10 and later take `reconnect-ms` instead of `reconnect`.
   */
  qemuMajor?: number;
  /** Add `reconnect=N` (seconds) to the vhost-user chardevs. */
  chardevReconnect?: number;
  /** Extra words for the kernel command line. */
  kernelArgs?: string[];
  /** Called with console text as it arrives (polled every 200 ms). */
  onConsole?: (chunk: string) => void;
  /** Words put before QEMU's command line, e.g. `taskset -c 1` (which must exec QEMU). */
  commandPrefix?: string[];
  /** Called with QEMU's pid right after it starts. */
  onSpawn?: (pid: number) => void;
  /** A QMP monitor on this unix socket (server, no wait) instead of `-monitor none`. */
  qmpSocket?: string;
  /** `-incoming URI`: wait for a migration instead of booting (the destination side). */
  incoming?: string;
  /**
   * Serve the serial console on this unix socket too (QEMU listens), so that a test can type
   * into it; the console log file still gets everything the guest prints.
   */
  serialSocket?: string;
  /** Use this initramfs as it is (a migration's destination shares its source's). */
  initrdPath?: string;
}

/** Outcome of one guest run. */
export interface GuestResult {
  /** Exit status of `/test.sh`, or null if the guest never reported one. */
  exitStatus: number | null;
  /** The whole serial console output (`\r\n` turned into `\n`). */
  console: string;
  /** QEMU's exit code (0 after a clean guest poweroff). */
  qemuExitCode: number;
  /** Wall time from QEMU's start to its exit. */
  durationMs: number;
  /** QEMU's stderr (start-up errors, vhost-user errors). */
  qemuStderr: string;
  /** The QEMU command line that was run (binary first). */
  command: string[];
}

/** Thrown by {@link runGuest} when the guest outlives `timeoutMs`. */
export class GuestTimeoutError extends Error {
  /** What was collected before QEMU was killed. */
  readonly result: GuestResult;

  /** @param result the partial result, `exitStatus` null. */
  constructor(result: GuestResult, timeoutMs: number) {
    super(
      `guest did not finish within ${timeoutMs} ms; QEMU was killed\n` +
        describeGuestRun(result),
    );
    this.name = "GuestTimeoutError";
    this.result = result;
  }
}

/** Files of a built guest kit. */
export interface GuestKit {
  /** Kernel given to `-kernel` (uncompressed PVH `vmlinux` when present). */
  kernel: string;
  /** Base initramfs (uncompressed `initrd.cpio` when present). */
  initrd: string;
}

/** Marker line printed by the guest's /init. */
export const EXIT_MARKER = "VHOSTD-GUEST-EXIT";

const GUEST_DIR = fileURLToPath(new URL(".", import.meta.url));
const REPO_ROOT = fileURLToPath(new URL("../../", import.meta.url)).replace(
  /\/$/,
  "",
);

/** Directory of the guest kit: `$VHOSTD_GUEST_KIT` or `<repo>/.cache/guest-kit`. */
export function kitDir(): string {
  return Deno.env.get("VHOSTD_GUEST_KIT") ?? `${REPO_ROOT}/.cache/guest-kit`;
}

/**
 * The accelerator to use: `kvm` only if the CPU advertises vmx or svm and
 * /dev/kvm exists; otherwise `tcg` (e.g. on PVM hosts, whose /dev/kvm hangs
 * stock kernels). `VHOSTD_GUEST_ACCEL=kvm|tcg` overrides.
 */
export function accelerator(): "kvm" | "tcg" {
  const forced = Deno.env.get("VHOSTD_GUEST_ACCEL");
  if (forced === "kvm" || forced === "tcg") return forced;
  if (forced) throw new Error(`VHOSTD_GUEST_ACCEL must be kvm or tcg, not ${forced}`);
  let cpuinfo = "";
  try {
    cpuinfo = Deno.readTextFileSync("/proc/cpuinfo");
  } catch {
    return "tcg";
  }
  const virt = /^flags\s*:.*\b(vmx|svm)\b/m.test(cpuinfo);
  let kvmNode = false;
  try {
    kvmNode = Deno.statSync("/dev/kvm").isCharDevice === true;
  } catch {
    kvmNode = false;
  }
  return virt && kvmNode ? "kvm" : "tcg";
}

let kitPromise: Promise<GuestKit> | undefined;

/**
 * Build the guest kit if needed (runs `build-kit.sh`, which returns at once
 * when the kit is up to date) and return its files. Throws with the
 * script's output if the build fails. Memoised per process.
 */
export function ensureKit(): Promise<GuestKit> {
  kitPromise ??= buildKit().catch((e) => {
    kitPromise = undefined;
    throw e;
  });
  return kitPromise;
}

async function buildKit(): Promise<GuestKit> {
  const dir = kitDir();
  const out = await new Deno.Command("bash", {
    args: [`${GUEST_DIR}build-kit.sh`, dir],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout) +
    new TextDecoder().decode(out.stderr);
  if (!out.success) {
    throw new Error(
      `tests/guest/build-kit.sh failed (exit ${out.code}):\n${text}`,
    );
  }
  const portableOnly = Deno.env.get("VHOSTD_GUEST_BOOT") === "bzimage";
  const pick = (fast: string, portable: string): string => {
    for (const name of portableOnly ? [portable] : [fast, portable]) {
      const path = `${dir}/${name}`;
      try {
        if (Deno.statSync(path).size > 0) return path;
      } catch {
        // try the next one
      }
    }
    throw new Error(`guest kit in ${dir} lacks ${portable}:\n${text}`);
  };
  return {
    kernel: pick("vmlinux", "vmlinuz"),
    initrd: pick("initrd.cpio", "initrd.cpio.gz"),
  };
}

/**
 * Builds the QEMU 11.1 chroot if needed (tests/guest/build-qemu11.sh: seconds when up to date)
 * and returns the wrapper to use as a QEMU binary.
 */
export async function ensureQemu11(): Promise<string> {
  const out = await new Deno.Command("bash", {
    args: [`${GUEST_DIR}build-qemu11.sh`],
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) {
    throw new Error(`build-qemu11.sh failed:\n${new TextDecoder().decode(out.stderr)}`);
  }
  return `${REPO_ROOT}/.cache/qemu11/qemu-system-x86_64`;
}

/** One member of a newc cpio archive. */
export interface CpioEntry {
  /** Path inside the archive, without a leading slash. */
  name: string;
  /** File contents; omit for a directory. */
  data?: Uint8Array;
  /** Permission bits (default 0o755). */
  mode?: number;
}

/**
 * Encode a "newc" (SVR4, no CRC) cpio archive, as the kernel's initramfs
 * unpacker reads it. Owner root, mtime 0; directories are not implied, so
 * list parents before children.
 */
export function newcArchive(entries: CpioEntry[]): Uint8Array {
  const enc = new TextEncoder();
  const chunks: Uint8Array[] = [];
  let size = 0;
  const push = (b: Uint8Array): void => {
    chunks.push(b);
    size += b.length;
  };
  const pad = (): void => {
    const n = (4 - (size % 4)) % 4;
    if (n) push(new Uint8Array(n));
  };
  const member = (name: string, mode: number, data: Uint8Array, ino: number) => {
    const nameBytes = enc.encode(name + "\0");
    const fields = [
      ino,
      mode,
      0, // uid
      0, // gid
      mode & 0o040000 ? 2 : 1, // nlink
      0, // mtime
      data.length,
      0, // devmajor
      0, // devminor
      0, // rdevmajor
      0, // rdevminor
      nameBytes.length,
      0, // check
    ];
    push(
      enc.encode(
        "070701" +
          fields.map((f) => f.toString(16).padStart(8, "0")).join(""),
      ),
    );
    push(nameBytes);
    pad();
    push(data);
    pad();
  };
  entries.forEach((e, i) => {
    const name = e.name.replace(/^\/+/, "");
    if (!name || name.includes("\0")) throw new Error(`bad cpio name ${e.name}`);
    const perm = (e.mode ?? 0o755) & 0o7777;
    if (e.data === undefined) member(name, 0o040000 | perm, new Uint8Array(), i + 1);
    else member(name, 0o100000 | perm, e.data, i + 1);
  });
  member("TRAILER!!!", 0, new Uint8Array(), 0);
  const out = new Uint8Array(size);
  let off = 0;
  for (const c of chunks) {
    out.set(c, off);
    off += c.length;
  }
  return out;
}

/** The per-run archive: `/test.sh` plus `files`, with parent dirs. */
function overlayArchive(
  script: string,
  files: Record<string, string | Uint8Array>,
): Uint8Array {
  const enc = new TextEncoder();
  const all: Record<string, Uint8Array> = { "/test.sh": enc.encode(script) };
  for (const [path, data] of Object.entries(files)) {
    if (!path.startsWith("/") || path.split("/").includes("..")) {
      throw new Error(`guest file path must be absolute: ${path}`);
    }
    if (/^\/(tmp|run|proc|sys|dev)(\/|$)/.test(path)) {
      throw new Error(`guest file ${path} would be hidden by a mount at boot`);
    }
    all[path] = typeof data === "string" ? enc.encode(data) : data;
  }
  const dirs = new Set<string>();
  for (const path of Object.keys(all)) {
    const parts = path.split("/").filter(Boolean);
    for (let i = 1; i < parts.length; i++) {
      dirs.add(parts.slice(0, i).join("/"));
    }
  }
  const entries: CpioEntry[] = [...dirs].sort().map((name) => ({ name }));
  for (const [path, data] of Object.entries(all)) {
    entries.push({ name: path, data, mode: 0o755 });
  }
  return newcArchive(entries);
}

/** QEMU option values double commas. */
function optValue(v: string): string {
  return v.replaceAll(",", ",,");
}

/**
 * The QEMU command line {@link runGuest} uses (binary first), for a kit,
 * the per-run initrd and the console log file.
 */
export function qemuCommand(
  opts: GuestOptions,
  kit: GuestKit,
  initrd: string,
  consoleLog: string,
): string[] {
  const mem = opts.memoryMiB ?? 512;
  const accel = accelerator();
  const args = [
    opts.qemuBinary ?? "qemu-system-x86_64",
    "-nodefaults",
    "-no-reboot",
    "-display",
    "none",
    ...(opts.qmpSocket
      ? ["-monitor", "none", "-qmp", `unix:${optValue(opts.qmpSocket)},server=on,wait=off`]
      : ["-monitor", "none"]),
    "-accel",
    accel,
    "-cpu",
    accel === "kvm" ? "host" : "max",
    "-machine",
    `${opts.machine ?? "q35"},memory-backend=mem`,
    "-m",
    `${mem}M`,
    "-object",
    `memory-backend-memfd,id=mem,size=${mem}M,share=on`,
    "-smp",
    String(opts.smp ?? 1),
    "-kernel",
    kit.kernel,
    "-initrd",
    initrd,
    "-append",
    ["console=ttyS0", "panic=-1", "quiet", ...(opts.kernelArgs ?? [])].join(
      " ",
    ),
    "-chardev",
    opts.serialSocket
      ? `socket,id=con0,path=${optValue(opts.serialSocket)},server=on,wait=off,logfile=${
        optValue(consoleLog)
      }`
      : `file,id=con0,path=${optValue(consoleLog)}`,
    "-serial",
    "chardev:con0",
  ];
  (opts.vhostUserBlk ?? []).forEach((d, i) => {
    let chardev = `socket,id=vub${i},path=${optValue(d.socket)}`;
    if (opts.chardevReconnect !== undefined) {
      chardev += (opts.qemuMajor ?? 7) >= 10
        ? `,reconnect-ms=${opts.chardevReconnect * 1000}`
        : `,reconnect=${opts.chardevReconnect}`;
    }
    let device = `vhost-user-blk-pci,chardev=vub${i}`;
    if (d.numQueues !== undefined) device += `,num-queues=${d.numQueues}`;
    if (d.queueSize !== undefined) device += `,queue-size=${d.queueSize}`;
    if (d.packed) device += ",packed=on";
    args.push("-chardev", chardev, "-device", device);
  });
  (opts.virtioBlkImages ?? []).forEach((img, i) => {
    let drive = `file=${
      optValue(img.path)
    },if=none,id=vblk${i},format=raw,aio=native,cache.direct=on`;
    if (img.readOnly) drive += ",readonly=on";
    if (img.shared) drive += ",file.locking=off";
    args.push("-drive", drive, "-device", `virtio-blk-pci,drive=vblk${i}`);
  });
  args.push(...(opts.extraArgs ?? []));
  if (opts.incoming) args.push("-incoming", opts.incoming);
  return args;
}

/**
 * Writes the run's initramfs to `path`: the kit's, padded to 4 bytes, with `/test.sh` and
 * `opts.files` appended as a second archive (the kernel unpacks both).
 */
export async function writeInitrd(opts: GuestOptions, kit: GuestKit, path: string): Promise<void> {
  await Deno.copyFile(kit.initrd, path);
  const f = await Deno.open(path, { append: true });
  try {
    const len = (await f.stat()).size;
    await writeAll(f, new Uint8Array((4 - (len % 4)) % 4));
    await writeAll(f, overlayArchive(opts.script, opts.files ?? {}));
  } finally {
    f.close();
  }
}

/**
 * Boot a guest, run `opts.script` as /test.sh and wait for the guest to
 * power off. Resolves with the script's exit status (null if the guest
 * never reported one, e.g. QEMU refused to start or the kernel panicked);
 * rejects with {@link GuestTimeoutError} after `timeoutMs`. QEMU is always
 * dead when this returns or throws.
 */
export async function runGuest(opts: GuestOptions): Promise<GuestResult> {
  const kit = await ensureKit();
  const timeoutMs = opts.timeoutMs ?? 180_000;
  const tmp = await Deno.makeTempDir({ prefix: "vhostd-guest-" });
  const echo = Deno.env.get("VHOSTD_GUEST_ECHO") === "1";
  try {
    const initrd = `${tmp}/initrd`;
    const consoleLog = `${tmp}/console.log`;
    await writeInitrd(opts, kit, initrd);
    await Deno.writeFile(consoleLog, new Uint8Array());
    const command = [
      ...(opts.commandPrefix ?? []),
      ...qemuCommand(opts, kit, initrd, consoleLog),
    ];

    const start = performance.now();
    let child: Deno.ChildProcess;
    try {
      child = new Deno.Command(command[0], {
        args: command.slice(1),
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      }).spawn();
    } catch (e) {
      throw new Error(
        `cannot start ${command[0]} (Debian: apt-get install qemu-system-x86): ${e}`,
      );
    }
    opts.onSpawn?.(child.pid);
    let exited = false;
    const output = child.output().finally(() => {
      exited = true;
    });
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      try {
        child.kill("SIGKILL");
      } catch {
        // already gone
      }
    }, timeoutMs);

    // Stream the console while QEMU runs, if anyone is listening.
    const listeners: ((s: string) => void)[] = [];
    if (opts.onConsole) listeners.push(opts.onConsole);
    if (echo) {
      listeners.push((s) => Deno.stderr.writeSync(new TextEncoder().encode(s)));
    }
    let streamed = 0;
    const streamDecoder = new TextDecoder();
    const pump = async (): Promise<void> => {
      const data = await Deno.readFile(consoleLog);
      if (data.length > streamed) {
        const text = streamDecoder.decode(data.subarray(streamed), {
          stream: true,
        });
        streamed = data.length;
        for (const l of listeners) l(text);
      }
    };

    let out: Deno.CommandOutput;
    try {
      if (listeners.length) {
        while (!exited) {
          let tick: ReturnType<typeof setTimeout> | undefined;
          await Promise.race([
            output,
            new Promise<void>((resolve) => {
              tick = setTimeout(resolve, 200);
            }),
          ]);
          clearTimeout(tick);
          await pump();
        }
      }
      out = await output;
    } finally {
      clearTimeout(timer);
      if (!exited) {
        // Only reached if something above threw: never leave QEMU behind.
        try {
          child.kill("SIGKILL");
        } catch {
          // already gone
        }
        await output.catch(() => undefined);
      }
    }
    const durationMs = performance.now() - start;
    if (listeners.length) await pump();

    const consoleText = new TextDecoder().decode(await Deno.readFile(consoleLog))
      .replaceAll("\r\n", "\n");
    const result: GuestResult = {
      exitStatus: timedOut ? null : guestExitStatus(consoleText),
      console: consoleText,
      qemuExitCode: out.code,
      durationMs,
      qemuStderr: new TextDecoder().decode(out.stderr) +
        new TextDecoder().decode(out.stdout),
      command,
    };
    if (timedOut) throw new GuestTimeoutError(result, timeoutMs);
    return result;
  } finally {
    if (Deno.env.get("VHOSTD_GUEST_KEEP") === "1") {
      console.error(`vhostd guest: kept ${tmp}`);
    } else {
      await Deno.remove(tmp, { recursive: true }).catch(() => undefined);
    }
  }
}

/** The status from the last `VHOSTD-GUEST-EXIT <n>` line, or null. */
export function guestExitStatus(consoleText: string): number | null {
  let status: number | null = null;
  for (const m of consoleText.matchAll(/^VHOSTD-GUEST-EXIT (\d+)\r?$/gm)) {
    status = Number(m[1]);
  }
  return status;
}

/**
 * Collect `key=value` lines printed by a guest script. With a `prefix`
 * (e.g. `"RESULT "`), only lines starting with it count and the prefix is
 * removed first. One pair per line; the value runs to the end of the line;
 * a later key wins.
 */
export function parseResults(
  consoleText: string,
  prefix = "",
): Record<string, string> {
  const out: Record<string, string> = {};
  for (const raw of consoleText.split(/\r?\n/)) {
    if (!raw.startsWith(prefix)) continue;
    const m = /^([A-Za-z_][A-Za-z0-9_.-]*)=(.*)$/.exec(raw.slice(prefix.length));
    if (m) out[m[1]] = m[2];
  }
  return out;
}

/**
 * A readable report of a run: command line, statuses, QEMU's stderr and the
 * full console. Use it in assertion messages.
 */
export function describeGuestRun(r: GuestResult): string {
  return [
    `QEMU: ${r.command.map(shellQuote).join(" ")}`,
    `guest exit status: ${r.exitStatus}; QEMU exit code: ${r.qemuExitCode}; ${
      Math.round(r.durationMs)
    } ms`,
    r.qemuStderr.trim() ? `--- QEMU stderr ---\n${r.qemuStderr.trimEnd()}` : "",
    `--- guest console ---\n${r.console.trimEnd()}\n--- end of console ---`,
  ].filter(Boolean).join("\n");
}

/**
 * Throw (with {@link describeGuestRun} as the message) unless the script
 * exited 0 and QEMU shut down cleanly.
 */
export function assertGuestSuccess(r: GuestResult): void {
  if (r.exitStatus !== 0 || r.qemuExitCode !== 0) {
    throw new Error(`guest run failed\n${describeGuestRun(r)}`);
  }
}

function shellQuote(s: string): string {
  return /^[A-Za-z0-9_./:=,+-]+$/.test(s) ? s : `'${s.replaceAll("'", `'\\''`)}'`;
}

async function writeAll(f: Deno.FsFile, data: Uint8Array): Promise<void> {
  let off = 0;
  while (off < data.length) off += await f.write(data.subarray(off));
}
