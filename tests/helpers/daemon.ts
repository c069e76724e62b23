/**
 * Runs the real `vhostd` command line as a child process, for tests.
 *
 * The daemon comes from this checkout, or from the one `VHOSTD_DAEMON_ROOT` names: a regression
 * test can then be run, unchanged, against the daemon of an older commit to show that it fails
 * there (`git worktree add /tmp/old <commit>; VHOSTD_DAEMON_ROOT=/tmp/old deno test -A ...`).
 *
 * @module
 */

/** The checkout whose daemon tests run (see the module documentation). */
const DAEMON_ROOT = Deno.env.get("VHOSTD_DAEMON_ROOT") ??
  new URL("../..", import.meta.url).pathname;

/** The path of `file` (relative to the repository's root) in the checkout whose daemon runs. */
export function daemonFile(file: string): string {
  return `${DAEMON_ROOT.replace(/\/$/, "")}/${file}`;
}

const MAIN = daemonFile("daemon/main.ts");

/** A running `vhostd` process. */
export class DaemonProcess {
  /** The child process. */
  readonly child: Deno.ChildProcess;
  /** Everything it wrote to stdout so far. */
  stdout = "";
  /** Everything it wrote to stderr so far. */
  stderr = "";
  readonly #pumps: Promise<void>[];

  private constructor(child: Deno.ChildProcess) {
    this.child = child;
    const pump = async (s: ReadableStream<Uint8Array>, key: "stdout" | "stderr") => {
      const dec = new TextDecoder();
      for await (const chunk of s) this[key] += dec.decode(chunk, { stream: true });
    };
    this.#pumps = [pump(child.stdout, "stdout"), pump(child.stderr, "stderr")];
  }

  /**
   * Starts `deno run -A daemon/main.ts ...args`; with `task`, `deno task ...args`; with `script`,
   * `deno run -A <script> ...args` (a device written against the public API).
   */
  static spawn(
    args: string[],
    env?: Record<string, string>,
    task = false,
    script = MAIN,
  ): DaemonProcess {
    const argv = task ? ["task", ...args] : ["run", "-A", script, ...args];
    return DaemonProcess.spawnUnder([], argv, env);
  }

  /**
   * Starts `deno ...denoArgs` under `wrapper` (a command that runs the rest of its arguments,
   * such as `prlimit --nofile=64:64 --` or `strace ... --`); the daemon is then the wrapper's child.
   */
  static spawnUnder(
    wrapper: string[],
    denoArgs: string[],
    env?: Record<string, string>,
  ): DaemonProcess {
    const [cmd, ...args] = [...wrapper, Deno.execPath(), ...denoArgs];
    const child = new Deno.Command(cmd, {
      args,
      cwd: DAEMON_ROOT,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1", ...env },
    }).spawn();
    return new DaemonProcess(child);
  }

  /** Starts a daemon and waits until it prints its banner (its sockets then listen). */
  static async start(
    args: string[],
    env?: Record<string, string>,
    task = false,
    script = MAIN,
  ): Promise<DaemonProcess> {
    const d = DaemonProcess.spawn(args, env, task, script);
    await d.waitFor(() => d.stdout.includes("vhostd: serving"), 30_000, "the start banner");
    return d;
  }

  /** {@link start}, with the daemon run under `wrapper` (e.g. `ip netns exec NS`). */
  static async startUnder(
    wrapper: string[],
    args: string[],
    env?: Record<string, string>,
  ): Promise<DaemonProcess> {
    const d = DaemonProcess.spawnUnder(wrapper, ["run", "-A", MAIN, ...args], env);
    await d.waitFor(() => d.stdout.includes("vhostd: serving"), 30_000, "the start banner");
    return d;
  }

  /** Polls `cond` every 50 ms; throws with the daemon's output after `timeoutMs`. */
  async waitFor(cond: () => boolean, timeoutMs: number, what: string): Promise<void> {
    const end = Date.now() + timeoutMs;
    while (!cond()) {
      if (Date.now() > end) {
        throw new Error(
          `timed out waiting for ${what}\nstdout:\n${this.stdout}\nstderr:\n${this.stderr}`,
        );
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** Sends `signal` and waits for the exit code. */
  async stop(signal: Deno.Signal = "SIGTERM"): Promise<number> {
    // Under `deno task` the daemon is the task runner's child: signal it directly, as a
    // terminal's Ctrl-C would (the runner forwards too, but can miss a signal while starting).
    for (const pid of [...childrenOf(this.child.pid), this.child.pid]) {
      try {
        Deno.kill(pid, signal);
      } catch {
        // already exited
      }
    }
    return await this.exit();
  }

  /**
   * Sends SIGTERM and waits up to `timeoutMs` for the exit code. A daemon still running by then
   * (a data-plane worker stuck in a system call ignores the shutdown) is killed with SIGKILL and
   * an error says so, instead of the test hanging with it.
   */
  async stopWithin(timeoutMs: number): Promise<number> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<"late">((r) => timer = setTimeout(() => r("late"), timeoutMs));
    try {
      const code = await Promise.race([this.stop(), late]);
      if (code !== "late") return code;
    } finally {
      clearTimeout(timer);
    }
    await this.stop("SIGKILL");
    throw new Error(`the daemon did not exit within ${timeoutMs} ms of SIGTERM\n${this.stderr}`);
  }

  /** Whether the process is still running (it has not exited, or not been reaped yet). */
  get alive(): boolean {
    try {
      const stat = Deno.readTextFileSync(`/proc/${this.child.pid}/stat`);
      return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
    } catch {
      return false;
    }
  }

  /** Waits for the process to exit and its output to be read; returns the exit code. */
  async exit(): Promise<number> {
    const status = await this.child.status;
    await Promise.all(this.#pumps);
    return status.code;
  }
}

/** Whether anything (a file, a socket, a dangling link) is at `path`. */
export function exists(path: string): boolean {
  try {
    Deno.lstatSync(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * Runs `vhostd ...args` to completion; returns code and output. With `killAfterMs`, a daemon
 * still running by then (one that should have refused to start) is stopped with SIGTERM, and its
 * code is whatever it exits with then.
 */
export async function runVhostd(
  args: string[],
  killAfterMs?: number,
): Promise<{ code: number; stdout: string; stderr: string }> {
  const d = DaemonProcess.spawn(args);
  const timer = killAfterMs === undefined
    ? undefined
    : setTimeout(() => d.stop().catch(() => {}), killAfterMs);
  const code = await d.exit();
  clearTimeout(timer);
  return { code, stdout: d.stdout, stderr: d.stderr };
}

/** Creates a sparse file of `bytes`. */
export function sparseFile(path: string, bytes: number): void {
  const f = Deno.openSync(path, { create: true, write: true, truncate: true });
  f.truncateSync(bytes);
  f.close();
}

/** Hex SHA-256 of some bytes. */
export async function sha256(data: Uint8Array): Promise<string> {
  const d = await crypto.subtle.digest("SHA-256", data as Uint8Array<ArrayBuffer>);
  return [...new Uint8Array(d)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** Pids of the direct children of `pid`. */
function childrenOf(pid: number): number[] {
  const out: number[] = [];
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      const stat = Deno.readTextFileSync(`/proc/${e.name}/stat`);
      // The parent pid is the 2nd field after the ")" that closes the command name.
      if (Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]) === pid) {
        out.push(Number(e.name));
      }
    } catch {
      // gone
    }
  }
  return out;
}

/** Runs `fn` with a fresh temporary directory, removed afterwards. */
export async function withDir(prefix: string, fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** How many fds process `pid` (default: this one) has open. */
export function openFdCount(pid: number | "self" = "self"): number {
  return [...Deno.readDirSync(`/proc/${pid}/fd`)].length;
}
