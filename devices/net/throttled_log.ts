/**
 * Log lines a guest can cause (a spoofed address, a full learning quota, an announcement while
 * stopped), rate-limited so that a guest cannot flood the log: a few at once, then a few per
 * minute. Lines held back are counted, and the next line that goes out says how many.
 *
 * @module
 */

import type { Logger } from "../../log/mod.ts";
import { TokenBucket } from "./token_bucket.ts";

/** Lines let through at once. */
export const LOG_BURST = 5;
/** Lines per minute after the burst. */
export const LOG_PER_MINUTE = 6;

/** A logger with a token bucket in front of it (one per source, e.g. per port). */
export class ThrottledLog {
  readonly #log: Logger;
  readonly #bucket: TokenBucket;
  #held = 0;

  /** Warnings go to `log`, at most `burst` at once and `perMinute` a minute after that. */
  constructor(log: Logger, burst: number = LOG_BURST, perMinute: number = LOG_PER_MINUTE) {
    this.#log = log;
    this.#bucket = new TokenBucket(perMinute / 60, burst);
  }

  /** Lines held back since the last one that went out. */
  get held(): number {
    return this.#held;
  }

  /** Logs `message` at warning level at time `now` (ms), unless the bucket is empty. */
  warn(now: number, message: string, properties: Record<string, unknown>): void {
    this.#write("warn", now, message, properties);
  }

  /** Logs `message` at info level at time `now` (ms), unless the bucket is empty. */
  info(now: number, message: string, properties: Record<string, unknown>): void {
    this.#write("info", now, message, properties);
  }

  #write(
    level: "warn" | "info",
    now: number,
    message: string,
    properties: Record<string, unknown>,
  ): void {
    if (!this.#bucket.take(now)) {
      this.#held++;
      return;
    }
    if (this.#held === 0) {
      this.#log[level](message, properties);
      return;
    }
    this.#log[level](`${message} ({held} more such lines were not logged)`, {
      ...properties,
      held: this.#held,
    });
    this.#held = 0;
  }
}
