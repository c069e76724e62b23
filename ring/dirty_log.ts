/**
 * The dirty log of a live migration (vhost-user `LOG_SHMFD`): a bitmap QEMU shares, one bit per
 * 4 KiB page of guest-physical memory. While QEMU copies guest RAM to the destination it reads
 * and clears the bitmap; every page the back-end writes (buffers it fills, used-ring updates) must
 * be marked after the write, or the destination runs with the page's older contents.
 *
 * The bits are set with atomic ORs: QEMU clears them concurrently with atomic exchanges.
 *
 * @module
 */

import { signalEventFd } from "../sys/event.ts";
import { closeQuietly } from "../sys/libc.ts";
import { type FdStat, fdStat } from "../sys/fd_kind.ts";
import { Mapping } from "../sys/mman.ts";

/** Size of a logged page (`VHOST_LOG_PAGE`). */
export const LOG_PAGE_SIZE = 4096;
/** Largest log accepted: 256 MiB of bits covers 8 TiB of guest memory. */
export const MAX_LOG_BYTES = 256 * 1024 * 1024;

const HOST_PAGE = 4096;

/** Thrown for a log the front-end describes wrongly (the caller turns it into a protocol error). */
export class DirtyLogError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "DirtyLogError";
  }
}

/** A mapped dirty bitmap, or none. */
export class DirtyLog {
  #mapping: Mapping | null = null;
  #bits: Uint8Array = new Uint8Array(0);
  #pages = 0;
  #notifyFd = -1;
  #marked = false;
  #outside = 0;

  /** Whether a bitmap is mapped. */
  get mapped(): boolean {
    return this.#mapping !== null;
  }

  /** Pages the bitmap covers. */
  get pages(): number {
    return this.#pages;
  }

  /** Marks that fell outside the bitmap since it was mapped (a front-end sizing bug). */
  get outside(): number {
    return this.#outside;
  }

  /**
   * Maps `size` bytes of bitmap at `offset` in `fd` (SET_LOG_BASE), replacing any earlier one.
   * The fd is checked to be at least that large, since touching a mapping past the end of its
   * file is SIGBUS, which would kill the whole process. The fd is always closed.
   */
  map(fd: number, size: number, offset: number): void {
    try {
      if (!Number.isSafeInteger(size) || size <= 0 || size > MAX_LOG_BYTES) {
        throw new DirtyLogError(`dirty log of ${size} bytes (1 to ${MAX_LOG_BYTES})`);
      }
      if (!Number.isSafeInteger(offset) || offset < 0) {
        throw new DirtyLogError(`dirty log at offset ${offset}`);
      }
      let stat: FdStat;
      try {
        stat = fdStat(fd);
      } catch (e) {
        throw new DirtyLogError(`dirty log fd cannot be read: ${(e as Error).message}`);
      }
      if (stat.kind !== "file") {
        throw new DirtyLogError(`dirty log fd is a ${stat.kind}, not a memory file`);
      }
      const fileSize = stat.size;
      if (offset + size > fileSize) {
        throw new DirtyLogError(
          `dirty log of ${size} bytes at offset ${offset} is larger than its fd (${fileSize} bytes)`,
        );
      }
      // mmap wants a page-aligned file offset: map from the page holding the first byte.
      const base = offset - (offset % HOST_PAGE);
      const mapping = Mapping.map(fd, size + (offset - base), base);
      this.unmap();
      this.#mapping = mapping;
      this.#bits = new Uint8Array(mapping.buffer, offset - base, size);
      this.#pages = size * 8;
      this.#outside = 0;
    } finally {
      closeQuietly(fd);
    }
  }

  /** Unmaps the bitmap (logging stopped, or the front-end left). */
  unmap(): void {
    this.#mapping?.unmap();
    this.#mapping = null;
    this.#bits = new Uint8Array(0);
    this.#pages = 0;
  }

  /** SET_LOG_FD: an eventfd to signal after marking pages (-1: none). The old one is closed. */
  setNotifyFd(fd: number): void {
    if (this.#notifyFd >= 0 && this.#notifyFd !== fd) closeQuietly(this.#notifyFd);
    this.#notifyFd = fd;
  }

  /** Marks every page of guest-physical [gpa, gpa + length) as written. */
  mark(gpa: number, length: number): void {
    if (length <= 0) return;
    const first = Math.floor(gpa / LOG_PAGE_SIZE);
    let last = Math.floor((gpa + length - 1) / LOG_PAGE_SIZE);
    if (last >= this.#pages) {
      // QEMU sizes the log to cover all guest memory; a page beyond it cannot be told apart.
      this.#outside++;
      last = this.#pages - 1;
    }
    const bits = this.#bits;
    let page = first;
    // Bit by bit up to a byte boundary, then whole bytes (large ranges: see markAll).
    for (; page <= last && (page & 7) !== 0; page++) Atomics.or(bits, page >>> 3, 1 << (page & 7));
    for (; page + 7 <= last; page += 8) Atomics.or(bits, page >>> 3, 0xff);
    for (; page <= last; page++) Atomics.or(bits, page >>> 3, 1 << (page & 7));
    this.#marked = true;
  }

  /** Signals the SET_LOG_FD eventfd if pages were marked since the last call. */
  notify(): void {
    if (!this.#marked) return;
    this.#marked = false;
    if (this.#notifyFd >= 0) signalEventFd(this.#notifyFd);
  }

  /** Whether page `page` is marked (for tests and the front-end library). */
  isMarked(page: number): boolean {
    return page < this.#pages && (this.#bits[page >>> 3] & (1 << (page & 7))) !== 0;
  }

  /** Unmaps and closes the notify fd. */
  close(): void {
    this.unmap();
    this.setNotifyFd(-1);
  }
}
