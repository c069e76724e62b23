/**
 * A token bucket: at most `burst` events at once, and `rate` per second on average after that.
 * The switch gives every port one for the frames it floods, and one for the log lines a guest
 * can cause, so that no guest can swamp the others or the log.
 *
 * @module
 */

/** A token bucket refilled from the caller's clock (milliseconds); allocates nothing. */
export class TokenBucket {
  /** Tokens added per second. */
  readonly rate: number;
  /** Most tokens held (the largest burst). */
  readonly burst: number;
  #tokens: number;
  #at = 0;

  /** A full bucket of `burst` tokens refilled at `rate` per second. */
  constructor(rate: number, burst: number = rate) {
    if (!(rate > 0) || !(burst >= 1)) {
      throw new RangeError(`token bucket needs rate > 0 and burst >= 1 (got ${rate}, ${burst})`);
    }
    this.rate = rate;
    this.burst = burst;
    this.#tokens = burst;
  }

  /** Takes one token at time `now` (ms); false when the bucket is empty. */
  take(now: number): boolean {
    this.#refill(now);
    if (this.#tokens < 1) return false;
    this.#tokens -= 1;
    return true;
  }

  /** Tokens available at time `now` (ms), fractions included. */
  available(now: number): number {
    this.#refill(now);
    return this.#tokens;
  }

  #refill(now: number): void {
    // A clock that went backwards (or a first call) only restarts the refill from `now`.
    const elapsed = now - this.#at;
    this.#at = now;
    if (elapsed > 0) this.#tokens = Math.min(this.burst, this.#tokens + elapsed * this.rate / 1000);
  }
}
