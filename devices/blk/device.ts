/**
 * virtio-blk (virtio 1.x §5.2) on a raw image file or block device.
 *
 * Each request is decoded once ({@link BlkRequest}) and then executed by one of two engines:
 * io_uring wherever the kernel gives one (reads, writes and flushes never hold the data-plane
 * worker), or the synchronous one (`preadv`/`pwritev` in the worker), kept as the fallback. Either
 * way the iovecs point straight into guest memory: no copies and no allocation per request.
 *
 * @module
 */

import { getLogger, type Logger } from "../../log/mod.ts";
import {
  type DescriptorChain,
  type DeviceEventLoop,
  IoDirection,
  type VirtioDevice,
  type Virtqueue,
} from "../device.ts";
import { bit, ProtocolFeature } from "../../vhost-user/message.ts";
import { IoVec } from "../../sys/io.ts";
import {
  Errno,
  fileSystemType,
  MEMORY_FS_MAGIC,
  O,
  statusFlags,
  SysError,
} from "../../sys/libc.ts";
import { type BlockBackend, FileBackend, NullBackend } from "./backend.ts";
import { type RequestSlot, UringEngine, type UringOwner } from "./uring.ts";
import { IoUringOp } from "../../sys/io_uring.ts";
import { monotonicMs } from "../../sys/clock.ts";
import { diskPermissions, ImageLock } from "./image_lock.ts";
import { type ZeroJob, ZeroJobs, type ZeroRange } from "./zero_jobs.ts";
import { BLK_HEADER_BYTES, BlkRequest, BlkRequestType, BlkStatus } from "./request.ts";
import type { ByteRef } from "../../ring/descriptor_chain.ts";
import { killAfterRequests, popRequest, type TakeRequest } from "./fault.ts";
import { sizeText } from "./image.ts";

/** virtio device id of a block device. */
export const VIRTIO_ID_BLOCK = 2;

/** virtio-blk feature bits. */
export const BlkFeature = {
  SIZE_MAX: 1,
  SEG_MAX: 2,
  GEOMETRY: 4,
  RO: 5,
  BLK_SIZE: 6,
  FLUSH: 9,
  TOPOLOGY: 10,
  CONFIG_WCE: 11,
  MQ: 12,
  DISCARD: 13,
  WRITE_ZEROES: 14,
} as const;

export { BlkRequestType, BlkStatus } from "./request.ts";

/** Config space layout: field offsets and the size of `struct virtio_blk_config`. */
export const BlkConfig = {
  CAPACITY: 0,
  SIZE_MAX: 8,
  SEG_MAX: 12,
  BLK_SIZE: 20,
  WCE: 32,
  NUM_QUEUES: 34,
  MAX_DISCARD_SECTORS: 36,
  MAX_DISCARD_SEG: 40,
  DISCARD_SECTOR_ALIGNMENT: 44,
  MAX_WRITE_ZEROES_SECTORS: 48,
  MAX_WRITE_ZEROES_SEG: 52,
  WRITE_ZEROES_MAY_UNMAP: 56,
  SIZE: 60,
} as const;

/** `VIRTIO_BLK_ID_BYTES`: length of the GET_ID answer. */
export const BLK_ID_BYTES = 20;
const SECTOR = 512;
const MAX_SEGMENT_BYTES = 1 << 20;
const SEG_MAX = 126;
const MAX_DISCARD_SEGMENTS = 32;
/**
 * While a migration runs, written data is synced in the background at most this often, so the
 * flush at the switch-over (which the guest sits out) has little left to do.
 */
const SYNC_AHEAD_MS = 100;
const MAX_DISCARD_SECTORS = 1 << 22;
/** What {@link BlkDevice.#handle} returns for a request a zeroing job now owns. */
const DEFERRED = -1;

/** Options of a block device; they cross to the worker by structured cloning. */
export interface BlkOptions {
  /** An open fd of the image (opened by the main thread, which validated it); -1 with `null`. */
  fd: number;
  /** Serve a null target of `sizeBytes`: requests complete without any I/O (for benchmarks). */
  null?: boolean;
  /**
   * `uring` keeps many requests in flight through io_uring, and a slow one (a cache miss, slow
   * storage) holds no other queue or device of the worker; `sync` serves one request at a time
   * with preadv/pwritev in the worker. Default `auto`: io_uring where the kernel allows it, except
   * for a buffered image on tmpfs or ramfs (measured faster with `sync`, and memory never waits);
   * the synchronous engine otherwise (a forced `uring` that cannot be set up is an error).
   */
  ioEngine?: BlkIoEngine;
  /** Image path, for logs. */
  path: string;
  /** Size of the image in bytes. */
  sizeBytes: number;
  /** Serve read-only: VIRTIO_BLK_F_RO, and writes fail. */
  readOnly: boolean;
  /** Number of queues offered. */
  queues: number;
  /** Serial number returned by GET_ID (at most 20 bytes). */
  serial: string;
  /** Logical block size advertised; default 512. */
  blockSize?: number;
  /** Device name in logs; default `blk`. */
  name?: string;
  /**
   * Lock the image as QEMU does while the front-end runs the device (default true); off only for
   * cluster file systems that arbitrate access themselves.
   */
  locking?: boolean;
  /**
   * Fault injection for restart tests: SIGKILL this process right after taking the Nth request,
   * before completing it (set from the environment variable VHOSTD_FAULT_KILL_AFTER). It picks
   * how requests are taken (fault.ts) when the device is built: the request path never checks it.
   */
  faultKillAfter?: number;
}

/** How a block device executes I/O: see {@link BlkOptions.ioEngine}. */
export type BlkIoEngine = "auto" | "sync" | "uring";

/** The values of {@link BlkIoEngine}, for flags and config files. */
export const BLK_IO_ENGINES: readonly BlkIoEngine[] = ["auto", "sync", "uring"];

/** Requests in flight at most with the io_uring engine. */
const URING_DEPTH = 256;

/** A virtio-blk device backed by a file descriptor. */
export class BlkDevice implements VirtioDevice {
  /** virtio device id (2). */
  readonly deviceId: number = VIRTIO_ID_BLOCK;
  /** Name in logs. */
  readonly name: string;
  /** Queues offered. */
  readonly numQueues: number;
  /** Device feature bits. */
  readonly features: bigint;
  /** Crash-consistent reconnect: QEMU keeps the inflight buffer across back-end restarts. */
  readonly protocolFeatures: bigint = bit(ProtocolFeature.INFLIGHT_SHMFD);
  /** processQueue takes every request it can, so the queues may be busy-polled. */
  readonly pollQueues = true;
  /** Capacity in 512-byte sectors (grows with the image: see {@link refresh}). */
  #capacity: number;
  /** Write cache enabled (writeback); when off, every write is followed by fdatasync. */
  writeCache = true;
  readonly #storage: BlockBackend;
  readonly #uring: UringEngine | null;
  readonly #zeroes: ZeroJobs;
  #loop: DeviceEventLoop | null = null;
  readonly #readOnly: boolean;
  readonly #blockSize: number;
  readonly #serial: Uint8Array;
  readonly #iov = new IoVec(1024);
  /** The request the synchronous engine serves (io_uring slots have their own). */
  readonly #request = new BlkRequest();
  /** The GET_ID answer: the serial, zero-padded. */
  readonly #id = new Uint8Array(BLK_ID_BYTES);
  /** How requests are taken from a queue: a plain pop, unless fault injection was asked for. */
  readonly #take: TakeRequest;
  readonly #segments = new Uint8Array(16 * MAX_DISCARD_SEGMENTS);
  readonly #segmentView = new DataView(this.#segments.buffer);
  readonly #log: Logger;
  #errors = 0;
  readonly #path: string;
  readonly #lock: ImageLock | null;
  /** Why the image cannot be written now (another holder has its lock), or null. */
  #fenced: string | null = null;
  #fencedCheckedAt = 0;
  /** A live migration runs (dirty logging on). */
  #migrating = false;
  /** Writes submitted since the last background sync started. */
  #writesSinceSync = 0;
  #syncedAt = 0;

  /** Builds the device around an open image fd. */
  constructor(options: BlkOptions) {
    this.name = options.name ?? "blk";
    this.#storage = options.null ? new NullBackend() : new FileBackend(options.fd);
    this.#zeroes = new ZeroJobs(this.#storage, {
      finish: (job, rc, resume) => this.#finishZeroes(job, rc, resume),
    });
    this.#log = getLogger(["vhostd", this.name]);
    this.#uring = options.null ? null : this.#startEngine(options);
    this.#readOnly = options.readOnly;
    this.#blockSize = options.blockSize ?? SECTOR;
    this.numQueues = options.queues;
    this.#capacity = Math.floor(options.sizeBytes / SECTOR);
    this.#serial = new TextEncoder().encode(options.serial).subarray(0, BLK_ID_BYTES);
    this.#id.set(this.#serial);
    this.#take = options.faultKillAfter ? killAfterRequests(options.faultKillAfter) : popRequest;
    this.#path = options.path;
    this.#lock = options.null || options.locking === false
      ? null
      : new ImageLock(options.fd, options.path, diskPermissions(options.readOnly));
    const conflict = this.#lock?.conflict() ?? null;
    if (conflict !== null) {
      // A migration's destination starts while the source still runs: serve, but take the
      // image only when the front-end starts the device, by which time the source let it go.
      this.#log.warn("{conflict}; this device will use the image only once it is released", {
        conflict,
      });
    }
    let f = bit(BlkFeature.SIZE_MAX) | bit(BlkFeature.SEG_MAX) | bit(BlkFeature.BLK_SIZE) |
      bit(BlkFeature.FLUSH) | bit(BlkFeature.CONFIG_WCE) | bit(BlkFeature.MQ) |
      bit(BlkFeature.DISCARD) | bit(BlkFeature.WRITE_ZEROES);
    if (this.#readOnly) f |= bit(BlkFeature.RO);
    this.features = f;
  }

  /**
   * The io_uring engine, unless the synchronous one serves: when asked for; by default for an
   * image in memory (tmpfs, ramfs); or when io_uring cannot be set up (too old a kernel, io_uring
   * disabled by sysctl or seccomp) and was not asked for, with a warning saying so. One log line
   * names the engine that serves and why.
   *
   * Buffered images on other file systems use io_uring: a read of cached pages completes inline as
   * it is submitted, while one that misses the cache, however slow the storage, waits in the
   * kernel instead of in the worker, where it would stall every queue and every device the worker
   * serves. (Measured with the
   * back-end bench, 4k random reads from the page cache of an ext4 image, alternated runs: io_uring
   * gave about twice the IOPS of preadv at half the CPU per I/O, one submission serving a batch.)
   * On tmpfs no read waits for storage, and io_uring measured slower there: tmpfs offers io_uring
   * no non-blocking read (Linux 6.18), so reads go through an io-wq thread (one appears at the
   * first read; none on ext4). One queue's reads took 7-9 µs of CPU each against 4-5 µs, at about
   * 70% of the IOPS (7 alternated runs); four queues about even in IOPS, still at more CPU.
   */
  #startEngine(options: BlkOptions): UringEngine | null {
    const asked = options.ioEngine ?? "auto";
    const direct = (statusFlags(options.fd) & O.DIRECT) !== 0;
    const mode = direct ? "O_DIRECT" : "buffered";
    if (asked === "sync") {
      this.#log.info("I/O engine: synchronous ({mode}; asked for)", { mode });
      return null;
    }
    if (asked === "auto" && !direct && MEMORY_FS_MAGIC.includes(fileSystemType(options.fd))) {
      this.#log.info(
        "I/O engine: synchronous (buffered, on tmpfs or ramfs: served from memory, where it " +
          "measured faster than io_uring)",
      );
      return null;
    }
    const owner: UringOwner = {
      finish: (slot, result) => this.#finish(slot, result),
      resume: (queue) => this.processQueue(queue),
    };
    let uring: UringEngine;
    try {
      uring = new UringEngine(options.fd, URING_DEPTH, SEG_MAX + 2, owner);
    } catch (e) {
      if (asked === "uring" || !(e instanceof SysError)) throw e;
      this.#log.warn(
        "I/O engine: synchronous ({mode}), since io_uring cannot be set up ({error}); a slow " +
          "read or write holds every queue and device of this worker",
        { mode, error: e.message },
      );
      return null;
    }
    this.#log.info("I/O engine: io_uring ({mode}, {depth} requests in flight, {workers})", {
      mode,
      depth: URING_DEPTH,
      workers: uring.workerLimit === null
        ? "io-wq threads at the kernel's default bound"
        : `at most ${uring.workerLimit} io-wq threads per worker`,
    });
    return uring;
  }

  /** The config space (`struct virtio_blk_config`), from `offset`, exactly `size` bytes. */
  getConfig(offset: number, size: number): Uint8Array {
    const c = new Uint8Array(Math.max(BlkConfig.SIZE, offset + size));
    const dv = new DataView(c.buffer);
    const sectorsPerBlock = this.#blockSize / SECTOR;
    dv.setBigUint64(BlkConfig.CAPACITY, BigInt(this.#capacity), true);
    dv.setUint32(BlkConfig.SIZE_MAX, MAX_SEGMENT_BYTES, true);
    dv.setUint32(BlkConfig.SEG_MAX, SEG_MAX, true);
    dv.setUint32(BlkConfig.BLK_SIZE, this.#blockSize, true);
    dv.setUint8(BlkConfig.WCE, this.writeCache ? 1 : 0);
    dv.setUint16(BlkConfig.NUM_QUEUES, this.numQueues, true);
    dv.setUint32(BlkConfig.MAX_DISCARD_SECTORS, MAX_DISCARD_SECTORS, true);
    dv.setUint32(BlkConfig.MAX_DISCARD_SEG, MAX_DISCARD_SEGMENTS, true);
    dv.setUint32(BlkConfig.DISCARD_SECTOR_ALIGNMENT, sectorsPerBlock, true);
    dv.setUint32(BlkConfig.MAX_WRITE_ZEROES_SECTORS, MAX_DISCARD_SECTORS, true);
    dv.setUint32(BlkConfig.MAX_WRITE_ZEROES_SEG, MAX_DISCARD_SEGMENTS, true);
    dv.setUint8(BlkConfig.WRITE_ZEROES_MAY_UNMAP, 1);
    return c.subarray(offset, offset + size);
  }

  /** Capacity in 512-byte sectors. */
  get capacity(): number {
    return this.#capacity;
  }

  /**
   * Reads the image's size again (after it was grown: `truncate`, `qemu-img resize`, `lvextend`)
   * and, when it grew, serves the new capacity and tells the front-end, which tells the guest.
   * A smaller image is refused: the guest keeps the old capacity (its file system may use the
   * end that is gone; reads there fail, writes there grow the file again), with a warning.
   */
  refresh(): string {
    const bytes = this.#storage.size?.();
    if (bytes === undefined) return "a null target's size is fixed";
    if (bytes < 0) {
      this.#log.error("cannot read the size of {path}: errno {errno}", {
        path: this.#path,
        errno: -bytes,
      });
      return `cannot read the size of ${this.#path}: errno ${-bytes}`;
    }
    const sectors = Math.floor(bytes / SECTOR);
    const old = this.#capacity;
    const from = sizeText(old * SECTOR);
    if (sectors === old) return `size unchanged (${from})`;
    if (sectors < old) {
      this.#log.warn(
        "image {path} shrank from {from} to {to}: refused, the guest keeps the old size " +
          "(shrink the file system inside the guest first, and restart the VM)",
        { path: this.#path, from, to: sizeText(sectors * SECTOR) },
      );
      return `shrinking from ${from} to ${sizeText(sectors * SECTOR)} refused`;
    }
    this.#capacity = sectors;
    const to = sizeText(sectors * SECTOR);
    const told = this.#loop?.configChanged() ?? false;
    this.#log.info("capacity {from} -> {to} ({old} -> {sectors} sectors); {told}", {
      from,
      to,
      old,
      sectors,
      told: told ? "the front-end was told" : "no front-end to tell",
    });
    return `grew from ${from} to ${to}; ${
      told ? "the front-end was told" : "no front-end to tell now"
    }`;
  }

  /** Only the write-cache byte is writable. */
  setConfig(offset: number, data: Uint8Array): boolean {
    if (offset !== BlkConfig.WCE || data.length !== 1 || data[0] > 1) return false;
    this.writeCache = data[0] === 1;
    this.#log.info("write cache {mode}", { mode: this.writeCache ? "on (writeback)" : "off" });
    if (!this.writeCache) {
      // A head start for the writes already cached (virtio asks for none). Through io_uring it
      // runs in the kernel, so a guest flipping the bit cannot hold the worker with fdatasync; its
      // error is kept for the next FLUSH.
      if (this.#uring !== null) this.#uring.syncInBackground();
      else this.#storage.flush();
    }
    return true;
  }

  /** Starts the io_uring engine's completion handling, if there is one, and the zeroing jobs'. */
  start(loop: DeviceEventLoop): void {
    this.#loop = loop;
    this.#zeroes.start(loop);
    this.#uring?.start(loop);
  }

  /**
   * The front-end started the device: take the image's lock. If another user holds it, every
   * request fails with an I/O error (and the lock is tried again, once a second) rather than two
   * writers sharing the image.
   */
  resumed(): void {
    if (this.#lock === null) return;
    this.#fenced = this.#lock.acquire();
    this.#fencedCheckedAt = monotonicMs();
    if (this.#fenced !== null) {
      this.#log.error("{conflict}: requests fail until it is released", {
        conflict: this.#fenced,
      });
    }
  }

  /**
   * Every ring stopped (the VM paused, or is migrating away): in-flight requests are complete
   * (quiesce ran), so make the writes durable, for a destination that may read the image from
   * another host next, and let go of the lock for it.
   */
  suspended(): void {
    const rc = this.#flush();
    if (rc !== 0) this.#ioError("flush at device stop", rc);
    this.#lock?.release();
    this.#fenced = null;
  }

  /** A migration started or ended: while it runs, what is written is synced ahead. */
  migrating(on: boolean): void {
    this.#migrating = on;
    this.#writesSinceSync = on ? 1 : 0;
  }

  /** Serves every available request on the queue (or as many as there are io_uring slots). */
  processQueue(queue: Virtqueue): void {
    // A WRITE_ZEROES still zeroing holds its queue (see zero_jobs.ts).
    if (this.#zeroes.busy(queue.index)) return;
    if (this.#fenced !== null && !this.#unfence()) {
      this.#failAll(queue);
      return;
    }
    const uring = this.#uring;
    const take = this.#take;
    for (;;) {
      const slot = uring?.take(queue) ?? null;
      if (uring !== null && slot === null) break; // throttled: resumed when a slot frees up
      const chain = take(queue);
      if (chain === null) {
        if (slot !== null) uring!.release(slot);
        break;
      }
      // Decoded once, into the slot's request when io_uring may take it.
      const request = slot?.request ?? this.#request;
      request.parse(chain);
      const invalid = this.#check(request);
      if (slot !== null && invalid === BlkStatus.OK && this.#submit(chain, request, slot)) continue;
      const status = invalid !== BlkStatus.OK ? invalid : this.#execute(chain, request, queue);
      if (status !== DEFERRED) this.#completeRequest(queue, request, status, chain);
      // A slot whose request the synchronous engine served is free only once that is done.
      if (slot !== null) uring!.release(slot);
      if (status === DEFERRED) break;
    }
    uring?.flush();
    if (this.#migrating && this.#writesSinceSync > 0) this.#syncAhead(uring);
  }

  /**
   * Syncs what was written in the background (io_uring), or starts its write-back from the page
   * cache, unless that was done less than 100 ms ago.
   */
  #syncAhead(uring: UringEngine | null): void {
    const now = monotonicMs();
    if (now - this.#syncedAt < SYNC_AHEAD_MS) return;
    if (uring === null) this.#storage.startWriteback?.();
    else if (!uring.syncInBackground()) return;
    this.#syncedAt = now;
    this.#writesSinceSync = 0;
  }

  /**
   * fdatasync, failing also if a background sync failed since the last flush: the kernel tells a
   * write-back error to one fdatasync only, and that may have been the background one.
   */
  #flush(): number {
    const rc = this.#storage.flush();
    const early = this.#uring?.takeSyncError() ?? 0;
    return rc !== 0 ? rc : early;
  }

  /** Waits for every request in flight (before a ring stops or guest memory changes). */
  quiesce(): void {
    this.#zeroes.drain();
    this.#uring?.drain();
  }

  /** Waits for requests in flight, flushes and closes the image (which drops its lock). */
  close(): void {
    this.#zeroes.close();
    this.#uring?.close();
    this.#storage.close();
  }

  /** Tries the lock again (at most once a second); true once it is held. */
  #unfence(): boolean {
    const now = monotonicMs();
    if (now - this.#fencedCheckedAt < 1000) return false;
    this.#fencedCheckedAt = now;
    this.#fenced = this.#lock!.acquire();
    if (this.#fenced !== null) return false;
    this.#log.info("image {path}: lock taken; serving requests", { path: this.#path });
    return true;
  }

  /** Completes every available request with an I/O error (the image is not ours to touch). */
  #failAll(queue: Virtqueue): void {
    const request = this.#request;
    for (let chain = queue.pop(); chain !== null; chain = queue.pop()) {
      request.parse(chain);
      this.#completeRequest(queue, request, BlkStatus.IOERR, chain);
    }
  }

  /**
   * What a decoded request gets without being executed: an I/O error when it has no status byte or
   * no whole header, or when a read or write falls outside the disk (or writes a read-only one);
   * OK when an engine should execute it.
   */
  #check(request: BlkRequest): number {
    if (!request.hasStatus) {
      return this.#ioError("request without room for a status byte", -Errno.EINVAL);
    }
    if (!request.hasHeader) return BlkStatus.IOERR;
    switch (request.type) {
      case BlkRequestType.IN:
        return this.#inRange(request.sector, request.dataBytes) ? BlkStatus.OK : BlkStatus.IOERR;
      case BlkRequestType.OUT:
        return this.#readOnly || !this.#inRange(request.sector, request.dataBytes)
          ? BlkStatus.IOERR
          : BlkStatus.OK;
      default:
        return BlkStatus.OK;
    }
  }

  /**
   * The io_uring engine: queues a checked read, write, flush, discard or write-zeroes; false sends
   * the request to the synchronous engine instead (other types, buffers with more segments than a
   * slot holds, discards and write-zeroes it refuses).
   */
  #submit(chain: DescriptorChain, request: BlkRequest, slot: RequestSlot): boolean {
    const bytes = request.dataBytes;
    switch (request.type) {
      case BlkRequestType.IN:
        if (!chain.writableIoVec(slot.iov, 0, bytes)) return false;
        slot.op = IoUringOp.READV;
        request.writtenOnSuccess = bytes + 1;
        break;
      case BlkRequestType.OUT:
        if (!chain.readableIoVec(slot.iov, BLK_HEADER_BYTES, bytes)) return false;
        slot.op = IoUringOp.WRITEV;
        this.#writesSinceSync++;
        slot.syncAfter = !this.writeCache;
        break;
      case BlkRequestType.FLUSH:
        slot.op = IoUringOp.FSYNC;
        break;
      case BlkRequestType.DISCARD: {
        // Punching holes may take long (much to deallocate, slow storage): in the kernel too. A
        // request that is refused goes to the synchronous engine, which refuses it again.
        const ranges = this.#ranges(chain, request, false);
        if (typeof ranges === "number") return false;
        slot.ranges = ranges.filter((r) => r.length > 0);
        if (slot.ranges.length === 0) return false;
        slot.op = IoUringOp.FALLOCATE;
        break;
      }
      case BlkRequestType.WRITE_ZEROES: {
        // Zeroing may mean writing gigabytes of zeros: in the kernel's time, range by range.
        const ranges = this.#ranges(chain, request, true);
        if (typeof ranges === "number") return false;
        slot.ranges = ranges.filter((r) => r.length > 0);
        if (slot.ranges.length === 0) return false;
        this.#uring!.startZeroing(slot);
        return true;
      }
      default:
        return false;
    }
    slot.expected = request.type === BlkRequestType.IN || request.type === BlkRequestType.OUT
      ? bytes
      : 0;
    slot.offset = request.sector * SECTOR;
    this.#uring!.queue(slot);
    return true;
  }

  /** Completes an io_uring request (the engine then interrupts the guest). */
  #finish(slot: RequestSlot, result: number): void {
    let status: number;
    if (slot.zeroing) {
      status = this.#status(result, "write zeroes");
    } else if (slot.op === IoUringOp.FSYNC) {
      const early = this.#uring!.takeSyncError();
      status = this.#status(result < 0 ? result : early, "flush");
    } else if (slot.op === IoUringOp.FALLOCATE) {
      status = this.#status(result, "discard");
    } else if (result === slot.expected) {
      status = BlkStatus.OK;
    } else if (result >= 0) {
      // The engine resubmitted short transfers until they stopped at the end of the file: the
      // image shrank under the device.
      status = this.#ioError(slot.op === IoUringOp.READV ? "read" : "write", -Errno.EIO);
    } else {
      status = this.#ioError(slot.op === IoUringOp.READV ? "read" : "write", result);
    }
    const queue = slot.queue!;
    const request = slot.request;
    if (slot.op === IoUringOp.WRITEV && !slot.zeroing) queue.countBytes?.(slot.expected);
    this.#completeRequest(queue, request, status, null);
  }

  /**
   * The synchronous engine: executes a checked request; returns its status, or DEFERRED when a
   * zeroing job completes it later.
   */
  #execute(chain: DescriptorChain, request: BlkRequest, queue: Virtqueue): number {
    const bytes = request.dataBytes;
    switch (request.type) {
      case BlkRequestType.IN: {
        const status = this.#read(chain, request);
        if (status === BlkStatus.OK) request.writtenOnSuccess = bytes + 1;
        return status;
      }
      case BlkRequestType.OUT:
        return this.#write(chain, request);
      case BlkRequestType.FLUSH:
        return this.#status(this.#flush(), "flush");
      case BlkRequestType.GET_ID: {
        // A buffer shorter than the ID gets its start (the one view made, for a rare request).
        const id = bytes >= BLK_ID_BYTES ? this.#id : this.#id.subarray(0, bytes);
        request.writtenOnSuccess = chain.write(id) + 1;
        return BlkStatus.OK;
      }
      case BlkRequestType.DISCARD:
        return this.#discard(chain, request);
      case BlkRequestType.WRITE_ZEROES:
        return this.#writeZeroes(chain, request, queue);
      default:
        return BlkStatus.UNSUPP;
    }
  }

  /**
   * Where every request ends, whichever engine served it: the status byte, the error counter and
   * the used ring. `chain` is the request's chain while the queue has not popped another (the
   * synchronous engine); requests completed later (io_uring, zeroing jobs) give only the head.
   */
  #complete(
    queue: Virtqueue,
    status: number,
    statusByte: ByteRef | null,
    written: number,
    chain: DescriptorChain | null,
    head: number,
  ): void {
    if (statusByte !== null) statusByte.u8[statusByte.offset] = status;
    if (status !== BlkStatus.OK) queue.countError?.();
    if (chain !== null) queue.push(chain, written);
    else queue.pushHead(head, written);
  }

  /** {@link #complete} for a decoded request: a failed one reports its status byte alone. */
  #completeRequest(
    queue: Virtqueue,
    request: BlkRequest,
    status: number,
    chain: DescriptorChain | null,
  ): void {
    const written = !request.hasStatus ? 0 : status === BlkStatus.OK ? request.writtenOnSuccess : 1;
    // Reads and writes are counted by direction however they ended (a failed one with no bytes),
    // also those refused before an engine saw them.
    const direction = !request.hasHeader || !request.hasStatus
      ? 0
      : request.type === BlkRequestType.IN
      ? IoDirection.READ
      : request.type === BlkRequestType.OUT
      ? IoDirection.WRITE
      : 0;
    if (direction !== 0) {
      queue.countIo?.(request.head, direction, status === BlkStatus.OK ? request.dataBytes : 0);
    }
    this.#complete(
      queue,
      status,
      request.hasStatus ? request.status : null,
      written,
      chain,
      request.head,
    );
  }

  #inRange(sector: number, bytes: number): boolean {
    return bytes % SECTOR === 0 && sector + bytes / SECTOR <= this.#capacity;
  }

  #read(chain: DescriptorChain, request: BlkRequest): number {
    const bytes = request.dataBytes;
    const iov = this.#iov;
    iov.clear();
    if (!chain.writableIoVec(iov, 0, bytes)) return BlkStatus.IOERR;
    const n = this.#storage.readv(iov, request.sector * SECTOR);
    return n === bytes ? BlkStatus.OK : this.#ioError("read", n < 0 ? n : -Errno.EIO);
  }

  #write(chain: DescriptorChain, request: BlkRequest): number {
    const bytes = request.dataBytes;
    const iov = this.#iov;
    iov.clear();
    if (!chain.readableIoVec(iov, BLK_HEADER_BYTES, bytes)) return BlkStatus.IOERR;
    const n = this.#storage.writev(iov, request.sector * SECTOR);
    this.#writesSinceSync++;
    if (n !== bytes) return this.#ioError("write", n < 0 ? n : -Errno.EIO);
    return this.writeCache
      ? BlkStatus.OK
      : this.#status(this.#storage.flush(), "write-through sync");
  }

  /**
   * Reads and checks the segments of a DISCARD or WRITE_ZEROES request (all of them, before any is
   * acted on); returns them, or the status that refuses the request.
   */
  #ranges(chain: DescriptorChain, request: BlkRequest, zeroes: boolean): ZeroRange[] | number {
    if (this.#readOnly) return BlkStatus.IOERR;
    const bytes = request.dataBytes;
    const count = bytes / 16;
    if (bytes <= 0 || bytes % 16 !== 0 || count > MAX_DISCARD_SEGMENTS) return BlkStatus.UNSUPP;
    chain.read(this.#segments.subarray(0, bytes), BLK_HEADER_BYTES);
    const sv = this.#segmentView;
    const ranges: ZeroRange[] = [];
    for (let i = 0; i < count; i++) {
      const o = i * 16;
      const sector = sv.getUint32(o, true) + sv.getUint32(o + 4, true) * 4294967296;
      const sectors = sv.getUint32(o + 8, true);
      const unmap = (sv.getUint32(o + 12, true) & 1) !== 0;
      if (sv.getUint32(o + 12, true) & ~1 || (unmap && !zeroes)) return BlkStatus.UNSUPP;
      if (sectors > MAX_DISCARD_SECTORS || !this.#inRange(sector, sectors * SECTOR)) {
        return BlkStatus.IOERR;
      }
      ranges.push({ offset: sector * SECTOR, length: sectors * SECTOR, unmap });
    }
    return ranges;
  }

  #discard(chain: DescriptorChain, request: BlkRequest): number {
    const ranges = this.#ranges(chain, request, false);
    if (typeof ranges === "number") return ranges;
    for (const r of ranges) {
      const st = this.#status(this.#storage.discard(r.offset, r.length), "discard");
      if (st !== BlkStatus.OK) return st;
    }
    return BlkStatus.OK;
  }

  /** Zeroes the ranges in bounded steps (see zero_jobs.ts); a status, or DEFERRED. */
  #writeZeroes(chain: DescriptorChain, request: BlkRequest, queue: Virtqueue): number {
    const ranges = this.#ranges(chain, request, true);
    if (typeof ranges === "number") return ranges;
    const nonEmpty = ranges.filter((r) => r.length > 0);
    if (nonEmpty.length === 0) return BlkStatus.OK;
    const rc = this.#zeroes.run(queue, chain.head, request.status, nonEmpty);
    return rc === null ? DEFERRED : this.#status(rc, "write zeroes");
  }

  /** A zeroing job is done: its completion, and its queue served again. */
  #finishZeroes(job: ZeroJob, rc: number, resume: boolean): void {
    this.#complete(job.queue, this.#status(rc, "write zeroes"), job.status, 1, null, job.head);
    const loop = this.#loop;
    if (loop === null) return;
    const queue = resume ? loop.queue(job.queue.index) : null;
    if (queue !== null) this.processQueue(queue);
    loop.notify(job.queue.index);
  }

  #status(rc: number, what: string): number {
    return rc === 0 ? BlkStatus.OK : this.#ioError(what, rc);
  }

  #ioError(what: string, negErrno: number): number {
    // One line for the first error and then one per thousand, so a failing disk cannot flood the log.
    if (this.#errors++ % 1000 === 0) {
      this.#log.error("{what} failed on {path}: errno {errno} ({count} errors so far)", {
        what,
        path: this.#path,
        errno: -negErrno,
        count: this.#errors,
      });
    }
    return BlkStatus.IOERR;
  }
}
