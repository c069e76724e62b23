/**
 * A guest that keeps running while the test talks to it: QEMU with a QMP monitor, its serial
 * console in a file, and the helpers a live-migration test needs (start a destination with
 * `-incoming`, migrate, read `query-migrate`).
 *
 * {@link runGuest} in qemu.ts boots a guest to completion; this is its long-lived sibling and
 * builds the same command line.
 *
 * @module
 */

import { ensureKit, type GuestOptions, qemuCommand, writeInitrd } from "./qemu.ts";

/** A QMP connection: commands in, replies out, events kept. */
export class Qmp {
  readonly #conn: Deno.UnixConn;
  readonly #lines: AsyncIterator<string>;
  /** Events received so far (`{event, data, timestamp}` objects). */
  readonly events: Record<string, unknown>[] = [];

  private constructor(conn: Deno.UnixConn) {
    this.#conn = conn;
    this.#lines = readLines(conn);
  }

  /** Connects (retrying while QEMU starts) and leaves capabilities negotiation mode. */
  static async connect(path: string, timeoutMs = 30_000): Promise<Qmp> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const conn = await Deno.connect({ transport: "unix", path });
        const qmp = new Qmp(conn);
        await qmp.#next(); // the greeting
        await qmp.execute("qmp_capabilities");
        return qmp;
      } catch (e) {
        if (Date.now() > deadline) throw new Error(`QMP at ${path}: ${e}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  async #next(): Promise<Record<string, unknown>> {
    const { value, done } = await this.#lines.next();
    if (done) throw new Error("QMP connection closed");
    return JSON.parse(value);
  }

  /** Runs a command; returns its `return` value, throws its `error`. */
  async execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    const msg = JSON.stringify(args ? { execute: command, arguments: args } : { execute: command });
    await this.#conn.write(new TextEncoder().encode(msg + "\n"));
    for (;;) {
      const r = await this.#next();
      if ("event" in r) {
        this.events.push(r);
        continue;
      }
      if ("error" in r) {
        const e = r.error as { class: string; desc: string };
        throw new Error(`QMP ${command}: ${e.class}: ${e.desc}`);
      }
      return r.return;
    }
  }

  /** Runs a human monitor command (HMP) and returns its text. */
  async hmp(command: string): Promise<string> {
    return String(await this.execute("human-monitor-command", { "command-line": command }));
  }

  /** Closes the connection. */
  close(): void {
    try {
      this.#conn.close();
    } catch {
      // already closed
    }
  }
}

async function* readLines(conn: Deno.UnixConn): AsyncGenerator<string> {
  const decoder = new TextDecoder();
  let buffered = "";
  for await (const chunk of conn.readable) {
    buffered += decoder.decode(chunk, { stream: true });
    let nl;
    while ((nl = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, nl).trim();
      buffered = buffered.slice(nl + 1);
      if (line) yield line;
    }
  }
}

/** What `query-migrate` says, in the parts tests and the bench read. */
export interface MigrationInfo {
  /** `active`, `completed`, `failed`, ... */
  status: string;
  /** Total time so far or in all, in ms. */
  totalTimeMs?: number;
  /** Downtime (completed migrations), in ms. */
  downtimeMs?: number;
  /** How many times the dirty bitmap was synced (passes over guest RAM). */
  dirtySyncCount?: number;
  /** RAM bytes transferred. */
  transferredBytes?: number;
  /** Why it failed. */
  errorDesc?: string;
}

/** Options of a {@link Vm}: a guest's, plus a name for its files. */
export interface VmOptions extends GuestOptions {
  /** Directory for the QMP socket and the console log (it must exist). */
  dir: string;
  /** Names the files in {@link dir}: `<name>.qmp`, `<name>.console`. */
  name: string;
}

/** A running QEMU with QMP. */
export class Vm {
  /** The options it was started with. */
  readonly options: VmOptions;
  /** QEMU's pid. */
  readonly pid: number;
  /** The console log's path. */
  readonly consolePath: string;
  /** The initramfs it booted (a destination reuses it). */
  readonly initrd: string;
  /** The command line. */
  readonly command: string[];
  /** QMP. */
  readonly qmp: Qmp;
  /** Settles with QEMU's exit code and stderr. */
  readonly exited: Promise<{ code: number; stderr: string }>;
  #child: Deno.ChildProcess;
  #running = true;
  #serial: Deno.UnixConn | null = null;

  private constructor(
    options: VmOptions,
    child: Deno.ChildProcess,
    consolePath: string,
    initrd: string,
    command: string[],
    qmp: Qmp,
    exited: Promise<{ code: number; stderr: string }>,
  ) {
    this.options = options;
    this.#child = child;
    this.pid = child.pid;
    this.consolePath = consolePath;
    this.initrd = initrd;
    this.command = command;
    this.qmp = qmp;
    this.exited = exited.finally(() => {
      this.#running = false;
    });
  }

  /** Starts QEMU (booting, or waiting for a migration with `incoming`) and connects QMP. */
  static async start(options: VmOptions): Promise<Vm> {
    const kit = await ensureKit();
    const consolePath = `${options.dir}/${options.name}.console`;
    const qmpSocket = `${options.dir}/${options.name}.qmp`;
    const serialSocket = `${options.dir}/${options.name}.serial`;
    let initrd = options.initrdPath;
    if (initrd === undefined) {
      initrd = `${options.dir}/${options.name}.initrd`;
      await writeInitrd(options, kit, initrd);
    }
    await Deno.writeFile(consolePath, new Uint8Array());
    const command = [
      ...(options.commandPrefix ?? []),
      ...qemuCommand({ ...options, qmpSocket, serialSocket }, kit, initrd, consolePath),
    ];
    const child = new Deno.Command(command[0], {
      args: command.slice(1),
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    options.onSpawn?.(child.pid);
    const exited = child.output().then((o) => ({
      code: o.code,
      stderr: new TextDecoder().decode(o.stderr) + new TextDecoder().decode(o.stdout),
    }));
    let qmp: Qmp;
    try {
      qmp = await Promise.race([
        Qmp.connect(qmpSocket),
        exited.then((e) => {
          throw new Error(`QEMU exited (${e.code}) before QMP answered:\n${e.stderr}`);
        }),
      ]);
    } catch (e) {
      try {
        child.kill("SIGKILL");
      } catch {
        // gone
      }
      await exited.catch(() => undefined);
      throw e;
    }
    const vm = new Vm(options, child, consolePath, initrd, command, qmp, exited);
    await vm.#connectSerial(serialSocket);
    return vm;
  }

  /**
   * Connects to the serial socket for the VM's whole life and reads (and drops) what comes: the
   * log file keeps it. QEMU's socket chardev drops output while no client is connected, and
   * its UART then retries, which a migration can carry over into a stalled console.
   */
  async #connectSerial(path: string): Promise<void> {
    const conn = await Deno.connect({ transport: "unix", path });
    this.#serial = conn;
    (async () => {
      const buf = new Uint8Array(16384);
      try {
        while ((await conn.read(buf)) !== null) {
          // the log file has it
        }
      } catch {
        // closed
      }
    })();
  }

  /** Types `text` into the guest's serial console (its /dev/console). */
  async type(text: string): Promise<void> {
    if (this.#serial === null) throw new Error("the serial console is closed");
    await this.#serial.write(new TextEncoder().encode(text));
  }

  /** Whether QEMU still runs. */
  get running(): boolean {
    return this.#running;
  }

  /** The console so far. */
  console(): string {
    try {
      return new TextDecoder().decode(Deno.readFileSync(this.consolePath)).replaceAll("\r\n", "\n");
    } catch {
      return "";
    }
  }

  /**
   * Waits until the console matches `re` (or satisfies a predicate); throws if QEMU exits or the
   * time runs out first.
   */
  async waitConsole(re: RegExp | ((console: string) => boolean), timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    const ok = typeof re === "function" ? re : (c: string) => re.test(c);
    for (;;) {
      if (ok(this.console())) return;
      if (!this.#running) {
        const e = await this.exited;
        throw new Error(`QEMU exited (${e.code}) before the console showed ${re}:\n${e.stderr}`);
      }
      if (Date.now() > deadline) {
        throw new Error(`the console did not show ${re} in ${timeoutMs} ms`);
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  /**
   * Where guest RAM can be read while QEMU runs: its memory-backend-memfd, through /proc (the
   * fd QEMU holds). Throws when QEMU holds no such fd.
   */
  async guestRamPath(): Promise<string> {
    const dir = `/proc/${this.pid}/fd`;
    for await (const e of Deno.readDir(dir)) {
      const target = await Deno.readLink(`${dir}/${e.name}`).catch(() => "");
      if (target.startsWith("/memfd:memory-backend-memfd")) return `${dir}/${e.name}`;
    }
    throw new Error(`QEMU ${this.pid} holds no memory-backend-memfd`);
  }

  /** `query-migrate`, reduced to {@link MigrationInfo}. */
  async migrationInfo(): Promise<MigrationInfo> {
    const r = await this.qmp.execute("query-migrate") as Record<string, unknown>;
    const ram = (r.ram ?? {}) as Record<string, number>;
    return {
      status: String(r.status ?? "none"),
      totalTimeMs: r["total-time"] as number | undefined,
      downtimeMs: r.downtime as number | undefined,
      dirtySyncCount: ram["dirty-sync-count"],
      transferredBytes: ram.transferred,
      errorDesc: r["error-desc"] as string | undefined,
    };
  }

  /**
   * Starts migrating to `uri` (where a destination waits with `-incoming`), capped at
   * `bandwidthBytes` per second and aiming at `downtimeLimitMs` of downtime (a low cap and a
   * tiny downtime keep QEMU passing over guest RAM while the guest works, until
   * {@link setMigrationLimits} lets it finish).
   */
  async startMigration(uri: string, bandwidthBytes: number, downtimeLimitMs = 300): Promise<void> {
    await this.setMigrationLimits(bandwidthBytes, downtimeLimitMs);
    await this.qmp.execute("migrate", { uri });
  }

  /** Changes the bandwidth cap and the downtime QEMU aims at, while it migrates. */
  async setMigrationLimits(bandwidthBytes: number, downtimeLimitMs: number): Promise<void> {
    await this.qmp.execute("migrate-set-parameters", {
      "max-bandwidth": bandwidthBytes,
      "downtime-limit": downtimeLimitMs,
    });
  }

  /**
   * Waits until the migration ends (completed, failed, cancelled) or `until` holds; returns the
   * state then. Throws after `timeoutMs`.
   */
  async waitMigration(
    until: (info: MigrationInfo) => boolean = () => false,
    timeoutMs = 300_000,
  ): Promise<MigrationInfo> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const info = await this.migrationInfo();
      if (["completed", "failed", "cancelled"].includes(info.status) || until(info)) return info;
      if (Date.now() > deadline) {
        throw new Error(`migration: still ${JSON.stringify(info)} after ${timeoutMs} ms`);
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  /**
   * What QEMU can tell about a guest that stopped making progress, for a failed test's report:
   * its run state, where its vCPU is (twice, a second apart: a moving RIP is a guest that runs),
   * and every virtqueue as QEMU and its vhost back-end see it (pending requests, or completions
   * the guest did not notice). Never throws.
   */
  async diagnose(): Promise<string> {
    if (!this.#running) return "QEMU exited";
    const hmp = (c: string) => this.qmp.hmp(c).catch((e) => `${c}: ${(e as Error).message}`);
    const rip = async () => (await hmp("info registers")).match(/RIP=\S+/)?.[0] ?? "RIP ?";
    const out = [(await hmp("info status")).trim(), await rip()];
    await new Promise((r) => setTimeout(r, 1000));
    out.push(await rip());
    const list = await hmp("info virtio");
    for (const path of list.matchAll(/^(\/\S+) \[/gm)) {
      for (const q of [0, 1]) {
        for (const what of ["virtio-queue-status", "virtio-vhost-queue-status"]) {
          const text = await hmp(`info ${what} ${path[1]} ${q}`);
          if (/error|not|invalid/i.test(text) && text.length < 200) continue;
          out.push(`${what} ${path[1]} ${q}:`, text.trim());
          // A vhost ring's indexes live in guest memory only: flags and idx of avail and used.
          for (const ring of ["avail", "used"]) {
            const at = text.match(new RegExp(`${ring}_phys:\\s+(0x[0-9a-f]+)`))?.[1];
            if (at) out.push(`${ring} ring flags, idx: ${(await hmp(`xp /2hx ${at}`)).trim()}`);
          }
        }
      }
    }
    return out.join("\n");
  }

  /** Asks QEMU to quit (QMP `quit`) and waits for it. */
  async quit(): Promise<void> {
    this.#closeSerial();
    if (!this.#running) return;
    await this.qmp.execute("quit").catch(() => undefined);
    this.qmp.close();
    await this.exited;
  }

  #closeSerial(): void {
    try {
      this.#serial?.close();
    } catch {
      // already closed
    }
    this.#serial = null;
  }

  /** Kills QEMU (always safe to call) and waits for it. */
  async kill(): Promise<void> {
    this.#closeSerial();
    this.qmp.close();
    if (this.#running) {
      try {
        this.#child.kill("SIGKILL");
      } catch {
        // gone
      }
    }
    await this.exited.catch(() => undefined);
  }
}
