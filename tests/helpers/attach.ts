/**
 * Clients of a console port for tests: an attach socket (Unix or TCP) or a pty, each collecting
 * everything the port sends and waiting for text to appear.
 *
 * @module
 */

import assert from "node:assert/strict";
import { closeQuietly, Errno, errno, libc, O, openFile } from "../../sys/libc.ts";
import { DaemonProcess } from "./daemon.ts";

/** Polls `text()` until `pattern` matches; throws with what arrived after `ms`. */
async function waitForText(
  what: string,
  text: () => string,
  pattern: string | RegExp,
  ms: number,
): Promise<RegExpMatchArray | string> {
  const deadline = Date.now() + ms;
  for (;;) {
    const t = text();
    if (typeof pattern === "string") {
      if (t.includes(pattern)) return pattern;
    } else {
      const m = t.match(pattern);
      if (m) return m;
    }
    if (Date.now() >= deadline) {
      throw new Error(`${what}: no ${pattern} within ${ms} ms; got ${JSON.stringify(t)}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** One connection to an attach socket. */
export class AttachClient {
  /** Everything received so far, decoded as UTF-8. */
  text = "";
  readonly #conn: Deno.Conn;
  readonly #pump: Promise<void>;
  #closed = false;

  private constructor(conn: Deno.Conn) {
    this.#conn = conn;
    this.#pump = (async () => {
      const dec = new TextDecoder();
      const buf = new Uint8Array(16384);
      try {
        for (;;) {
          const n = await conn.read(buf);
          if (n === null) break;
          this.text += dec.decode(buf.subarray(0, n), { stream: true });
        }
      } catch {
        // closed under us
      }
      this.#closed = true;
    })();
  }

  /** Connects to `path`, retrying for up to `retryMs` while the socket does not exist yet. */
  static async connect(path: string, retryMs = 5000): Promise<AttachClient> {
    const deadline = Date.now() + retryMs;
    for (;;) {
      try {
        return new AttachClient(await Deno.connect({ transport: "unix", path }));
      } catch (e) {
        if (Date.now() >= deadline) throw e;
        await new Promise((r) => setTimeout(r, 50));
      }
    }
  }

  /**
   * Connects to a TCP attach socket on loopback (or `hostname`) and sends `token` as the first
   * line, as a person pastes it and presses Enter (nothing when null).
   */
  static async connectTcp(
    port: number,
    token: string | null,
    hostname = "127.0.0.1",
  ): Promise<AttachClient> {
    const client = new AttachClient(await Deno.connect({ transport: "tcp", hostname, port }));
    if (token !== null) await client.send(`${token}\r`);
    return client;
  }

  /** Whether the server closed the connection. */
  get closed(): boolean {
    return this.#closed;
  }

  /** Sends text (UTF-8) or bytes. */
  async send(data: string | Uint8Array): Promise<void> {
    const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
    for (let off = 0; off < bytes.length;) off += await this.#conn.write(bytes.subarray(off));
  }

  /** Waits until `pattern` matches the received text; throws with what arrived after `ms`. */
  waitFor(pattern: string | RegExp, ms = 30_000): Promise<RegExpMatchArray | string> {
    return waitForText("attach client", () => this.text, pattern, ms);
  }

  /** Closes the connection and waits for the reader to finish. */
  async close(): Promise<void> {
    try {
      this.#conn.close();
    } catch {
      // already closed
    }
    await this.#pump;
  }
}

/**
 * A user of a port's pty: opens the slave path as `screen` or `cat` would. It reads through FFI
 * with O_NONBLOCK, polled from a timer, because an async Deno read of a tty occupies a blocking
 * thread that closing the file does not release.
 */
export class PtyClient {
  /** Everything read so far, decoded as UTF-8. */
  text = "";
  /** The open slave (for ioctls such as a window size). */
  readonly fd: number;
  readonly #timer: ReturnType<typeof setInterval>;
  readonly #buf = new Uint8Array(4096);
  readonly #dec = new TextDecoder();

  /** Opens the pty at `path` (a symlink to it is fine). */
  constructor(path: string) {
    this.fd = openFile(path, O.RDWR | O.NONBLOCK | 0o400 /* O_NOCTTY */);
    this.#timer = setInterval(() => this.#poll(), 10);
  }

  #poll(): void {
    for (;;) {
      const n = Number(libc.read(this.fd, this.#buf, BigInt(this.#buf.length)));
      if (n <= 0) return;
      this.text += this.#dec.decode(this.#buf.subarray(0, n), { stream: true });
    }
  }

  /** Writes text to the pty (it is small: a pty takes it at once). */
  send(text: string): void {
    const bytes = new TextEncoder().encode(text);
    for (let off = 0; off < bytes.length;) {
      const part = bytes.subarray(off);
      const n = Number(libc.write(this.fd, part, BigInt(part.length)));
      if (n < 0 && errno() !== Errno.EAGAIN) throw new Error(`pty write: errno ${errno()}`);
      off += Math.max(n, 0);
    }
  }

  /** Waits until `pattern` matches what was read. */
  waitFor(pattern: string | RegExp, ms = 30_000): Promise<RegExpMatchArray | string> {
    return waitForText("pty client", () => this.text, pattern, ms);
  }

  /** Stops polling and closes the pty. */
  close(): void {
    clearInterval(this.#timer);
    closeQuietly(this.fd);
  }
}

/** Writes a fresh random token to `path` (mode 0600), as an operator would; returns it. */
export function writeTokenFile(path: string): string {
  const bytes = crypto.getRandomValues(new Uint8Array(24));
  const token = btoa(String.fromCharCode(...bytes));
  Deno.writeTextFileSync(path, `${token}\n`, { mode: 0o600 });
  Deno.chmodSync(path, 0o600);
  return token;
}

/** Waits until the file at `path` (a port's log) contains `text`: the daemon has taken it. */
export async function waitForFile(path: string, text: string, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await Deno.readTextFile(path).catch(() => "")).includes(text)) {
    if (Date.now() > end) throw new Error(`${path} never got ${JSON.stringify(text)}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/**
 * Runs `fn` with `vhostd console --socket <dir>/con.sock ...args(sock)` started in a fresh
 * directory (mode 0755, or `dirMode`); checks the daemon stops cleanly and removes the directory.
 */
export async function withConsole(
  args: (sock: string) => string[],
  fn: (ctx: { sock: string; dir: string; d: DaemonProcess }) => Promise<void>,
  dirMode = 0o755,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-console-" });
  Deno.chmodSync(dir, dirMode);
  const sock = `${dir}/con.sock`;
  let d: DaemonProcess | null = null;
  try {
    d = await DaemonProcess.start(["console", "--socket", sock, ...args(sock)]);
    await fn({ sock, dir, d });
  } finally {
    try {
      if (d) assert.equal(await d.stop(), 0, `vhostd did not stop cleanly:\n${d.stderr}`);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  }
}
