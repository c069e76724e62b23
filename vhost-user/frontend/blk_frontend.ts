/**
 * A whole vhost-user-blk front-end session, played the way QEMU 7.2 plays it (message for
 * message, as in the traces under shared/research/traces): connect and initialise, start the
 * device, stop it, reconnect with the ring indices carried over. A {@link BlkDriver} on top issues
 * requests once the device runs.
 *
 * QEMU 7.2 orderings reproduced here (and why a back-end must cope with them):
 * - SET_VRING_CALL/ERR for every queue at connect time, before any ring exists;
 * - SET_VRING_ENABLE for every queue of the device, including queues the guest never set up;
 * - stop is SET_STATUS(0) *before* GET_VRING_BASE, so status 0 must not reset the rings;
 * - a reconnect replays everything but GET_CONFIG (QEMU caches it), with SET_VRING_BASE set to the
 *   index read at stop (or, after a back-end crash, the used index found in guest memory).
 *
 * @module
 */

import { BlkFeature } from "../../devices/blk/device.ts";
import { closeQuietly } from "../../sys/libc.ts";
import { acceptUnix, connectUnix, FdSocket, listenUnix } from "../../sys/socket.ts";
import {
  bit,
  HEADER_SIZE,
  MAX_PAYLOAD,
  ProtocolFeature,
  VirtioFeature,
  VRING_F_LOG,
} from "../message.ts";
import { FrontendDirtyLog } from "./dirty_log.ts";
import { BlkDriver, type BlkDriverOptions } from "./blk_driver.ts";
import { type BlkConfigInfo, decodeBlkConfig, QEMU72_BLK_CONFIG_SIZE } from "./blk_config.ts";
import { FrontendConnection } from "./connection.ts";
import type { InflightInfo } from "../message.ts";
import { DriverQueue } from "./driver_queue.ts";
import { DEFAULT_LAYOUT, GuestRam, type RegionLayout } from "./memory.ts";

/** virtio status bits. */
export const DeviceStatus = {
  ACKNOWLEDGE: 1 as const,
  DRIVER: 2 as const,
  DRIVER_OK: 4 as const,
  FEATURES_OK: 8 as const,
} as const;

/** The virtio-blk feature bits this driver understands (QEMU 7.2's `user_feature_bits`, in part). */
export const DRIVER_BLK_FEATURES: bigint = bit(BlkFeature.SIZE_MAX) | bit(BlkFeature.SEG_MAX) |
  bit(BlkFeature.BLK_SIZE) | bit(BlkFeature.FLUSH) | bit(BlkFeature.TOPOLOGY) |
  bit(BlkFeature.CONFIG_WCE) | bit(BlkFeature.MQ) | bit(BlkFeature.DISCARD) |
  bit(BlkFeature.WRITE_ZEROES) | bit(BlkFeature.RO) | bit(VirtioFeature.VERSION_1);

/** Protocol features this front-end can use (it has no back-end message handler of its own). */
export const FRONTEND_PROTOCOL_FEATURES: bigint = bit(ProtocolFeature.MQ) |
  bit(ProtocolFeature.LOG_SHMFD) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG) |
  bit(ProtocolFeature.RESET_DEVICE) | bit(ProtocolFeature.STATUS);

/** Options of a session. */
export interface BlkFrontendOptions {
  /** The back-end's socket. */
  socket: string;
  /** Queues of the device (QEMU's num-queues); default 1. */
  queues?: number;
  /** Queues the guest sets up (default: all); the rest are only enabled, as QEMU does. */
  startedQueues?: number[];
  /** Queue size; default 128 (QEMU 7.2's default). */
  queueSize?: number;
  /** Negotiate VIRTIO_F_EVENT_IDX when offered; default true. */
  eventIdx?: boolean;
  /** Negotiate VIRTIO_F_INDIRECT_DESC when offered (and build indirect tables); default true. */
  indirect?: boolean;
  /** Use ADD_MEM_REG when CONFIGURE_MEM_SLOTS is offered (else SET_MEM_TABLE); default true. */
  memSlots?: boolean;
  /** Negotiate INFLIGHT_SHMFD when offered and keep the buffer across restarts; default true. */
  inflight?: boolean;
  /** Negotiate BACKEND_REQ when offered and pass one end of a socket pair, as QEMU does. */
  backendChannel?: boolean;
  /** Which requests carry NEED_REPLY (see {@link FrontendConnection.ackMode}); default "all". */
  ackMode?: "qemu" | "all";
  /** Guest RAM layout; default {@link DEFAULT_LAYOUT}. */
  layout?: readonly RegionLayout[];
  /** Where guest RAM starts in its memfd (see {@link GuestRam.create}); default 0. */
  ramFileOffset?: number;
  /**
   * The inflight buffer to hand over with SET_INFLIGHT_FD instead of asking the back-end for one
   * (GET_INFLIGHT_FD): a test's own, possibly hostile, description and fd. The session closes
   * the fd.
   */
  inflightBuffer?: { info: InflightInfo; fd: number };
  /** Keep retrying the connection this long; default 5000 ms. */
  connectRetryMs?: number;
  /** Request slots and sizes of the driver. */
  driver?: BlkDriverOptions;
  /** Record every message sent ({@link FrontendConnection.record}). */
  record?: boolean;
  /** Changes the feature word to acknowledge (default: offered ∩ what this driver knows). */
  chooseFeatures?: (offered: bigint, proposed: bigint) => bigint;
}

/** A vhost-user-blk front-end session. */
export class BlkFrontend {
  /** The current connection (replaced by {@link reconnect}). */
  conn: FrontendConnection;
  /** Guest RAM. */
  readonly ram: GuestRam;
  /** Every queue of the device (rings exist for all; only started ones are given to the back-end). */
  readonly queues: DriverQueue[];
  /** The request driver. */
  readonly blk: BlkDriver;
  /** Features the back-end offered. */
  offeredFeatures = 0n;
  /** Features acknowledged with SET_FEATURES. */
  features = 0n;
  /** Protocol features the back-end offered. */
  offeredProtocolFeatures = 0n;
  /** GET_QUEUE_NUM's answer (0 without MQ). */
  queueNum = 0;
  /** GET_MAX_MEM_SLOTS's answer (0 without CONFIGURE_MEM_SLOTS). */
  maxMemSlots = 0;
  /** The raw config bytes read at the first initialisation (QEMU's 57). */
  configBytes: Uint8Array = new Uint8Array(0);
  /** Next avail index to give each queue with SET_VRING_BASE. */
  readonly base: number[];
  /** Messages sent on every connection of this session, when recording. */
  readonly sent: { request: number; flags: number }[] = [];
  readonly #options: BlkFrontendOptions;
  readonly #started: number[];
  #memShared = false;
  #backendFd = -1;
  #backendSocket: FdSocket | null = null;
  #inflight: { info: InflightInfo; fd: number } | null = null;
  /** The dirty log while a migration runs ({@link startMigration}), else null. */
  #dirtyLog: FrontendDirtyLog | null = null;

  private constructor(options: BlkFrontendOptions, conn: FrontendConnection) {
    this.#options = options;
    this.conn = conn;
    this.#prepare(conn);
    const n = options.queues ?? 1;
    this.#started = options.startedQueues ?? Array.from({ length: n }, (_, i) => i);
    this.ram = GuestRam.create(options.layout ?? DEFAULT_LAYOUT, options.ramFileOffset);
    this.#inflight = options.inflightBuffer ?? null;
    const size = options.queueSize ?? 128;
    const indirect = options.indirect ?? true;
    this.queues = Array.from(
      { length: n },
      (_, i) => DriverQueue.create(this.ram, i, size, { indirectEntries: indirect ? 32 : 0 }),
    );
    this.blk = new BlkDriver(this.ram, this.queues, options.driver);
    this.base = this.queues.map(() => 0);
  }

  /** Connects, initialises and starts the device, as QEMU does when the guest driver loads. */
  static async open(options: BlkFrontendOptions): Promise<BlkFrontend> {
    const s = await BlkFrontend.connect(options);
    try {
      s.start();
      if (s.conn.ackMode === "qemu") s.conn.sync();
      return s;
    } catch (e) {
      s.close();
      throw e;
    }
  }

  /** Connects and initialises (QEMU's realize), without starting the device. */
  static async connect(options: BlkFrontendOptions): Promise<BlkFrontend> {
    const conn = await FrontendConnection.connect(options.socket, {
      retryMs: options.connectRetryMs ?? 5000,
    });
    let s: BlkFrontend;
    try {
      s = new BlkFrontend(options, conn);
    } catch (e) {
      conn.close();
      throw e;
    }
    try {
      s.init(true);
      return s;
    } catch (e) {
      s.close();
      throw e;
    }
  }

  #prepare(conn: FrontendConnection): void {
    conn.ackMode = this.#options.ackMode ?? "all";
    if (this.#options.record) conn.record = this.sent;
  }

  /** The decoded config read at initialisation. */
  get config(): BlkConfigInfo {
    return decodeBlkConfig(this.configBytes);
  }

  /** Whether protocol feature `f` was negotiated. */
  hasProtocol(f: number): boolean {
    return (this.conn.protocolFeatures & bit(f)) !== 0n;
  }

  /** Queues given to the back-end at start. */
  get startedQueues(): readonly number[] {
    return this.#started;
  }

  /**
   * The connect-time sequence (QEMU 7.2 `vhost_user_backend_init` + `vhost_dev_init` +
   * vhost-user-blk realize). `readConfig` is false on a reconnect: QEMU uses its cached config.
   */
  init(readConfig: boolean): void {
    const c = this.conn;
    const o = this.#options;
    this.offeredFeatures = c.getFeatures();
    if (!(this.offeredFeatures & bit(VirtioFeature.PROTOCOL_FEATURES))) {
      throw new Error("back-end does not offer VHOST_USER_F_PROTOCOL_FEATURES (bit 30)");
    }
    this.offeredProtocolFeatures = c.getProtocolFeatures();
    let want = FRONTEND_PROTOCOL_FEATURES;
    if (o.memSlots ?? true) want |= bit(ProtocolFeature.CONFIGURE_MEM_SLOTS);
    if (o.backendChannel) want |= bit(ProtocolFeature.BACKEND_REQ);
    if (o.inflight ?? true) want |= bit(ProtocolFeature.INFLIGHT_SHMFD);
    c.setProtocolFeatures(this.offeredProtocolFeatures & want);
    if (this.hasProtocol(ProtocolFeature.MQ)) this.queueNum = c.getQueueNum();
    if (this.queueNum < this.queues.length && this.hasProtocol(ProtocolFeature.MQ)) {
      throw new Error(`back-end has ${this.queueNum} queues, ${this.queues.length} wanted`);
    }
    if (this.hasProtocol(ProtocolFeature.CONFIGURE_MEM_SLOTS)) {
      this.maxMemSlots = c.getMaxMemSlots();
    }
    if (this.hasProtocol(ProtocolFeature.BACKEND_REQ)) this.#sendBackendChannel();
    c.setOwner();
    c.getFeatures();
    for (const q of this.queues) {
      c.setVringCall(q.index, q.layout.callFd);
      c.setVringErr(q.index, q.layout.errFd);
    }
    if (readConfig) {
      if (!this.hasProtocol(ProtocolFeature.CONFIG)) {
        throw new Error("back-end does not offer VHOST_USER_PROTOCOL_F_CONFIG");
      }
      this.configBytes = c.getConfig(0, QEMU72_BLK_CONFIG_SIZE);
    }
  }

  #sendBackendChannel(): void {
    // QEMU gives the back-end one end of a socketpair; a listener on a private path does the same.
    const dir = Deno.makeTempDirSync({ prefix: "vhostd-fe-" });
    const path = `${dir}/backend-req.sock`;
    const lfd = listenUnix(path);
    let cfd = -1;
    try {
      cfd = connectUnix(path);
      closeQuietly(this.#backendFd);
      this.#backendSocket = null;
      this.#backendFd = acceptUnix(lfd);
      this.conn.setBackendReqFd(cfd);
    } finally {
      closeQuietly(cfd);
      closeQuietly(lfd);
      Deno.removeSync(dir, { recursive: true });
    }
  }

  /**
   * The next message the back-end sent on its request channel (a config change, say; see
   * {@link BlkFrontendOptions.backendChannel}), without waiting: null when none has arrived or
   * there is no channel. Its payload is read and dropped; this front-end answers nothing on the
   * channel, so it must not be asked to.
   */
  takeBackendRequest(): { request: number; flags: number; size: number } | null {
    if (this.#backendFd < 0) return null;
    const socket =
      (this.#backendSocket ??= new FdSocket(this.#backendFd, HEADER_SIZE + MAX_PAYLOAD));
    const fds: number[] = [];
    try {
      const got = socket.recvAvailable(0, HEADER_SIZE, fds);
      if (got === 0) return null;
      // The rest of the message is on its way (a back-end sends each one whole).
      if (got < HEADER_SIZE) socket.recv(got, HEADER_SIZE - got, fds);
      const dv = new DataView(socket.buffer.buffer);
      const size = dv.getUint32(8, true);
      if (size > MAX_PAYLOAD) throw new Error(`back-end request with a ${size}-byte payload`);
      if (size > 0) socket.recv(HEADER_SIZE, size, fds);
      return { request: dv.getUint32(0, true), flags: dv.getUint32(4, true), size };
    } finally {
      for (const fd of fds) closeQuietly(fd);
    }
  }

  #addStatus(bits: number): void {
    const cur = this.conn.getStatus();
    if ((cur & bits) === bits) return;
    this.conn.setStatus(cur | bits);
  }

  /** The feature word SET_FEATURES carries: bit 30 plus what the driver acknowledges. */
  proposeFeatures(): bigint {
    const o = this.#options;
    let driver = DRIVER_BLK_FEATURES;
    if (o.eventIdx ?? true) driver |= bit(VirtioFeature.RING_EVENT_IDX);
    if (o.indirect ?? true) driver |= bit(VirtioFeature.RING_INDIRECT_DESC);
    const proposed = (this.offeredFeatures & driver) | bit(VirtioFeature.PROTOCOL_FEATURES);
    return o.chooseFeatures?.(this.offeredFeatures, proposed) ?? proposed;
  }

  /**
   * The start sequence (QEMU 7.2 `vhost_user_blk_start` → `vhost_dev_start`): features, status
   * FEATURES_OK, calls, memory, the started rings, ENABLE for every queue, status DRIVER_OK.
   */
  start(): void {
    const c = this.conn;
    this.features = this.proposeFeatures();
    if (this.#dirtyLog !== null) this.features |= bit(VirtioFeature.LOG_ALL);
    const status = this.hasProtocol(ProtocolFeature.STATUS);
    c.setFeatures(this.features);
    if (status) this.#addStatus(DeviceStatus.FEATURES_OK);
    if (this.hasProtocol(ProtocolFeature.INFLIGHT_SHMFD)) {
      // QEMU asks for the buffer once and keeps it for the VM's life, reconnects included.
      this.#inflight ??= c.getInflightFd(this.queues.length, this.queues[0].size);
      c.setInflightFd(this.#inflight.info, this.#inflight.fd);
    }
    for (const q of this.queues) c.setVringCall(q.index, q.layout.callFd);
    c.setFeatures(this.features);
    if (status) this.#addStatus(DeviceStatus.FEATURES_OK);
    this.#shareMemory();
    const eventIdx = (this.features & bit(VirtioFeature.RING_EVENT_IDX)) !== 0n;
    for (const i of this.#started) {
      const q = this.queues[i];
      q.eventIdx = eventIdx;
      c.setVringNum(i, q.size);
      c.setVringBase(i, this.base[i]);
      c.setVringAddr(this.#vringAddr(q));
      c.setVringKick(i, q.layout.kickFd);
    }
    // Started (or restarted after a reconnect) during a migration: QEMU 7.2 sends the log last.
    if (this.#dirtyLog !== null) c.setLogBase(this.#dirtyLog.fd, this.#dirtyLog.size);
    for (const q of this.queues) c.setVringEnable(q.index, true);
    if (status) {
      this.#addStatus(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.DRIVER_OK);
    }
  }

  #vringAddr(q: DriverQueue) {
    const a = q.vringAddr();
    return this.#dirtyLog === null ? a : { ...a, flags: VRING_F_LOG };
  }

  /**
   * Starts dirty logging on the running device, as QEMU 7.2 does when a migration begins
   * (`vhost_migration_log`): SET_LOG_BASE with a log covering guest RAM, SET_FEATURES with
   * VHOST_F_LOG_ALL, then SET_VRING_ADDR with VHOST_VRING_F_LOG for every started ring. Returns
   * the log, which {@link reconnect} keeps using until {@link stopMigration}.
   */
  startMigration(): FrontendDirtyLog {
    if (this.#dirtyLog !== null) return this.#dirtyLog;
    const top = Math.max(...this.ram.regions.map((r) => r.guestPhysAddr + r.memorySize));
    const log = new FrontendDirtyLog(top);
    this.#dirtyLog = log;
    const c = this.conn;
    c.setLogBase(log.fd, log.size);
    this.features |= bit(VirtioFeature.LOG_ALL);
    c.setFeatures(this.features);
    for (const i of this.#started) c.setVringAddr(this.#vringAddr(this.queues[i]));
    if (c.ackMode === "qemu") c.sync();
    return log;
  }

  /** Ends dirty logging (migration over or cancelled): LOG_ALL and the rings' log flags off. */
  stopMigration(): void {
    const log = this.#dirtyLog;
    if (log === null) return;
    this.#dirtyLog = null;
    const c = this.conn;
    this.features &= ~bit(VirtioFeature.LOG_ALL);
    c.setFeatures(this.features);
    for (const i of this.#started) c.setVringAddr(this.#vringAddr(this.queues[i]));
    if (c.ackMode === "qemu") c.sync();
    log.close();
  }

  #shareMemory(): void {
    const c = this.conn;
    if (this.hasProtocol(ProtocolFeature.CONFIGURE_MEM_SLOTS)) {
      // QEMU sends only the regions the back-end does not have yet on this connection.
      if (this.#memShared) return;
      for (const r of this.ram.regions) c.addMemReg(r, this.ram.fd);
    } else {
      c.setMemTable([...this.ram.regions], this.ram.fds);
    }
    this.#memShared = true;
  }

  /**
   * The stop sequence (QEMU 7.2 `vhost_dev_stop`): SET_STATUS(0) first, then ENABLE(0) for every
   * queue, then GET_VRING_BASE for each started queue. Returns the indices, also kept in
   * {@link base} for the next start.
   */
  stop(): number[] {
    const c = this.conn;
    if (this.hasProtocol(ProtocolFeature.STATUS)) c.setStatus(0);
    for (const q of this.queues) c.setVringEnable(q.index, false);
    for (const i of this.#started) this.base[i] = c.getVringBase(i);
    return this.#started.map((i) => this.base[i]);
  }

  /**
   * Drops the connection and connects again, replaying init (without GET_CONFIG) and start.
   * `crashed` means the back-end died without a stop: as QEMU 7.2 does ("ring restore failed"),
   * each ring resumes from the used index found in guest memory.
   */
  async reconnect(crashed = false): Promise<void> {
    this.conn.close();
    if (crashed) { for (const i of this.#started) this.base[i] = this.queues[i].usedIdx; }
    this.conn = await FrontendConnection.connect(this.#options.socket, {
      retryMs: this.#options.connectRetryMs ?? 5000,
    });
    this.#prepare(this.conn);
    this.#memShared = false;
    this.init(false);
    this.start();
    if (this.conn.ackMode === "qemu") this.conn.sync();
  }

  /** Closes the connection, the rings' eventfds and guest RAM. Idempotent. */
  close(): void {
    this.conn.close();
    this.#dirtyLog?.close();
    this.#dirtyLog = null;
    closeQuietly(this.#backendFd);
    this.#backendFd = -1;
    this.#backendSocket = null;
    if (this.#inflight) closeQuietly(this.#inflight.fd);
    this.#inflight = null;
    for (const q of this.queues) q.close();
    this.ram.close();
  }
}
