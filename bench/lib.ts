/**
 * Shared pieces of the benchmark harness: process CPU and memory from /proc, starting and
 * stopping the back-ends under test, medians, progress output and scratch images.
 *
 * @module
 */

/** Repository root (no trailing slash). */
export const REPO_ROOT: string = new URL("..", import.meta.url).pathname.replace(/\/$/, "");

/** Clock ticks per second of /proc/PID/stat's utime and stime (USER_HZ, 100 on Linux). */
export const CLK_TCK = 100;

/** A named step failed; the message is one line meant for a person. */
export class StepError extends Error {
  /** @param step what was being done, e.g. `backend tmpfs qsd`. */
  constructor(readonly step: string, message: string) {
    super(`${step}: ${message}`);
    this.name = "StepError";
  }
}

/** Median of some numbers (mean of the middle two for an even count); NaN for none. */
export function median(xs: readonly number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

/** `items` in the order of run `n`: rotated by `n`, so that none always goes first. */
export function runOrder<T>(items: readonly T[], n: number): T[] {
  const k = n % items.length;
  return [...items.slice(k), ...items.slice(0, k)];
}

/** CPU time of a process (all its threads) in seconds: utime + stime from /proc/PID/stat. */
export function processCpuSeconds(pid: number): number {
  return statCpuSeconds(Deno.readTextFileSync(`/proc/${pid}/stat`));
}

function statCpuSeconds(stat: string): number {
  // Field 2 (comm) may hold spaces and parentheses: split after the last ')'.
  const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
  return (Number(rest[11]) + Number(rest[12])) / CLK_TCK;
}

/** CPU seconds of a process's threads, split by whether the thread's name matches `pattern`. */
export function threadCpuSeconds(
  pid: number,
  pattern: RegExp,
): { matching: number; other: number } {
  let matching = 0, other = 0;
  for (const t of Deno.readDirSync(`/proc/${pid}/task`)) {
    let stat: string, comm: string;
    try {
      stat = Deno.readTextFileSync(`/proc/${pid}/task/${t.name}/stat`);
      comm = Deno.readTextFileSync(`/proc/${pid}/task/${t.name}/comm`).trim();
    } catch {
      continue; // the thread ended meanwhile
    }
    if (pattern.test(comm)) matching += statCpuSeconds(stat);
    else other += statCpuSeconds(stat);
  }
  return { matching, other };
}

/** Resident set size of a process in bytes (VmRSS from /proc/PID/status). */
export function rssBytes(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB/m.exec(Deno.readTextFileSync(`/proc/${pid}/status`));
  if (!m) throw new Error(`no VmRSS for process ${pid}`);
  return Number(m[1]) * 1024;
}

/** Number of threads of a process. */
export function threadCount(pid: number): number {
  const m = /^Threads:\s+(\d+)/m.exec(Deno.readTextFileSync(`/proc/${pid}/status`));
  return m ? Number(m[1]) : 0;
}

/** Progress lines go to stderr, so stdout stays for results. */
export function progress(line: string): void {
  const t = new Date().toISOString().slice(11, 19);
  Deno.stderr.writeSync(new TextEncoder().encode(`[bench ${t}] ${line}\n`));
}

/** Quotes a word for a shell command line shown to people. */
export function shellQuote(s: string): string {
  return /^[A-Za-z0-9_./:=,+@%-]+$/.test(s) ? s : `'${s.replaceAll("'", `'\\''`)}'`;
}

/** A command line as one shell-quoted string (this Deno binary shown as `deno`, wherever it is). */
export function commandLine(argv: readonly string[]): string {
  return argv.map((a) => a === Deno.execPath() ? "deno" : shellQuote(a)).join(" ");
}

const LIVE = new Set<Deno.ChildProcess>();

/** SIGKILLs every process {@link startProcess} started that is still running (for signal exits). */
export function killAllStarted(): void {
  for (const c of LIVE) {
    try {
      c.kill("SIGKILL");
    } catch {
      // already gone
    }
  }
}

/** A back-end process under test: its PID for /proc sampling, and how to stop it. */
export interface RunningBackend {
  /** Process whose CPU and memory count as the back-end's. */
  readonly pid: number;
  /** The command that started it (argv, binary first). */
  readonly command: string[];
  /** Stops it (SIGTERM, then SIGKILL after 5 s) and waits for it. */
  stop(): Promise<void>;
  /** Output collected so far (for error messages). */
  output(): string;
}

/**
 * Spawns `argv` and waits until `ready(output)` holds (output is stdout + stderr so far), or
 * fails with the output if it exits first or `timeoutMs` passes. `onOutput`, if given, sees every
 * chunk of output the moment it arrives (e.g. to time-stamp periodic counters).
 */
export async function startProcess(
  argv: string[],
  ready: (output: string, child: Deno.ChildProcess) => boolean,
  timeoutMs = 30_000,
  env: Record<string, string> = {},
  onOutput?: (chunk: string, stream: "stdout" | "stderr") => void,
): Promise<RunningBackend> {
  const child = new Deno.Command(argv[0], {
    args: argv.slice(1),
    cwd: REPO_ROOT,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1", ...env },
  }).spawn();
  let out = "";
  let exited = false;
  const pump = async (s: ReadableStream<Uint8Array>, stream: "stdout" | "stderr") => {
    const dec = new TextDecoder();
    for await (const chunk of s) {
      const text = dec.decode(chunk, { stream: true });
      out += text;
      onOutput?.(text, stream);
    }
  };
  const pumps = Promise.all([pump(child.stdout, "stdout"), pump(child.stderr, "stderr")]);
  LIVE.add(child);
  const status = child.status.finally(() => {
    exited = true;
    LIVE.delete(child);
  });
  const backend: RunningBackend = {
    pid: child.pid,
    command: argv,
    output: () => out,
    async stop() {
      if (!exited) {
        try {
          child.kill("SIGTERM");
        } catch {
          // already gone
        }
        const timer = setTimeout(() => {
          try {
            child.kill("SIGKILL");
          } catch {
            // already gone
          }
        }, 5000);
        await status;
        clearTimeout(timer);
      }
      await pumps;
    },
  };
  const end = Date.now() + timeoutMs;
  while (!ready(out, child)) {
    if (exited || Date.now() > end) {
      await backend.stop();
      const why = exited ? `exited (${(await status).code})` : `not ready after ${timeoutMs} ms`;
      throw new Error(`${argv[0]} ${why}: ${lastLines(out)}`);
    }
    await sleep(50);
  }
  return backend;
}

/** Whether a unix socket at `path` exists. */
export function socketExists(path: string): boolean {
  try {
    return Deno.statSync(path).isSocket === true;
  } catch {
    return false;
  }
}

/** Resolves after `ms`. */
export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** The last few non-empty lines of some output, joined with ` | ` (for one-line errors). */
export function lastLines(text: string, n = 3): string {
  const lines = text.split("\n").map((l) => l.trim()).filter(Boolean);
  return lines.length ? lines.slice(-n).join(" | ") : "(no output)";
}

/**
 * Writes a file of `bytes` pseudo-random bytes (so reads hit real blocks, not holes) in 1 MiB
 * chunks, then syncs it.
 */
export function writeRandomImage(path: string, bytes: number): void {
  const chunk = new Uint8Array(1 << 20);
  const f = Deno.openSync(path, { create: true, write: true, truncate: true });
  try {
    let x = 0x12345678;
    for (let done = 0; done < bytes; done += chunk.length) {
      // xorshift32 per 4 bytes; quick and incompressible enough for a block device.
      const v = new Uint32Array(chunk.buffer);
      for (let i = 0; i < v.length; i++) {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        v[i] = x;
      }
      const n = Math.min(chunk.length, bytes - done);
      let off = 0;
      while (off < n) off += f.writeSync(chunk.subarray(off, n));
    }
    f.syncSync();
  } finally {
    f.close();
  }
}

/** Runs a command to completion and returns its stdout (trimmed), or "" if it cannot run. */
export async function commandOutput(argv: string[]): Promise<string> {
  try {
    const out = await new Deno.Command(argv[0], {
      args: argv.slice(1),
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    return new TextDecoder().decode(out.stdout).trim();
  } catch {
    return "";
  }
}

/** Path of the Deno running the harness (children run the same one). */
export const DENO: string = Deno.execPath();

/** Rounds to `digits` significant digits (for JSON and tables). */
export function sig(x: number, digits = 3): number {
  if (!Number.isFinite(x) || x === 0) return x;
  return Number(x.toPrecision(digits));
}
