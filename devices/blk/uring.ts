/**
 * Asynchronous block I/O through io_uring for the virtio-blk device: many requests in flight per
 * device, and none of them holds the data-plane worker, whether the image is opened with O_DIRECT
 * or buffered. A buffered read of cached pages completes inline while it is submitted (about as
 * cheap as a preadv, and reaped at once); a cache miss waits in the kernel (the file system's
 * asynchronous read, or an io-wq kernel thread for one that has none, such as FUSE), and so do
 * writes that must wait for the page cache, fdatasync, discards and zeroing (fallocate, or writes
 * of zeros where the file system cannot zero a range). Meanwhile the worker serves every other
 * queue and device.
 *
 * Each request in flight owns a slot: the queue to complete on, the decoded request, and its iovec
 * array (the kernel may read it until the completion arrives). Completions that arrive later
 * signal an eventfd in the worker's epoll loop.
 *
 * @module
 */

import { createEventFd, drainEventFd } from "../../sys/event.ts";
import { IoVec } from "../../sys/io.ts";
import { closeQuietly, Errno } from "../../sys/libc.ts";
import { IoUring, IoUringOp } from "../../sys/io_uring.ts";
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE } from "../../sys/io.ts";
import type { ZeroRange } from "./zero_jobs.ts";
import type { DeviceEventLoop, Virtqueue } from "../device.ts";
import { BlkRequest } from "./request.ts";

/** One request in flight. */
export class RequestSlot {
  /** Slot number, the io_uring tag. */
  readonly tag: number;
  /** The queue to complete on. */
  queue: Virtqueue | null = null;
  /** The request it serves, decoded into this slot's own object (the device completes it). */
  readonly request: BlkRequest = new BlkRequest();
  /** Bytes the operation must transfer (0 for a flush). */
  expected = 0;
  /** Bytes already transferred by earlier, short, completions of this request. */
  done = 0;
  /** Times it was resubmitted after EAGAIN or EINTR. */
  retries = 0;
  /**
   * A discard's ranges, punched one after the other, or a WRITE_ZEROES request's, zeroed one
   * after the other (op FALLOCATE; for zeroing, WRITEV of zeros where fallocate cannot).
   */
  ranges: readonly ZeroRange[] = [];
  /** The range of {@link ranges} in hand. */
  range = 0;
  /** A WRITE_ZEROES request (else a discard, when {@link ranges} is set). */
  zeroing = false;
  /** Zeroing: the fallocate mode in flight on the current range. */
  mode = 0;
  /** Zeroing by writes: bytes of the current range written so far. */
  zeroed = 0;
  /** The operation (IoUringOp). */
  op = 0;
  /** Byte offset in the image. */
  offset = 0;
  /** Follow a successful write with fdatasync before completing (write-through). */
  syncAfter = false;
  /** Data buffers in guest memory. */
  readonly iov: IoVec;

  /** A free slot. */
  constructor(tag: number, maxSegments: number) {
    this.tag = tag;
    this.iov = new IoVec(maxSegments);
  }
}

/** What the engine needs from the device to finish a request. */
export interface UringOwner {
  /**
   * Completes a request whose I/O ended with `result`: -errno, or the bytes transferred in all
   * (short transfers were resubmitted until done; fewer than expected means end of file).
   */
  finish(slot: RequestSlot, result: number): void;
  /** Serves a queue again (after it was throttled for lack of slots). */
  resume(queue: Virtqueue): void;
}

/**
 * Most io-wq kernel threads a data-plane worker's rings may use for blocking work on images,
 * whatever the guests send. That work is what a file system cannot do asynchronously: reads on
 * FUSE or tmpfs, buffered writes (ext4 too, Linux 6.18), fdatasync, discards. Buffered reads on
 * ext4, xfs or a block device, and O_DIRECT I/O, need no io-wq thread. More requests than the cap
 * wait in io-wq's queue. 16 keeps that many slow requests in flight (a network file system wants
 * some parallelism); idle io-wq threads exit after a few seconds.
 *
 * The threads are shared by the devices of a worker: a disk whose storage holds all of them (a
 * guest keeping 16 reads outstanding on a stalled FUSE or NFS file) delays the other disks'
 * io-wq work, their buffered writes and flushes, until its requests complete; their reads, and
 * the worker itself, go on. A device with `ownWorker` has io-wq threads of its own.
 */
export const IOWQ_MAX_WORKERS = 16;

/**
 * The io-wq cap a worker's rings set: {@link IOWQ_MAX_WORKERS}, or 4 per CPU if that is fewer (the
 * kernel's own default for files, which it takes from the first ring a thread creates, capped by
 * that ring's size: 256 threads per worker on a 64-CPU host; RLIMIT_NPROC for other fds). io-wq is
 * per submitting thread, so the cap bounds a worker and every device it serves; each device's ring
 * sets the same value.
 */
export function ioWqWorkerCap(): number {
  return Math.min(IOWQ_MAX_WORKERS, 4 * navigator.hardwareConcurrency);
}

/** Resubmissions of one request after EAGAIN or EINTR before it fails. */
const MAX_RETRIES = 3;

/** fallocate modes that zero a range, in the order tried, when the driver allows unmapping. */
const UNMAP_MODES = [FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE];
/** The one that keeps the range allocated, when it does not. */
const ZERO_MODES = [FALLOC_FL_ZERO_RANGE];
/** Zeros written by one WRITEV where fallocate cannot zero: a 1 MiB buffer, this many times. */
const ZERO_WRITE_SEGMENTS = 16;
const ZERO_CHUNK = 1 << 20;
/** Memory alignment O_DIRECT asks of buffers (a page covers any logical block size). */
const PAGE = 4096;

/** The io_uring engine of one block device. */
export class UringEngine {
  readonly #ring: IoUring;
  readonly #eventFd: number;
  readonly #fd: number;
  readonly #slots: RequestSlot[];
  readonly #free: RequestSlot[];
  readonly #owner: UringOwner;
  readonly #touched = new Set<Virtqueue>();
  readonly #throttled = new Set<Virtqueue>();
  #loop: DeviceEventLoop | null = null;
  /** A background sync is in flight (see {@link syncInBackground}). */
  #syncing = false;
  /** The first error of a background sync not yet taken (-errno), or 0. */
  #syncError = 0;
  /** Completions are being reaped: a nested {@link flush} only submits. */
  #reaping = false;
  /** fallocate modes the file system refused (EOPNOTSUPP): not tried again. */
  readonly #unsupported = new Set<number>();
  /** Zeros to write from, allocated at the first zeroing that needs them; page-aligned address. */
  #zeros: Uint8Array | null = null;
  #zerosAddress = 0;
  /** The reap callback, made once (no closure per batch). */
  readonly #onCompletion = (tag: number, result: number) => this.#completion(tag, result);
  /**
   * The io-wq thread cap in force for files (at most {@link IOWQ_MAX_WORKERS}), or null where the
   * kernel cannot set one (before 5.15: its default, min(ring entries, 4 × CPUs), applies).
   */
  readonly workerLimit: number | null;

  /**
   * An engine on image `fd` with `depth` requests in flight at most. Throws SysError when the
   * kernel gives no io_uring (too old, disabled by sysctl or seccomp).
   */
  constructor(fd: number, depth: number, maxSegments: number, owner: UringOwner) {
    this.#fd = fd;
    this.#owner = owner;
    this.#ring = new IoUring(depth);
    let limit: number | null = ioWqWorkerCap();
    try {
      this.#ring.ioWqMaxWorkers(limit, limit);
    } catch {
      limit = null;
    }
    this.workerLimit = limit;
    try {
      this.#eventFd = createEventFd();
    } catch (e) {
      this.#ring.close();
      throw e;
    }
    try {
      this.#ring.registerEventFd(this.#eventFd);
    } catch (e) {
      this.#ring.close();
      closeQuietly(this.#eventFd);
      throw e;
    }
    this.#slots = Array.from(
      { length: this.#ring.entries },
      (_, i) => new RequestSlot(i, maxSegments),
    );
    this.#free = [...this.#slots].reverse();
  }

  /** Requests in flight. */
  get inFlight(): number {
    return this.#slots.length - this.#free.length;
  }

  /** Watches the completion eventfd in the worker's loop. */
  start(loop: DeviceEventLoop): void {
    this.#loop = loop;
    loop.watch(this.#eventFd, () => {
      drainEventFd(this.#eventFd);
      this.#reapAll(true);
    });
  }

  /** A free slot, or null (the queue is then throttled until a completion frees one). */
  take(queue: Virtqueue): RequestSlot | null {
    const slot = this.#free.pop();
    if (slot === undefined) {
      this.#throttled.add(queue);
      return null;
    }
    slot.queue = queue;
    slot.iov.clear();
    slot.syncAfter = false;
    slot.done = 0;
    slot.retries = 0;
    slot.range = 0;
    slot.zeroing = false;
    slot.mode = 0;
    slot.zeroed = 0;
    return slot;
  }

  /** Puts an unused slot back. */
  release(slot: RequestSlot): void {
    slot.queue = null;
    this.#free.push(slot);
  }

  /** Queues the slot's operation; submitted by {@link flush}. */
  queue(slot: RequestSlot): void {
    // Never full: there are exactly as many slots as ring entries.
    if (slot.op === IoUringOp.FALLOCATE) {
      const r = slot.ranges[slot.range];
      const mode = slot.zeroing ? slot.mode : FALLOC_FL_PUNCH_HOLE;
      this.#ring.prepareFallocate(
        this.#fd,
        r.offset,
        r.length,
        mode | FALLOC_FL_KEEP_SIZE,
        slot.tag,
      );
      return;
    }
    const iov = slot.op === IoUringOp.FSYNC ? null : slot.iov;
    this.#ring.prepare(slot.op, this.#fd, iov, slot.offset, slot.tag);
  }

  /**
   * Starts an fdatasync no request waits for, so that written data is on stable storage before a
   * flush that must be quick (at a migration's switch-over) asks for it. Returns false while one
   * is in flight or when every slot is busy. Its error is kept for {@link takeSyncError}: the
   * kernel reports a write-back error once per open file, so nobody else would see it.
   */
  syncInBackground(): boolean {
    if (this.#syncing) return false;
    const slot = this.#free.pop();
    if (slot === undefined) return false;
    slot.queue = null;
    slot.op = IoUringOp.FSYNC;
    slot.syncAfter = false;
    slot.offset = 0;
    this.#syncing = true;
    this.queue(slot);
    this.flush();
    return true;
  }

  /** The first error of a background sync since the last call (-errno), or 0. */
  takeSyncError(): number {
    const e = this.#syncError;
    this.#syncError = 0;
    return e;
  }

  /**
   * Hands everything queued to the kernel, and completes what finished meanwhile (reads from the
   * page cache finish inline), so that their used entries go out with this batch.
   */
  flush(): void {
    if (this.#ring.submit() && !this.#reaping) this.#reapAll(true);
  }

  /** Waits for every request in flight and completes them; serves no queue meanwhile. */
  drain(): void {
    this.#ring.submit();
    this.#reapAll(false);
    while (this.inFlight > 0) {
      this.#ring.wait(1);
      this.#reapAll(false);
    }
  }

  /**
   * Completes everything posted, submits what that queued again (the rest of a short transfer,
   * the sync of a write-through write), and with `resume` serves the queues that waited for a
   * slot; repeats while any of it completes inline. Then interrupts the queues it completed on.
   */
  #reapAll(resume: boolean): void {
    this.#reaping = true;
    try {
      for (;;) {
        const reaped = this.#ring.reap(this.#onCompletion);
        if (resume && this.#throttled.size > 0 && this.#free.length > 0) {
          const queues = [...this.#throttled];
          this.#throttled.clear();
          for (const q of queues) if (this.#loop?.queue(q.index)) this.#owner.resume(q);
        }
        const submitted = this.#ring.submit();
        if (reaped === 0 && !submitted && !this.#ring.hasCompletions) break;
      }
    } finally {
      this.#reaping = false;
    }
    this.#notify();
  }

  /** One completion: the request goes on (queued again, submitted by the caller) or ends. */
  #completion(tag: number, result: number): void {
    const slot = this.#slots[tag];
    if ((result === -Errno.EAGAIN || result === -Errno.EINTR) && slot.retries < MAX_RETRIES) {
      slot.retries++;
      this.queue(slot);
      return;
    }
    if (slot.zeroing) {
      if (result < 0) {
        if (!this.#zeroFailed(slot, result)) return; // zeroing the range another way
      } else if (slot.op === IoUringOp.WRITEV && result === 0) {
        result = -Errno.EIO; // no progress: never loop on it
      } else if (this.#zeroNext(slot, result)) {
        return;
      } else {
        result = 0;
      }
      this.#end(slot, result);
      return;
    }
    const transfer = slot.op === IoUringOp.READV || slot.op === IoUringOp.WRITEV;
    if (transfer && result > 0 && slot.done + result < slot.expected) {
      // A short read or write (a buffered one may stop where the cached pages end): the rest is
      // submitted again, never done synchronously in the worker. EOF ends it at 0 below.
      slot.done += result;
      slot.offset += result;
      slot.iov.advance(result);
      this.queue(slot);
      return;
    }
    if (slot.op === IoUringOp.FALLOCATE) {
      // A discard is a hint: a file system that cannot punch holes has done all it must.
      if (result === -Errno.EOPNOTSUPP) result = 0;
      if (result === 0 && ++slot.range < slot.ranges.length) {
        slot.retries = 0;
        this.queue(slot);
        return;
      }
    }
    const total = transfer && result >= 0 ? slot.done + result : result;
    if (slot.syncAfter && total === slot.expected) {
      // Write-through: the data is written; complete only once it is durable.
      slot.syncAfter = false;
      slot.op = IoUringOp.FSYNC;
      this.queue(slot);
      return;
    }
    this.#end(slot, total);
  }

  /** The slot's work is over with `result`: its request completes, or its background sync. */
  #end(slot: RequestSlot, result: number): void {
    const queue = slot.queue;
    if (queue === null) {
      // A background sync: no request to complete.
      if (result < 0 && this.#syncError === 0) this.#syncError = result;
      this.#syncing = false;
      this.release(slot);
      return;
    }
    this.#owner.finish(slot, result);
    this.#touched.add(queue);
    this.release(slot);
  }

  /**
   * Starts zeroing `slot.ranges` (a WRITE_ZEROES request): fallocate per range where the file
   * system zeroes ranges itself, else writes of zeros, all through the ring, in the kernel's time
   * rather than the worker's. The caller sets the slot's ranges; this picks the first step.
   */
  startZeroing(slot: RequestSlot): void {
    slot.zeroing = true;
    slot.range = 0;
    this.#zeroRange(slot);
  }

  /**
   * The fallocate mode to try on range `r` after `after` (a mode tried already, or -1 for the
   * first), leaving out those refused before; -1 when none is left (zeros are then written).
   */
  #zeroMode(r: ZeroRange, after: number): number {
    const modes = r.unmap ? UNMAP_MODES : ZERO_MODES;
    for (let i = modes.indexOf(after) + 1; i < modes.length; i++) {
      if (!this.#unsupported.has(modes[i])) return modes[i];
    }
    return -1;
  }

  /** Queues the first step of the current range: a fallocate, or the first write of zeros. */
  #zeroRange(slot: RequestSlot): void {
    slot.zeroed = 0;
    slot.retries = 0;
    slot.mode = this.#zeroMode(slot.ranges[slot.range], -1);
    if (slot.mode >= 0) {
      slot.op = IoUringOp.FALLOCATE;
      this.queue(slot);
    } else this.#zeroWrite(slot);
  }

  /** Queues a write of zeros over the next part of the current range. */
  #zeroWrite(slot: RequestSlot): void {
    if (this.#zeros === null) {
      this.#zeros = new Uint8Array(ZERO_CHUNK + PAGE);
      const at = Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(this.#zeros)));
      this.#zerosAddress = Math.ceil(at / PAGE) * PAGE;
    }
    const r = slot.ranges[slot.range];
    slot.op = IoUringOp.WRITEV;
    slot.iov.clear();
    let bytes = Math.min(r.length - slot.zeroed, ZERO_CHUNK * ZERO_WRITE_SEGMENTS);
    slot.expected = bytes;
    slot.done = 0;
    slot.offset = r.offset + slot.zeroed;
    while (bytes > 0) {
      const n = Math.min(bytes, ZERO_CHUNK);
      slot.iov.push(this.#zerosAddress, n);
      bytes -= n;
    }
    this.queue(slot);
  }

  /**
   * A zeroing step failed with `result`: whether that is the end of the request (false when
   * another way to zero the range was queued instead: the next fallocate mode, or writes).
   */
  #zeroFailed(slot: RequestSlot, result: number): boolean {
    if (slot.op !== IoUringOp.FALLOCATE) return true;
    if (result !== -Errno.EOPNOTSUPP && result !== -Errno.EINVAL) return true;
    // EOPNOTSUPP: the file system never does it (not tried again); EINVAL: not for this range.
    if (result === -Errno.EOPNOTSUPP) this.#unsupported.add(slot.mode);
    slot.mode = this.#zeroMode(slot.ranges[slot.range], slot.mode);
    slot.retries = 0;
    if (slot.mode >= 0) this.queue(slot);
    else this.#zeroWrite(slot);
    return false;
  }

  /**
   * A zeroing step succeeded (`result` bytes written, or 0 from fallocate): queues the next step
   * and returns true, or returns false when every range is zeroed.
   */
  #zeroNext(slot: RequestSlot, result: number): boolean {
    if (slot.op === IoUringOp.WRITEV) {
      // A short write just leaves more for the next one.
      slot.zeroed += result;
      if (slot.zeroed < slot.ranges[slot.range].length) {
        this.#zeroWrite(slot);
        return true;
      }
    }
    if (++slot.range < slot.ranges.length) {
      this.#zeroRange(slot);
      return true;
    }
    return false;
  }

  #notify(): void {
    for (const q of this.#touched) this.#loop?.notify(q.index);
    this.#touched.clear();
  }

  /** Waits for what is in flight, then releases the ring. */
  close(): void {
    this.drain();
    this.#loop?.unwatch(this.#eventFd);
    this.#ring.close();
    closeQuietly(this.#eventFd);
  }
}
