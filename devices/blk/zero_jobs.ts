/**
 * WRITE_ZEROES in bounded steps, so that one request cannot hold the data-plane worker: the
 * synchronous engine's way (the io_uring engine zeroes through its ring: devices/blk/uring.ts).
 *
 * Where the file system cannot zero a range itself (no `FALLOC_FL_ZERO_RANGE`, as on ext2, vfat
 * or tmpfs), zeroing means writing zeros, and one request may name 32 ranges of 2 GiB: done in
 * one go, every other queue of the device (and every other device of the worker) would wait for
 * 64 GiB of writes. So the first step of a request is taken at once, which is all that most
 * requests need; a request with more to do becomes a job, which the worker's loop advances one
 * step per turn, between the other fds' events. Its queue takes no new request until it is done:
 * at most one job per queue, and a guest driving one queue waits as it would for a slow disk.
 *
 * The advertised limits (`max_write_zeroes_sectors`, `_seg`) stay the same whatever the file
 * system: a guest reads them once, at probe time, so limits that changed with a restart or a
 * migration to another host would make requests it was allowed to send fail; and a hostile guest
 * ignores them anyway. Bounding the work per turn protects the worker either way.
 *
 * @module
 */

import { createEventFd, drainEventFd, signalEventFd } from "../../sys/event.ts";
import { closeQuietly, Errno } from "../../sys/libc.ts";
import type { ByteRef } from "../../ring/descriptor_chain.ts";
import type { DeviceEventLoop, Virtqueue } from "../device.ts";
import type { BlockBackend } from "./backend.ts";

/** One range to make read as zeros. */
export interface ZeroRange {
  /** Byte offset in the image. */
  offset: number;
  /** Bytes. */
  length: number;
  /** The driver allows deallocating the range (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP). */
  unmap: boolean;
}

/** A request whose zeroing goes on across loop turns. */
export class ZeroJob {
  /** The queue the request came on. */
  readonly queue: Virtqueue;
  /** Head of its chain, to complete it by. */
  readonly head: number;
  /** Where its status byte goes. */
  readonly status: ByteRef;
  readonly #ranges: readonly ZeroRange[];
  #next = 0;
  /** Bytes of range {@link #next} already zeroed. */
  #done = 0;

  /** A job zeroing `ranges` for the chain `head` of `queue`. */
  constructor(queue: Virtqueue, head: number, status: ByteRef, ranges: readonly ZeroRange[]) {
    this.queue = queue;
    this.head = head;
    this.status = { u8: status.u8, offset: status.offset };
    this.#ranges = ranges;
  }

  /** Whether every range is zeroed. */
  get finished(): boolean {
    return this.#next >= this.#ranges.length;
  }

  /** One bounded call into the storage; returns 0, or -errno (the job then stops). */
  step(storage: BlockBackend): number {
    const r = this.#ranges[this.#next];
    const n = storage.zeroRange(r.offset + this.#done, r.length - this.#done, r.unmap);
    if (n < 0) return n;
    if (n === 0 && r.length > 0) return -Errno.EIO; // no progress: never loop on it
    this.#done += n;
    if (this.#done >= r.length) {
      this.#next++;
      this.#done = 0;
    }
    return 0;
  }
}

/** What the jobs need from the device. */
export interface ZeroJobOwner {
  /**
   * A deferred request is done with `rc` (0 or -errno): complete it, and with `resume` serve its
   * queue again (not while draining: the ring is about to stop).
   */
  finish(job: ZeroJob, rc: number, resume: boolean): void;
}

/** The zeroing jobs of one block device, at most one per queue. */
export class ZeroJobs {
  readonly #storage: BlockBackend;
  readonly #owner: ZeroJobOwner;
  readonly #jobs = new Map<number, ZeroJob>();
  #loop: DeviceEventLoop | null = null;
  /** Kept signalled while jobs remain: the loop then calls {@link #turn} once per iteration. */
  #eventFd = -1;

  /** Jobs zeroing through `storage`, completed by `owner`. */
  constructor(storage: BlockBackend, owner: ZeroJobOwner) {
    this.#storage = storage;
    this.#owner = owner;
  }

  /** Lets the worker's loop advance the jobs. */
  start(loop: DeviceEventLoop): void {
    this.#loop = loop;
    this.#eventFd = createEventFd();
    loop.watch(this.#eventFd, () => this.#turn());
  }

  /** Whether queue `index` waits for a job of its own. */
  busy(index: number): boolean {
    return this.#jobs.size > 0 && this.#jobs.has(index);
  }

  /**
   * Zeroes `ranges` for the chain `head` of `queue`: the first step at once, and if that finished
   * the request, its result (0 or -errno). Otherwise null: a job now owns the request, and the
   * queue must take no other until {@link ZeroJobOwner.finish} was called for it. Without a loop
   * to come back from (a device used on its own), everything is done at once.
   */
  run(
    queue: Virtqueue,
    head: number,
    status: ByteRef,
    ranges: readonly ZeroRange[],
  ): number | null {
    const job = new ZeroJob(queue, head, status, ranges);
    const rc = job.step(this.#storage);
    if (rc < 0 || job.finished) return rc;
    if (this.#loop === null) return this.#finish(job);
    this.#jobs.set(queue.index, job);
    signalEventFd(this.#eventFd);
    return null;
  }

  /** One step of every job; completes those that are done. */
  #turn(): void {
    for (const job of [...this.#jobs.values()]) {
      const rc = job.step(this.#storage);
      if (rc < 0 || job.finished) {
        this.#jobs.delete(job.queue.index);
        this.#owner.finish(job, rc, true);
      }
    }
    if (this.#jobs.size === 0) drainEventFd(this.#eventFd);
  }

  /** Runs `job` to its end now; returns 0 or -errno. */
  #finish(job: ZeroJob): number {
    while (!job.finished) {
      const rc = job.step(this.#storage);
      if (rc < 0) return rc;
    }
    return 0;
  }

  /**
   * Completes every job now (a ring is about to stop, guest memory to change, or the device to
   * reset: nothing may be left to write into guest memory afterwards). This is the one place a
   * large zeroing still holds the worker, and only the front-end can bring it about.
   */
  drain(): void {
    for (const job of [...this.#jobs.values()]) {
      this.#jobs.delete(job.queue.index);
      this.#owner.finish(job, this.#finish(job), false);
    }
    if (this.#eventFd >= 0) drainEventFd(this.#eventFd);
  }

  /** Completes every job, then stops watching. */
  close(): void {
    this.drain();
    if (this.#eventFd < 0) return;
    this.#loop?.unwatch(this.#eventFd);
    closeQuietly(this.#eventFd);
    this.#eventFd = -1;
  }
}
