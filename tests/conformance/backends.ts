/**
 * The two back-ends the conformance suite runs against, spawned as real processes on temporary
 * images: vhostd's blk device and qemu-storage-daemon's vhost-user-blk export (QEMU 7.2). Each is
 * killed and its files removed by {@link RunningBackend.stop}.
 *
 * A missing tool fails loudly: nothing here skips.
 *
 * @module
 */

import { fileURLToPath } from "node:url";

/** The back-ends under test. */
export type BackendKind = "vhostd" | "vhostd-uring" | "qsd";

/** Both kinds, in the order tests run them. */
export const BACKENDS: readonly BackendKind[] = ["vhostd", "vhostd-uring", "qsd"];

/**
 * vhostd in either I/O engine: sync (the image through the page cache, busy-polling by default)
 * or io_uring (O_DIRECT, polling off).
 */
export const isVhostd = (kind: BackendKind): boolean => kind !== "qsd";

/** The repository root. */
export const REPO = fileURLToPath(new URL("../../", import.meta.url));

/** How to start a back-end. */
export interface BackendOptions {
  /** Queues offered (vhostd --queues, qsd num-queues); default 4. */
  queues?: number;
  /** Serve read-only; default false. */
  readOnly?: boolean;
  /** Image size in bytes; default 64 MiB. */
  sizeBytes?: number;
  /** Directory for the image and socket (default: a new temp dir, removed by stop()). */
  dir?: string;
  /** qsd only: serve a null-co block node (no I/O at all) instead of the image. */
  nullTarget?: boolean;
}

/** A back-end process serving an image on a socket. */
export interface RunningBackend {
  /** Which one. */
  kind: BackendKind;
  /** Its vhost-user socket. */
  socket: string;
  /** The image file it serves. */
  image: string;
  /** Image size in bytes. */
  sizeBytes: number;
  /** Queues it was told to offer. */
  queues: number;
  /** Whether it serves read-only. */
  readOnly: boolean;
  /** The process id. */
  pid: number;
  /** Everything it wrote to stderr and stdout so far. */
  output(): string;
  /** Whether the process has exited. */
  exited(): boolean;
  /** Kills it (SIGTERM, then SIGKILL) and removes its files. Idempotent. */
  stop(): Promise<void>;
  /** Kills it with SIGKILL without cleaning up (a crash), waiting for it to be gone. */
  crash(): Promise<void>;
  /** Starts it again on the same socket and image (after {@link crash}). */
  restart(): Promise<void>;
}

/** A sparse image of `sizeBytes` with a recognisable pattern in its first and last MiB. */
export function makeImage(path: string, sizeBytes: number): void {
  const f = Deno.openSync(path, { create: true, write: true, truncate: true });
  try {
    f.truncateSync(sizeBytes);
    const mib = new Uint8Array(Math.min(1 << 20, sizeBytes));
    for (let i = 0; i < mib.length; i++) mib[i] = (i * 7 + (i >> 9)) & 0xff;
    f.writeSync(mib);
    f.seekSync(sizeBytes - mib.length, Deno.SeekMode.Start);
    f.writeSync(mib);
  } finally {
    f.close();
  }
}

/** Reads `length` bytes of the image at `offset` (what the host sees). */
export function readImage(path: string, offset: number, length: number): Uint8Array {
  const f = Deno.openSync(path, { read: true });
  try {
    f.seekSync(offset, Deno.SeekMode.Start);
    const out = new Uint8Array(length);
    let got = 0;
    while (got < length) {
      const n = f.readSync(out.subarray(got));
      if (n === null) break;
      got += n;
    }
    return out;
  } finally {
    f.close();
  }
}

function command(kind: BackendKind, b: RunningBackend, nullTarget: boolean): Deno.Command {
  if (isVhostd(kind)) {
    const args = [
      "run",
      "-A",
      `${REPO}daemon/main.ts`,
      "blk",
      "--socket",
      b.socket,
      "--image",
      b.image,
      "--queues",
      String(b.queues),
      "--log-level",
      "warning",
    ];
    if (b.readOnly) args.push("--read-only");
    // The sync engine runs with the default busy-poll window, io_uring without: both ways of
    // noticing the driver's requests (polling with kicks off, and kicks) meet every test.
    if (kind === "vhostd-uring") args.push("--direct", "--poll-us", "0");
    return new Deno.Command(Deno.execPath(), {
      args,
      cwd: REPO,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    });
  }
  const blockdev = nullTarget
    ? `driver=null-co,node-name=n0,size=${b.sizeBytes},read-zeroes=on`
    : `driver=file,node-name=n0,filename=${b.image}${b.readOnly ? ",read-only=on" : ""}`;
  return new Deno.Command("qemu-storage-daemon", {
    args: [
      "--blockdev",
      blockdev,
      "--export",
      `type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=${b.socket},` +
      `writable=${b.readOnly ? "off" : "on"},num-queues=${b.queues}`,
    ],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  });
}

/** Starts a back-end and waits until its socket accepts connections. */
export async function startBackend(
  kind: BackendKind,
  options: BackendOptions = {},
): Promise<RunningBackend> {
  const ownDir = options.dir === undefined;
  const dir = options.dir ?? Deno.makeTempDirSync({ prefix: `vhostd-conf-${kind}-` });
  const sizeBytes = options.sizeBytes ?? 64 << 20;
  const image = `${dir}/disk.img`;
  makeImage(image, sizeBytes);
  let out = "";
  let child: Deno.ChildProcess | null = null;
  let status: Promise<Deno.CommandStatus> | null = null;
  let done = false;
  let stopped = false;
  const pump = async (s: ReadableStream<Uint8Array>) => {
    const dec = new TextDecoder();
    for await (const chunk of s) out = (out + dec.decode(chunk)).slice(-20000);
  };
  const b: RunningBackend = {
    kind,
    socket: `${dir}/blk.sock`,
    image,
    sizeBytes,
    queues: options.queues ?? 4,
    readOnly: options.readOnly ?? false,
    pid: 0,
    output: () => out,
    exited: () => done,
    async stop() {
      if (stopped) return;
      stopped = true;
      await kill("SIGTERM");
      if (ownDir) Deno.removeSync(dir, { recursive: true });
    },
    async crash() {
      await kill("SIGKILL");
    },
    async restart() {
      await spawn();
    },
  };
  async function kill(signal: Deno.Signal): Promise<void> {
    if (child === null || status === null) return;
    if (!done) {
      try {
        child.kill(signal);
      } catch {
        // already gone
      }
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<"late">((r) => timer = setTimeout(() => r("late"), 5000));
    const r = await Promise.race([status, late]);
    clearTimeout(timer);
    if (r === "late") {
      child.kill("SIGKILL");
      await status;
    }
    child = null;
  }
  async function spawn(): Promise<void> {
    if (isVhostd(kind)) {
      try {
        Deno.removeSync(b.socket); // a crashed vhostd leaves its socket behind
      } catch {
        // none
      }
    }
    done = false;
    const c = command(kind, b, options.nullTarget ?? false).spawn();
    child = c;
    b.pid = c.pid;
    status = c.status.then((s) => {
      done = true;
      return s;
    });
    pump(c.stdout);
    pump(c.stderr);
    const deadline = Date.now() + 15000;
    for (;;) {
      if (done) throw new Error(`${kind} exited at start-up:\n${out}`);
      try {
        if (Deno.lstatSync(b.socket).isSocket) break;
      } catch {
        // not yet
      }
      if (Date.now() > deadline) throw new Error(`${kind} did not create its socket:\n${out}`);
      await new Promise((r) => setTimeout(r, 25));
    }
  }
  try {
    await spawn();
  } catch (e) {
    await b.stop();
    throw e;
  }
  return b;
}
