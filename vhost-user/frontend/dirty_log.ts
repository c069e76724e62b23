/**
 * The front-end's side of migration dirty logging: the shared bitmap QEMU creates (one bit per
 * 4 KiB guest page, in a memfd handed over with SET_LOG_BASE) and reads back while it copies guest
 * RAM, clearing what it read.
 *
 * @module
 */

import { closeQuietly } from "../../sys/libc.ts";
import { createMemfd, Mapping } from "../../sys/mman.ts";

/** Bytes of guest memory one bit of the log stands for. */
export const LOG_PAGE = 4096;

/** A dirty bitmap covering guest-physical addresses up to a limit. */
export class FrontendDirtyLog {
  /** The memfd (SET_LOG_BASE sends it). */
  readonly fd: number;
  /** Size of the bitmap in bytes (SET_LOG_BASE's mmap_size). */
  readonly size: number;
  readonly #mapping: Mapping;
  readonly #words: Uint32Array;

  /** A log covering guest-physical addresses below `guestBytes` (QEMU rounds to 64-bit words). */
  constructor(guestBytes: number) {
    const pages = Math.ceil(guestBytes / LOG_PAGE);
    this.size = Math.max(8, Math.ceil(pages / 64) * 8);
    this.fd = createMemfd("vhostd-frontend-log", this.size);
    this.#mapping = Mapping.map(this.fd, this.size);
    this.#words = new Uint32Array(this.#mapping.buffer);
  }

  /** Whether the page holding `gpa` is marked (without clearing it). */
  isDirty(gpa: number): boolean {
    const page = Math.floor(gpa / LOG_PAGE);
    return (this.#words[page >>> 5] & (1 << (page & 31))) !== 0;
  }

  /** The marked pages' guest addresses, clearing them as QEMU's sync does (atomic exchange). */
  sync(): number[] {
    const out: number[] = [];
    for (let w = 0; w < this.#words.length; w++) {
      if (this.#words[w] === 0) continue;
      const bits = Atomics.exchange(this.#words, w, 0);
      for (let b = 0; b < 32; b++) if (bits & (1 << b)) out.push((w * 32 + b) * LOG_PAGE);
    }
    return out;
  }

  /** Unmaps and closes the log. */
  close(): void {
    this.#mapping.unmap();
    closeQuietly(this.fd);
  }
}
