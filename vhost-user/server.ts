/**
 * The data-plane event loop of one device: it accepts one front-end at a time on the listening
 * socket, handles its messages, and services queues when they are kicked. It blocks in
 * `epoll_wait` and is meant to run inside a worker.
 *
 * Anything a front-end does wrong (a malformed message, a socket error, even a bug it triggers in
 * the device) ends that connection with one log line; the loop then waits for the next front-end.
 *
 * @module
 */

import { getLogger, type Logger } from "../log/mod.ts";
import { drainEventFd } from "../sys/event.ts";
import { closeQuietly, Errno, setNonBlocking, SysError } from "../sys/libc.ts";
import { monotonicMs } from "../sys/clock.ts";
import {
  acceptUnix,
  PeerClosedError,
  type PeerCredentials,
  peerCredentials,
} from "../sys/socket.ts";
import type { DeviceEventLoop, VirtioDevice, Virtqueue } from "../devices/device.ts";
import { type BackendOptions, type KickWatcher, VhostUserBackend } from "./backend.ts";
import { Connection } from "./connection.ts";
import type { EventLoop } from "./event_loop.ts";
import { requestName } from "./message.ts";
import { QueueStat } from "../ring/queue_stats.ts";

/** Server options. */
export interface ServerOptions extends BackendOptions {
  /** User ids allowed to connect (default: anyone who can open the socket). */
  allowUids?: number[];
  /**
   * Time a front-end may take to send the rest of a message it started, in ms (default 2000);
   * then its connection is dropped. Nothing waits for it meanwhile: other sockets are served.
   */
  messageTimeoutMs?: number;
  /**
   * Called after anything `status` shows may have changed: a front-end connected or left, a
   * control message was handled, a queue broke. Never called per request.
   */
  onStateChange?: (server: VhostUserServer) => void;
  /**
   * This device's busy-poll window in µs (default: the loop's). A device that asks for 0 is never
   * polled, even on a loop that polls for another device sharing it.
   */
  pollUs?: number;
}

/** Messages handled per wake-up before the loop gives other fds a turn. */
const MESSAGES_PER_WAKE = 16;
/** Default of {@link ServerOptions.messageTimeoutMs}. */
const MESSAGE_TIMEOUT_MS = 2000;
/** How long accepting pauses when the process is out of fds. */
const ACCEPT_PAUSE_MS = 1000;

/**
 * One device's vhost-user server on a shared {@link EventLoop}: it accepts one front-end at a time,
 * handles its messages, and services the device's queues when they are kicked.
 */
export class VhostUserServer implements KickWatcher, DeviceEventLoop {
  /** The protocol state. */
  readonly backend: VhostUserBackend;
  /** The connected front-end's credentials, if any. */
  peer: PeerCredentials | null = null;
  readonly #listenFd: number;
  readonly #loop: EventLoop;
  readonly #options: ServerOptions;
  readonly #log: Logger;
  /** Whether the loop busy-polls this device's queues (kicks off while it does). */
  readonly #polling: boolean;
  #conn: Connection | null = null;

  /** Serves `device` on the already listening socket `listenFd`, in `loop`. */
  constructor(
    listenFd: number,
    device: VirtioDevice,
    loop: EventLoop,
    options: ServerOptions = {},
  ) {
    this.#listenFd = listenFd;
    this.#loop = loop;
    this.#options = options;
    this.#log = getLogger(["vhostd", device.name]);
    this.backend = new VhostUserBackend(device, this, options);
    this.#polling = (options.pollUs ?? loop.pollUs) > 0 && this.backend.polled.includes(true);
    if (this.#polling) loop.raisePollUs(options.pollUs ?? loop.pollUs);
  }

  /** Registers a queue's kick eventfd. */
  watchKick(fd: number, queue: number): void {
    this.#loop.watch(fd, () => this.#kick(queue));
  }

  /** Unregisters a kick eventfd. */
  unwatchKick(fd: number): void {
    this.#loop.unwatch(fd);
  }

  /** Watches a device's own fd; an exception from `handler` drops the front-end. */
  watch(fd: number, handler: () => void): void {
    this.#loop.watch(fd, () => {
      try {
        handler();
      } catch (e) {
        this.#disconnect(`dropping the front-end: device event: ${errorText(e)}`, true);
      }
    });
  }

  /** Stops watching a device's fd. */
  unwatch(fd: number): void {
    this.#loop.unwatch(fd);
  }

  /** A queue the device may push to now, or null. */
  queue(index: number): Virtqueue | null {
    const q = this.backend.queues[index];
    return q !== undefined && q.ready ? q : null;
  }

  /** Interrupts the driver for a queue the device pushed to outside a kick. */
  notify(index: number): void {
    const q = this.backend.queues[index];
    if (q === undefined || this.backend.stopIfBroken(index)) return;
    if (q.ready) q.notify();
  }

  /**
   * The device's config space changed: tell the connected front-end (see
   * {@link VhostUserBackend.announceConfigChange}). Without one there is nobody to tell: the next
   * front-end reads the config when it connects.
   */
  configChanged(): boolean {
    return this.#conn !== null && this.backend.announceConfigChange();
  }

  /** Starts listening for front-ends and lets the device register its own fds. */
  start(): void {
    this.#loop.watch(this.#listenFd, () => this.#accept());
    this.#loop.addTick(this.#timers);
    if (this.#polling) this.#loop.addPoller(this.#poller);
    this.backend.device.start?.(this);
  }

  /** The busy-poll hooks. */
  readonly #poller = {
    poll: (): boolean => this.#pollWork(false),
    arm: (): boolean => this.#pollWork(true),
  };

  /** Polls the queues (or arms them); a failure drops the front-end, as it would in a kick. */
  #pollWork(arm: boolean): boolean {
    if (this.#conn === null) return false;
    try {
      return arm ? this.backend.armQueues() : this.backend.pollQueues();
    } catch (e) {
      this.#disconnect(`dropping the front-end: ${errorText(e)}`, true);
      return false;
    }
  }

  /** A queue broke and was stopped: status shows it. */
  queueStopped(): void {
    this.#options.onStateChange?.(this);
  }

  /** Drops any front-end and stops listening. */
  close(): void {
    if (this.#conn) this.#disconnect("the daemon is shutting down");
    this.#acceptPausedAt = 0;
    this.#loop.unwatch(this.#listenFd);
    this.#loop.removePoller(this.#poller);
    this.#loop.removeTick(this.#timers);
  }
  #accept(): void {
    let fd: number;
    try {
      fd = acceptUnix(this.#listenFd);
    } catch (e) {
      this.#log.warn("accept failed: {error}", { error: String(e) });
      if (e instanceof SysError && (e.errno === Errno.EMFILE || e.errno === Errno.ENFILE)) {
        // Out of fds: the pending connection stays readable, and retrying at once would spin
        // (and flood the log). Stop listening for a second; the timer tick resumes.
        this.#loop.unwatch(this.#listenFd);
        this.#acceptPausedAt = monotonicMs();
        this.#loop.wakeTicks();
      }
      return;
    }
    let cred: PeerCredentials;
    try {
      cred = peerCredentials(fd);
    } catch (e) {
      this.#log.warn("refusing a front-end whose credentials cannot be read: {error}", {
        error: String(e),
      });
      closeQuietly(fd);
      return;
    }
    const allow = this.#options.allowUids;
    if (allow && !allow.includes(cred.uid)) {
      this.#log.warn("refusing front-end pid {pid} uid {uid}: uid not allowed", { ...cred });
      closeQuietly(fd);
      return;
    }
    // QEMU redials as soon as it sees our side close; its old connection's EOF may still be
    // waiting in the same epoll batch. A dead connection must not lock the new one out.
    if (this.#conn !== null && this.#conn.socket.peerClosed()) {
      this.#disconnect("front-end closed the connection");
    }
    if (this.#conn !== null) {
      this.#log.warn(
        "refusing front-end pid {pid} uid {uid}: another front-end (pid {current}) is connected",
        { ...cred, current: this.peer?.pid },
      );
      closeQuietly(fd);
      return;
    }
    // Non-blocking: a message trickling in is assembled across wake-ups (see #message), and a
    // front-end that stops reading its replies fails its own send instead of stalling the loop.
    setNonBlocking(fd);
    this.#conn = new Connection(fd);
    this.peer = cred;
    this.#loop.watch(fd, () => this.#message());
    this.#log.info("front-end connected: pid {pid} uid {uid}", { ...cred });
    this.#options.onStateChange?.(this);
  }

  #message(): void {
    const conn = this.#conn;
    if (conn === null) return;
    let request = 0;
    try {
      for (let i = 0; i < MESSAGES_PER_WAKE && this.#conn === conn; i++) {
        const m = conn.poll();
        if (m === null) {
          // Part of a message came: the deadline tick watches it from now on.
          if (conn.partialSince > 0) this.#loop.wakeTicks();
          return;
        }
        request = m.request;
        this.#log.debug("{request} flags 0x{flags} size {size} fds {fds}", {
          request: requestName(m.request),
          flags: m.flags.toString(16),
          size: m.payload.byteLength,
          fds: m.fds.length,
        });
        this.backend.handle(m, conn);
        this.#options.onStateChange?.(this);
        request = 0;
      }
    } catch (e) {
      if (e instanceof PeerClosedError) {
        this.#disconnect("front-end closed the connection");
      } else {
        let why = errorText(e);
        if (e instanceof SysError && e.errno === Errno.EAGAIN) {
          why = "its socket is full: the front-end does not read the replies";
        }
        // Most refusals already start with the request's name: name it once.
        const name = request ? requestName(request) : "";
        const what = name && !why.startsWith(name) ? `${name}: ` : "";
        this.#disconnect(`dropping the front-end: ${what}${why}`, true);
      }
    }
  }

  /** When accepting was paused for want of fds (0: it is not). */
  #acceptPausedAt = 0;

  /**
   * Timed work, run by the loop only while some is pending: drop a front-end whose message has
   * been part-way in for too long (see messageTimeoutMs), resume accepting after a pause.
   */
  readonly #timers = {
    intervalMs: 250,
    run: (): boolean => {
      const now = monotonicMs();
      let pending = false;
      if (this.#acceptPausedAt > 0) {
        if (now - this.#acceptPausedAt < ACCEPT_PAUSE_MS) pending = true;
        else {
          this.#acceptPausedAt = 0;
          this.#loop.watch(this.#listenFd, () => this.#accept());
        }
      }
      const since = this.#conn?.partialSince ?? 0;
      if (since === 0) return pending;
      const limit = this.#options.messageTimeoutMs ?? MESSAGE_TIMEOUT_MS;
      if (now - since < limit) return true;
      this.#disconnect(
        `dropping the front-end: it sent part of a message and not the rest within ${limit} ms`,
        true,
      );
      return pending;
    },
  };

  #kick(queue: number): void {
    const q = this.backend.queues[queue];
    if (q === undefined || q.kickFd < 0) return;
    q.stats[QueueStat.KICKS]++;
    try {
      drainEventFd(q.kickFd);
      this.backend.serviceQueue(queue, this.#polling && this.backend.polled[queue]);
    } catch (e) {
      this.#disconnect(`dropping the front-end: queue ${queue}: ${errorText(e)}`, true);
    }
  }

  #disconnect(reason: string, error = false): void {
    const conn = this.#conn;
    if (conn === null) return;
    if (error) this.#log.error(reason);
    else this.#log.info(reason);
    this.#loop.unwatch(conn.fd);
    this.#conn = null;
    this.peer = null;
    try {
      this.backend.disconnect();
    } finally {
      conn.close();
      this.#options.onStateChange?.(this);
    }
  }
}

function errorText(e: unknown): string {
  if (e instanceof SysError || e instanceof Error) return e.message;
  return String(e);
}
