/**
 * The split virtqueue (virtio 1.x §2.7), device side.
 *
 * State follows the vhost-user ring life cycle: a queue is *configured* by SET_VRING_NUM/ADDR/BASE,
 * *started* by SET_VRING_KICK, *stopped* by GET_VRING_BASE, and independently *enabled* by
 * SET_VRING_ENABLE. Stopping never resets the indices: QEMU 7.2 stops and restarts rings around
 * SET_STATUS(0) and expects them to carry on.
 *
 * @module
 */

import { signalEventFd } from "../sys/event.ts";
import { closeQuietly } from "../sys/libc.ts";
import { type DescriptorChain, MAX_SEGMENTS, ParsedChain } from "./descriptor_chain.ts";
import type { GuestMemory, MemoryRegion } from "./guest_memory.ts";
import type { InflightRegion } from "./inflight.ts";
import type { DirtyLog } from "./dirty_log.ts";
import {
  IO_STAT_SLOTS,
  IoDirection,
  ioSlotBase,
  IoStat,
  latencyBucket,
  QUEUE_STAT_SLOTS,
  QueueStat,
} from "./queue_stats.ts";
import { monotonicMs } from "../sys/clock.ts";
import {
  AVAIL_ALIGN,
  availEntry,
  availEventOffset,
  availRingSize,
  DESC_ADDR,
  DESC_ALIGN,
  DESC_FLAGS,
  DESC_LEN,
  DESC_NEXT,
  DESC_SIZE,
  descTableSize,
  RING_FLAGS,
  RING_IDX,
  USED_ALIGN,
  USED_ELEM_LEN,
  usedElem,
  usedEventOffset,
  usedRingSize,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VRING_AVAIL_F_NO_INTERRUPT,
  VRING_USED_F_NO_NOTIFY,
} from "./layout.ts";

export {
  MAX_QUEUE_SIZE,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VRING_AVAIL_F_NO_INTERRUPT,
  VRING_USED_F_NO_NOTIFY,
} from "./layout.ts";

/**
 * Fewest descriptors a chain may use in total, direct and indirect, whatever the queue size. The
 * rule is the queue size (virtio 1.2 §2.7.5.3.1), but Linux sizes indirect tables by the device's
 * segment limit, not the queue's size, and a block device offers 126 segments plus a header and a
 * status: a queue of 64 must still take the 128-descriptor chains its driver builds. Either way,
 * the work per chain is bounded by this, never by a table length the guest chooses.
 */
export const MIN_CHAIN_BUDGET = 128;
/** Addresses from 2^53 up do not fit a number exactly; no guest memory is there. */
const MAX_GUEST_ADDRESS_HIGH = 2 ** 21;

/** Front-end virtual addresses of the three ring parts (SET_VRING_ADDR). */
export interface RingAddresses {
  /** Descriptor table. */
  desc: number;
  /** Driver (available) ring. */
  avail: number;
  /** Device (used) ring. */
  used: number;
}

/**
 * The operations a device needs from a queue: take chains, complete them (one at a time or in
 * batches), give back chains it cannot use yet, and wait for more. A device that holds receive
 * buffers until data comes needs all of them; the state of the ring itself (size, addresses,
 * eventfds) belongs to the vhost-user back-end and is not reachable from here.
 */
export interface Virtqueue {
  /** The queue's index within the device. */
  readonly index: number;
  /** Queue size (number of descriptors). */
  readonly size: number;
  /** The next available chain, or null when the ring is empty (or the queue just broke). */
  pop(): DescriptorChain | null;
  /** Returns a chain to the driver, having written `written` bytes into its writable part. */
  push(chain: DescriptorChain, written: number): void;
  /**
   * {@link push} by head index, for a chain completed after others were popped (async I/O, or
   * receive buffers held until data came). With `publish` false the used element is written but
   * the driver does not see it yet: {@link publishUsed} then shows a batch at once (the buffers
   * of one packet that spans several).
   */
  pushHead(head: number, written: number, publish?: boolean): void;
  /** Shows the driver every used element {@link pushHead} wrote with `publish` false. */
  publishUsed(): void;
  /**
   * Gives back the last `count` popped chains untouched, as if they had never been popped: the
   * next {@link pop} returns them again (a receive queue that ran out of buffers in the middle of
   * a packet). Not for chains completed since, nor for queues the front-end tracks inflight.
   */
  unpop(count: number): void;
  /** Whether the driver has made chains available that the device has not popped. */
  hasAvailable(): boolean;
  /**
   * Whether the driver broke the queue: {@link pop} then returns null until the front-end starts
   * it again. A device that pops outside a kick calls `DeviceEventLoop.notify` to have a
   * broken queue stopped and reported.
   */
  readonly broken: boolean;
  /**
   * Asks the driver not to kick while the device drains the queue. vhostd does this around every
   * `VirtioDevice.processQueue` call; a device needs it only for work outside one.
   */
  disableNotification(): void;
  /**
   * Asks the driver to kick when it makes chains available, and returns whether some already
   * arrived meanwhile: a device waiting for receive buffers then carries on at once instead of
   * waiting for a kick that will not come (the race that VIRTIO_F_EVENT_IDX makes likely).
   */
  enableNotification(): boolean;
  /**
   * Has the device called again for this queue once the loop has served its other fds, as if
   * the driver kicked: a device that stops at a budget with chains left yields this way. Returns
   * false when the queue is stopped and no call will come.
   */
  kickSelf(): boolean;
  /** Counts a request the device failed (an I/O error status), for metrics. */
  countError?(): void;
  /** Counts bytes a request read from the driver, when it completes by {@link pushHead}. */
  countBytes?(bytes: number): void;
  /**
   * Counts the request with head `head`, completed next by {@link push} or {@link pushHead}, as
   * a read or a write ({@link IoDirection}) of `bytes` data bytes: its latency then goes to that
   * direction's histogram as well.
   */
  countIo?(head: number, direction: number, bytes: number): void;
}

/** One split virtqueue. */
export class SplitQueue implements Virtqueue {
  /** The queue's index within the device. */
  readonly index: number;
  /** Largest size SET_VRING_NUM may set. */
  readonly maxSize: number;
  #size = 0;
  #addresses: RingAddresses | null = null;
  #lastAvailIdx = 0;
  #usedIdx = 0;
  #eventIdx = false;
  #indirect = false;
  #enabled = false;
  #started = false;
  #broken = false;
  #kickFd = -1;
  #callFd = -1;
  #errFd = -1;
  #error = "";
  #inflight: InflightRegion | null = null;
  #stats: Float64Array = new Float64Array(QUEUE_STAT_SLOTS);
  #ioStats: Float64Array = new Float64Array(IO_STAT_SLOTS);
  /**
   * The chain {@link pop} parses into (null until the queue is first configured): a driver
   * enables only the queues it uses (Linux one per vCPU), and the others then cost no memory.
   */
  #chain: ParsedChain | null = null;
  #memory: GuestMemory | null = null;
  /** Where written buffers are logged during a migration (null: not logging). */
  #log: DirtyLog | null = null;
  /** Held until the dirty log arrives: logging is on but nothing could record it yet. */
  #awaitingLog = false;
  /** Guest-physical address of the used ring for the dirty log (VHOST_VRING_F_LOG), or -1. */
  #usedLogAddress = -1;
  #generation = -1;
  #desc: MemoryRegion | null = null;
  #descOff = 0;
  #avail: MemoryRegion | null = null;
  #availOff = 0;
  #used: MemoryRegion | null = null;
  #usedOff = 0;
  #signalledUsed = 0;
  #signalledValid = false;
  #pushedSinceNotify = false;
  #resubmit: number[] = [];
  /** When the current batch started (0: no batch); every chain popped in it is dated by it. */
  #batchStart = 0;
  #poppedAt: Float64Array = NO_TIMES;
  /** Pop times of the chains completed since the last {@link notify}, not yet timed. */
  #completedAt: Float64Array = NO_TIMES;
  /** The {@link IoDirection} of each of those (0: neither). */
  #completedDirection: Uint8Array = NO_DIRECTIONS;
  /** The direction {@link countIo} gave each head until it completes (0: none). */
  #directionOf: Uint8Array = NO_DIRECTIONS;
  #completedCount = 0;

  /** Creates queue `index` admitting sizes up to `maxSize`. */
  constructor(index: number, maxSize: number) {
    this.index = index;
    this.maxSize = maxSize;
  }

  /** Queue size, 0 until {@link configure} (SET_VRING_NUM). */
  get size(): number {
    return this.#size;
  }

  /** Ring addresses in the front-end's address space, null until {@link setAddresses}. */
  get addresses(): RingAddresses | null {
    return this.#addresses;
  }

  /** Next available-ring index the device will read. */
  get lastAvailIdx(): number {
    return this.#lastAvailIdx;
  }

  /** The device's used index (what it last put on the used ring). */
  get usedIdx(): number {
    return this.#usedIdx;
  }

  /** Whether VIRTIO_F_EVENT_IDX was negotiated. */
  get eventIdx(): boolean {
    return this.#eventIdx;
  }

  /** Whether VIRTIO_F_INDIRECT_DESC was negotiated. */
  get indirect(): boolean {
    return this.#indirect;
  }

  /** SET_VRING_ENABLE state. */
  get enabled(): boolean {
    return this.#enabled;
  }

  /** Set by {@link start} (SET_VRING_KICK), cleared by {@link stop} (GET_VRING_BASE). */
  get started(): boolean {
    return this.#started;
  }

  /** Whether the driver broke the ring ({@link fail}); cleared by {@link start} and {@link reset}. */
  get broken(): boolean {
    return this.#broken;
  }

  /** The kick eventfd, or -1. */
  get kickFd(): number {
    return this.#kickFd;
  }

  /** The call eventfd, or -1. */
  get callFd(): number {
    return this.#callFd;
  }

  /** The error eventfd, or -1. */
  get errFd(): number {
    return this.#errFd;
  }

  /** Why the queue broke (for the log), or "". */
  get error(): string {
    return this.#error;
  }

  /** This queue's inflight tracking region (INFLIGHT_SHMFD), or null. */
  get inflight(): InflightRegion | null {
    return this.#inflight;
  }

  /**
   * Counters (see {@link QueueStat}); a private array until {@link countInto} points it at shared
   * memory. Cost on the hot path: a few increments and one clock read per request.
   */
  get stats(): Float64Array {
    return this.#stats;
  }

  /**
   * The device's read/write accounting ({@link IoStat}), one array for all its queues (in vhostd,
   * shared memory the main thread reads); private until {@link countInto} replaces it.
   */
  get ioStats(): Float64Array {
    return this.#ioStats;
  }

  /**
   * Moves the counters into `stats` (at least {@link QUEUE_STAT_SLOTS} long) and, when given, the
   * read/write accounting into `ioStats`. Called before the queue is first used.
   */
  countInto(stats: Float64Array | null, ioStats: Float64Array | null = null): void {
    if (stats !== null) this.#stats = stats;
    if (ioStats !== null) this.#ioStats = ioStats;
  }

  /**
   * Sets the queue size (SET_VRING_NUM): a power of two up to {@link maxSize}, and no larger
   * than an inflight region already given. The rings must be translated again ({@link attach}).
   */
  configure(size: number): void {
    if (size === 0 || size > this.maxSize || (size & (size - 1)) !== 0) {
      throw new RangeError(`bad queue size ${size} (max ${this.maxSize})`);
    }
    if (this.#inflight !== null && size > this.#inflight.size) {
      throw new RangeError(
        `queue size ${size} is larger than the inflight buffer's ${this.#inflight.size}`,
      );
    }
    this.#size = size;
    this.#allocate(size);
  }

  /**
   * Sizes the per-head bookkeeping to `size` entries and creates the chain object, the first time
   * the queue is configured (and again only if a later size is larger): the memory follows what
   * the driver negotiated, not {@link maxSize}. Times of chains still in flight are kept.
   */
  #allocate(size: number): void {
    this.#chain ??= new ParsedChain();
    if (size <= this.#poppedAt.length) return;
    const poppedAt = new Float64Array(size);
    poppedAt.set(this.#poppedAt);
    this.#poppedAt = poppedAt;
    const directionOf = new Uint8Array(size);
    directionOf.set(this.#directionOf);
    this.#directionOf = directionOf;
    const completedAt = new Float64Array(size);
    completedAt.set(this.#completedAt.subarray(0, this.#completedCount));
    this.#completedAt = completedAt;
    const completedDirection = new Uint8Array(size);
    completedDirection.set(this.#completedDirection.subarray(0, this.#completedCount));
    this.#completedDirection = completedDirection;
  }

  /**
   * Sets where the three ring parts are in the front-end's address space (SET_VRING_ADDR). The
   * rings must be translated again ({@link attach}).
   */
  setAddresses(addresses: RingAddresses): void {
    this.#addresses = { desc: addresses.desc, avail: addresses.avail, used: addresses.used };
  }

  /** Sets the next available index the device reads (SET_VRING_BASE). */
  setBase(lastAvailIdx: number): void {
    this.#lastAvailIdx = lastAvailIdx & 0xffff;
  }

  /** Applies the negotiated ring features (SET_FEATURES). */
  setFeatures(eventIdx: boolean, indirect: boolean): void {
    this.#eventIdx = eventIdx;
    this.#indirect = indirect;
  }

  /** Enables or disables the ring (SET_VRING_ENABLE, or features without protocol features). */
  enable(on: boolean): void {
    this.#enabled = on;
  }

  /**
   * Gives the queue its inflight tracking region (INFLIGHT_SHMFD), or takes it away (null). The
   * region must hold at least {@link size} entries.
   */
  trackInflight(region: InflightRegion | null): void {
    this.#inflight = region;
  }

  /** Stops the ring (GET_VRING_BASE, or a ring the driver broke): closes the kick fd. */
  stop(): void {
    this.setKickFd(-1);
    this.#started = false;
  }

  /** Whether requests may be processed: configured, translated, started, enabled and sound. */
  get ready(): boolean {
    return this.#started && this.#enabled && !this.#broken && !this.#awaitingLog &&
      this.#translated();
  }

  /** Forgets everything (device reset or disconnect); closes the eventfds. */
  reset(): void {
    this.#size = 0;
    this.#addresses = null;
    this.#lastAvailIdx = 0;
    this.#usedIdx = 0;
    this.#enabled = false;
    this.#started = false;
    this.#broken = false;
    this.#error = "";
    this.#memory = null;
    this.#generation = -1;
    this.#desc = this.#avail = this.#used = null;
    this.#signalledValid = false;
    this.#pushedSinceNotify = false;
    this.#resubmit = [];
    this.#inflight = null;
    this.#log = null;
    this.#awaitingLog = false;
    this.#usedLogAddress = -1;
    this.#stats[QueueStat.IN_FLIGHT] = 0;
    this.#batchStart = 0;
    this.#poppedAt.fill(0);
    this.#directionOf.fill(0);
    this.#completedCount = 0;
    this.setKickFd(-1);
    this.setCallFd(-1);
    this.setErrFd(-1);
  }

  /** Replaces the kick fd (closing the old one). */
  setKickFd(fd: number): void {
    if (this.#kickFd >= 0 && this.#kickFd !== fd) closeQuietly(this.#kickFd);
    this.#kickFd = fd;
  }

  /** Replaces the call fd (closing the old one). */
  setCallFd(fd: number): void {
    if (this.#callFd >= 0 && this.#callFd !== fd) closeQuietly(this.#callFd);
    this.#callFd = fd;
  }

  /** Replaces the error fd (closing the old one). */
  setErrFd(fd: number): void {
    if (this.#errFd >= 0 && this.#errFd !== fd) closeQuietly(this.#errFd);
    this.#errFd = fd;
  }

  /**
   * Translates the ring addresses through `memory`. Returns an error message when a ring part is
   * outside guest memory or misaligned, or null on success. Called again whenever the memory
   * table changes.
   */
  attach(memory: GuestMemory): string | null {
    this.#memory = memory;
    this.#generation = -1;
    this.#desc = this.#avail = this.#used = null;
    const a = this.#addresses;
    if (a === null || this.#size === 0) return null;
    if (memory.regions.length === 0) {
      return "no guest memory was shared: QEMU needs " +
        "-object memory-backend-memfd,id=mem,size=<RAM>,share=on -machine memory-backend=mem";
    }
    const n = this.#size;
    const parts: [string, number, number, number][] = [
      ["descriptor table", a.desc, descTableSize(n), DESC_ALIGN],
      ["available ring", a.avail, availRingSize(n), AVAIL_ALIGN],
      ["used ring", a.used, usedRingSize(n), USED_ALIGN],
    ];
    const found: [MemoryRegion, number][] = [];
    for (const [name, uva, len, align] of parts) {
      const r = memory.findUva(uva, len);
      if (r === null) {
        return `queue ${this.index}: ${name} at 0x${
          uva.toString(16)
        } (+${len}) is outside guest memory`;
      }
      const off = r.offsetOfUva(uva);
      if (off % align !== 0) return `queue ${this.index}: ${name} is misaligned`;
      found.push([r, off]);
    }
    [[this.#desc, this.#descOff], [this.#avail, this.#availOff], [this.#used, this.#usedOff]] =
      found;
    this.#generation = memory.generation;
    return null;
  }

  #translated(): boolean {
    return this.#desc !== null && this.#memory !== null &&
      this.#generation === this.#memory.generation;
  }

  /** Takes the used index from guest memory (used->idx), where a previous session left it. */
  syncUsedIdx(): void {
    if (this.#used === null) return;
    this.#usedIdx = Atomics.load(this.#used.u16, (this.#usedOff + RING_IDX) >> 1);
  }

  /** The driver's avail->idx. */
  availIdx(): number {
    return Atomics.load(this.#avail!.u16, (this.#availOff + RING_IDX) >> 1);
  }

  /** Chains popped (or to be resubmitted) and not yet put on the used ring. */
  get inFlight(): number {
    return (this.#lastAvailIdx - this.#usedIdx) & 0xffff;
  }

  /** Whether the driver has made chains available that the device has not popped. */
  hasAvailable(): boolean {
    return this.#resubmit.length > 0 || this.availIdx() !== this.#lastAvailIdx;
  }

  /**
   * Starts the ring (SET_VRING_KICK). With inflight tracking, chains an earlier back-end took and
   * never completed are queued for resubmission, oldest first, and the available index resumes
   * after them. Returns how many chains will be resubmitted.
   */
  start(): number {
    this.#started = true;
    // A ring the front-end starts again (after stopping it) is a fresh ring: a failure on the
    // old one no longer applies, as the virtio device reset that precedes it promises the driver.
    this.#broken = false;
    this.#error = "";
    this.#signalledValid = false;
    this.#resubmit = [];
    if (this.#inflight === null || !this.#translated()) return 0;
    this.syncUsedIdx();
    this.#resubmit = this.#inflight.recover(this.#usedIdx).filter((head) => head < this.#size);
    this.#lastAvailIdx = (this.#usedIdx + this.#resubmit.length) & 0xffff;
    return this.#resubmit.length;
  }

  /** Marks the queue broken, tells the front-end through the error eventfd, and returns null. */
  fail(message: string): null {
    this.#broken = true;
    this.#error = `queue ${this.index}: ${message}`;
    this.#stats[QueueStat.ERRORS]++;
    if (this.#errFd >= 0) signalEventFd(this.#errFd);
    return null;
  }

  /** Pops the next available chain into the queue's preallocated chain object. */
  pop(): DescriptorChain | null {
    const chain = this.#chain;
    if (this.#broken || chain === null) return null;
    if (this.#resubmit.length > 0) {
      const head = this.#resubmit.shift()!;
      const err = this.#parse(head, chain);
      if (err !== null) return this.fail(err);
      this.#taken(head);
      return chain;
    }
    const avail = this.#avail!;
    const availIdx = Atomics.load(avail.u16, (this.#availOff + RING_IDX) >> 1);
    if (availIdx === this.#lastAvailIdx) return null;
    if (((availIdx - this.#lastAvailIdx) & 0xffff) > this.#size) {
      return this.fail(`available index jumped from ${this.#lastAvailIdx} to ${availIdx}`);
    }
    const slot = (this.#availOff + availEntry(this.#lastAvailIdx % this.#size)) >> 1;
    const head = avail.u16[slot];
    this.#lastAvailIdx = (this.#lastAvailIdx + 1) & 0xffff;
    const err = this.#parse(head, chain);
    if (err !== null) return this.fail(err);
    this.#inflight?.markTaken(head);
    this.#taken(head);
    return chain;
  }

  /** Dates a popped chain (one clock read per batch, not per chain) and counts it in flight. */
  #taken(head: number): void {
    if (this.#batchStart === 0) this.#batchStart = monotonicMs();
    this.#poppedAt[head] = this.#batchStart;
    this.#stats[QueueStat.IN_FLIGHT]++;
  }

  /**
   * Adds the chains completed since the last call to the latency histogram: each took from the
   * start of the batch it was popped in until now.
   */
  #recordLatencies(): void {
    const now = monotonicMs();
    const s = this.#stats;
    const io = this.#ioStats;
    const done = this.#completedAt;
    const directions = this.#completedDirection;
    for (let i = 0; i < this.#completedCount; i++) {
      const ms = now - done[i];
      const bucket = latencyBucket(ms);
      s[QueueStat.LATENCY_SUM] += ms / 1000;
      s[QueueStat.LATENCY_BUCKET0 + bucket]++;
      if (directions[i] !== 0) {
        const base = ioSlotBase(directions[i]);
        io[base + IoStat.LATENCY_SUM] += ms / 1000;
        io[base + IoStat.LATENCY_BUCKET0 + bucket]++;
      }
    }
    this.#completedCount = 0;
  }

  /** Counts a request the device failed, for metrics. */
  countError(): void {
    this.#stats[QueueStat.ERRORS]++;
  }

  /** Counts bytes read from the driver's buffers by a request completed with pushHead. */
  countBytes(bytes: number): void {
    this.#stats[QueueStat.BYTES] += bytes;
  }

  /** Counts a read or a write the device completes next (see {@link Virtqueue.countIo}). */
  countIo(head: number, direction: number, bytes: number): void {
    if (direction !== IoDirection.READ && direction !== IoDirection.WRITE) return;
    const base = ioSlotBase(direction);
    this.#ioStats[base + IoStat.REQUESTS]++;
    this.#ioStats[base + IoStat.BYTES] += bytes;
    if (head < this.#directionOf.length) this.#directionOf[head] = direction;
  }

  #parse(head: number, chain: ParsedChain): string | null {
    const memory = this.#memory!;
    chain.reset(head);
    if (head >= this.#size) return `head descriptor ${head} out of range`;
    let table = this.#desc!;
    let tableOff = this.#descOff;
    let tableLen = this.#size;
    let idx = head;
    // One budget for the whole chain, indirect table included: a table may be long, but the
    // descriptors the device walks per chain stay bounded (see MIN_CHAIN_BUDGET).
    let budget = Math.max(this.#size, MIN_CHAIN_BUDGET);
    let inIndirect = false;
    for (;;) {
      if (budget-- === 0) return "descriptor chain loops or is longer than the queue";
      const d = tableOff + idx * DESC_SIZE;
      const view = table.view;
      const high = view.getUint32(d + DESC_ADDR + 4, true);
      if (high >= MAX_GUEST_ADDRESS_HIGH) {
        return `descriptor ${idx} points above 2^53, outside guest memory`;
      }
      const addr = view.getUint32(d + DESC_ADDR, true) + high * 4294967296;
      const len = view.getUint32(d + DESC_LEN, true);
      const flags = view.getUint16(d + DESC_FLAGS, true);
      const next = view.getUint16(d + DESC_NEXT, true);
      if (flags & VIRTQ_DESC_F_INDIRECT) {
        if (inIndirect) return "indirect descriptor inside an indirect table";
        if (!this.#indirect) return "indirect descriptor without VIRTIO_F_INDIRECT_DESC";
        if (flags & VIRTQ_DESC_F_NEXT) return "indirect descriptor with NEXT set";
        if (len === 0 || len % DESC_SIZE !== 0) return `indirect table of bad length ${len}`;
        const r = memory.findGpa(addr, len);
        if (r === null) return `indirect table at 0x${addr.toString(16)} is outside guest memory`;
        table = r;
        tableOff = r.offsetOfGpa(addr);
        tableLen = len / DESC_SIZE;
        idx = 0;
        inIndirect = true;
        // The pointer to the table carries no buffer: the budget is for the table's entries
        // (Linux fills a table with its 128 segments, header and status included).
        budget++;
        continue;
      }
      // An empty buffer carries nothing and would let a chain spin through descriptors for free.
      if (len === 0) return `descriptor ${idx} has length 0`;
      const r = memory.findGpa(addr, len);
      if (r === null) {
        return `buffer at 0x${addr.toString(16)} (+${len}) is outside guest memory`;
      }
      const writable = (flags & VIRTQ_DESC_F_WRITE) !== 0;
      if (!writable && chain.segmentCount > chain.readableCount) {
        return "device-readable buffer after a device-writable one";
      }
      if (chain.segmentCount === MAX_SEGMENTS) return "too many buffers in one chain";
      if (chain.readableBytes + chain.writableBytes + len > 0xffffffff) {
        return "chain longer than 4 GiB";
      }
      chain.addSegment(r, r.offsetOfGpa(addr), len, writable);
      if (!(flags & VIRTQ_DESC_F_NEXT)) return null;
      if (next >= tableLen) return `next descriptor ${next} out of range`;
      idx = next;
    }
  }

  /** Puts a completed chain on the used ring and publishes the new used index (fenced). */
  push(chain: DescriptorChain, written: number): void {
    this.#stats[QueueStat.BYTES] += chain.readableBytes;
    if (this.#log !== null) this.#logChain(chain);
    this.#complete(chain.head, written, true);
  }

  /**
   * {@link push} by head index, for devices that completed a chain after popping others. With
   * `publish` false the element is written but the used index is not yet published: call
   * {@link publishUsed} once the related elements are all written (the buffers of one merged
   * receive packet must become visible together).
   */
  pushHead(head: number, written: number, publish = true): void {
    if (this.#log !== null) this.#logHead(head);
    this.#complete(head, written, publish);
  }

  /**
   * Starts or stops logging what the device writes into the driver's buffers (during a migration,
   * while VHOST_F_LOG_ALL is on).
   */
  logWrites(log: DirtyLog | null): void {
    this.#log = log;
    this.#awaitingLog = false;
  }

  /**
   * Holds the queue (not {@link ready}) until {@link logWrites} gives it a log: after a reconnect
   * in the middle of a migration, QEMU turns logging on and starts the rings before it sends the
   * log itself, and a write made in between would reach the destination stale.
   */
  awaitLog(): void {
    this.#log = null;
    this.#awaitingLog = true;
  }

  /** Logs used-ring writes at guest-physical address `gpa` (VHOST_VRING_F_LOG), or not (-1). */
  logUsedRingAt(gpa: number): void {
    this.#usedLogAddress = gpa;
  }

  /** Whether writes are being logged (for status and tests). */
  get logging(): boolean {
    return this.#log !== null;
  }

  /** Marks the driver-writable buffers of `chain` in the dirty log (all of them: cheap, safe). */
  #logChain(chain: DescriptorChain): void {
    const log = this.#log!;
    for (let i = chain.readableCount; i < chain.segmentCount; i++) {
      log.mark(chain.region[i]!.gpaOfOffset(chain.offset[i]), chain.length[i]);
    }
  }

  /**
   * Marks the writable buffers of the chain at `head`, completed by index: the chain object is
   * long reused, so its descriptors are walked again (with every check) into a scratch chain.
   * A driver that rewrote them meanwhile only mislogs its own memory.
   */
  #logHead(head: number): void {
    scratchChain ??= new ParsedChain();
    if (this.#parse(head, scratchChain) === null) this.#logChain(scratchChain);
  }

  /** Marks the used ring's pages (its index, elements, flags and avail_event) in the dirty log. */
  #logUsedRing(): void {
    if (this.#usedLogAddress >= 0) this.#log!.mark(this.#usedLogAddress, usedRingSize(this.#size));
  }

  #complete(head: number, written: number, publish: boolean): void {
    const used = this.#used!;
    this.#inflight?.beforeComplete(head);
    const elem = (this.#usedOff + usedElem(this.#usedIdx % this.#size)) >> 2;
    used.u32[elem] = head;
    used.u32[elem + (USED_ELEM_LEN >> 2)] = written;
    this.#usedIdx = (this.#usedIdx + 1) & 0xffff;
    if (publish) {
      Atomics.store(used.u16, (this.#usedOff + RING_IDX) >> 1, this.#usedIdx);
      if (this.#log !== null) this.#logUsedRing();
    }
    this.#inflight?.afterComplete(head, this.#usedIdx);
    this.#pushedSinceNotify = true;
    const s = this.#stats;
    s[QueueStat.REQUESTS]++;
    s[QueueStat.BYTES] += written;
    if (s[QueueStat.IN_FLIGHT] > 0) s[QueueStat.IN_FLIGHT]--;
    const at = this.#poppedAt[head];
    const direction = this.#directionOf[head];
    this.#directionOf[head] = 0;
    if (at > 0) {
      // Timed when the batch ends (notify): that is when the driver learns of the completion,
      // and it costs one clock read per batch instead of one per request.
      if (this.#completedCount === this.#completedAt.length) this.#recordLatencies();
      this.#completedDirection[this.#completedCount] = direction;
      this.#completedAt[this.#completedCount++] = at;
      this.#poppedAt[head] = 0;
    }
  }

  /** Publishes the used index after {@link pushHead} calls with `publish` false (fenced). */
  publishUsed(): void {
    Atomics.store(this.#used!.u16, (this.#usedOff + RING_IDX) >> 1, this.#usedIdx);
    if (this.#log !== null) this.#logUsedRing();
  }

  /**
   * Gives back the last `count` popped chains, as if they had never been popped (a receive queue
   * that ran out of buffers in the middle of a packet). A count beyond the chains still out, or a
   * queue with inflight tracking (whose chains the inflight region already records as taken), is
   * a device bug: a RangeError, before anything changes.
   */
  unpop(count: number): void {
    if (!Number.isInteger(count) || count < 0 || count > this.inFlight) {
      throw new RangeError(`queue ${this.index}: cannot give back ${count} chains`);
    }
    if (this.#inflight !== null) {
      throw new RangeError(
        `queue ${this.index}: chains cannot be given back with inflight tracking`,
      );
    }
    this.#lastAvailIdx = (this.#lastAvailIdx - count) & 0xffff;
    this.#stats[QueueStat.IN_FLIGHT] = Math.max(0, this.#stats[QueueStat.IN_FLIGHT] - count);
  }

  /**
   * Stops asking the driver for kicks while the device works through the ring (a hint: a driver
   * may still kick). Also ends the current batch, which dates the chains popped next.
   */
  disableNotification(): void {
    this.#batchStart = 0;
    if (!this.#eventIdx) this.#setUsedFlags(VRING_USED_F_NO_NOTIFY);
  }

  /**
   * Asks the driver to kick when it makes more chains available, and returns whether it already
   * did meanwhile: the caller then carries on instead of sleeping through chains no kick will
   * announce. With VIRTIO_F_EVENT_IDX, the kick is asked for from {@link lastAvailIdx} on.
   */
  enableNotification(): boolean {
    if (this.#eventIdx) {
      Atomics.store(
        this.#used!.u16,
        (this.#usedOff + availEventOffset(this.#size)) >> 1,
        this.#lastAvailIdx,
      );
      if (this.#log !== null) this.#logUsedRing();
    } else {
      this.#setUsedFlags(0);
    }
    return this.hasAvailable();
  }

  #setUsedFlags(flags: number): void {
    Atomics.store(this.#used!.u16, (this.#usedOff + RING_FLAGS) >> 1, flags);
    if (this.#log !== null) this.#logUsedRing();
  }

  /**
   * Has the event loop call the device for this queue again once it has served the other ready
   * fds, as a kick would: a device that stops at a budget with chains left yields this way, so
   * that one busy queue does not starve the rest. Returns false when the queue has no kick fd
   * (it stopped), and nothing will call again.
   */
  kickSelf(): boolean {
    if (this.#kickFd < 0) return false;
    signalEventFd(this.#kickFd);
    return true;
  }

  /** Interrupts the driver if anything was pushed since the last call and the driver wants it. */
  notify(): void {
    this.#batchStart = 0;
    if (this.#completedCount > 0) this.#recordLatencies();
    this.#log?.notify();
    if (!this.#pushedSinceNotify) return;
    this.#pushedSinceNotify = false;
    const avail = this.#avail!;
    let needed: boolean;
    if (this.#eventIdx) {
      const usedEvent = avail.u16[(this.#availOff + usedEventOffset(this.#size)) >> 1];
      const now = this.#usedIdx;
      const old = this.#signalledUsed;
      needed = !this.#signalledValid ||
        ((now - usedEvent - 1) & 0xffff) < ((now - old) & 0xffff);
      this.#signalledUsed = now;
      this.#signalledValid = true;
    } else {
      needed = (avail.u16[(this.#availOff + RING_FLAGS) >> 1] & VRING_AVAIL_F_NO_INTERRUPT) === 0;
    }
    if (needed && this.#callFd >= 0) {
      signalEventFd(this.#callFd);
      this.#stats[QueueStat.INTERRUPTS]++;
    }
  }
}

/** Where completions by head index are walked again for the dirty log (one per worker). */
let scratchChain: ParsedChain | null = null;

/** The bookkeeping of a queue not yet configured: empty, shared (nothing is written to it). */
const NO_TIMES = new Float64Array(0);
const NO_DIRECTIONS = new Uint8Array(0);
