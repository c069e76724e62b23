/**
 * Where a block device's data lives. The device parses requests and builds iovecs into guest
 * memory; a backend moves the bytes. Results are byte counts or negative errno values.
 *
 * @module
 */

import {
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  fallocate,
  fdatasync,
  IoVec,
  preadvFull,
  pwritevFull,
  startWriteback,
} from "../../sys/io.ts";
import { closeQuietly, Errno, fdSize, SysError } from "../../sys/libc.ts";

/** Storage under a block device. */
export interface BlockBackend {
  /** Reads `iov.total` bytes at `offset` into the iovecs; bytes read or -errno. */
  readv(iov: IoVec, offset: number): number;
  /** Writes `iov.total` bytes at `offset`; bytes written or -errno. */
  writev(iov: IoVec, offset: number): number;
  /** Makes completed writes durable; 0 or -errno. */
  flush(): number;
  /** Starts writing cached data back without waiting (ahead of a {@link flush}); optional. */
  startWriteback?(): void;
  /** Drops a range (a hint: reading it back may give zeros or the old data); 0 or -errno. */
  discard(offset: number, length: number): number;
  /**
   * Makes the start of a range read as zeros, deallocating it if `unmap` allows; returns how many
   * bytes from `offset` on it zeroed (at least one sector, at most `length`), or -errno. It does a
   * bounded amount of work per call, so that a caller can serve other requests between calls.
   */
  zeroRange(offset: number, length: number, unmap: boolean): number;
  /** The storage's size in bytes now (it may have grown), or -errno; absent for fixed sizes. */
  size?(): number;
  /** Flushes and releases the storage. */
  close(): void;
}

const ZERO_CHUNK = 1 << 20;
/** Memory alignment O_DIRECT asks of buffers (the logical block size; a page covers any). */
const PAGE = 4096;
/** Most bytes one {@link FileBackend.zeroRange} call writes zeros to. */
const ZERO_WRITE_STEP = 4 * ZERO_CHUNK;
/**
 * Most bytes one {@link FileBackend.zeroRange} call hands to fallocate: a file system zeroes a
 * range in metadata, but a block device without a zeroing command has the kernel write the zeros.
 */
const ZERO_FALLOCATE_STEP = 256 << 20;
/** fallocate modes that zero a range, in the order tried, when the driver allows unmapping. */
const UNMAP_MODES = [FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE];
/** The one that keeps the range allocated, when it does not. */
const ZERO_MODES = [FALLOC_FL_ZERO_RANGE];

function alignUp(value: number, alignment: number): number {
  return Math.ceil(value / alignment) * alignment;
}

/** A raw image file or block device, through preadv/pwritev/fallocate. */
export class FileBackend implements BlockBackend {
  readonly #fd: number;
  /** Zeros to write from: one page more than a chunk, so that a chunk can start page-aligned. */
  readonly #zeros = new Uint8Array(ZERO_CHUNK + PAGE);
  /** The first page-aligned address in {@link #zeros}: O_DIRECT refuses unaligned buffers. */
  readonly #zerosAddress = alignUp(
    Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(this.#zeros))),
    PAGE,
  );
  readonly #iov = new IoVec(1);
  /** fallocate modes the file system refused (EOPNOTSUPP): not tried again. */
  readonly #unsupported = new Set<number>();

  /** Wraps an open fd; the backend owns it from now on. */
  constructor(fd: number) {
    this.#fd = fd;
  }

  /** Reads with preadv, retrying short reads. */
  readv(iov: IoVec, offset: number): number {
    return preadvFull(this.#fd, iov, offset);
  }

  /** Writes with pwritev, retrying short writes. */
  writev(iov: IoVec, offset: number): number {
    return pwritevFull(this.#fd, iov, offset);
  }

  /** fdatasync. */
  flush(): number {
    return fdatasync(this.#fd);
  }

  /** Starts write-back of the page cache; errors surface at the next {@link flush}. */
  startWriteback(): void {
    startWriteback(this.#fd);
  }

  /** Punches a hole; a file system that cannot still reads back what was there, which is fine. */
  discard(offset: number, length: number): number {
    const rc = fallocate(this.#fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
    return rc === -Errno.EOPNOTSUPP ? 0 : rc;
  }

  /**
   * Punches a hole (with `unmap`) or zeroes the range through fallocate, in steps of at most
   * 256 MiB; where the file system supports neither (ext2, vfat, tmpfs for ZERO_RANGE), writes
   * zeros, at most 4 MiB per call. A mode refused once is not tried again.
   */
  zeroRange(offset: number, length: number, unmap: boolean): number {
    for (const mode of unmap ? UNMAP_MODES : ZERO_MODES) {
      if (this.#unsupported.has(mode)) continue;
      const n = Math.min(length, ZERO_FALLOCATE_STEP);
      const rc = fallocate(this.#fd, mode | FALLOC_FL_KEEP_SIZE, offset, n);
      if (rc === 0) return n;
      if (rc === -Errno.EOPNOTSUPP) this.#unsupported.add(mode);
      else if (rc !== -Errno.EINVAL) return rc;
    }
    const n = Math.min(length, ZERO_WRITE_STEP);
    for (let done = 0; done < n;) {
      const chunk = Math.min(ZERO_CHUNK, n - done);
      this.#iov.clear();
      this.#iov.push(this.#zerosAddress, chunk);
      const w = pwritevFull(this.#fd, this.#iov, offset + done);
      if (w !== chunk) return w < 0 ? w : -Errno.EIO;
      done += chunk;
    }
    return n;
  }

  /** The file's or block device's size (lseek to its end; reads and writes use offsets). */
  size(): number {
    try {
      return fdSize(this.#fd);
    } catch (e) {
      return e instanceof SysError ? -e.errno : -Errno.EIO;
    }
  }

  /** fdatasync, then close. */
  close(): void {
    fdatasync(this.#fd);
    closeQuietly(this.#fd);
  }
}

/**
 * Completes every request without touching data (reads leave the guest's buffers as they were):
 * what is left to measure is the protocol and ring cost alone, like qemu-storage-daemon's null-co
 * driver with read-zeroes=off.
 */
export class NullBackend implements BlockBackend {
  /** Reports the whole read done. */
  readv(iov: IoVec): number {
    return iov.total;
  }
  /** Reports the whole write done. */
  writev(iov: IoVec): number {
    return iov.total;
  }
  /** Nothing to flush. */
  flush(): number {
    return 0;
  }
  /** Nothing to drop. */
  discard(): number {
    return 0;
  }
  /** Nothing to zero: reports the whole range done. */
  zeroRange(_offset: number, length: number): number {
    return length;
  }
  /** Nothing to release. */
  close(): void {}
}
