/**
 * A descriptor chain popped from a virtqueue, flattened into device-readable segments followed by
 * device-writable segments. Every segment was bounds-checked against guest memory when the chain
 * was parsed, so the accessors below never reach outside guest RAM.
 *
 * The object is preallocated per queue and refilled by each pop: the hot path allocates nothing.
 *
 * @module
 */

import type { IoVec } from "../sys/io.ts";
import type { MemoryRegion } from "./guest_memory.ts";

/** Most segments one chain may have (the kernel's IOV_MAX). */
export const MAX_SEGMENTS = 1024;

/** Where one byte of guest memory is: a view and an index into it (kept by async devices). */
export interface ByteRef {
  /** The region's bytes. */
  u8: Uint8Array;
  /** Index of the byte in {@link u8}. */
  offset: number;
}

/**
 * A parsed descriptor chain: the device's view of one request. Read-only: only the queue that
 * parsed the chain fills it, so every segment stays one the queue bounds-checked.
 *
 * Segment `i` is `region[i].u8[offset[i] .. offset[i] + length[i]]` (host address `address[i]`);
 * the readable segments come first. Most devices need only the copying and iovec methods.
 */
export interface DescriptorChain {
  /** Index of the head descriptor, reported back in the used ring. */
  readonly head: number;
  /** Number of device-readable segments (they come first). */
  readonly readableCount: number;
  /** Number of device-writable segments. */
  readonly writableCount: number;
  /** Total number of segments. */
  readonly segmentCount: number;
  /** Total bytes the device may read. */
  readonly readableBytes: number;
  /** Total bytes the device may write. */
  readonly writableBytes: number;
  /** Host virtual address of each segment. */
  readonly address: ArrayLike<number>;
  /** Length of each segment. */
  readonly length: ArrayLike<number>;
  /** Index of each segment's first byte in its region's views. */
  readonly offset: ArrayLike<number>;
  /** Guest memory region of each segment. */
  readonly region: readonly (MemoryRegion | null)[];
  /** Copies readable bytes starting at byte `from` into `dst`; returns how many were copied. */
  read(dst: Uint8Array, from?: number): number;
  /** Copies `src` into the writable space starting at byte `at`; returns how many were copied. */
  write(src: Uint8Array, at?: number): number;
  /** Writes one byte at offset `at` of the writable space; false if out of range. */
  writeByte(at: number, value: number): boolean;
  /** Points `ref` at byte `at` of the writable space (for completing later); false if none. */
  writableByte(at: number, ref: ByteRef): boolean;
  /** Appends the readable range [from, from+length) to `iov`; false if it does not fit. */
  readableIoVec(iov: IoVec, from: number, length: number): boolean;
  /** Appends the writable range [from, from+length) to `iov`; false if it does not fit. */
  writableIoVec(iov: IoVec, from: number, length: number): boolean;
  /** Views of the readable segments (allocates: a convenience for simple devices). */
  readableViews(): Uint8Array[];
  /** Views of the writable segments (allocates: a convenience for simple devices). */
  writableViews(): Uint8Array[];
}

/**
 * The queue's side of a {@link DescriptorChain}: one per queue, emptied and refilled by each pop
 * while the queue bounds-checks every descriptor (so the hot path allocates nothing). Devices
 * see it only as the read-only {@link DescriptorChain}.
 */
export class ParsedChain implements DescriptorChain {
  /** Index of the head descriptor, reported back in the used ring. */
  head = 0;
  /** Number of device-readable segments (they come first). */
  readableCount = 0;
  /** Total number of segments. */
  segmentCount = 0;
  /** Total bytes the device may read. */
  readableBytes = 0;
  /** Total bytes the device may write. */
  writableBytes = 0;
  /** Host virtual address of each segment. */
  readonly address: Float64Array = new Float64Array(MAX_SEGMENTS);
  /** Length of each segment. */
  readonly length: Uint32Array = new Uint32Array(MAX_SEGMENTS);
  /** Index of each segment's first byte in its region's views. */
  readonly offset: Float64Array = new Float64Array(MAX_SEGMENTS);
  /** Region of each segment. */
  readonly region: (MemoryRegion | null)[] = new Array(MAX_SEGMENTS).fill(null);

  /** Number of device-writable segments. */
  get writableCount(): number {
    return this.segmentCount - this.readableCount;
  }

  /** Empties the chain before it is refilled. */
  reset(head: number): void {
    this.head = head;
    this.readableCount = 0;
    this.segmentCount = 0;
    this.readableBytes = 0;
    this.writableBytes = 0;
  }

  /** Appends a segment (the queue has already bounds-checked it). */
  addSegment(region: MemoryRegion, offset: number, length: number, writable: boolean): void {
    const i = this.segmentCount++;
    this.region[i] = region;
    this.offset[i] = offset;
    this.length[i] = length;
    this.address[i] = region.hostAddress - region.base + offset;
    if (writable) this.writableBytes += length;
    else {
      this.readableCount++;
      this.readableBytes += length;
    }
  }

  /** Copies readable bytes starting at byte `from` into `dst`; returns how many were copied. */
  read(dst: Uint8Array, from = 0): number {
    return this.#copy(0, this.readableCount, from, dst, false);
  }

  /** Copies `src` into the writable space starting at byte `at`; returns how many were copied. */
  write(src: Uint8Array, at = 0): number {
    return this.#copy(this.readableCount, this.segmentCount, at, src, true);
  }

  /** Writes one byte at offset `at` of the writable space; false if out of range. */
  writeByte(at: number, value: number): boolean {
    for (let i = this.readableCount; i < this.segmentCount; i++) {
      const len = this.length[i];
      if (at < len) {
        this.region[i]!.u8[this.offset[i] + at] = value;
        return true;
      }
      at -= len;
    }
    return false;
  }

  /** Points `ref` at byte `at` of the writable space (for completing later); false if none. */
  writableByte(at: number, ref: ByteRef): boolean {
    for (let i = this.readableCount; i < this.segmentCount; i++) {
      const len = this.length[i];
      if (at < len) {
        ref.u8 = this.region[i]!.u8;
        ref.offset = this.offset[i] + at;
        return true;
      }
      at -= len;
    }
    return false;
  }

  /** Appends the readable range [from, from+length) to `iov`; false if it does not fit. */
  readableIoVec(iov: IoVec, from: number, length: number): boolean {
    return this.#iovec(0, this.readableCount, from, length, iov);
  }

  /** Appends the writable range [from, from+length) to `iov`; false if it does not fit. */
  writableIoVec(iov: IoVec, from: number, length: number): boolean {
    return this.#iovec(this.readableCount, this.segmentCount, from, length, iov);
  }

  /** Views of the readable segments (allocates: a convenience for simple devices). */
  readableViews(): Uint8Array[] {
    return this.#views(0, this.readableCount);
  }

  /** Views of the writable segments (allocates: a convenience for simple devices). */
  writableViews(): Uint8Array[] {
    return this.#views(this.readableCount, this.segmentCount);
  }

  #views(start: number, end: number): Uint8Array[] {
    const out: Uint8Array[] = [];
    for (let i = start; i < end; i++) {
      out.push(this.region[i]!.u8.subarray(this.offset[i], this.offset[i] + this.length[i]));
    }
    return out;
  }

  #copy(start: number, end: number, pos: number, buf: Uint8Array, toGuest: boolean): number {
    let done = 0;
    for (let i = start; i < end && done < buf.length; i++) {
      const len = this.length[i];
      if (pos >= len) {
        pos -= len;
        continue;
      }
      const n = Math.min(len - pos, buf.length - done);
      const u8 = this.region[i]!.u8;
      const off = this.offset[i] + pos;
      if (n <= 32) {
        if (toGuest) { for (let k = 0; k < n; k++) u8[off + k] = buf[done + k]; }
        else for (let k = 0; k < n; k++) buf[done + k] = u8[off + k];
      } else if (toGuest) {
        u8.set(buf.subarray(done, done + n), off);
      } else {
        buf.set(u8.subarray(off, off + n), done);
      }
      done += n;
      pos = 0;
    }
    return done;
  }

  #iovec(start: number, end: number, pos: number, length: number, iov: IoVec): boolean {
    for (let i = start; i < end && length > 0; i++) {
      const len = this.length[i];
      if (pos >= len) {
        pos -= len;
        continue;
      }
      const n = Math.min(len - pos, length);
      if (!iov.push(this.address[i] + pos, n)) return false;
      length -= n;
      pos = 0;
    }
    return length === 0;
  }
}
