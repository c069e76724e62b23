/**
 * Asynchronous block I/O through io_uring for the virtio-blk device: many requests in flight per
 * queue, which is what a real disk (O_DIRECT) needs to reach its IOPS. The synchronous engine
 * serves one request at a time and is faster only when data comes from the page cache.
 *
 * Each request in flight owns a slot: the queue to complete on, the decoded request, and its iovec
 * array (the kernel may read it until the completion arrives). Completions arrive on an
 * eventfd in the worker's epoll loop.
 *
 * @module
 */

import { createEventFd, drainEventFd } from "../../sys/event.ts";
import { IoVec } from "../../sys/io.ts";
import { closeQuietly } from "../../sys/libc.ts";
import { IoUring, IoUringOp } from "../../sys/io_uring.ts";
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
  /** Completes a request whose I/O ended with `result` (bytes or -errno). */
  finish(slot: RequestSlot, result: number): void;
  /** Serves a queue again (after it was throttled for lack of slots). */
  resume(queue: Virtqueue): void;
}

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

  /** An engine on image `fd` with `depth` requests in flight at most. */
  constructor(fd: number, depth: number, maxSegments: number, owner: UringOwner) {
    this.#fd = fd;
    this.#owner = owner;
    this.#ring = new IoUring(depth);
    this.#eventFd = createEventFd();
    this.#ring.registerEventFd(this.#eventFd);
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
      this.#reapAll();
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
    return slot;
  }

  /** Puts an unused slot back. */
  release(slot: RequestSlot): void {
    slot.queue = null;
    this.#free.push(slot);
  }

  /** Queues the slot's operation; submitted by {@link flush}. */
  queue(slot: RequestSlot): void {
    const iov = slot.op === IoUringOp.FSYNC ? null : slot.iov;
    // Never full: there are exactly as many slots as ring entries.
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

  /** Hands everything queued to the kernel. */
  flush(): void {
    this.#ring.submit();
  }

  /** Waits for every request in flight and completes them. */
  drain(): void {
    this.flush();
    while (this.inFlight > 0) {
      this.#ring.wait(1);
      this.#reap();
    }
    this.#notify();
  }

  #reapAll(): void {
    this.#reap();
    this.#notify();
    if (this.#throttled.size > 0 && this.#free.length > 0) {
      const queues = [...this.#throttled];
      this.#throttled.clear();
      for (const q of queues) if (this.#loop?.queue(q.index)) this.#owner.resume(q);
      this.flush();
      this.#notify();
    }
  }

  #reap(): void {
    this.#ring.reap((tag, result) => {
      const slot = this.#slots[tag];
      if (slot.syncAfter && result === slot.expected) {
        // Write-through: the data is written; complete only once it is durable.
        slot.syncAfter = false;
        slot.op = IoUringOp.FSYNC;
        this.queue(slot);
        this.flush();
        return;
      }
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
    });
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
