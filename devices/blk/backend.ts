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
} from "../../sys/io.ts";
import { closeQuietly, Errno } from "../../sys/libc.ts";

/** Storage under a block device. */
export interface BlockBackend {
  /** Reads `iov.total` bytes at `offset` into the iovecs; bytes read or -errno. */
  readv(iov: IoVec, offset: number): number;
  /** Writes `iov.total` bytes at `offset`; bytes written or -errno. */
  writev(iov: IoVec, offset: number): number;
  /** Makes completed writes durable; 0 or -errno. */
  flush(): number;
  /** Drops a range (a hint: reading it back may give zeros or the old data); 0 or -errno. */
  discard(offset: number, length: number): number;
  /** Makes a range read as zeros, deallocating it if `unmap`; 0 or -errno. */
  writeZeroes(offset: number, length: number, unmap: boolean): number;
  /** Flushes and releases the storage. */
  close(): void;
}

const ZERO_CHUNK = 1 << 20;

/** A raw image file or block device, through preadv/pwritev/fallocate. */
export class FileBackend implements BlockBackend {
  readonly #fd: number;
  readonly #zeros = new Uint8Array(ZERO_CHUNK);
  readonly #zerosAddress = Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(this.#zeros)));
  readonly #iov = new IoVec(1);

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

  /** Punches a hole; a file system that cannot still reads back what was there, which is fine. */
  discard(offset: number, length: number): number {
    const rc = fallocate(this.#fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
    return rc === -Errno.EOPNOTSUPP ? 0 : rc;
  }

  /** Punches a hole or zeroes the range; falls back to writing zeros. */
  writeZeroes(offset: number, length: number, unmap: boolean): number {
    const mode = (unmap ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE) | FALLOC_FL_KEEP_SIZE;
    const rc = fallocate(this.#fd, mode, offset, length);
    if (rc !== -Errno.EOPNOTSUPP && rc !== -Errno.EINVAL) return rc;
    for (let done = 0; done < length;) {
      const n = Math.min(ZERO_CHUNK, length - done);
      this.#iov.clear();
      this.#iov.push(this.#zerosAddress, n);
      const w = pwritevFull(this.#fd, this.#iov, offset + done);
      if (w !== n) return w < 0 ? w : -Errno.EIO;
      done += n;
    }
    return 0;
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
  /** Nothing to zero. */
  writeZeroes(): number {
    return 0;
  }
  /** Nothing to release. */
  close(): void {}
}
