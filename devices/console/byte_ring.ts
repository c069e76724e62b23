/**
 * A fixed-size byte ring: the scrollback of a port (old bytes are overwritten) and the input
 * waiting for guest buffers (bounded: writers are told how much fitted).
 *
 * @module
 */

/** A circular byte buffer that never grows. */
export class ByteRing {
  /** Capacity in bytes. */
  readonly capacity: number;
  readonly #buf: Uint8Array;
  #start = 0;
  #length = 0;

  /** Allocates `capacity` bytes once. */
  constructor(capacity: number) {
    if (!Number.isInteger(capacity) || capacity < 1) {
      throw new RangeError(`bad capacity ${capacity}`);
    }
    this.capacity = capacity;
    this.#buf = new Uint8Array(capacity);
  }

  /** Bytes held. */
  get length(): number {
    return this.#length;
  }

  /** Room left before {@link write} refuses bytes. */
  get free(): number {
    return this.capacity - this.#length;
  }

  /** Appends what fits of `src`; returns how many bytes were taken. */
  write(src: Uint8Array): number {
    const n = Math.min(src.length, this.free);
    this.#put(src.subarray(0, n));
    return n;
  }

  /** Appends all of `src`, dropping the oldest bytes to make room (scrollback). */
  append(src: Uint8Array): void {
    if (src.length >= this.capacity) {
      this.#start = 0;
      this.#length = 0;
      this.#put(src.subarray(src.length - this.capacity));
      return;
    }
    const excess = src.length - this.free;
    if (excess > 0) this.consume(excess);
    this.#put(src);
  }

  #put(src: Uint8Array): void {
    if (src.length === 0) return;
    const end = (this.#start + this.#length) % this.capacity;
    const first = Math.min(src.length, this.capacity - end);
    this.#buf.set(src.subarray(0, first), end);
    if (first < src.length) this.#buf.set(src.subarray(first), 0);
    this.#length += src.length;
  }

  /**
   * The held bytes as at most two views into the ring (oldest first), valid until the next
   * write. `part` 0 is the first piece, 1 the wrapped-around rest (possibly empty).
   */
  segment(part: 0 | 1): Uint8Array {
    const firstLen = Math.min(this.#length, this.capacity - this.#start);
    if (part === 0) return this.#buf.subarray(this.#start, this.#start + firstLen);
    return this.#buf.subarray(0, this.#length - firstLen);
  }

  /** Drops the `n` oldest bytes. */
  consume(n: number): void {
    n = Math.min(n, this.#length);
    this.#start = (this.#start + n) % this.capacity;
    this.#length -= n;
    if (this.#length === 0) this.#start = 0;
  }

  /** Copies everything held into a new array (for tests and snapshots). */
  toBytes(): Uint8Array {
    const a = this.segment(0), b = this.segment(1);
    const out = new Uint8Array(a.length + b.length);
    out.set(a);
    out.set(b, a.length);
    return out;
  }
}
