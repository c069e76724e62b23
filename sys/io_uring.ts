/**
 * A minimal io_uring through raw syscalls: readv, writev and fdatasync, completions signalled on
 * an eventfd so the data-plane worker's epoll loop sees them. No liburing: the rings are mapped and
 * driven from TypeScript, with Atomics for the head/tail indices the kernel shares.
 *
 * @module
 */

import { closeQuietly, errno, libc, SysError } from "./libc.ts";
import { Mapping } from "./mman.ts";
import type { IoVec } from "./io.ts";

const SYS_IO_URING_SETUP = 425n;
const SYS_IO_URING_ENTER = 426n;
const SYS_IO_URING_REGISTER = 427n;
const IORING_OFF_SQ_RING = 0;
const IORING_OFF_CQ_RING = 0x8000000;
const IORING_OFF_SQES = 0x10000000;
const IORING_FEAT_SINGLE_MMAP = 1;
const IORING_ENTER_GETEVENTS = 1;
const IORING_REGISTER_EVENTFD = 4;
const IORING_REGISTER_IOWQ_MAX_WORKERS = 19;
/** `cq_flags` bit: completions posted while it is set do not signal the registered eventfd. */
const IORING_CQ_EVENTFD_DISABLED = 1;
const IORING_FSYNC_DATASYNC = 1;

/** io_uring operation codes used here. */
export const IoUringOp = { READV: 1, WRITEV: 2, FSYNC: 3, FALLOCATE: 17 } as const;

/** One completion. */
export interface Completion {
  /** The `tag` given at submission. */
  tag: number;
  /** Bytes transferred, or a negative errno. */
  result: number;
}

/** A submission and completion ring pair. */
export class IoUring {
  /** The io_uring fd. */
  readonly fd: number;
  /** Submission queue size. */
  readonly entries: number;
  readonly #rings: Mapping;
  readonly #cqRing: Mapping | null;
  readonly #sqes: Mapping;
  readonly #sq: Uint32Array;
  readonly #cq: Uint32Array;
  readonly #sqeView: DataView;
  readonly #cqeView: DataView;
  readonly #sqHead: number;
  readonly #sqTail: number;
  readonly #sqMask: number;
  readonly #sqArray: number;
  readonly #cqHead: number;
  readonly #cqTail: number;
  readonly #cqMask: number;
  readonly #cqes: number;
  /** Index (in u32s) of `cq_flags` in the completion ring; -1 where the kernel has none. */
  readonly #cqFlags: number;
  #tail = 0;
  #pending = 0;

  /** Sets up a ring of `entries` submissions (a power of two). */
  constructor(entries: number) {
    const p = new Uint8Array(120);
    const pv = new DataView(p.buffer);
    const fd = Number(libc.io_uring_setup(SYS_IO_URING_SETUP, entries, p));
    if (fd < 0) throw new SysError("io_uring_setup", errno());
    this.fd = fd;
    this.entries = pv.getUint32(0, true);
    const cqEntries = pv.getUint32(4, true);
    const features = pv.getUint32(20, true);
    const sqOff = 40, cqOff = 80;
    const sqSize = pv.getUint32(sqOff + 24, true) + this.entries * 4;
    const cqSize = pv.getUint32(cqOff + 20, true) + cqEntries * 16;
    try {
      if (features & IORING_FEAT_SINGLE_MMAP) {
        this.#rings = Mapping.map(fd, Math.max(sqSize, cqSize), IORING_OFF_SQ_RING);
        this.#cqRing = null;
      } else {
        this.#rings = Mapping.map(fd, sqSize, IORING_OFF_SQ_RING);
        this.#cqRing = Mapping.map(fd, cqSize, IORING_OFF_CQ_RING);
      }
      this.#sqes = Mapping.map(fd, this.entries * 64, IORING_OFF_SQES);
    } catch (e) {
      closeQuietly(fd);
      throw e;
    }
    this.#sq = new Uint32Array(this.#rings.buffer);
    this.#cq = new Uint32Array((this.#cqRing ?? this.#rings).buffer);
    this.#cqeView = new DataView((this.#cqRing ?? this.#rings).buffer);
    this.#sqeView = new DataView(this.#sqes.buffer);
    this.#sqHead = pv.getUint32(sqOff, true) >> 2;
    this.#sqTail = pv.getUint32(sqOff + 4, true) >> 2;
    this.#sqMask = this.#sq[pv.getUint32(sqOff + 8, true) >> 2];
    this.#sqArray = pv.getUint32(sqOff + 24, true) >> 2;
    this.#cqHead = pv.getUint32(cqOff, true) >> 2;
    this.#cqTail = pv.getUint32(cqOff + 4, true) >> 2;
    this.#cqMask = this.#cq[pv.getUint32(cqOff + 8, true) >> 2];
    this.#cqes = pv.getUint32(cqOff + 20, true);
    // Linux 5.8 and later give cq_off.flags; before it the field is 0 and there is nothing to set.
    const cqFlagsOffset = pv.getUint32(cqOff + 24, true);
    this.#cqFlags = cqFlagsOffset === 0 ? -1 : cqFlagsOffset >> 2;
    this.#tail = this.#sq[this.#sqTail];
  }

  /** Signals `eventFd` whenever completions are posted. */
  registerEventFd(eventFd: number): void {
    const rc = Number(
      libc.io_uring_register(
        SYS_IO_URING_REGISTER,
        this.fd,
        IORING_REGISTER_EVENTFD,
        new Int32Array([eventFd]),
        1,
      ),
    );
    if (rc < 0) throw new SysError("io_uring_register(EVENTFD)", errno());
  }

  /**
   * Sets the most io-wq kernel threads of the calling thread (shared by every ring that thread
   * submits on): `bounded` for work on regular files and block devices, `unbounded` for other fds;
   * 0 leaves a value as it is (IORING_REGISTER_IOWQ_MAX_WORKERS, Linux 5.15). Returns the values
   * in force before. Those threads run what cannot complete without blocking: buffered reads and
   * writes a file system cannot do asynchronously, fdatasync, fallocate. Throws SysError (EINVAL
   * on older kernels).
   */
  ioWqMaxWorkers(bounded: number, unbounded: number): [number, number] {
    const counts = new Uint32Array([bounded, unbounded]);
    const rc = Number(
      libc.io_uring_register(
        SYS_IO_URING_REGISTER,
        this.fd,
        IORING_REGISTER_IOWQ_MAX_WORKERS,
        new Uint8Array(counts.buffer),
        2,
      ),
    );
    if (rc < 0) throw new SysError("io_uring_register(IOWQ_MAX_WORKERS)", errno());
    return [counts[0], counts[1]];
  }

  /** Prepared submissions not yet handed to the kernel. */
  get pending(): number {
    return this.#pending;
  }

  /** Whether completions are waiting to be reaped. */
  get hasCompletions(): boolean {
    return this.#cq[this.#cqHead] !== Atomics.load(this.#cq, this.#cqTail);
  }

  /** Free submission slots. */
  get space(): number {
    return this.entries - (this.#tail - Atomics.load(this.#sq, this.#sqHead)) - this.#pending;
  }

  /**
   * Queues a readv/writev of `iov` at `offset` (the iovec array must stay untouched until the
   * completion arrives), or an fdatasync (`iov` null). False when the ring is full.
   */
  prepare(op: number, fd: number, iov: IoVec | null, offset: number, tag: number): boolean {
    if (this.space <= 0) return false;
    const index = (this.#tail + this.#pending) & this.#sqMask;
    const o = index * 64;
    const v = this.#sqeView;
    for (let i = 0; i < 64; i += 8) v.setBigUint64(o + i, 0n, true);
    v.setUint8(o, op);
    v.setInt32(o + 4, fd, true);
    if (iov !== null) {
      v.setUint32(o + 8, offset >>> 0, true);
      v.setUint32(o + 12, Math.floor(offset / 4294967296), true);
      const addr = iov.address;
      v.setUint32(o + 16, addr >>> 0, true);
      v.setUint32(o + 20, Math.floor(addr / 4294967296), true);
      v.setUint32(o + 24, iov.count, true);
    } else {
      v.setUint32(o + 28, IORING_FSYNC_DATASYNC, true);
    }
    v.setUint32(o + 32, tag, true);
    this.#sq[this.#sqArray + index] = index;
    this.#pending++;
    return true;
  }

  /**
   * Queues an fallocate(2) of `length` bytes at `offset` with `mode` (IORING_OP_FALLOCATE, Linux
   * 5.6; always run by an io-wq thread). False when the ring is full.
   */
  prepareFallocate(fd: number, offset: number, length: number, mode: number, tag: number): boolean {
    if (this.space <= 0) return false;
    const index = (this.#tail + this.#pending) & this.#sqMask;
    const o = index * 64;
    const v = this.#sqeView;
    for (let i = 0; i < 64; i += 8) v.setBigUint64(o + i, 0n, true);
    v.setUint8(o, IoUringOp.FALLOCATE);
    v.setInt32(o + 4, fd, true);
    v.setUint32(o + 8, offset >>> 0, true);
    v.setUint32(o + 12, Math.floor(offset / 4294967296), true);
    // The length goes where a transfer's buffer address would, the mode in the length field.
    v.setUint32(o + 16, length >>> 0, true);
    v.setUint32(o + 20, Math.floor(length / 4294967296), true);
    v.setUint32(o + 24, mode, true);
    v.setUint32(o + 32, tag, true);
    this.#sq[this.#sqArray + index] = index;
    this.#pending++;
    return true;
  }

  /**
   * Hands the prepared submissions to the kernel. What completes during the call (a buffered read
   * from the page cache completes inline) does not signal the eventfd: the caller reaps right
   * after, which saves the loop a wake-up and an eventfd read per batch. Returns whether anything
   * was submitted.
   */
  submit(): boolean {
    if (this.#pending === 0) return false;
    this.#tail += this.#pending;
    Atomics.store(this.#sq, this.#sqTail, this.#tail >>> 0);
    const n = this.#pending;
    this.#pending = 0;
    let done = 0;
    // Only this thread writes cq_flags; the kernel reads it when it posts a completion.
    const quiet = this.#cqFlags >= 0;
    const flags = quiet ? this.#cq[this.#cqFlags] : 0;
    if (quiet) Atomics.store(this.#cq, this.#cqFlags, flags | IORING_CQ_EVENTFD_DISABLED);
    try {
      while (done < n) {
        const rc = Number(
          libc.io_uring_enter(SYS_IO_URING_ENTER, this.fd, n - done, 0, 0, null, 0n),
        );
        if (rc < 0) {
          const err = errno();
          if (err === 4 || err === 11 || err === 16) continue; // EINTR, EAGAIN, EBUSY
          throw new SysError("io_uring_enter", err);
        }
        done += rc;
      }
    } finally {
      if (quiet) Atomics.store(this.#cq, this.#cqFlags, flags & ~IORING_CQ_EVENTFD_DISABLED);
    }
    return true;
  }

  /** Blocks until at least `min` completions are waiting. */
  wait(min: number): void {
    for (;;) {
      const rc = Number(
        libc.io_uring_enter(SYS_IO_URING_ENTER, this.fd, 0, min, IORING_ENTER_GETEVENTS, null, 0n),
      );
      if (rc >= 0) return;
      const err = errno();
      if (err !== 4) throw new SysError("io_uring_enter(GETEVENTS)", err);
    }
  }

  /** Calls `onCompletion(tag, result)` for every posted completion; returns how many. */
  reap(onCompletion: (tag: number, result: number) => void): number {
    let head = this.#cq[this.#cqHead];
    const tail = Atomics.load(this.#cq, this.#cqTail);
    let n = 0;
    while (head !== tail) {
      const o = this.#cqes + ((head & this.#cqMask) * 16);
      const tag = this.#cqeView.getUint32(o, true);
      const result = this.#cqeView.getInt32(o + 8, true);
      head = (head + 1) >>> 0;
      Atomics.store(this.#cq, this.#cqHead, head);
      onCompletion(tag, result);
      n++;
    }
    return n;
  }

  /** Unmaps the rings and closes the fd. */
  close(): void {
    this.#sqes.unmap();
    this.#cqRing?.unmap();
    this.#rings.unmap();
    closeQuietly(this.fd);
  }
}

/** Whether this kernel lets us create an io_uring (it may be disabled by sysctl or seccomp). */
export function ioUringAvailable(): boolean {
  try {
    new IoUring(2).close();
    return true;
  } catch {
    return false;
  }
}
