/**
 * The host side of one console port, whatever carries it to the guest (vhost-user queues or a
 * QEMU character device): an append-only log, a scrollback ring, the attach socket (Unix or TCP)
 * and its clients, an optional terminal (a pty's master, or the daemon's stdin and stdout), and
 * the input waiting for the guest.
 *
 * Everything is a non-blocking fd in the caller's epoll loop: the data plane blocks in
 * `epoll_wait`, so no Deno async API would ever run here.
 *
 * @module
 */

import { getLogger, type Logger } from "../../log/mod.ts";
import { rateLimited } from "../../log/rate_limit.ts";
import { closeQuietly, Errno, errno, libc, setNonBlocking } from "../../sys/libc.ts";
import { writeAll } from "../../sys/io.ts";
import { setTcpNoDelay } from "../../sys/socket.ts";
import { windowSize } from "../../sys/pty.ts";
import { ByteRing } from "./byte_ring.ts";
import { Acceptor, refuse, tell } from "./acceptor.ts";
import { MAX_TOKEN_BYTES, TokenCheck } from "./attach_token.ts";
import { ConsoleLog } from "./console_log.ts";
import { PeerPolicy } from "./peer_policy.ts";

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
  /** Listening attach socket fd (Unix or TCP), or -1. */
  attachFd: number;
  /** Path of the attach socket, removed on close (or "" for none, as for TCP). */
  attachPath: string;
  /** The attach socket is TCP (its clients get TCP_NODELAY). */
  attachTcp?: boolean;
  /** Who may attach, and how many at once. */
  access: AttachAccess;
  /** A terminal attached for the port's whole life (`--attach pty` or `stdio`). */
  terminal?: TerminalConfig;
  /** The log, opened by the main thread (see `openLogFile`), or null. */
  log: PortLogConfig | null;
  /** Scrollback bytes kept for clients that attach later. */
  scrollbackBytes: number;
  /** Client input held while the guest cannot take it. */
  inputBytes: number;
}

/** Who may attach to a port (plain data, like {@link PortConfig}). */
export interface AttachAccess {
  /**
   * Uids besides the daemon's own and root that may connect to the Unix attach socket, checked
   * with SO_PEERCRED (see `PeerPolicy`).
   */
  allowUids: number[];
  /** The token a TCP client must send as its first line (required for TCP; see `TokenCheck`). */
  token?: Uint8Array<ArrayBuffer>;
  /** Socket clients attached at once at most (the terminal does not count); more are refused. */
  maxClients: number;
}

/** A port's log file, opened by the main thread. */
export interface PortLogConfig {
  /** Its path (rotated to `path.1`). */
  path: string;
  /** The fd, O_APPEND. */
  fd: number;
  /** Its size when opened. */
  size: number;
  /** Rotation size in bytes (0: never). */
  maxBytes: number;
}

/**
 * A client that is there from start to stop: a pty's master or the daemon's stdin and stdout.
 * Unlike a socket client it is never dropped for being slow (output it cannot take now is
 * skipped: the log and scrollback keep it) and gets no scrollback (it sees everything live).
 */
export interface TerminalConfig {
  /** `pty` or `stdio`, for logs. */
  kind: "pty" | "stdio";
  /** Where input comes from (O_NONBLOCK), or -1. */
  readFd: number;
  /** Where output goes (O_NONBLOCK). May equal {@link readFd}. */
  writeFd: number;
  /**
   * A terminal whose window size is read (TIOCGWINSZ) whenever input arrives, or -1. A blocked
   * worker never sees SIGWINCH, so a resize reaches the guest with the next keystroke.
   */
  sizeFd: number;
  /** Fds only held open, closed with the port (a pty's slave, see `sys/pty.ts`). */
  holdFds: number[];
  /** A symlink to the pty removed on close, or "". */
  linkPath: string;
}

/** Default scrollback per port. */
export const DEFAULT_SCROLLBACK = 64 * 1024;
/** Default input held per port while the guest has no receive buffers. */
export const DEFAULT_INPUT_LIMIT = 64 * 1024;
/** Default number of socket clients attached to one port at once. */
export const DEFAULT_MAX_CLIENTS = 16;

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

/** A connected reader and writer of the port: a socket client or the terminal. */
interface Client {
  /** Input is read here (-1 once it ended). */
  readFd: number;
  /** Output is written here (-1 once it failed). */
  writeFd: number;
  /** The terminal: never dropped, fds closed only with the port. */
  permanent: boolean;
  /** Whether {@link readFd} is in the loop. */
  watched: boolean;
  /** Last window size seen on the terminal (see {@link TerminalConfig.sizeFd}). */
  size: string;
  /** A TCP client that has not sent its token yet: it gets no output and gives no input. */
  token: TokenCheck | null;
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
  readonly #clients = new Set<Client>();
  readonly #readBuf = new Uint8Array(READ_CHUNK);
  /** Rate-limited: clients, and through the log's rotation the guest, cause these lines. */
  readonly #log: Logger;
  readonly #peers: PeerPolicy;
  readonly #consoleLog: ConsoleLog | null;
  #acceptor: Acceptor | null = null;
  #loop: FdWatcher | null = null;
  /** Clients are not read while the input ring is full (back-pressure instead of dropping). */
  #paused = false;
  /** Output bytes the terminal could not take (nobody reading the pty, a stalled stdout). */
  #terminalSkipped = 0;

  /** Builds the port from fds opened by the main thread. */
  constructor(config: PortConfig) {
    this.#config = config;
    this.id = config.id;
    this.name = config.name;
    this.scrollback = new ByteRing(config.scrollbackBytes);
    this.input = new ByteRing(config.inputBytes);
    this.#log = rateLimited(getLogger(["vhostd", "console", config.name]));
    this.#peers = new PeerPolicy(config.access.allowUids);
    const log = config.log;
    this.#consoleLog = log && new ConsoleLog(log.path, log, log.maxBytes, this.#log);
  }

  /** Number of attached clients (the terminal included). */
  get clientCount(): number {
    return this.#clients.size;
  }

  /** Starts accepting clients in `loop`, and reading the terminal if there is one. */
  start(loop: FdWatcher): void {
    this.#loop = loop;
    if (this.#config.attachFd >= 0) {
      setNonBlocking(this.#config.attachFd);
      const what = `the attach socket of port ${this.id}`;
      this.#acceptor = new Acceptor(
        this.#config.attachFd,
        loop,
        (fd) => this.#admit(fd),
        this.#log,
        what,
      );
      this.#acceptor.start();
    }
    const t = this.#config.terminal;
    if (t) {
      if (t.readFd >= 0) setNonBlocking(t.readFd);
      setNonBlocking(t.writeFd);
      const c: Client = {
        readFd: t.readFd,
        writeFd: t.writeFd,
        permanent: true,
        watched: false,
        size: "",
        token: null,
      };
      this.#clients.add(c);
      this.#checkSize(c);
      this.#watch(c);
    }
  }

  /** The guest wrote `data`: log it, keep it, and send it to every client. */
  output(data: Uint8Array): void {
    if (data.length === 0) return;
    this.#consoleLog?.append(data);
    this.scrollback.append(data);
    for (const c of this.#clients) {
      if (c.writeFd < 0 || c.token !== null || writeAll(c.writeFd, data, false)) continue;
      if (!c.permanent) {
        this.#drop(c, "it does not keep up or went away");
        continue;
      }
      const err = errno();
      if (err === Errno.EAGAIN) {
        // Nobody reads the pty (or stdout stalls): skip rather than stall the guest.
        if (this.#terminalSkipped === 0) {
          this.#log.debug("the {kind} of port {port} is full; output skipped", {
            kind: this.#config.terminal!.kind,
            port: this.id,
          });
        }
        this.#terminalSkipped += data.length;
      } else {
        this.#log.warn("writing to the {kind} of port {port} failed (errno {errno}); it stops", {
          kind: this.#config.terminal!.kind,
          port: this.id,
          errno: err,
        });
        c.writeFd = -1;
      }
    }
  }

  /** The guest took `n` bytes of {@link input}; resumes reading clients if they were paused. */
  consumed(n: number): void {
    this.input.consume(n);
    if (this.#paused && this.input.free > 0) {
      this.#paused = false;
      for (const c of this.#clients) this.#watch(c);
    }
  }

  /** A client still owing its token is read even while input is paused: it gives no input. */
  #watch(c: Client): void {
    if ((this.#paused && c.token === null) || c.watched || c.readFd < 0) return;
    c.watched = true;
    this.#loop?.watch(c.readFd, () => this.#readClient(c));
  }

  #unwatch(c: Client): void {
    if (!c.watched) return;
    c.watched = false;
    this.#loop?.unwatch(c.readFd);
  }

  /** Decides whether a new connection may attach: who it is, and how many are attached. */
  #admit(fd: number): void {
    this.#dropLate(performance.now());
    const tcp = this.#config.attachTcp === true;
    if (!tcp) {
      // TCP carries no credentials: its clients prove themselves with the token instead.
      const verdict = this.#peers.check(fd);
      if ("refused" in verdict) {
        this.#log.warn("refusing a client of port {port}: {why}", {
          port: this.id,
          why: verdict.refused,
        });
        refuse(fd, verdict.refused);
        return;
      }
    }
    const max = this.#config.access.maxClients;
    if (this.#socketClients() >= max) {
      this.#log.warn("refusing a client of port {port}: {max} clients are attached already", {
        port: this.id,
        max,
      });
      refuse(fd, `port ${this.name} has ${max} clients attached already; try again later`);
      return;
    }
    setNonBlocking(fd);
    if (tcp) {
      try {
        setTcpNoDelay(fd);
      } catch {
        // only latency is at stake
      }
    }
    const token = tcp ? new TokenCheck(this.#config.access.token!) : null;
    const c: Client = {
      readFd: fd,
      writeFd: fd,
      permanent: false,
      watched: false,
      size: "",
      token,
    };
    this.#clients.add(c);
    this.#watch(c);
    if (token === null) this.#welcome(c);
  }

  /** Socket clients attached or owing their token (the terminal does not count). */
  #socketClients(): number {
    let n = 0;
    for (const c of this.#clients) if (!c.permanent) n++;
    return n;
  }

  /** Drops TCP clients that did not send their token in time, making room for others. */
  #dropLate(now: number): void {
    for (const c of this.#clients) {
      if (c.token !== null && now > c.token.deadline) {
        tell(c.writeFd, "no token in time");
        this.#drop(c, "it sent no token in time");
      }
    }
  }

  /** A client is in: it sees the recent past first, then live output. */
  #welcome(c: Client): void {
    for (const part of [0, 1] as const) {
      const seg = this.scrollback.segment(part);
      if (seg.length > 0 && !writeAll(c.writeFd, seg, false)) {
        this.#drop(c, "it does not take the scrollback");
        return;
      }
    }
    this.#log.info("client attached to port {port} ({clients} attached)", {
      port: this.id,
      clients: this.#clients.size,
    });
  }

  /** Reads the terminal's window size and passes a change on as a resize. */
  #checkSize(c: Client): void {
    const fd = c.permanent ? this.#config.terminal!.sizeFd : -1;
    if (fd < 0) return;
    const ws = windowSize(fd);
    if (ws === null) return;
    const size = `${ws.cols}x${ws.rows}`;
    if (size === c.size) return;
    c.size = size;
    this.onResize(ws.cols, ws.rows);
  }

  #readClient(c: Client): void {
    // A client owing its token is read a line's worth at most: what follows the token is input.
    const room = c.token !== null ? MAX_TOKEN_BYTES + 2 : Math.min(this.input.free, READ_CHUNK);
    if (room === 0) {
      this.#pause();
      return;
    }
    const n = Number(libc.read(c.readFd, this.#readBuf, BigInt(room)));
    if (n < 0) {
      const err = errno();
      if (err === Errno.EAGAIN || err === Errno.EINTR) return;
      this.#drop(c, `read failed (errno ${err})`);
      return;
    }
    if (n === 0) {
      this.#drop(c, "it disconnected");
      return;
    }
    let chunk: Uint8Array = this.#readBuf.subarray(0, n);
    if (c.token !== null) {
      const progress = c.token.feed(chunk);
      if (progress.state === "waiting") {
        this.#dropLate(performance.now());
        return;
      }
      if (progress.state === "refused") {
        tell(c.writeFd, progress.why);
        this.#drop(c, `it sent a ${progress.why}`);
        return;
      }
      c.token = null;
      if (this.#paused) this.#unwatch(c);
      this.#welcome(c);
      chunk = progress.rest;
      if (chunk.length === 0 || !this.#clients.has(c)) return;
    }
    this.#checkSize(c);
    for (let r = findResize(chunk); r !== null; r = findResize(chunk)) {
      this.input.write(chunk.subarray(0, r.index));
      this.onResize(r.cols, r.rows);
      chunk = chunk.subarray(r.index + r.length);
    }
    this.input.write(chunk);
    if (this.input.free === 0) this.#pause();
    this.onInput();
  }

  /** Stops reading clients that give input (a client owing its token gives none). */
  #pause(): void {
    if (this.#paused) return;
    for (const c of this.#clients) if (c.token === null) this.#unwatch(c);
    this.#paused = true;
  }

  /**
   * A socket client leaves for good. The terminal only stops being read (stdin reached its end,
   * or the pty failed): its fds are the port's, and output still goes to it.
   */
  #drop(c: Client, why: string): void {
    this.#unwatch(c);
    if (c.permanent) {
      c.readFd = -1;
      this.#log.info("input from the {kind} of port {port} ended: {why}", {
        kind: this.#config.terminal!.kind,
        port: this.id,
        why,
      });
      return;
    }
    this.#clients.delete(c);
    closeQuietly(c.readFd);
    this.#log.info("client left port {port}: {why}", { port: this.id, why });
  }

  /**
   * Disconnects the clients, stops listening, closes the terminal, removes the socket and the
   * pty link, and closes the log.
   */
  close(): void {
    for (const c of [...this.#clients]) {
      if (!c.permanent) this.#drop(c, "the daemon is stopping");
      else this.#unwatch(c);
    }
    this.#clients.clear();
    const t = this.#config.terminal;
    if (t) {
      const fds = new Set([t.readFd, t.writeFd, ...t.holdFds]);
      for (const fd of fds) closeQuietly(fd);
      t.readFd = t.writeFd = -1;
      t.holdFds = [];
      if (t.linkPath) removeQuietly(t.linkPath);
      if (this.#terminalSkipped > 0) {
        this.#log.info("{bytes} bytes of output were not taken by the {kind} of port {port}", {
          bytes: this.#terminalSkipped,
          kind: t.kind,
          port: this.id,
        });
      }
      this.#config.terminal = undefined;
    }
    this.#acceptor?.close();
    this.#acceptor = null;
    if (this.#config.attachFd >= 0) {
      closeQuietly(this.#config.attachFd);
      this.#config.attachFd = -1;
      if (this.#config.attachPath) removeQuietly(this.#config.attachPath);
    }
    this.#consoleLog?.close();
    if (this.#config.log) this.#config.log.fd = -1;
  }
}

function removeQuietly(path: string): void {
  try {
    Deno.removeSync(path);
  } catch {
    // already gone
  }
}
