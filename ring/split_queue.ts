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

/** Descriptor flags. */
export const VIRTQ_DESC_F_NEXT = 1;
/** The buffer is device-writable. */
export const VIRTQ_DESC_F_WRITE = 2;
/** The buffer holds a table of indirect descriptors. */
export const VIRTQ_DESC_F_INDIRECT = 4;
/** used->flags: the device asks not to be kicked. */
export const VRING_USED_F_NO_NOTIFY = 1;
/** avail->flags: the driver asks not to be interrupted. */
export const VRING_AVAIL_F_NO_INTERRUPT = 1;
/** Largest queue size the split ring format allows. */
export const MAX_QUEUE_SIZE = 32768;
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

/** The operations a device needs from a queue while it processes requests. */
export interface Virtqueue {
  /** The queue's index within the device. */
  readonly index: number;
  /** Queue size (number of descriptors). */
  readonly size: number;
  /** The next available chain, or null when the ring is empty (or the queue just broke). */
  pop(): DescriptorChain | null;
  /** Returns a chain to the driver, having written `written` bytes into its writable part. */
  push(chain: DescriptorChain, written: number): void;
  /** {@link push} by head index, for a chain completed after others were popped (async I/O). */
  pushHead(head: number, written: number): void;
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
  /** Queue size, 0 until SET_VRING_NUM. */
  size = 0;
  /** Ring addresses in the front-end's address space, null until SET_VRING_ADDR. */
  addresses: RingAddresses | null = null;
  /** Next available-ring index the device will read. */
  lastAvailIdx = 0;
  /** The device's used index (what it last published). */
  usedIdx = 0;
  /** Whether VIRTIO_F_EVENT_IDX was negotiated. */
  eventIdx = false;
  /** Whether VIRTIO_F_INDIRECT_DESC was negotiated. */
  indirect = false;
  /** SET_VRING_ENABLE state. */
  enabled = false;
  /** Set by SET_VRING_KICK, cleared by GET_VRING_BASE. */
  started = false;
  /** Set when the guest broke the ring; cleared by reconfiguration. */
  broken = false;
  /** The kick eventfd, or -1. */
  kickFd: number = -1;
  /** The call eventfd, or -1. */
  callFd: number = -1;
  /** The error eventfd, or -1. */
  errFd: number = -1;
  /** Why the queue broke (for the log). */
  error = "";
  /** This queue's inflight tracking region (INFLIGHT_SHMFD), or null. */
  inflight: InflightRegion | null = null;
  /**
   * Counters (see {@link QueueStat}); a private array until the owner points it at shared memory.
   * Cost on the hot path: a few increments and one clock read per request.
   */
  stats: Float64Array = new Float64Array(QUEUE_STAT_SLOTS);
  /**
   * The device's read/write accounting ({@link IoStat}), one array for all its queues (in vhostd,
   * shared memory the main thread reads); private until replaced.
   */
  ioStats: Float64Array = new Float64Array(IO_STAT_SLOTS);

  readonly #chain = new ParsedChain();
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
  readonly #poppedAt: Float64Array;
  /** Pop times of the chains completed since the last {@link notify}, not yet timed. */
  readonly #completedAt: Float64Array;
  /** The {@link IoDirection} of each of those (0: neither). */
  readonly #completedDirection: Uint8Array;
  /** The direction {@link countIo} gave each head until it completes (0: none). */
  readonly #directionOf: Uint8Array;
  #completedCount = 0;

  /** Creates queue `index` admitting sizes up to `maxSize`. */
  constructor(index: number, maxSize: number) {
    this.index = index;
    this.maxSize = maxSize;
    this.#poppedAt = new Float64Array(maxSize);
    this.#completedAt = new Float64Array(maxSize);
    this.#completedDirection = new Uint8Array(maxSize);
    this.#directionOf = new Uint8Array(maxSize);
  }

  /** Whether requests may be processed: configured, translated, started, enabled and sound. */
  get ready(): boolean {
    return this.started && this.enabled && !this.broken && !this.#awaitingLog &&
      this.#translated();
  }

  /** Forgets everything (device reset or disconnect); closes the eventfds. */
  reset(): void {
    this.size = 0;
    this.addresses = null;
    this.lastAvailIdx = 0;
    this.usedIdx = 0;
    this.enabled = false;
    this.started = false;
    this.broken = false;
    this.error = "";
    this.#memory = null;
    this.#generation = -1;
    this.#desc = this.#avail = this.#used = null;
    this.#signalledValid = false;
    this.#pushedSinceNotify = false;
    this.#resubmit = [];
    this.inflight = null;
    this.#log = null;
    this.#awaitingLog = false;
    this.#usedLogAddress = -1;
    this.stats[QueueStat.IN_FLIGHT] = 0;
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
    if (this.kickFd >= 0 && this.kickFd !== fd) closeQuietly(this.kickFd);
    this.kickFd = fd;
  }

  /** Replaces the call fd (closing the old one). */
  setCallFd(fd: number): void {
    if (this.callFd >= 0 && this.callFd !== fd) closeQuietly(this.callFd);
    this.callFd = fd;
  }

  /** Replaces the error fd (closing the old one). */
  setErrFd(fd: number): void {
    if (this.errFd >= 0 && this.errFd !== fd) closeQuietly(this.errFd);
    this.errFd = fd;
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
    const a = this.addresses;
    if (a === null || this.size === 0) return null;
    if (memory.regions.length === 0) {
      return "no guest memory was shared: QEMU needs " +
        "-object memory-backend-memfd,id=mem,size=<RAM>,share=on -machine memory-backend=mem";
    }
    const n = this.size;
    const parts: [string, number, number, number][] = [
      ["descriptor table", a.desc, 16 * n, 16],
      ["available ring", a.avail, 6 + 2 * n, 2],
      ["used ring", a.used, 6 + 8 * n, 4],
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
    if (this.#used !== null) this.usedIdx = Atomics.load(this.#used.u16, (this.#usedOff + 2) >> 1);
  }

  /** The driver's avail->idx. */
  availIdx(): number {
    return Atomics.load(this.#avail!.u16, (this.#availOff + 2) >> 1);
  }

  /** Chains popped (or to be resubmitted) and not yet put on the used ring. */
  get inFlight(): number {
    return (this.lastAvailIdx - this.usedIdx) & 0xffff;
  }

  /** Whether the driver has made chains available that the device has not popped. */
  hasAvailable(): boolean {
    return this.#resubmit.length > 0 || this.availIdx() !== this.lastAvailIdx;
  }

  /**
   * Starts the ring (SET_VRING_KICK). With inflight tracking, chains an earlier back-end took and
   * never completed are queued for resubmission, oldest first, and the available index resumes
   * after them. Returns how many chains will be resubmitted.
   */
  start(): number {
    this.started = true;
    // A ring the front-end starts again (after stopping it) is a fresh ring: a failure on the
    // old one no longer applies, as the virtio device reset that precedes it promises the driver.
    this.broken = false;
    this.error = "";
    this.#signalledValid = false;
    this.#resubmit = [];
    if (this.inflight === null || !this.#translated()) return 0;
    this.syncUsedIdx();
    this.#resubmit = this.inflight.recover(this.usedIdx).filter((head) => head < this.size);
    this.lastAvailIdx = (this.usedIdx + this.#resubmit.length) & 0xffff;
    return this.#resubmit.length;
  }

  /** Marks the queue broken, tells the front-end through the error eventfd, and returns null. */
  fail(message: string): null {
    this.broken = true;
    this.error = `queue ${this.index}: ${message}`;
    this.stats[QueueStat.ERRORS]++;
    if (this.errFd >= 0) signalEventFd(this.errFd);
    return null;
  }

  /** Pops the next available chain into the queue's preallocated chain object. */
  pop(): DescriptorChain | null {
    if (this.broken) return null;
    if (this.#resubmit.length > 0) {
      const head = this.#resubmit.shift()!;
      const err = this.#parse(head, this.#chain);
      if (err !== null) return this.fail(err);
      this.#taken(head);
      return this.#chain;
    }
    const avail = this.#avail!;
    const availIdx = Atomics.load(avail.u16, (this.#availOff + 2) >> 1);
    if (availIdx === this.lastAvailIdx) return null;
    if (((availIdx - this.lastAvailIdx) & 0xffff) > this.size) {
      return this.fail(`available index jumped from ${this.lastAvailIdx} to ${availIdx}`);
    }
    const slot = (this.#availOff + 4 + 2 * (this.lastAvailIdx % this.size)) >> 1;
    const head = avail.u16[slot];
    this.lastAvailIdx = (this.lastAvailIdx + 1) & 0xffff;
    const err = this.#parse(head, this.#chain);
    if (err !== null) return this.fail(err);
    this.inflight?.markTaken(head);
    this.#taken(head);
    return this.#chain;
  }

  /** Dates a popped chain (one clock read per batch, not per chain) and counts it in flight. */
  #taken(head: number): void {
    if (this.#batchStart === 0) this.#batchStart = monotonicMs();
    this.#poppedAt[head] = this.#batchStart;
    this.stats[QueueStat.IN_FLIGHT]++;
  }

  /**
   * Adds the chains completed since the last call to the latency histogram: each took from the
   * start of the batch it was popped in until now.
   */
  #recordLatencies(): void {
    const now = monotonicMs();
    const s = this.stats;
    const io = this.ioStats;
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
    this.stats[QueueStat.ERRORS]++;
  }

  /** Counts bytes read from the driver's buffers by a request completed with pushHead. */
  countBytes(bytes: number): void {
    this.stats[QueueStat.BYTES] += bytes;
  }

  /** Counts a read or a write the device completes next (see {@link Virtqueue.countIo}). */
  countIo(head: number, direction: number, bytes: number): void {
    if (direction !== IoDirection.READ && direction !== IoDirection.WRITE) return;
    const base = ioSlotBase(direction);
    this.ioStats[base + IoStat.REQUESTS]++;
    this.ioStats[base + IoStat.BYTES] += bytes;
    if (head < this.#directionOf.length) this.#directionOf[head] = direction;
  }

  #parse(head: number, chain: ParsedChain): string | null {
    const memory = this.#memory!;
    chain.reset(head);
    if (head >= this.size) return `head descriptor ${head} out of range`;
    let table = this.#desc!;
    let tableOff = this.#descOff;
    let tableLen = this.size;
    let idx = head;
    // One budget for the whole chain, indirect table included: a table may be long, but the
    // descriptors the device walks per chain stay bounded (see MIN_CHAIN_BUDGET).
    let budget = Math.max(this.size, MIN_CHAIN_BUDGET);
    let inIndirect = false;
    for (;;) {
      if (budget-- === 0) return "descriptor chain loops or is longer than the queue";
      const d = tableOff + idx * 16;
      const view = table.view;
      const high = view.getUint32(d + 4, true);
      if (high >= MAX_GUEST_ADDRESS_HIGH) {
        return `descriptor ${idx} points above 2^53, outside guest memory`;
      }
      const addr = view.getUint32(d, true) + high * 4294967296;
      const len = view.getUint32(d + 8, true);
      const flags = view.getUint16(d + 12, true);
      const next = view.getUint16(d + 14, true);
      if (flags & VIRTQ_DESC_F_INDIRECT) {
        if (inIndirect) return "indirect descriptor inside an indirect table";
        if (!this.indirect) return "indirect descriptor without VIRTIO_F_INDIRECT_DESC";
        if (flags & VIRTQ_DESC_F_NEXT) return "indirect descriptor with NEXT set";
        if (len === 0 || len % 16 !== 0) return `indirect table of bad length ${len}`;
        const r = memory.findGpa(addr, len);
        if (r === null) return `indirect table at 0x${addr.toString(16)} is outside guest memory`;
        table = r;
        tableOff = r.offsetOfGpa(addr);
        tableLen = len / 16;
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
    this.stats[QueueStat.BYTES] += chain.readableBytes;
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
    if (this.#usedLogAddress >= 0) this.#log!.mark(this.#usedLogAddress, 6 + 8 * this.size);
  }

  #complete(head: number, written: number, publish: boolean): void {
    const used = this.#used!;
    this.inflight?.beforeComplete(head);
    const elem = (this.#usedOff + 4 + 8 * (this.usedIdx % this.size)) >> 2;
    used.u32[elem] = head;
    used.u32[elem + 1] = written;
    this.usedIdx = (this.usedIdx + 1) & 0xffff;
    if (publish) {
      Atomics.store(used.u16, (this.#usedOff + 2) >> 1, this.usedIdx);
      if (this.#log !== null) this.#logUsedRing();
    }
    this.inflight?.afterComplete(head, this.usedIdx);
    this.#pushedSinceNotify = true;
    const s = this.stats;
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
    Atomics.store(this.#used!.u16, (this.#usedOff + 2) >> 1, this.usedIdx);
    if (this.#log !== null) this.#logUsedRing();
  }

  /**
   * Gives back the last `count` popped chains, as if they had never been popped (a receive queue
   * that ran out of buffers in the middle of a packet). Not for queues with inflight tracking.
   */
  unpop(count: number): void {
    this.lastAvailIdx = (this.lastAvailIdx - count) & 0xffff;
    this.stats[QueueStat.IN_FLIGHT] = Math.max(0, this.stats[QueueStat.IN_FLIGHT] - count);
  }

  /**
   * Turns driver notifications (kicks) on or off. Turning them on returns whether chains arrived
   * in the meantime, so the caller processes again instead of sleeping through them.
   */
  setNotification(enable: boolean): boolean {
    const used = this.#used!;
    if (!enable) this.#batchStart = 0;
    if (this.eventIdx) {
      if (enable) {
        Atomics.store(used.u16, (this.#usedOff + 4 + 8 * this.size) >> 1, this.lastAvailIdx);
      }
    } else {
      Atomics.store(used.u16, this.#usedOff >> 1, enable ? 0 : VRING_USED_F_NO_NOTIFY);
    }
    if (this.#log !== null) this.#logUsedRing();
    return enable && this.hasAvailable();
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
    if (this.eventIdx) {
      const usedEvent = avail.u16[(this.#availOff + 4 + 2 * this.size) >> 1];
      const now = this.usedIdx;
      const old = this.#signalledUsed;
      needed = !this.#signalledValid ||
        ((now - usedEvent - 1) & 0xffff) < ((now - old) & 0xffff);
      this.#signalledUsed = now;
      this.#signalledValid = true;
    } else {
      needed = (avail.u16[this.#availOff >> 1] & VRING_AVAIL_F_NO_INTERRUPT) === 0;
    }
    if (needed && this.callFd >= 0) {
      signalEventFd(this.callFd);
      this.stats[QueueStat.INTERRUPTS]++;
    }
  }
}

/** Where completions by head index are walked again for the dirty log (one per worker). */
let scratchChain: ParsedChain | null = null;
