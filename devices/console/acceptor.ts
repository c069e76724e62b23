/**
 * Accepting connections on a listening socket in a worker's epoll loop without spinning when
 * the process runs out of file descriptors.
 *
 * A listener is level-triggered: while a connection waits in its backlog, `epoll_wait` reports
 * it again at once. When accept fails for want of fds (EMFILE, ENFILE) or kernel memory (ENOBUFS,
 * ENOMEM) the connection stays queued, so trying again on the next wake-up would burn a CPU until
 * an fd is freed, starving the guest and every other port. The acceptor stops watching the
 * listener instead and tries again after a back-off, on a timerfd created up front (none could be
 * created once fds ran out).
 *
 * @module
 */

import type { Logger } from "../../log/mod.ts";
import { armTimerFd, createTimerFd, drainEventFd } from "../../sys/event.ts";
import { closeQuietly, Errno, setNonBlocking, SysError } from "../../sys/libc.ts";
import { writeAll } from "../../sys/io.ts";
import { acceptUnix } from "../../sys/socket.ts";
import type { FdWatcher } from "./port_hub.ts";

/** First back-off after a failed accept, in milliseconds; it doubles up to {@link MAX_BACKOFF_MS}. */
export const MIN_BACKOFF_MS = 50;
/** Longest back-off, in milliseconds. */
export const MAX_BACKOFF_MS = 2000;
/** Connections accepted per wake-up at most, so that one busy listener cannot hog the loop. */
const ACCEPT_BATCH = 16;

/** Accepts connections on one listening socket (Unix or TCP), backing off when fds run out. */
export class Acceptor {
  readonly #listenFd: number;
  readonly #loop: FdWatcher;
  readonly #onConnection: (fd: number) => void;
  readonly #log: Logger;
  readonly #what: string;
  readonly #timerFd: number;
  #backoffMs = MIN_BACKOFF_MS;
  #paused = false;

  /**
   * An acceptor of `listenFd` that hands each connection (a blocking, close-on-exec fd) to
   * `onConnection`; `what` names the socket in `log` (which should be rate-limited).
   */
  constructor(
    listenFd: number,
    loop: FdWatcher,
    onConnection: (fd: number) => void,
    log: Logger,
    what: string,
  ) {
    this.#listenFd = listenFd;
    this.#loop = loop;
    this.#onConnection = onConnection;
    this.#log = log;
    this.#what = what;
    this.#timerFd = createTimerFd();
  }

  /** Starts watching the listener (which must be non-blocking). */
  start(): void {
    this.#loop.watch(this.#listenFd, () => this.#accept());
  }

  /** Stops watching and closes the timer; the listener itself is the caller's to close. */
  close(): void {
    this.#loop.unwatch(this.#paused ? this.#timerFd : this.#listenFd);
    closeQuietly(this.#timerFd);
  }

  #accept(): void {
    for (let i = 0; i < ACCEPT_BATCH; i++) {
      let fd: number;
      try {
        fd = acceptUnix(this.#listenFd);
      } catch (e) {
        const err = e instanceof SysError ? e.errno : -1;
        // ECONNABORTED: the peer left before it was accepted; nothing to back off from.
        if (err === Errno.EAGAIN || err === Errno.EINTR || err === Errno.ECONNABORTED) return;
        this.#pause(e instanceof SysError ? e.code : String(e));
        return;
      }
      this.#backoffMs = MIN_BACKOFF_MS;
      this.#onConnection(fd);
    }
  }

  /** Stops watching the listener until the back-off has passed. */
  #pause(code: string): void {
    const ms = this.#backoffMs;
    this.#log.warn("cannot accept on {what}: {code}; trying again in {ms} ms", {
      what: this.#what,
      code,
      ms,
    });
    this.#backoffMs = Math.min(ms * 2, MAX_BACKOFF_MS);
    this.#loop.unwatch(this.#listenFd);
    armTimerFd(this.#timerFd, ms);
    this.#loop.watch(this.#timerFd, () => this.#resume());
    this.#paused = true;
  }

  #resume(): void {
    drainEventFd(this.#timerFd);
    this.#loop.unwatch(this.#timerFd);
    this.#loop.watch(this.#listenFd, () => this.#accept());
    this.#paused = false;
    this.#accept();
  }
}

/** Tells a peer something in one line (`vhostd: ...`), as much as its socket takes now. */
export function tell(fd: number, message: string): void {
  writeAll(fd, new TextEncoder().encode(`vhostd: ${message}\r\n`), false);
}

/**
 * Tells a refused peer why, without waiting for it (the socket is made non-blocking first: a
 * peer that reads nothing must not stall the loop), then closes the connection.
 */
export function refuse(fd: number, why: string): void {
  try {
    setNonBlocking(fd);
    tell(fd, why);
  } finally {
    closeQuietly(fd);
  }
}
