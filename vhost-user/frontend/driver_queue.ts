/**
 * The split virtqueue (virtio 1.x §2.7), driver side: what a guest's driver does. The rings live
 * in {@link GuestRam}; chains are built from free descriptors, made available, and reclaimed from
 * the used ring with every used element checked (known head, chain outstanding, length within
 * the chain's writable bytes).
 *
 * The hot-path methods ({@link DriverQueue.add3}, {@link DriverQueue.publish},
 * {@link DriverQueue.kick}, {@link DriverQueue.poll}) allocate nothing, so the load generator uses
 * them directly.
 *
 * @module
 */

import { createEventFd, drainEventFd, Epoll, signalEventFd } from "../../sys/event.ts";
import { closeQuietly } from "../../sys/libc.ts";
import type { VringAddr } from "../message.ts";
import type { GuestBuffer, GuestRam } from "./memory.ts";
import {
  AVAIL_ALIGN,
  availEntry,
  availEventOffset,
  availRingSize,
  DESC_ADDR,
  DESC_ALIGN,
  DESC_FLAGS,
  DESC_LEN,
  DESC_SIZE,
  descTableSize,
  MAX_QUEUE_SIZE,
  RING_FLAGS,
  RING_IDX,
  USED_ELEM_LEN,
  usedElem,
  usedEventOffset,
  usedRingSize,
  VIRTQ_DESC_F_INDIRECT as F_INDIRECT,
  VIRTQ_DESC_F_NEXT as F_NEXT,
  VIRTQ_DESC_F_WRITE as F_WRITE,
  VRING_USED_F_NO_NOTIFY as USED_F_NO_NOTIFY,
} from "../../ring/layout.ts";

/** One buffer of a chain. */
export interface Segment {
  /** Guest-physical address. */
  gpa: number;
  /** Length in bytes. */
  length: number;
  /** Device-writable (the device fills it) rather than device-readable. */
  writable: boolean;
}

/** The back-end put something on the used ring that a correct device never would. */
export class UsedRingError extends Error {
  /** Builds the error. */
  constructor(message: string) {
    super(message);
    this.name = "UsedRingError";
  }
}

/** Where a queue's parts are, plus its eventfds: enough for a worker to drive it. */
export interface QueueLayout {
  /** Queue index. */
  index: number;
  /** Queue size. */
  size: number;
  /** Descriptor table. */
  desc: GuestBuffer;
  /** Available (driver) ring, with room for used_event. */
  avail: GuestBuffer;
  /** Used (device) ring, with room for avail_event. */
  used: GuestBuffer;
  /** Indirect tables, one per head, or null. */
  indirect: GuestBuffer | null;
  /** Entries per indirect table. */
  indirectEntries: number;
  /** Kick eventfd (the driver writes it). */
  kickFd: number;
  /** Call eventfd (the device writes it). */
  callFd: number;
  /** Error eventfd (the device writes it when it gives up on the ring). */
  errFd: number;
}

/** Options of {@link DriverQueue.create}. */
export interface DriverQueueOptions {
  /** Entries per indirect table (0: no indirect tables); default 0. */
  indirectEntries?: number;
}

/** One split virtqueue, driver side. */
export class DriverQueue {
  /** Where everything is. */
  readonly layout: QueueLayout;
  /** Queue index. */
  readonly index: number;
  /** Queue size. */
  readonly size: number;
  /** Use VIRTIO_F_EVENT_IDX (set after feature negotiation). */
  eventIdx = false;
  /** Kick after every publish, whatever the device asked (for tests of notification logic). */
  alwaysKick = false;
  /** The driver's avail->idx (the next slot to fill). */
  availIdx = 0;
  /** Used index up to which the driver has reclaimed. */
  lastUsedIdx = 0;
  /** Kicks sent. */
  kicks = 0;
  /** Length field of the last used element {@link poll} returned. */
  lastLen = 0;
  /** Requests made available and not yet returned. */
  outstanding = 0;
  readonly #ram: GuestRam;
  readonly #u16: Uint16Array;
  readonly #u32: Uint32Array;
  readonly #descOff: number;
  readonly #availOff: number;
  readonly #usedOff: number;
  readonly #usedEventSlot: number;
  readonly #free: Uint16Array;
  #freeTop = 0;
  /** Per head: descriptors in the chain (0 when the head is not outstanding). */
  readonly #chainLen: Uint16Array;
  /** Per head: writable bytes of the chain. */
  readonly #writable: Uint32Array;
  /** Per descriptor: next descriptor of its chain (our own copy; the device may not change it). */
  readonly #next: Uint16Array;
  readonly #epoll: Epoll;
  readonly #ownsFds: boolean;
  #publishedIdx = 0;

  private constructor(ram: GuestRam, layout: QueueLayout, ownsFds: boolean) {
    this.#ram = ram;
    this.layout = layout;
    this.index = layout.index;
    this.size = layout.size;
    this.#ownsFds = ownsFds;
    this.#u16 = ram.u16;
    this.#u32 = ram.u32;
    this.#descOff = layout.desc.offset;
    this.#availOff = layout.avail.offset;
    this.#usedOff = layout.used.offset;
    this.#usedEventSlot = (layout.avail.offset + usedEventOffset(layout.size)) >> 1;
    this.#free = new Uint16Array(layout.size);
    this.#chainLen = new Uint16Array(layout.size);
    this.#writable = new Uint32Array(layout.size);
    this.#next = new Uint16Array(layout.size);
    this.#epoll = new Epoll(4);
    this.#epoll.add(layout.callFd, 0);
    this.#initFree();
    this.availIdx = this.#u16[(this.#availOff + RING_IDX) >> 1];
    this.#publishedIdx = this.availIdx;
    this.lastUsedIdx = this.#u16[(this.#usedOff + RING_IDX) >> 1];
  }

  /** Allocates the rings of queue `index` (size a power of two) in `ram`, and its eventfds. */
  static create(
    ram: GuestRam,
    index: number,
    size: number,
    options: DriverQueueOptions = {},
  ): DriverQueue {
    if (size < 1 || size > MAX_QUEUE_SIZE || (size & (size - 1)) !== 0) {
      throw new RangeError(`queue size ${size} is not a power of two up to ${MAX_QUEUE_SIZE}`);
    }
    const entries = options.indirectEntries ?? 0;
    const layout: QueueLayout = {
      index,
      size,
      // Alignments from virtio 1.x §2.7: 16 for the table, 2 for avail, 4 for used. Page-align the
      // table anyway, as guests do.
      desc: ram.alloc(descTableSize(size), 4096),
      avail: ram.alloc(availRingSize(size), AVAIL_ALIGN),
      used: ram.alloc(usedRingSize(size), 4096),
      indirect: entries > 0 ? ram.alloc(descTableSize(entries * size), DESC_ALIGN) : null,
      indirectEntries: entries,
      kickFd: createEventFd(),
      callFd: createEventFd(),
      errFd: createEventFd(),
    };
    return new DriverQueue(ram, layout, true);
  }

  /** Drives a queue another thread created (the fds stay owned by that thread). */
  static attach(ram: GuestRam, layout: QueueLayout): DriverQueue {
    return new DriverQueue(ram, layout, false);
  }

  /** The SET_VRING_ADDR payload: front-end virtual addresses of the three parts. */
  vringAddr(): VringAddr {
    const l = this.layout;
    return {
      index: this.index,
      flags: 0,
      desc: l.desc.uva,
      avail: l.avail.uva,
      used: l.used.uva,
      log: l.used.gpa,
    };
  }

  #initFree(): void {
    this.#freeTop = 0;
    for (let i = this.size - 1; i >= 0; i--) this.#free[this.#freeTop++] = i;
    this.#chainLen.fill(0);
    this.outstanding = 0;
  }

  /** Zeroes the rings and forgets all requests (a device reset, as a driver does it). */
  reset(): void {
    const l = this.layout;
    this.#ram.bytes(l.desc).fill(0);
    this.#ram.bytes(l.avail).fill(0);
    this.#ram.bytes(l.used).fill(0);
    this.availIdx = this.#publishedIdx = this.lastUsedIdx = 0;
    this.#initFree();
  }

  /**
   * Places both ring indices at `idx` in guest memory before the ring is given to the device, as
   * if `idx` requests had already gone round (to test 16-bit wrap-around). Pair it with
   * SET_VRING_BASE `idx`.
   */
  presetIndices(idx: number): void {
    if (this.outstanding !== 0) throw new Error("requests are outstanding");
    this.availIdx = this.#publishedIdx = this.lastUsedIdx = idx & 0xffff;
    Atomics.store(this.#u16, (this.#availOff + RING_IDX) >> 1, this.availIdx);
    Atomics.store(this.#u16, (this.#usedOff + RING_IDX) >> 1, this.availIdx);
    // used_event and avail_event as a ring that went round would have them (a fresh ring has 0
    // for both, matching index 0): otherwise the first kick decision compares with a stale 0.
    this.#u16[this.#usedEventSlot] = this.availIdx;
    Atomics.store(this.#u16, (this.#usedOff + availEventOffset(this.size)) >> 1, this.availIdx);
  }

  /** Free descriptors. */
  get freeCount(): number {
    return this.#freeTop;
  }

  /** The device's used->idx as it is in memory now. */
  get usedIdx(): number {
    return Atomics.load(this.#u16, (this.#usedOff + RING_IDX) >> 1);
  }

  /** avail->idx as published in guest memory (possibly by another thread driving this ring). */
  get publishedAvailIdx(): number {
    return Atomics.load(this.#u16, (this.#availOff + RING_IDX) >> 1);
  }

  /** used->flags (VRING_USED_F_NO_NOTIFY is bit 0). */
  get usedFlags(): number {
    return Atomics.load(this.#u16, (this.#usedOff + RING_FLAGS) >> 1);
  }

  /** avail_event, which the device writes after the used ring when EVENT_IDX is on. */
  get availEvent(): number {
    return Atomics.load(this.#u16, (this.#usedOff + availEventOffset(this.size)) >> 1);
  }

  #writeDesc(i: number, gpa: number, len: number, flags: number, next: number): void {
    this.#writeEntry(this.#descOff + DESC_SIZE * i, gpa, len, flags, next);
  }

  #writeIndirect(head: number, k: number, gpa: number, len: number, flags: number, next: number) {
    const l = this.layout;
    const at = l.indirect!.offset + DESC_SIZE * (head * l.indirectEntries + k);
    this.#writeEntry(at, gpa, len, flags, next);
  }

  /** Writes the descriptor at byte offset `at` of guest RAM (flags and next in one store). */
  #writeEntry(at: number, gpa: number, len: number, flags: number, next: number): void {
    const w = (at + DESC_ADDR) >> 2;
    this.#u32[w] = gpa >>> 0;
    this.#u32[w + 1] = Math.floor(gpa / 4294967296);
    this.#u32[(at + DESC_LEN) >> 2] = len;
    this.#u32[(at + DESC_FLAGS) >> 2] = flags | (next << 16);
  }

  #put(head: number, count: number, writable: number): void {
    this.#chainLen[head] = count;
    this.#writable[head] = writable;
    this.#u16[(this.#availOff + availEntry(this.availIdx & (this.size - 1))) >> 1] = head;
    this.availIdx = (this.availIdx + 1) & 0xffff;
    this.outstanding++;
  }

  /**
   * Builds a chain from `segments` and puts its head in the next avail slot (not yet published).
   * With `indirect`, the chain is one descriptor pointing at an indirect table. Returns the head,
   * or -1 when there are not enough free descriptors.
   */
  add(segments: readonly Segment[], indirect = false): number {
    let writable = 0;
    for (const s of segments) if (s.writable) writable += s.length;
    if (indirect) {
      const l = this.layout;
      if (l.indirect === null) throw new Error("queue was created without indirect tables");
      if (segments.length > l.indirectEntries) throw new RangeError("too many segments");
      if (this.#freeTop === 0) return -1;
      const head = this.#free[--this.#freeTop];
      segments.forEach((s, k) => {
        const last = k === segments.length - 1;
        this.#writeIndirect(
          head,
          k,
          s.gpa,
          s.length,
          (s.writable ? F_WRITE : 0) | (last ? 0 : F_NEXT),
          last ? 0 : k + 1,
        );
      });
      const table = l.indirect.gpa + DESC_SIZE * head * l.indirectEntries;
      this.#writeDesc(head, table, DESC_SIZE * segments.length, F_INDIRECT, 0);
      this.#next[head] = head;
      this.#put(head, 1, writable);
      return head;
    }
    if (segments.length === 0 || segments.length > this.#freeTop) return -1;
    const ids = segments.map(() => this.#free[--this.#freeTop]);
    segments.forEach((s, k) => {
      const last = k === segments.length - 1;
      const next = last ? 0 : ids[k + 1];
      this.#writeDesc(
        ids[k],
        s.gpa,
        s.length,
        (s.writable ? F_WRITE : 0) | (last ? 0 : F_NEXT),
        next,
      );
      this.#next[ids[k]] = next;
    });
    this.#put(ids[0], segments.length, writable);
    return ids[0];
  }

  /**
   * The allocation-free form of {@link add} for block requests: a readable header, an optional
   * data buffer (`dataLen` 0 for none), and a writable status byte. Returns the head or -1.
   */
  add3(
    hdrGpa: number,
    hdrLen: number,
    dataGpa: number,
    dataLen: number,
    dataWritable: boolean,
    statusGpa: number,
  ): number {
    const n = dataLen > 0 ? 3 : 2;
    if (this.#freeTop < n) return -1;
    const a = this.#free[--this.#freeTop];
    const c = this.#free[--this.#freeTop];
    if (n === 3) {
      const b = this.#free[--this.#freeTop];
      this.#writeDesc(a, hdrGpa, hdrLen, F_NEXT, b);
      this.#writeDesc(b, dataGpa, dataLen, F_NEXT | (dataWritable ? F_WRITE : 0), c);
      this.#next[a] = b;
      this.#next[b] = c;
    } else {
      this.#writeDesc(a, hdrGpa, hdrLen, F_NEXT, c);
      this.#next[a] = c;
    }
    this.#writeDesc(c, statusGpa, 1, F_WRITE, 0);
    this.#put(a, n, 1 + (dataWritable ? dataLen : 0));
    return a;
  }

  /**
   * Publishes the chains added since the last call (a fenced store of avail->idx) and, with
   * EVENT_IDX, asks to be interrupted for the next completion (used_event).
   */
  publish(): void {
    if (this.eventIdx) this.#u16[this.#usedEventSlot] = this.lastUsedIdx;
    Atomics.store(this.#u16, (this.#availOff + RING_IDX) >> 1, this.availIdx);
  }

  /**
   * Kicks the device if it asked for it (used->flags, or avail_event with EVENT_IDX) since the
   * last kick decision. Returns whether a kick was sent.
   */
  kick(): boolean {
    const old = this.#publishedIdx;
    const now = this.availIdx;
    this.#publishedIdx = now;
    let needed: boolean;
    if (this.alwaysKick) needed = true;
    else if (this.eventIdx) {
      needed = ((now - this.availEvent - 1) & 0xffff) < ((now - old) & 0xffff);
    } else needed = (this.usedFlags & USED_F_NO_NOTIFY) === 0;
    if (needed) {
      signalEventFd(this.layout.kickFd);
      this.kicks++;
    }
    return needed;
  }

  /** Kicks unconditionally. */
  kickNow(): void {
    signalEventFd(this.layout.kickFd);
    this.kicks++;
  }

  /**
   * Reclaims the next used element: returns its head (and sets {@link lastLen}), or -1 when the
   * device has returned nothing new. Throws {@link UsedRingError} for a head that is not
   * outstanding or a length beyond the chain's writable bytes.
   */
  poll(): number {
    if (this.usedIdx === this.lastUsedIdx) return -1;
    const e = (this.#usedOff + usedElem(this.lastUsedIdx & (this.size - 1))) >> 2;
    const id = this.#u32[e];
    const len = this.#u32[e + (USED_ELEM_LEN >> 2)];
    if (id >= this.size || this.#chainLen[id] === 0) {
      throw new UsedRingError(
        `queue ${this.index}: used element ${this.lastUsedIdx} names head ${id}, not outstanding`,
      );
    }
    if (len > this.#writable[id]) {
      throw new UsedRingError(
        `queue ${this.index}: used length ${len} exceeds the ${this.#writable[id]} writable bytes`,
      );
    }
    this.lastUsedIdx = (this.lastUsedIdx + 1) & 0xffff;
    let d = id;
    for (let k = this.#chainLen[id]; k > 0; k--) {
      this.#free[this.#freeTop++] = d;
      d = this.#next[d];
    }
    this.#chainLen[id] = 0;
    this.outstanding--;
    this.lastLen = len;
    // Ask for an interrupt at the next completion. The fenced store orders it before the caller's
    // next read of used->idx, so a completion racing with it is seen by that read.
    if (this.eventIdx) Atomics.store(this.#u16, this.#usedEventSlot, this.lastUsedIdx);
    return id;
  }

  /** Waits up to `timeoutMs` for the call eventfd; returns whether it fired (and clears it). */
  waitCall(timeoutMs: number): boolean {
    if (this.#epoll.wait(timeoutMs) === 0) return false;
    drainEventFd(this.layout.callFd);
    return true;
  }

  /** Whether the device signalled its error eventfd (clears it). */
  errorSignalled(): boolean {
    return drainEventFd(this.layout.errFd) > 0;
  }

  /**
   * Polls, waiting on the call eventfd between attempts, until a used element arrives. Returns
   * its head; throws after `timeoutMs` without one. A device that updates the used ring but never
   * signals the call eventfd (when the driver asked for it) times out here: that is a bug.
   */
  waitUsed(timeoutMs = 5000): number {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const head = this.poll();
      if (head >= 0) return head;
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(
          `queue ${this.index}: no completion within ${timeoutMs} ms ` +
            `(avail ${this.availIdx}, used ${this.usedIdx}, outstanding ${this.outstanding})`,
        );
      }
      this.waitCall(left);
    }
  }

  /** Closes the epoll fd and, for a queue this thread created, the eventfds. */
  close(): void {
    this.#epoll.close();
    if (this.#ownsFds) {
      closeQuietly(this.layout.kickFd);
      closeQuietly(this.layout.callFd);
      closeQuietly(this.layout.errFd);
    }
  }
}
