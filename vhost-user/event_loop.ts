/**
 * The data-plane worker's event loop: one epoll set, a handler per fd, blocking in `epoll_wait`
 * through synchronous FFI. Several vhost-user servers (one per socket) can share one loop, which
 * is how a switch moves frames between guests without leaving its thread.
 *
 * @module
 */

import { getLogger } from "../log/mod.ts";
import { drainEventFd, Epoll } from "../sys/event.ts";

/** Periodic work run between events (for back-pressure retries). */
export interface LoopTick {
  /** How often, at most, in milliseconds. */
  intervalMs: number;
  /** Returns whether it still has work (when false, the loop may sleep indefinitely). */
  run(): boolean;
}

/**
 * Work the loop looks for itself while it busy-polls: virtqueues whose kicks are switched off so
 * that the driver does not pay for them.
 */
export interface LoopPoller {
  /** Serves whatever is ready; returns whether there was anything. */
  poll(): boolean;
  /**
   * The loop is about to sleep: switch notifications back on. Returns true when work arrived
   * meanwhile, in which case the loop polls again instead of sleeping.
   */
  arm(): boolean;
}

/** Options of an {@link EventLoop}. */
export interface EventLoopOptions {
  /**
   * After the last event, keep polling (fds, and the {@link LoopPoller}s) for up to this many
   * microseconds before sleeping in epoll_wait; 0 (the default) sleeps at once. A wake-up from
   * epoll_wait costs far more CPU than a short poll, and polled virtqueues spare the driver its
   * kicks. The window adapts to how often events come (see the loop's run).
   */
  pollUs?: number;
}

/** An epoll loop dispatching readiness to per-fd handlers. */
export class EventLoop {
  /** The epoll instance. */
  readonly epoll: Epoll = new Epoll(128);
  /**
   * Busy-poll window in microseconds (0: none). A loop shared by several devices polls with the
   * largest window any of them asked for ({@link raisePollUs}).
   */
  get pollUs(): number {
    return this.#pollUs;
  }
  #pollUs: number;
  readonly #handlers = new Map<number, () => void>();
  readonly #tokens = new Map<number, number>();
  readonly #ticks: LoopTick[] = [];
  readonly #pollers: LoopPoller[] = [];
  #nextToken = 1;
  /** Set by the stop fd's handler: {@link run} returns. */
  #stopped = false;
  #busyTicks = false;
  /** Current busy-poll window in ms (adapts between 0 and {@link pollUs}). */
  #windowMs = 0;

  /** A loop; see {@link EventLoopOptions}. */
  constructor(options: EventLoopOptions = {}) {
    const us = options.pollUs ?? 0;
    if (!Number.isInteger(us) || us < 0) throw new RangeError(`bad poll window ${us} µs`);
    this.#pollUs = us;
  }

  /** Widens the busy-poll window to `us` if it is narrower (a device that polls joined). */
  raisePollUs(us: number): void {
    if (!Number.isInteger(us) || us < 0) throw new RangeError(`bad poll window ${us} µs`);
    if (us > this.#pollUs) this.#pollUs = us;
  }

  /** Calls `handler` whenever `fd` is readable or hung up, until {@link unwatch}. */
  watch(fd: number, handler: () => void): void {
    const token = this.#nextToken++;
    this.epoll.add(fd, token);
    this.#handlers.set(token, handler);
    this.#tokens.set(fd, token);
  }

  /** Stops watching `fd` (unknown fds are ignored). */
  unwatch(fd: number): void {
    const token = this.#tokens.get(fd);
    if (token === undefined) return;
    this.epoll.remove(fd);
    this.#tokens.delete(fd);
    this.#handlers.delete(token);
  }

  /** Adds periodic work; {@link LoopTick.run} says whether more is pending. */
  addTick(tick: LoopTick): void {
    this.#ticks.push(tick);
    this.#busyTicks = true;
  }

  /** Removes a tick added with {@link addTick} (its device left a shared loop). */
  removeTick(tick: LoopTick): void {
    const i = this.#ticks.indexOf(tick);
    if (i >= 0) this.#ticks.splice(i, 1);
  }

  /** Adds work to look for while busy-polling (only looked at while {@link pollUs} is above 0). */
  addPoller(poller: LoopPoller): void {
    this.#pollers.push(poller);
  }

  /** Removes a poller added with {@link addPoller}. */
  removePoller(poller: LoopPoller): void {
    const i = this.#pollers.indexOf(poller);
    if (i >= 0) this.#pollers.splice(i, 1);
  }

  /** Asks the ticks to run soon (a device queued work that waits on a tick). */
  wakeTicks(): void {
    this.#busyTicks = this.#ticks.length > 0;
  }

  /**
   * Runs until `stopFd` (an eventfd) is signalled, and returns the count it read from it (how
   * many times it was signalled). A handler that throws is logged and the loop goes on: one
   * misbehaving peer must not stop the others sharing this thread. It may run again afterwards.
   */
  run(stopFd: number): number {
    let signals = 0;
    this.#stopped = false;
    this.watch(stopFd, () => {
      signals = drainEventFd(stopFd);
      this.#stopped = true;
    });
    try {
      this.#serve();
    } finally {
      this.unwatch(stopFd);
    }
    return signals;
  }

  /** Dispatches events until the stop fd's handler sets {@link #stopped}. */
  #serve(): void {
    const ep = this.epoll;
    const interval = this.#ticks.length ? Math.min(...this.#ticks.map((t) => t.intervalMs)) : -1;
    while (!this.#stopped) {
      const timeout = this.#busyTicks ? interval : -1;
      const n = this.pollUs > 0 ? this.#pollThenWait(timeout) : ep.wait(timeout);
      for (let i = 0; i < n && !this.#stopped; i++) {
        const handler = this.#handlers.get(ep.readyTokens[i]);
        if (handler === undefined) continue;
        try {
          handler();
        } catch (e) {
          getLogger(["vhostd", "loop"]).error("event handler failed: {error}", {
            error: (e as Error).stack ?? String(e),
          });
        }
      }
      if (this.#busyTicks) {
        let busy = false;
        for (const t of this.#ticks) busy = t.run() || busy;
        this.#busyTicks = busy;
      }
    }
  }

  /**
   * Polls the fds and the pollers until something is ready or the window passes with nothing to
   * do; then arms the pollers and sleeps. Returns the number of ready fds (0: poll again).
   *
   * The window adapts to the gap between the last work and the next event, measured from when the
   * loop went idle (its polling included), as QEMU's AioContext polling does: a gap the window
   * covered is what polling is for, and the window stays; a gap longer than {@link pollUs} means
   * events come too slowly for polling to catch them, and the window closes (polling would only
   * burn CPU before the same sleep); a gap in between, which a longer window would have caught,
   * grows it (doubling from 4 µs). Judging by the sleep alone, as this loop once did, keeps a
   * full window open while every event comes just after it, polling and catching nothing.
   */
  #pollThenWait(timeoutMs: number): number {
    const ep = this.epoll;
    let idleSince = performance.now();
    if (this.#windowMs > 0) {
      let deadline = idleSince + this.#windowMs;
      for (;;) {
        const n = ep.wait(0);
        // Polled even when fds are ready: the polled queues' kicks are off, and an fd ready at
        // every turn (a long zeroing job, a busy peer) would otherwise starve them.
        let worked = false;
        for (const p of this.#pollers) worked = p.poll() || worked;
        if (n > 0) return n;
        const now = performance.now();
        if (worked) {
          idleSince = now;
          deadline = now + this.#windowMs;
        } else if (now >= deadline) break;
      }
    }
    if (this.#arm()) {
      // Work came in after the last poll, and the driver did not kick for it.
      let worked = false;
      for (const p of this.#pollers) worked = p.poll() || worked;
      if (worked) return 0;
      // Nothing could take it now (a block device out of io_uring slots resumes the queue itself
      // when a request completes): kicks back on, and sleep rather than spin.
      this.#arm();
    }
    const n = ep.wait(timeoutMs);
    const gap = performance.now() - idleSince;
    const max = this.pollUs / 1000;
    if (n === 0 || gap > max) this.#windowMs = 0;
    else if (gap > this.#windowMs) {
      this.#windowMs = Math.min(max, Math.max(0.004, this.#windowMs * 2));
    }
    return n;
  }

  /** Arms every poller; returns whether any found work waiting. */
  #arm(): boolean {
    let pending = false;
    for (const p of this.#pollers) pending = p.arm() || pending;
    return pending;
  }

  /** Closes the epoll fd. */
  close(): void {
    this.epoll.close();
  }
}
