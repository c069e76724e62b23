/**
 * The host side of one console port, whatever carries it to the guest (vhost-user queues or a
 * QEMU character device): an append-only log, a scrollback ring, the attach socket and its
 * clients, and the input waiting for the guest.
 *
 * Everything is a non-blocking fd in the caller's epoll loop: the data plane blocks in
 * `epoll_wait`, so no Deno async API would ever run here.
 *
 * @module
 */

import { getLogger, type Logger } from "@logtape/logtape";
import { closeQuietly, Errno, errno, libc, setNonBlocking } from "../../sys/libc.ts";
import { acceptUnix } from "../../sys/socket.ts";
import { ByteRing } from "./byte_ring.ts";

/** Where a port registers its fds: the device's event loop. */
export interface FdWatcher {
  /** Calls `handler` whenever `fd` is readable or hung up. */
  watch(fd: number, handler: () => void): void;
  /** Stops watching `fd`. */
  unwatch(fd: number): void;
}

/** How one port is set up (plain data: it crosses into the worker). */
export interface PortConfig {
  /** Port number (0 is the console). */
  id: number;
  /** Name the guest sees (`/dev/virtio-ports/NAME`), and used in socket and log names. */
  name: string;
  /** Listening (Unix) attach socket fd, or -1. */
  attachFd: number;
  /** Path of the attach socket, removed on close (or "" for none). */
  attachPath: string;
  /** Log file opened O_APPEND, or -1. */
  logFd: number;
  /** Scrollback bytes kept for clients that attach later. */
  scrollbackBytes: number;
  /** Client input held while the guest cannot take it. */
  inputBytes: number;
}

/** Default scrollback per port. */
export const DEFAULT_SCROLLBACK = 64 * 1024;
/** Default input held per port while the guest has no receive buffers. */
export const DEFAULT_INPUT_LIMIT = 64 * 1024;

/** Bytes read from a client per read(2). */
const READ_CHUNK = 16 * 1024;

/** A resize request found in client input: `ESC [ 8 ; rows ; cols t` (xterm's own form). */
export interface ResizeRequest {
  /** Where the sequence starts. */
  index: number;
  /** Its length in bytes. */
  length: number;
  /** Columns. */
  cols: number;
  /** Rows. */
  rows: number;
}

/**
 * Finds xterm's "resize text area" sequence `ESC [ 8 ; ROWS ; COLS t` in `buf`. A terminal client
 * sends it when its window changes size (it is the one sequence a terminal never sends as
 * keyboard input), so the port takes it as a resize and does not pass it to the guest.
 */
export function findResize(buf: Uint8Array, from = 0): ResizeRequest | null {
  for (let i = buf.indexOf(0x1b, from); i >= 0; i = buf.indexOf(0x1b, i + 1)) {
    if (buf[i + 1] !== 0x5b || buf[i + 2] !== 0x38 || buf[i + 3] !== 0x3b) continue;
    let p = i + 4, rows = 0, cols = 0, digits = 0;
    for (; p < buf.length && buf[p] >= 0x30 && buf[p] <= 0x39 && digits < 5; p++, digits++) {
      rows = rows * 10 + buf[p] - 0x30;
    }
    if (digits === 0 || buf[p] !== 0x3b) continue;
    p++;
    digits = 0;
    for (; p < buf.length && buf[p] >= 0x30 && buf[p] <= 0x39 && digits < 5; p++, digits++) {
      cols = cols * 10 + buf[p] - 0x30;
    }
    if (digits === 0 || buf[p] !== 0x74 || rows > 0xffff || cols > 0xffff) continue;
    return { index: i, length: p + 1 - i, cols, rows };
  }
  return null;
}

/** One port's host side. */
export class PortHub {
  /** Port number. */
  readonly id: number;
  /** Port name. */
  readonly name: string;
  /** What the guest wrote most recently (bounded). */
  readonly scrollback: ByteRing;
  /** Client input not yet handed to the guest (bounded). */
  readonly input: ByteRing;
  /** Called when input arrived and the guest may take it. */
  onInput: () => void = () => {};
  /** Called when a client asked for a new terminal size. */
  onResize: (cols: number, rows: number) => void = () => {};
  readonly #config: PortConfig;
  readonly #clients = new Set<number>();
  readonly #readBuf = new Uint8Array(READ_CHUNK);
  readonly #log: Logger;
  #loop: FdWatcher | null = null;
  /** Clients are not read while the input ring is full (back-pressure instead of dropping). */
  #paused = false;

  /** Builds the port from fds opened by the main thread. */
  constructor(config: PortConfig) {
    this.#config = config;
    this.id = config.id;
    this.name = config.name;
    this.scrollback = new ByteRing(config.scrollbackBytes);
    this.input = new ByteRing(config.inputBytes);
    this.#log = getLogger(["vhostd", "console", config.name]);
  }

  /** Number of attached clients. */
  get clientCount(): number {
    return this.#clients.size;
  }

  /** Starts accepting clients in `loop`. */
  start(loop: FdWatcher): void {
    this.#loop = loop;
    if (this.#config.attachFd >= 0) {
      setNonBlocking(this.#config.attachFd);
      loop.watch(this.#config.attachFd, () => this.#accept());
    }
  }

  /** The guest wrote `data`: log it, keep it, and send it to every client. */
  output(data: Uint8Array): void {
    if (data.length === 0) return;
    if (this.#config.logFd >= 0 && !writeAll(this.#config.logFd, data, true)) {
      this.#log.error("writing the log failed (errno {errno}); logging stops", { errno: errno() });
      closeQuietly(this.#config.logFd);
      this.#config.logFd = -1;
    }
    this.scrollback.append(data);
    for (const fd of this.#clients) {
      if (!writeAll(fd, data, false)) this.#drop(fd, "it does not keep up or went away");
    }
  }

  /** The guest took `n` bytes of {@link input}; resumes reading clients if they were paused. */
  consumed(n: number): void {
    this.input.consume(n);
    if (this.#paused && this.input.free > 0) {
      this.#paused = false;
      for (const fd of this.#clients) this.#loop?.watch(fd, () => this.#readClient(fd));
    }
  }

  #accept(): void {
    let fd: number;
    try {
      fd = acceptUnix(this.#config.attachFd);
    } catch {
      return; // EAGAIN: another wake-up took it
    }
    setNonBlocking(fd);
    // A new client sees the recent past first, then live output.
    for (const part of [0, 1] as const) {
      const seg = this.scrollback.segment(part);
      if (seg.length > 0 && !writeAll(fd, seg, false)) {
        closeQuietly(fd);
        return;
      }
    }
    this.#clients.add(fd);
    if (!this.#paused) this.#loop?.watch(fd, () => this.#readClient(fd));
    this.#log.info("client attached to port {port} ({clients} attached)", {
      port: this.id,
      clients: this.#clients.size,
    });
  }

  #readClient(fd: number): void {
    const room = Math.min(this.input.free, READ_CHUNK);
    if (room === 0) {
      this.#pause();
      return;
    }
    const n = Number(libc.read(fd, this.#readBuf, BigInt(room)));
    if (n < 0) {
      const err = errno();
      if (err === Errno.EAGAIN || err === Errno.EINTR) return;
      this.#drop(fd, `read failed (errno ${err})`);
      return;
    }
    if (n === 0) {
      this.#drop(fd, "it disconnected");
      return;
    }
    let chunk = this.#readBuf.subarray(0, n);
    for (let r = findResize(chunk); r !== null; r = findResize(chunk)) {
      this.input.write(chunk.subarray(0, r.index));
      this.onResize(r.cols, r.rows);
      chunk = chunk.subarray(r.index + r.length);
    }
    this.input.write(chunk);
    if (this.input.free === 0) this.#pause();
    this.onInput();
  }

  #pause(): void {
    if (this.#paused) return;
    this.#paused = true;
    for (const fd of this.#clients) this.#loop?.unwatch(fd);
  }

  #drop(fd: number, why: string): void {
    this.#loop?.unwatch(fd);
    this.#clients.delete(fd);
    closeQuietly(fd);
    this.#log.info("client left port {port}: {why}", { port: this.id, why });
  }

  /** Disconnects the clients, stops listening, removes the socket and closes the log. */
  close(): void {
    for (const fd of [...this.#clients]) this.#drop(fd, "the daemon is stopping");
    if (this.#config.attachFd >= 0) {
      this.#loop?.unwatch(this.#config.attachFd);
      closeQuietly(this.#config.attachFd);
      this.#config.attachFd = -1;
      if (this.#config.attachPath) {
        try {
          Deno.removeSync(this.#config.attachPath);
        } catch {
          // already gone
        }
      }
    }
    closeQuietly(this.#config.logFd);
    this.#config.logFd = -1;
  }
}

/**
 * Writes all of `data` to `fd`. A log file may block briefly; a client socket is non-blocking and
 * a client whose socket buffer is full is reported as failing (false) rather than stalling every
 * other port and the guest.
 */
export function writeAll(fd: number, data: Uint8Array, mayBlock: boolean): boolean {
  let off = 0;
  while (off < data.length) {
    const part = off === 0 ? data : data.subarray(off);
    const n = Number(libc.write(fd, part as Uint8Array<ArrayBuffer>, BigInt(part.length)));
    if (n < 0) {
      const err = errno();
      if (err === Errno.EINTR || (mayBlock && err === Errno.EAGAIN)) continue;
      return false;
    }
    off += n;
  }
  return true;
}
