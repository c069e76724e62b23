/**
 * The back-end side of the vhost-user protocol: one handler per request id, the device's rings and
 * guest memory, and the QEMU 7.2 ordering rules.
 *
 * Rules that other back-ends learned the hard way, and that this one follows:
 * - SET_STATUS(0) arrives before GET_VRING_BASE: it keeps the ring indices, but no ring may be
 *   read again until it is re-enabled (firmware resets the device when the OS takes over, and the
 *   old rings' memory may by then hold anything).
 * - GET_VRING_BASE stops a ring but does not reset its indices.
 * - SET_VRING_ENABLE may name a queue that was never set up: the flag is kept for later.
 * - net sends SET_VRING_ENABLE(1) before SET_FEATURES; without bit 30 all rings start enabled.
 * - A malformed message drops this connection only; a broken ring stops only that ring.
 *
 * @module
 */

import { getLogger, type Logger } from "../log/mod.ts";
import { closeQuietly, setNonBlocking } from "../sys/libc.ts";
import { signalEventFd } from "../sys/event.ts";
import { type FdKind, fdStat } from "../sys/fd_kind.ts";
import { createMemfd, Mapping } from "../sys/mman.ts";
import { inflightQueueSize, InflightRegion } from "../ring/inflight.ts";
import { DirtyLog, DirtyLogError } from "../ring/dirty_log.ts";
import { GuestMemory, MemoryError } from "../ring/guest_memory.ts";
import { MAX_QUEUE_SIZE, SplitQueue } from "../ring/split_queue.ts";
import type { VirtioDevice } from "../devices/device.ts";
import { type Connection, ProtocolError } from "./connection.ts";
import { BackendChannel } from "./backend_channel.ts";
import {
  bit,
  configPayload,
  decodeConfig,
  decodeInflight,
  decodeMemRegion,
  decodeMemTable,
  decodeVringAddr,
  Flags,
  getU64,
  type InflightInfo,
  inflightPayload,
  type Message,
  PAYLOAD_SIZE,
  ProtocolFeature,
  Request,
  requestName,
  u64Payload,
  VirtioFeature,
  VRING_F_LOG,
  VRING_IDX_MASK,
  VRING_NOFD_MASK,
  vringStatePayload,
} from "./message.ts";

/** Where the back-end registers and unregisters kick fds (the server's epoll). */
export interface KickWatcher {
  /** Starts watching `fd` as the kick of queue `queue`. */
  watchKick(fd: number, queue: number): void;
  /** Stops watching `fd`. */
  unwatchKick(fd: number): void;
  /** A queue was stopped because the driver broke it (for status). */
  queueStopped?(queue: number): void;
}

/** Back-end tuning. */
export interface BackendOptions {
  /** Most memory regions (GET_MAX_MEM_SLOTS); default 256. */
  maxMemSlots?: number;
  /** Where each queue keeps its counters (shared memory the main thread reads); default private. */
  queueStats?: (queue: number) => Float64Array;
  /** Where the device's reads and writes are counted, all queues together (see `IoStat`). */
  ioStats?: Float64Array;
  /**
   * Mark written pages in the dirty log during a migration (default true). Only tests turn it
   * off, to show that a migration test catches a back-end that does not log.
   */
  dirtyLogging?: boolean;
}

/**
 * Protocol features every vhostd device supports. BACKEND_REQ carries config-change messages
 * ({@link VhostUserBackend.announceConfigChange}).
 */
export const BASE_PROTOCOL_FEATURES: bigint = bit(ProtocolFeature.MQ) |
  bit(ProtocolFeature.LOG_SHMFD) | bit(ProtocolFeature.REPLY_ACK) |
  bit(ProtocolFeature.BACKEND_REQ) | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS) |
  bit(ProtocolFeature.RESET_DEVICE) | bit(ProtocolFeature.STATUS);

/** Transport features every vhostd device supports (LOG_ALL: dirty logging for migration). */
export const BASE_FEATURES: bigint = bit(VirtioFeature.VERSION_1) |
  bit(VirtioFeature.RING_INDIRECT_DESC) | bit(VirtioFeature.RING_EVENT_IDX) |
  bit(VirtioFeature.PROTOCOL_FEATURES) | bit(VirtioFeature.LOG_ALL);

/** Requests that may carry fds, and how many at most. */
const FD_CARRIERS: Partial<Record<number, number>> = {
  [Request.SET_MEM_TABLE]: 8,
  [Request.SET_LOG_BASE]: 1,
  [Request.SET_LOG_FD]: 1,
  [Request.SET_VRING_KICK]: 1,
  [Request.SET_VRING_CALL]: 1,
  [Request.SET_VRING_ERR]: 1,
  [Request.SET_BACKEND_REQ_FD]: 1,
  [Request.SET_INFLIGHT_FD]: 1,
  [Request.GPU_SET_SOCKET]: 1,
  [Request.ADD_MEM_REG]: 1,
  [Request.REM_MEM_REG]: 1,
  [Request.SET_DEVICE_STATE_FD]: 1,
};

/** Requests whose answer is a reply body: an unsupported one cannot be answered at all. */
const HAS_REPLY = new Set<number>([
  Request.GET_FEATURES,
  Request.GET_PROTOCOL_FEATURES,
  Request.GET_VRING_BASE,
  Request.GET_QUEUE_NUM,
  Request.GET_CONFIG,
  Request.GET_MAX_MEM_SLOTS,
  Request.GET_STATUS,
  Request.GET_INFLIGHT_FD,
  Request.IOTLB_MSG,
  Request.CREATE_CRYPTO_SESSION,
  Request.POSTCOPY_ADVISE,
  Request.POSTCOPY_END,
  Request.GET_SHARED_OBJECT,
  Request.SET_DEVICE_STATE_FD,
  Request.CHECK_DEVICE_STATE,
  Request.GET_SHMEM_CONFIG,
]);

/** The protocol state of one device for one front-end session. */
export class VhostUserBackend {
  /** The device served. */
  readonly device: VirtioDevice;
  /** Guest memory shared by the front-end. */
  readonly memory: GuestMemory;
  /** The device's queues. */
  readonly queues: SplitQueue[];
  /** Per queue: whether the device lets it be busy-polled (`VirtioDevice.pollQueues`). */
  readonly polled: readonly boolean[];
  /** Virtio features offered. */
  readonly features: bigint;
  /** Protocol features offered. */
  readonly protocolFeatures: bigint;
  /** Features the front-end acknowledged. */
  ackedFeatures = 0n;
  /** Protocol features the front-end acknowledged. */
  ackedProtocolFeatures = 0n;
  /** The virtio status byte (SET_STATUS). */
  status = 0;
  readonly #watcher: KickWatcher;
  readonly #log: Logger;
  #inflight: Mapping | null = null;
  #running = false;
  /** The migration dirty log (SET_LOG_BASE), shared by every queue while LOG_ALL is on. */
  readonly #dirtyLog = new DirtyLog();
  readonly #dirtyLogging: boolean;
  #logAll = false;
  /** Logging came on before the log did: this connection joined a migration under way. */
  #joinedMigration = false;
  /** The back-end request channel (SET_BACKEND_REQ_FD), or null. */
  #channel: BackendChannel | null = null;
  /** A config change was announced while no ring ran: announce it again when one starts. */
  #configChangeUnseen = false;
  /** "No channel" was logged on this connection. */
  #noChannelLogged = false;

  /** Creates the back-end for `device`; kick fds are registered through `watcher`. */
  constructor(device: VirtioDevice, watcher: KickWatcher, options: BackendOptions = {}) {
    this.device = device;
    this.#watcher = watcher;
    this.#log = getLogger(["vhostd", device.name]);
    this.memory = new GuestMemory(options.maxMemSlots ?? 256);
    const maxSize = device.maxQueueSize ?? 1024;
    this.queues = Array.from({ length: device.numQueues }, (_, i) => new SplitQueue(i, maxSize));
    const poll = device.pollQueues;
    this.polled = this.queues.map((q) =>
      typeof poll === "function" ? poll(q.index) : poll === true
    );
    this.#dirtyLogging = options.dirtyLogging ?? true;
    const stats = options.queueStats;
    const io = options.ioStats ?? null;
    for (const q of this.queues) q.countInto(stats ? stats(q.index) : null, io);
    this.features = device.features | BASE_FEATURES;
    this.protocolFeatures = BASE_PROTOCOL_FEATURES | (device.protocolFeatures ?? 0n) |
      (device.getConfig ? bit(ProtocolFeature.CONFIG) : 0n) |
      (device.announce ? bit(ProtocolFeature.RARP) : 0n);
  }

  /** Whether any ring is started: the device is live (see {@link VirtioDevice.suspended}). */
  get running(): boolean {
    return this.#running;
  }

  #hasProtocol(feature: number): boolean {
    return (this.ackedProtocolFeatures & bit(feature)) !== 0n;
  }

  /** Handles one message, replying as the protocol asks. Throws ProtocolError to drop the peer. */
  handle(m: Message, conn: Connection): void {
    try {
      this.#check(m);
      const ok = this.#dispatch(m, conn);
      if (
        ok !== null && (m.flags & Flags.NEED_REPLY) && this.#hasProtocol(ProtocolFeature.REPLY_ACK)
      ) {
        conn.reply(m.request, u64Payload(ok ? 0n : 1n));
      }
    } finally {
      for (const fd of m.fds) closeQuietly(fd);
      m.fds.length = 0;
    }
  }

  #check(m: Message): void {
    const name = requestName(m.request);
    if (m.request < 1 || m.request > Request.GET_SHMEM_CONFIG) {
      throw new ProtocolError(`unknown request ${m.request}`);
    }
    const maxFds = FD_CARRIERS[m.request] ?? 0;
    if (m.fds.length > maxFds) {
      throw new ProtocolError(`${name} carried ${m.fds.length} fds (at most ${maxFds})`);
    }
    const size = PAYLOAD_SIZE[m.request];
    if (size !== undefined && m.payload.byteLength !== size) {
      throw new ProtocolError(
        `${name}: payload is ${m.payload.byteLength} bytes, expected ${size}`,
      );
    }
  }

  #queue(index: number, name: string): SplitQueue {
    const q = this.queues[index];
    if (q === undefined) {
      throw new ProtocolError(
        `${name}: queue ${index} does not exist (${this.queues.length} queues)`,
      );
    }
    return q;
  }

  #takeFd(m: Message): number {
    const fd = m.fds.shift();
    if (fd === undefined) throw new ProtocolError(`${requestName(m.request)} carried no fd`);
    return fd;
  }

  /** Returns true/false for an acknowledgement, or null when a reply body was already sent. */
  #dispatch(m: Message, conn: Connection): boolean | null {
    const p = m.payload;
    switch (m.request) {
      case Request.GET_FEATURES:
        conn.reply(m.request, u64Payload(this.features));
        return null;
      case Request.SET_FEATURES:
        return this.#setFeatures(p.getBigUint64(0, true));
      case Request.SET_OWNER:
        return true;
      case Request.RESET_OWNER:
      case Request.RESET_DEVICE:
        this.resetDevice();
        return true;
      case Request.SET_MEM_TABLE:
        return this.#setMemTable(m);
      case Request.SET_VRING_NUM: {
        const q = this.#queue(p.getUint32(0, true), "SET_VRING_NUM");
        try {
          q.configure(p.getUint32(4, true));
        } catch (e) {
          if (e instanceof RangeError) throw new ProtocolError(`SET_VRING_NUM: ${e.message}`);
          throw e;
        }
        this.#attach(q);
        return true;
      }
      case Request.SET_VRING_ADDR: {
        const a = decodeVringAddr(p);
        const q = this.#queue(a.index, "SET_VRING_ADDR");
        if (a.flags & ~VRING_F_LOG) {
          throw new ProtocolError(`SET_VRING_ADDR: unknown flags 0x${a.flags.toString(16)}`);
        }
        // With VHOST_VRING_F_LOG, used-ring writes are logged at the guest address QEMU gives.
        q.logUsedRingAt(a.flags & VRING_F_LOG ? a.log : -1);
        q.setAddresses(a);
        this.#attach(q);
        // The used index lives in guest memory; after a back-end restart it is the truth.
        q.syncUsedIdx();
        return true;
      }
      case Request.SET_VRING_BASE: {
        const q = this.#queue(p.getUint32(0, true), "SET_VRING_BASE");
        q.setBase(p.getUint32(4, true));
        return true;
      }
      case Request.GET_VRING_BASE: {
        const q = this.#queue(p.getUint32(0, true), "GET_VRING_BASE");
        this.device.quiesce?.();
        if (q.inFlight > 0 && q.started) {
          // The front-end takes the index as "everything before it is done": a chain still out
          // would never complete (on a migration's destination, nobody knows of it).
          this.#log.warn("queue {queue} stops with {count} requests not completed", {
            queue: q.index,
            count: q.inFlight,
          });
        }
        this.#stop(q);
        this.#log.debug("queue {queue} stops at avail {avail}, used {used}", {
          queue: q.index,
          avail: q.lastAvailIdx,
          used: q.usedIdx,
        });
        if (this.#running && !this.queues.some((other) => other.started)) this.#suspend();
        conn.reply(m.request, vringStatePayload({ index: q.index, num: q.lastAvailIdx }));
        return null;
      }
      case Request.SET_VRING_KICK:
      case Request.SET_VRING_CALL:
      case Request.SET_VRING_ERR:
        return this.#setVringFd(m);
      case Request.GET_PROTOCOL_FEATURES:
        conn.reply(m.request, u64Payload(this.protocolFeatures));
        return null;
      case Request.SET_LOG_BASE:
        this.#setLogBase(m);
        // QEMU waits for this reply whether or not it asked for one.
        conn.reply(m.request, u64Payload(0n));
        return null;
      case Request.SET_BACKEND_REQ_FD: {
        if (!this.#hasProtocol(ProtocolFeature.BACKEND_REQ)) {
          // Refused as an unsupported request is (handle() closes the fd); the session goes on.
          this.#log.warn("rejecting SET_BACKEND_REQ_FD: BACKEND_REQ was not negotiated");
          return false;
        }
        const fd = this.#takeFd(m);
        this.#requireKind(fd, "socket", "a socket", "SET_BACKEND_REQ_FD");
        let channel: BackendChannel;
        try {
          channel = new BackendChannel(fd, this.#log);
        } catch (e) {
          closeQuietly(fd);
          throw new ProtocolError(`SET_BACKEND_REQ_FD: ${(e as Error).message}`);
        }
        // A front-end may hand over a new channel at any time; the old one is of no more use.
        this.#channel?.close();
        this.#channel = channel;
        return true;
      }
      case Request.SET_LOG_FD: {
        const fd = this.#takeFd(m);
        this.#requireEventFd(fd, "SET_LOG_FD");
        this.#dirtyLog.setNotifyFd(fd);
        return true;
      }
      case Request.SEND_RARP: {
        if (!this.device.announce) return this.#reject(m);
        this.#requireProtocol(m, ProtocolFeature.RARP);
        this.device.announce(new Uint8Array(p.buffer, p.byteOffset, 6).slice());
        return true;
      }
      case Request.SET_PROTOCOL_FEATURES: {
        const v = p.getBigUint64(0, true);
        if (v & ~this.protocolFeatures) {
          throw new ProtocolError(
            `SET_PROTOCOL_FEATURES: 0x${v.toString(16)} has bits that were not offered`,
          );
        }
        this.ackedProtocolFeatures = v;
        return true;
      }
      case Request.GET_QUEUE_NUM:
        conn.reply(m.request, u64Payload(BigInt(this.queues.length)));
        return null;
      case Request.SET_VRING_ENABLE: {
        const q = this.#queue(p.getUint32(0, true), "SET_VRING_ENABLE");
        const num = p.getUint32(4, true);
        if (num > 1) throw new ProtocolError(`SET_VRING_ENABLE: bad value ${num}`);
        q.enable(num === 1);
        if (q.enabled) this.serviceQueue(q.index);
        return true;
      }
      case Request.GET_CONFIG: {
        const c = decodeConfig(p);
        const data = new Uint8Array(c.size);
        if (this.device.getConfig) {
          data.set(this.device.getConfig(c.offset, c.size).subarray(0, c.size));
        }
        // A zero-size reply tells the front-end the read failed.
        const size = this.device.getConfig ? c.size : 0;
        conn.reply(
          m.request,
          configPayload({ offset: c.offset, size, flags: c.flags, data: data.subarray(0, size) }),
        );
        return null;
      }
      case Request.SET_CONFIG: {
        const c = decodeConfig(p);
        return this.device.setConfig?.(c.offset, c.data, c.flags === 1) ?? false;
      }
      case Request.GET_MAX_MEM_SLOTS:
        conn.reply(m.request, u64Payload(BigInt(this.memory.maxRegions)));
        return null;
      case Request.ADD_MEM_REG: {
        // Decode before taking the fd: a field that does not fit must leave it in the message,
        // which closes it.
        const region = decodeMemRegion(p, 8);
        const fd = this.#takeFd(m);
        this.#mapRegion(() => this.memory.add(region, fd));
        return true;
      }
      case Request.REM_MEM_REG: {
        this.device.quiesce?.();
        const removed = this.memory.remove(decodeMemRegion(p, 8));
        if (!removed) this.#log.warn("REM_MEM_REG names a region that is not mapped");
        this.#attachAll();
        return removed;
      }
      case Request.GET_INFLIGHT_FD:
        this.#requireProtocol(m, ProtocolFeature.INFLIGHT_SHMFD);
        this.#getInflight(m, conn);
        return null;
      case Request.SET_INFLIGHT_FD:
        this.#requireProtocol(m, ProtocolFeature.INFLIGHT_SHMFD);
        this.#setInflight(m);
        return true;
      case Request.SET_STATUS: {
        const status = Number(p.getBigUint64(0, true) & 0xffn);
        if (status === 0) {
          // The driver reset the device and gave up its rings, whose memory may already hold
          // anything: firmware (SeaBIOS) drives a disk at boot, the OS reuses that memory, and only
          // later resets the device. No ring may be read, polled or armed until the front-end
          // enables it again. The indices stay: QEMU 7.2 sends this before GET_VRING_BASE.
          for (const q of this.queues) q.enable(false);
        }
        this.status = status;
        return true;
      }
      case Request.GET_STATUS:
        conn.reply(m.request, u64Payload(BigInt(this.status)));
        return null;
      default:
        return this.#reject(m);
    }
  }

  #reject(m: Message): boolean {
    const name = requestName(m.request);
    if (HAS_REPLY.has(m.request)) {
      throw new ProtocolError(`${name} is not supported and needs a reply`);
    }
    this.#log.warn("rejecting {request}: not supported by this device", { request: name });
    return false;
  }

  #requireProtocol(m: Message, feature: number): void {
    if (!(this.protocolFeatures & bit(feature))) {
      throw new ProtocolError(`${requestName(m.request)} needs a protocol feature not offered`);
    }
  }

  #inflightLayout(p: DataView): InflightInfo {
    const info = decodeInflight(p);
    if (info.numQueues < 1 || info.numQueues > this.queues.length) {
      throw new ProtocolError(`inflight buffer for ${info.numQueues} queues`);
    }
    if (info.queueSize < 1 || info.queueSize > MAX_QUEUE_SIZE) {
      throw new ProtocolError(`inflight buffer for queues of size ${info.queueSize}`);
    }
    return info;
  }

  #getInflight(m: Message, conn: Connection): void {
    const info = this.#inflightLayout(m.payload);
    const size = info.numQueues * inflightQueueSize(info.queueSize);
    const fd = createMemfd("vhostd-inflight", size);
    try {
      conn.reply(m.request, inflightPayload({ ...info, mmapSize: size, mmapOffset: 0 }), [fd]);
    } finally {
      closeQuietly(fd);
    }
  }

  #setInflight(m: Message): void {
    const info = this.#inflightLayout(m.payload);
    const fd = this.#takeFd(m);
    const per = inflightQueueSize(info.queueSize);
    const need = info.numQueues * per;
    // The mapping starts at the page holding mmapOffset (mmap wants aligned offsets).
    const skew = info.mmapOffset % 4096;
    try {
      if (info.mmapSize < need) {
        throw new ProtocolError(`inflight buffer of ${info.mmapSize} bytes is too small`);
      }
      const { kind, size } = fdStat(fd);
      if (kind !== "file") {
        throw new ProtocolError(`inflight buffer fd is a ${kind}, not a memory file`);
      }
      // Past the end of its file a mapping is SIGBUS, which kills every device in the process.
      if (info.mmapOffset + need > size) {
        throw new ProtocolError(
          `inflight buffer of ${need} bytes at offset ${info.mmapOffset} is larger than its fd ` +
            `(${size} bytes)`,
        );
      }
      for (const q of this.queues.slice(0, info.numQueues)) {
        if (q.size > info.queueSize) {
          throw new ProtocolError(
            `inflight buffer for queues of ${info.queueSize} but queue ${q.index} has ${q.size}`,
          );
        }
      }
      this.#dropInflight();
      this.#inflight = Mapping.map(fd, need + skew, info.mmapOffset - skew);
    } catch (e) {
      if (e instanceof RangeError) throw new ProtocolError(e.message);
      throw e;
    } finally {
      closeQuietly(fd);
    }
    const view = new DataView(this.#inflight.buffer);
    for (let i = 0; i < info.numQueues; i++) {
      this.queues[i].trackInflight(new InflightRegion(view, skew + i * per, info.queueSize));
    }
  }

  #dropInflight(): void {
    for (const q of this.queues) q.trackInflight(null);
    this.#inflight?.unmap();
    this.#inflight = null;
  }

  #setFeatures(v: bigint): boolean {
    if (v & ~this.features) {
      throw new ProtocolError(`SET_FEATURES: 0x${v.toString(16)} has bits that were not offered`);
    }
    this.ackedFeatures = v;
    const eventIdx = (v & bit(VirtioFeature.RING_EVENT_IDX)) !== 0n;
    const indirect = (v & bit(VirtioFeature.RING_INDIRECT_DESC)) !== 0n;
    const noProtocol = (v & bit(VirtioFeature.PROTOCOL_FEATURES)) === 0n;
    for (const q of this.queues) {
      q.setFeatures(eventIdx, indirect);
      // Without bit 30 there is no SET_VRING_ENABLE: rings are enabled from the start.
      if (noProtocol) q.enable(true);
    }
    this.#updateLogging();
    this.device.setFeatures?.(v);
    return true;
  }

  #setLogBase(m: Message): void {
    if (!this.#hasProtocol(ProtocolFeature.LOG_SHMFD)) {
      // Without LOG_SHMFD the payload is an address in QEMU's own memory, useless to us.
      throw new ProtocolError("SET_LOG_BASE without the LOG_SHMFD protocol feature");
    }
    const size = getU64(m.payload, 0);
    const offset = getU64(m.payload, 8);
    const fd = this.#takeFd(m); // after decoding: a field that throws leaves it to be closed
    try {
      this.#dirtyLog.map(fd, size, offset); // closes fd, mapped or not
    } catch (e) {
      if (e instanceof DirtyLogError) throw new ProtocolError(e.message);
      throw e;
    }
    this.#log.info("dirty log of {size} bytes mapped (covers {gib} GiB of guest memory)", {
      size,
      gib: (this.#dirtyLog.pages * 4096 / 2 ** 30).toFixed(1),
    });
    if (this.#joinedMigration && this.#dirtyLogging) {
      // This connection replaces one that died mid-migration. Pages the dead back-end wrote since
      // QEMU last read the log are lost to QEMU (QEMU 7.2 stops syncing a vhost log once the
      // back-end is gone), and nobody can tell which: mark every page, so that QEMU copies
      // guest RAM once more rather than leave a page stale on the destination.
      for (const r of this.memory.regions) this.#dirtyLog.mark(r.guestPhysAddr, r.memorySize);
      this.#log.warn(
        "joined a migration under way: all of guest memory marked dirty, since a back-end " +
          "that died mid-migration may have written pages QEMU never learned of",
      );
    }
    this.#joinedMigration = false;
    this.#updateLogging();
    // Queues held while waiting for the log may run now.
    for (const q of this.queues) this.serviceQueue(q.index);
  }

  /**
   * Hands the log to the queues while VHOST_F_LOG_ALL is on. Turned on before SET_LOG_BASE (QEMU
   * does that on a reconnect during a migration), the queues are held until the log arrives;
   * turned off, the log is unmapped (QEMU frees it; the next migration sends a new one).
   */
  #updateLogging(): void {
    const logAll = (this.ackedFeatures & bit(VirtioFeature.LOG_ALL)) !== 0n;
    if (logAll !== this.#logAll) {
      this.#log.info("dirty logging {state}", { state: logAll ? "on" : "off" });
      if (!logAll) this.#dirtyLog.unmap();
      // QEMU turns logging on before sending the log only when a connection starts in the middle
      // of a migration (a reconnect); when a migration starts, the log comes first.
      this.#joinedMigration = logAll && !this.#dirtyLog.mapped;
      this.#logAll = logAll;
      this.device.migrating?.(logAll);
    }
    for (const q of this.queues) {
      if (!logAll || !this.#dirtyLogging) q.logWrites(null);
      else if (this.#dirtyLog.mapped) q.logWrites(this.#dirtyLog);
      else q.awaitLog();
    }
  }

  #setMemTable(m: Message): boolean {
    const regions = decodeMemTable(m.payload);
    if (m.fds.length !== regions.length) {
      throw new ProtocolError(
        `SET_MEM_TABLE: ${regions.length} regions but ${m.fds.length} fds`,
      );
    }
    this.device.quiesce?.();
    this.memory.clear();
    const fds = m.fds.splice(0);
    this.#mapRegion(() => {
      let next = 0;
      try {
        // add() closes each fd it is given, mapped or not; only the ones never reached are ours.
        while (next < regions.length) this.memory.add(regions[next], fds[next++]);
      } finally {
        for (const fd of fds.slice(next)) closeQuietly(fd);
      }
    });
    if (regions.length === 0) {
      this.#log.warn(
        "SET_MEM_TABLE with no regions: guest RAM needs " +
          "-object memory-backend-memfd,id=mem,size=<RAM>,share=on -machine memory-backend=mem",
      );
    }
    return true;
  }

  #mapRegion(fn: () => void): void {
    try {
      fn();
    } catch (e) {
      if (e instanceof MemoryError || e instanceof RangeError) throw new ProtocolError(e.message);
      throw e;
    } finally {
      this.#attachAll();
    }
  }

  #setVringFd(m: Message): boolean {
    const v = m.payload.getBigUint64(0, true);
    const index = Number(v & BigInt(VRING_IDX_MASK));
    const noFd = (v & BigInt(VRING_NOFD_MASK)) !== 0n;
    const name = requestName(m.request);
    const q = this.#queue(index, name);
    if (noFd && m.fds.length > 0) throw new ProtocolError(`${name}: fd sent with the no-fd flag`);
    const fd = noFd ? -1 : this.#takeFd(m);
    // A pipe given as a call fd fills after a few hundred interrupts, and a blocking write then
    // hangs the worker for good: only non-blocking eventfds are taken.
    if (fd >= 0) this.#requireEventFd(fd, name);
    if (m.request === Request.SET_VRING_CALL) {
      q.setCallFd(fd);
      // An interrupt lost while no back-end was connected (a restart, a reconnect) would leave
      // the driver waiting for ever; a spurious one costs it a look at the used ring.
      if (fd >= 0) signalEventFd(fd);
    } else if (m.request === Request.SET_VRING_ERR) {
      q.setErrFd(fd);
    } else {
      if (noFd) throw new ProtocolError("SET_VRING_KICK without an fd (polling) is not supported");
      if (q.kickFd >= 0) this.#watcher.unwatchKick(q.kickFd);
      q.setKickFd(fd);
      this.#watcher.watchKick(fd, q.index);
      const resubmitted = q.start();
      this.#log.debug("queue {queue} starts at avail {avail}, used {used}", {
        queue: q.index,
        avail: q.lastAvailIdx,
        used: q.usedIdx,
      });
      if (!this.#running) {
        this.#running = true;
        this.device.resumed?.();
        // QEMU ignores a config change while the device is stopped (and keeps serving its cached
        // config to the guest): tell it again now that it runs.
        if (this.#configChangeUnseen) this.announceConfigChange();
      }
      if (resubmitted > 0) {
        this.#log.info("resubmitting {count} requests left in flight by an earlier back-end", {
          count: resubmitted,
          queue: q.index,
        });
      }
      // Requests may have been queued before the kick fd existed (for instance after a restart).
      this.serviceQueue(q.index);
    }
    return true;
  }

  /** Refuses anything but an eventfd, and makes it non-blocking; closes it when refused. */
  #requireEventFd(fd: number, what: string): void {
    this.#requireKind(fd, "eventfd", "an eventfd", what);
    setNonBlocking(fd);
  }

  /** Refuses an fd that is not of `kind` (`named` in the error), closing it. */
  #requireKind(fd: number, kind: FdKind, named: string, what: string): void {
    let found: string;
    try {
      found = fdStat(fd).kind;
      if (found === kind) return;
    } catch (e) {
      found = `broken fd (${(e as Error).message})`;
    }
    closeQuietly(fd);
    throw new ProtocolError(`${what}: the fd is a ${found}, not ${named}`);
  }

  /**
   * Tells the front-end that the device's config space changed, with
   * VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the back-end request channel; QEMU then reads the
   * config again (GET_CONFIG) and interrupts the guest. Never waits: see backend_channel.ts.
   * Returns whether the front-end will hear of it (false without a channel, or when the channel
   * is broken or full).
   */
  announceConfigChange(): boolean {
    const channel = this.#channel;
    if (channel === null) {
      if (!this.#noChannelLogged) {
        this.#log.warn(
          "the front-end gave no back-end channel (BACKEND_REQ): it cannot be told that the " +
            "config changed",
        );
        this.#noChannelLogged = true;
      }
      return false;
    }
    this.#configChangeUnseen = !this.#running;
    const result = channel.configChanged();
    this.#log.debug("config change {result}", { result });
    return result !== "dropped";
  }

  #attach(q: SplitQueue): void {
    const err = q.attach(this.memory);
    if (err !== null) throw new ProtocolError(err);
  }

  #attachAll(): void {
    for (const q of this.queues) {
      const err = q.attach(this.memory);
      if (err !== null) {
        this.#log.error("{error}", { error: err, queue: q.index });
        q.fail(err);
      }
    }
  }

  #stop(q: SplitQueue): void {
    if (q.kickFd >= 0) this.#watcher.unwatchKick(q.kickFd);
    q.stop();
  }

  /** The last running ring stopped: tell the device (after its in-flight requests completed). */
  #suspend(): void {
    const started = performance.now();
    this.#running = false;
    this.device.quiesce?.();
    this.device.suspended?.();
    this.#log.debug("device suspended in {ms} ms", {
      ms: (performance.now() - started).toFixed(1),
    });
  }

  /**
   * Processes a queue after a kick, with notifications suppressed while it works. `polling` leaves
   * them suppressed afterwards: the loop is busy-polling the queue and arms it before it sleeps
   * ({@link armQueues}).
   */
  serviceQueue(index: number, polling = false): void {
    const q = this.queues[index];
    if (!q.ready) return;
    for (;;) {
      q.disableNotification();
      const before = q.lastAvailIdx;
      this.device.processQueue(q);
      if (q.broken || polling) break;
      // A device may leave chains available (a receive queue with nothing to send yet): when it
      // took none, stop with notifications back on instead of spinning on the same chains.
      if (!q.enableNotification() || q.lastAvailIdx === before) break;
    }
    q.notify();
    this.stopIfBroken(q.index);
  }

  /**
   * Stops queue `index` if the driver broke it (logging why, once), also when the device found
   * out outside a kick (a receive queue it filled from the network). Returns whether it was.
   */
  stopIfBroken(index: number): boolean {
    const q = this.queues[index];
    if (q === undefined || !q.broken) return false;
    if (!q.started) return true; // stopped and reported already
    this.#log.error("{error}; the queue is stopped until the device is reset", {
      error: q.error,
      queue: q.index,
    });
    this.#stop(q);
    this.#watcher.queueStopped?.(q.index);
    return true;
  }

  /** Serves the queues the driver added to, kicks or not; returns whether any had work. */
  pollQueues(): boolean {
    let worked = false;
    for (const q of this.queues) {
      if (!q.ready || !this.polled[q.index] || !q.hasAvailable()) continue;
      const before = q.lastAvailIdx;
      this.serviceQueue(q.index, true);
      worked ||= q.lastAvailIdx !== before;
    }
    return worked;
  }

  /**
   * Turns kicks back on for every running queue before the loop sleeps. Returns true when chains
   * arrived meanwhile (the driver did not kick for them: the loop must poll again).
   */
  armQueues(): boolean {
    let pending = false;
    for (const q of this.queues) {
      if (q.ready && this.polled[q.index] && q.enableNotification()) pending = true;
    }
    return pending;
  }

  /** RESET_DEVICE: stop and forget all rings, keep memory, ownership and protocol features. */
  resetDevice(): void {
    if (this.#running) this.#suspend();
    this.device.quiesce?.();
    for (const q of this.queues) {
      if (q.kickFd >= 0) this.#watcher.unwatchKick(q.kickFd);
      q.reset();
    }
    this.status = 0;
    this.device.reset?.();
  }

  /** The front-end went away: reset everything, unmap guest memory. */
  disconnect(): void {
    this.resetDevice();
    this.#dropInflight();
    this.#dirtyLog.close();
    this.#logAll = false;
    this.#joinedMigration = false;
    // The channel belongs to the connection (QEMU sends it once, at connect, and keeps it across
    // RESET_DEVICE): it goes with the connection.
    this.#channel?.close();
    this.#channel = null;
    this.#configChangeUnseen = false;
    this.#noChannelLogged = false;
    this.memory.clear();
    this.ackedFeatures = 0n;
    this.ackedProtocolFeatures = 0n;
  }
}
