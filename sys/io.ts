/**
 * Scatter-gather file I/O straight into and out of guest memory.
 *
 * The hot path returns negative errno values instead of throwing: an I/O error is an ordinary
 * outcome to report to the guest, not an exceptional one.
 *
 * @module
 */

import { Errno, errno, libc } from "./libc.ts";

/** fallocate modes. */
export const FALLOC_FL_KEEP_SIZE = 0x01;
/** Deallocates the range (must be combined with KEEP_SIZE). */
export const FALLOC_FL_PUNCH_HOLE = 0x02;
/** Zeroes the range, keeping it allocated. */
export const FALLOC_FL_ZERO_RANGE = 0x10;

/**
 * A preallocated `struct iovec` array. Addresses are host virtual addresses as `number`s
 * (exact below 2^53), written as two u32 halves so no BigInt or pointer object is needed.
 */
export class IoVec {
  /** The iovec array as the kernel reads it. */
  readonly words: Uint32Array<ArrayBuffer>;
  /** The same memory as bytes, passed to `preadv`/`pwritev`. */
  readonly bytes: Uint8Array<ArrayBuffer>;
  /** Entries in use. */
  count = 0;
  /** Sum of the entries' lengths. */
  total = 0;
  /** Capacity in entries. */
  readonly capacity: number;
  /** Address of the iovec array itself (for io_uring submissions). */
  readonly address: number;

  /** Allocates room for `capacity` entries (the kernel accepts at most 1024). */
  constructor(capacity: number) {
    this.capacity = capacity;
    this.words = new Uint32Array(capacity * 4);
    this.bytes = new Uint8Array(this.words.buffer);
    this.address = Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(this.words)));
  }

  /** Empties the array. */
  clear(): void {
    this.count = 0;
    this.total = 0;
  }

  /** Appends one buffer; returns false when the array is full. */
  push(address: number, length: number): boolean {
    if (this.count === this.capacity) return false;
    const w = this.count * 4;
    this.words[w] = address >>> 0;
    this.words[w + 1] = Math.floor(address / 4294967296);
    this.words[w + 2] = length;
    this.words[w + 3] = 0;
    this.count++;
    this.total += length;
    return true;
  }

  /** Drops the first `n` bytes (after a short transfer), adjusting the first remaining entry. */
  advance(n: number): void {
    const w = this.words;
    let first = 0;
    while (n > 0 && first < this.count) {
      const len = w[first * 4 + 2];
      if (n >= len) {
        n -= len;
        this.total -= len;
        first++;
      } else {
        const a = w[first * 4] + w[first * 4 + 1] * 4294967296 + n;
        w[first * 4] = a >>> 0;
        w[first * 4 + 1] = Math.floor(a / 4294967296);
        w[first * 4 + 2] = len - n;
        this.total -= n;
        n = 0;
      }
    }
    if (first > 0) {
      w.copyWithin(0, first * 4, this.count * 4);
      this.count -= first;
    }
  }
}

/**
 * Reads `iov.total` bytes at `offset`, retrying short reads. Returns the bytes read (less than
 * asked only at end of file) or a negative errno. Consumes `iov`.
 */
export function preadvFull(fd: number, iov: IoVec, offset: number): number {
  let done = 0;
  while (iov.count > 0) {
    const n = Number(libc.preadv(fd, iov.bytes, iov.count, BigInt(offset + done)));
    if (n < 0) {
      const err = errno();
      if (err === Errno.EINTR) continue;
      return -err;
    }
    if (n === 0) break;
    done += n;
    iov.advance(n);
  }
  return done;
}

/** Writes `iov.total` bytes at `offset`, retrying short writes. Returns bytes or negative errno. */
export function pwritevFull(fd: number, iov: IoVec, offset: number): number {
  let done = 0;
  while (iov.count > 0) {
    const n = Number(libc.pwritev(fd, iov.bytes, iov.count, BigInt(offset + done)));
    if (n < 0) {
      const err = errno();
      if (err === Errno.EINTR) continue;
      return -err;
    }
    if (n === 0) return -Errno.EIO;
    done += n;
    iov.advance(n);
  }
  return done;
}

/** fdatasync; returns 0 or a negative errno. */
export function fdatasync(fd: number): number {
  return libc.fdatasync(fd) < 0 ? -errno() : 0;
}

/** fallocate; returns 0 or a negative errno. */
/** sync_file_range's SYNC_FILE_RANGE_WRITE: start writing dirty pages back, without waiting. */
const SYNC_FILE_RANGE_WRITE = 2;

/**
 * Starts write-back of every dirty page of `fd` and returns without waiting for it (it only
 * blocks while the disk's request queue is full); 0 or a negative errno. Durability still needs
 * {@link fdatasync}, which then has less to write.
 */
export function startWriteback(fd: number): number {
  return libc.sync_file_range(fd, 0n, 0n, SYNC_FILE_RANGE_WRITE) < 0 ? -errno() : 0;
}

export function fallocate(fd: number, mode: number, offset: number, length: number): number {
  return libc.fallocate(fd, mode, BigInt(offset), BigInt(length)) < 0 ? -errno() : 0;
}

/**
 * Writes all of `data` to `fd`; false when a write fails. With `mayBlock`, EAGAIN is retried (a log
 * file may block briefly); without it a full non-blocking fd is a failure, so that a console
 * client that does not keep up is dropped rather than stalling every other port and the guest.
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
