/**
 * The data-plane worker's event loop: one epoll set, a handler per fd, blocking in `epoll_wait`
 * through synchronous FFI. Several vhost-user servers (one per socket) can share one loop, which
 * is how a switch moves frames between guests without leaving its thread.
 *
 * @module
 */

import { getLogger } from "@logtape/logtape";
import { drainEventFd, Epoll } from "../sys/event.ts";

/** Periodic work run between events (for back-pressure retries). */
export interface LoopTick {
  /** How often, at most, in milliseconds. */
  intervalMs: number;
  /** Returns whether it still has work (when false, the loop may sleep indefinitely). */
  run(): boolean;
}

/** An epoll loop dispatching readiness to per-fd handlers. */
export class EventLoop {
  /** The epoll instance. */
  readonly epoll: Epoll = new Epoll(128);
  readonly #handlers = new Map<number, () => void>();
  readonly #tokens = new Map<number, number>();
  readonly #ticks: LoopTick[] = [];
  #nextToken = 1;
  #busyTicks = false;

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

  /** Asks the ticks to run soon (a device queued work that waits on a tick). */
  wakeTicks(): void {
    this.#busyTicks = this.#ticks.length > 0;
  }

  /**
   * Runs until `stopFd` (an eventfd) is signalled. A handler that throws is logged and the loop
   * goes on: one misbehaving peer must not stop the others sharing this thread.
   */
  run(stopFd: number): void {
    let stop = false;
    this.watch(stopFd, () => {
      drainEventFd(stopFd);
      stop = true;
    });
    const ep = this.epoll;
    const interval = this.#ticks.length ? Math.min(...this.#ticks.map((t) => t.intervalMs)) : -1;
    while (!stop) {
      const n = ep.wait(this.#busyTicks ? interval : -1);
      for (let i = 0; i < n && !stop; i++) {
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

  /** Closes the epoll fd. */
  close(): void {
    this.epoll.close();
  }
}
