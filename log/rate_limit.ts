/**
 * Rate limits for log lines that someone outside the daemon can cause again and again: a guest's
 * control messages, a client attaching and leaving, a refused connection. Without them a guest in
 * a loop fills the host's journal and drowns everything else in it.
 *
 * Each message template gets its own budget, so that a flood of one kind of line does not hide
 * the others, and the first line let through after a flood says how many like it were dropped.
 *
 * @example
 * ```ts
 * import { getLogger } from "./mod.ts";
 * import { rateLimited } from "./rate_limit.ts";
 * const log = rateLimited(getLogger(["vhostd", "console"]));
 * for (let i = 0; i < 1000; i++) log.warn("ignoring control event {event}", { event: 99 });
 * // 10 lines, then one every 6 s, each saying how many were dropped before it
 * ```
 *
 * @module
 */

import type { Logger } from "./mod.ts";

/** How many events a {@link RateLimiter} lets through. */
export interface RateLimit {
  /** Events let through at once after a quiet spell. */
  burst: number;
  /** One more event is let through per this many milliseconds. */
  intervalMs: number;
}

/** The limit of each guest-triggered line: 10 at once, then one every 6 s (10 a minute). */
export const GUEST_LOG_LIMIT: RateLimit = { burst: 10, intervalMs: 6000 };

/** A token bucket: {@link RateLimit.burst} tokens, one more every {@link RateLimit.intervalMs}. */
export class RateLimiter {
  readonly #limit: RateLimit;
  #tokens: number;
  #refilledAt: number;
  #dropped = 0;

  /** A full bucket at `now` (milliseconds on any monotonic clock). */
  constructor(limit: RateLimit, now: number = performance.now()) {
    if (!(limit.burst >= 1) || !(limit.intervalMs > 0)) {
      throw new RangeError(`bad rate limit: ${JSON.stringify(limit)}`);
    }
    this.#limit = limit;
    this.#tokens = limit.burst;
    this.#refilledAt = now;
  }

  /** Whether an event at `now` may go through; one that may not is counted as dropped. */
  admit(now: number = performance.now()): boolean {
    const { burst, intervalMs } = this.#limit;
    const earned = Math.floor((now - this.#refilledAt) / intervalMs);
    if (earned > 0) {
      this.#tokens = Math.min(burst, this.#tokens + earned);
      this.#refilledAt = this.#tokens === burst ? now : this.#refilledAt + earned * intervalMs;
    }
    if (this.#tokens === 0) {
      this.#dropped++;
      return false;
    }
    this.#tokens--;
    return true;
  }

  /** Events dropped since the last call (the count starts again from 0). */
  takeDropped(): number {
    const n = this.#dropped;
    this.#dropped = 0;
    return n;
  }
}

/** A log call: a message template and its properties. */
type LogCall = (message: string, properties?: Record<string, unknown>) => void;

/**
 * Wraps `logger` so that each of its message templates is let through at most as `limit` says
 * ({@link GUEST_LOG_LIMIT} by default). Use it for every line that a guest, a front-end or a
 * console client can cause at will.
 */
export function rateLimited(logger: Logger, limit: RateLimit = GUEST_LOG_LIMIT): Logger {
  // One bucket per template: the templates are the code's own, so the map stays small.
  const limiters = new Map<string, RateLimiter>();
  const limited = (write: LogCall): LogCall => (message, properties) => {
    let limiter = limiters.get(message);
    if (limiter === undefined) {
      limiter = new RateLimiter(limit);
      limiters.set(message, limiter);
    }
    if (!limiter.admit()) return;
    const dropped = limiter.takeDropped();
    if (dropped === 0) write(message, properties);
    else write(`${message} ({dropped} more like this dropped)`, { ...properties, dropped });
  };
  return {
    category: logger.category,
    trace: limited(logger.trace.bind(logger)),
    debug: limited(logger.debug.bind(logger)),
    info: limited(logger.info.bind(logger)),
    warn: limited(logger.warn.bind(logger)),
    error: limited(logger.error.bind(logger)),
    fatal: limited(logger.fatal.bind(logger)),
  };
}
