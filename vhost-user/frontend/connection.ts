/**
 * The front-end (QEMU's) side of one vhost-user connection: typed requests with their replies,
 * REPLY_ACK handling, and a raw API that sends any bytes with any flags and fds, so that tests can
 * replay recorded sequences and send hostile input.
 *
 * Every wait is bounded by socket time-outs: a back-end that stops answering makes a call throw
 * instead of hanging the caller.
 *
 * @module
 */

import { closeQuietly, Errno, SysError } from "../../sys/libc.ts";
import { connectUnix, PeerClosedError, setSocketTimeouts } from "../../sys/socket.ts";
import { Connection, ProtocolError } from "../connection.ts";
import {
  bit,
  configPayload,
  decodeConfig,
  decodeInflight,
  encodeMessage,
  Flags,
  type InflightInfo,
  inflightPayload,
  type MemRegion,
  memTablePayload,
  type Message,
  ProtocolFeature,
  Request,
  requestName,
  singleRegionPayload,
  u64Payload,
  type VringAddr,
  vringAddrPayload,
  vringStatePayload,
} from "../message.ts";

/** A back-end answered a NEED_REPLY request with a non-zero status. */
export class NackError extends Error {
  /** The request that was refused. */
  readonly request: number;
  /** The u64 status the back-end sent. */
  readonly status: bigint;

  /** Builds the error for `request` refused with `status`. */
  constructor(request: number, status: bigint) {
    super(`${requestName(request)} refused by the back-end (status ${status})`);
    this.name = "NackError";
    this.request = request;
    this.status = status;
  }
}

/** Options of {@link FrontendConnection.connect}. */
export interface ConnectOptions {
  /** Keep retrying ENOENT/ECONNREFUSED for this long (a back-end still starting); default 0. */
  retryMs?: number;
  /** Longest wait for any reply, in ms; default 5000. */
  timeoutMs?: number;
}

/** A reply as received: header fields, a copy of the payload, and any fds (the caller owns them). */
export interface Reply {
  /** Request id echoed by the back-end. */
  request: number;
  /** Header flags (0x5 for a well-formed reply). */
  flags: number;
  /** The payload bytes (a copy). */
  payload: Uint8Array<ArrayBuffer>;
  /** Fds that came with the reply. */
  fds: number[];
}

/**
 * One connection to a vhost-user back-end, seen from the front-end.
 *
 * The typed methods send exactly what QEMU sends (flags `0x1`, plus `NEED_REPLY` where
 * {@link ackRequested} says so) and check each reply's request id, REPLY flag and size.
 */
export class FrontendConnection {
  /** The back-end's socket path. */
  readonly path: string;
  /** Protocol features acknowledged with SET_PROTOCOL_FEATURES (0 until then). */
  protocolFeatures = 0n;
  /**
   * Which requests carry NEED_REPLY once REPLY_ACK is negotiated: `"qemu"` (QEMU 7.2's choice:
   * SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG, SET_BACKEND_REQ_FD, SET_CONFIG) or `"all"` (every
   * request without a reply body, so each one is confirmed before the next is sent).
   */
  ackMode: "qemu" | "all" = "all";
  /** When not null, every message sent is appended here (request id and flags), for replay checks. */
  record: { request: number; flags: number }[] | null = null;
  readonly #conn: Connection;
  readonly #timeoutMs: number;
  #closed = false;

  private constructor(path: string, fd: number, timeoutMs: number) {
    this.path = path;
    this.#timeoutMs = timeoutMs;
    this.#conn = new Connection(fd);
  }

  /** Connects to the back-end listening at `path`. */
  static async connect(path: string, options: ConnectOptions = {}): Promise<FrontendConnection> {
    const deadline = Date.now() + (options.retryMs ?? 0);
    for (;;) {
      try {
        const fd = connectUnix(path);
        const timeoutMs = options.timeoutMs ?? 5000;
        setSocketTimeouts(fd, timeoutMs);
        return new FrontendConnection(path, fd, timeoutMs);
      } catch (e) {
        const retryable = e instanceof SysError &&
          (e.errno === Errno.ENOENT || e.errno === Errno.ECONNREFUSED);
        if (!retryable || Date.now() >= deadline) throw e;
        await new Promise((r) => setTimeout(r, 20));
      }
    }
  }

  /** The socket fd. */
  get fd(): number {
    return this.#conn.fd;
  }

  /** Whether REPLY_ACK was negotiated. */
  get replyAck(): boolean {
    return (this.protocolFeatures & bit(ProtocolFeature.REPLY_ACK)) !== 0n;
  }

  /** Whether a request without a reply body gets NEED_REPLY under the current {@link ackMode}. */
  ackRequested(request: number): boolean {
    if (!this.replyAck) return false;
    if (this.ackMode === "all") return true;
    return request === Request.SET_MEM_TABLE || request === Request.ADD_MEM_REG ||
      request === Request.REM_MEM_REG || request === Request.SET_BACKEND_REQ_FD ||
      request === Request.SET_CONFIG;
  }

  // ---- raw access -------------------------------------------------------------------------

  /**
   * Sends one message exactly as given: `flags` is the whole flags word (the version bits are not
   * added), and `size` overrides the header's size field (default: the payload's length), so a
   * test can send a header that lies about its payload.
   */
  sendRaw(
    request: number,
    flags: number,
    payload: Uint8Array = new Uint8Array(0),
    fds: readonly number[] = [],
    size?: number,
  ): void {
    const bytes = encodeMessage(request, flags, payload);
    this.record?.push({ request, flags });
    if (size !== undefined) new DataView(bytes.buffer).setUint32(8, size, true);
    this.#conn.socket.send(bytes, fds);
  }

  /** Sends raw bytes on the socket (for truncated or garbage headers). */
  sendBytes(bytes: Uint8Array<ArrayBuffer>, fds: readonly number[] = []): void {
    this.#conn.socket.send(bytes, fds);
  }

  /** Receives the next message from the back-end, whatever it is. */
  receiveRaw(): Reply {
    const m: Message = this.#conn.receive();
    return {
      request: m.request,
      flags: m.flags,
      payload: new Uint8Array(m.payload.buffer, m.payload.byteOffset, m.payload.byteLength)
        .slice(),
      fds: m.fds,
    };
  }

  /**
   * Whether the back-end has closed the connection: waits up to `timeoutMs` for EOF. Returns false
   * if the connection is still open (a time-out); throws if a message arrives instead.
   */
  waitClosed(timeoutMs = 2000): boolean {
    setSocketTimeouts(this.fd, timeoutMs);
    try {
      const m = this.#conn.receive();
      for (const fd of m.fds) closeQuietly(fd);
      throw new ProtocolError(`expected EOF, got ${requestName(m.request)}`);
    } catch (e) {
      if (e instanceof PeerClosedError) return true;
      if (e instanceof SysError && (e.errno === Errno.EAGAIN || e.errno === Errno.ETIMEDOUT)) {
        return false;
      }
      if (e instanceof SysError && e.errno === Errno.ECONNRESET) return true;
      throw e;
    } finally {
      setSocketTimeouts(this.fd, this.#timeoutMs);
    }
  }

  /** Receives the reply to `request`, checking its id, flags and (if given) payload size. */
  receiveReply(request: number, size?: number): Reply {
    const r = this.receiveRaw();
    const name = requestName(request);
    if (r.request !== request) {
      for (const fd of r.fds) closeQuietly(fd);
      throw new ProtocolError(`${name}: the back-end replied to ${requestName(r.request)}`);
    }
    if ((r.flags & ~Flags.NEED_REPLY) !== (Flags.VERSION | Flags.REPLY)) {
      for (const fd of r.fds) closeQuietly(fd);
      throw new ProtocolError(`${name}: reply flags 0x${r.flags.toString(16)}, expected 0x5`);
    }
    if (size !== undefined && r.payload.length !== size) {
      for (const fd of r.fds) closeQuietly(fd);
      throw new ProtocolError(`${name}: reply of ${r.payload.length} bytes, expected ${size}`);
    }
    return r;
  }

  // ---- typed requests ---------------------------------------------------------------------

  /**
   * Sends a request that has no reply body. With REPLY_ACK negotiated (and `ack` not false) it
   * carries NEED_REPLY and the back-end's u64 answer is awaited; a non-zero answer throws
   * {@link NackError}.
   */
  request(
    request: number,
    payload?: Uint8Array,
    fds: readonly number[] = [],
    ack: boolean = this.ackRequested(request),
  ): void {
    const flags = Flags.VERSION | (ack ? Flags.NEED_REPLY : 0);
    this.sendRaw(request, flags, payload, fds);
    if (!ack) return;
    const status = this.#u64(this.receiveReply(request, 8));
    if (status !== 0n) throw new NackError(request, status);
  }

  /** Sends a request that has a reply body and returns that body. */
  query(request: number, payload?: Uint8Array, size?: number): Reply {
    this.sendRaw(request, Flags.VERSION, payload);
    return this.receiveReply(request, size);
  }

  #u64(r: Reply): bigint {
    return new DataView(r.payload.buffer).getBigUint64(0, true);
  }

  /** GET_FEATURES. */
  getFeatures(): bigint {
    return this.#u64(this.query(Request.GET_FEATURES, undefined, 8));
  }

  /** SET_FEATURES. */
  setFeatures(features: bigint): void {
    this.request(Request.SET_FEATURES, u64Payload(features));
  }

  /** GET_PROTOCOL_FEATURES. */
  getProtocolFeatures(): bigint {
    return this.#u64(this.query(Request.GET_PROTOCOL_FEATURES, undefined, 8));
  }

  /**
   * SET_PROTOCOL_FEATURES. REPLY_ACK only applies after this message, so it is never acked
   * itself (QEMU sends it with flags 0x1).
   */
  setProtocolFeatures(features: bigint): void {
    this.request(Request.SET_PROTOCOL_FEATURES, u64Payload(features), [], false);
    this.protocolFeatures = features;
  }

  /** SET_OWNER. */
  setOwner(): void {
    this.request(Request.SET_OWNER);
  }

  /** GET_QUEUE_NUM. */
  getQueueNum(): number {
    return Number(this.#u64(this.query(Request.GET_QUEUE_NUM, undefined, 8)));
  }

  /** GET_MAX_MEM_SLOTS. */
  getMaxMemSlots(): number {
    return Number(this.#u64(this.query(Request.GET_MAX_MEM_SLOTS, undefined, 8)));
  }

  /**
   * GET_CONFIG for `size` bytes at `offset`. Returns the config bytes; a zero-size reply (the
   * back-end's way of saying the read failed) returns an empty array.
   */
  getConfig(offset: number, size: number, flags = 0): Uint8Array<ArrayBuffer> {
    const req = configPayload({ offset, size, flags, data: new Uint8Array(size) });
    const r = this.query(Request.GET_CONFIG, req);
    if (r.payload.length < 12) throw new ProtocolError("GET_CONFIG: reply shorter than 12 bytes");
    const c = decodeConfig(new DataView(r.payload.buffer));
    if (c.size === 0) return new Uint8Array(0);
    if (c.size !== size || c.offset !== offset) {
      throw new ProtocolError(
        `GET_CONFIG: asked offset ${offset} size ${size}, got offset ${c.offset} size ${c.size}`,
      );
    }
    return c.data as Uint8Array<ArrayBuffer>;
  }

  /** SET_CONFIG. */
  setConfig(offset: number, data: Uint8Array, flags = 0): void {
    this.request(Request.SET_CONFIG, configPayload({ offset, size: data.length, flags, data }));
  }

  /** SET_MEM_TABLE with one fd per region (the same fd may appear several times). */
  setMemTable(regions: MemRegion[], fds: readonly number[]): void {
    this.request(Request.SET_MEM_TABLE, memTablePayload(regions), fds);
  }

  /** ADD_MEM_REG. */
  addMemReg(region: MemRegion, fd: number): void {
    this.request(Request.ADD_MEM_REG, singleRegionPayload(region), [fd]);
  }

  /** REM_MEM_REG. */
  remMemReg(region: MemRegion): void {
    this.request(Request.REM_MEM_REG, singleRegionPayload(region));
  }

  /** SET_VRING_NUM. */
  setVringNum(index: number, num: number): void {
    this.request(Request.SET_VRING_NUM, vringStatePayload({ index, num }));
  }

  /** SET_VRING_BASE (split ring: the next avail index the device reads). */
  setVringBase(index: number, num: number): void {
    this.request(Request.SET_VRING_BASE, vringStatePayload({ index, num }));
  }

  /** SET_VRING_ADDR. */
  setVringAddr(addr: VringAddr): void {
    this.request(Request.SET_VRING_ADDR, vringAddrPayload(addr));
  }

  /** GET_VRING_BASE: stops the ring and returns the next avail index the device would read. */
  getVringBase(index: number): number {
    const r = this.query(Request.GET_VRING_BASE, vringStatePayload({ index, num: 0 }), 8);
    const dv = new DataView(r.payload.buffer);
    if (dv.getUint32(0, true) !== index) {
      throw new ProtocolError(`GET_VRING_BASE: asked queue ${index}, got ${dv.getUint32(0, true)}`);
    }
    return dv.getUint32(4, true);
  }

  #vringFd(request: number, index: number, fd: number): void {
    const noFd = fd < 0 ? 0x100 : 0;
    this.request(request, u64Payload(BigInt(index | noFd)), fd < 0 ? [] : [fd]);
  }

  /** SET_VRING_KICK (`fd` -1 sends the no-fd flag). */
  setVringKick(index: number, fd: number): void {
    this.#vringFd(Request.SET_VRING_KICK, index, fd);
  }

  /** SET_VRING_CALL (`fd` -1 sends the no-fd flag). */
  setVringCall(index: number, fd: number): void {
    this.#vringFd(Request.SET_VRING_CALL, index, fd);
  }

  /** SET_VRING_ERR (`fd` -1 sends the no-fd flag). */
  setVringErr(index: number, fd: number): void {
    this.#vringFd(Request.SET_VRING_ERR, index, fd);
  }

  /** SET_VRING_ENABLE. */
  setVringEnable(index: number, enable: boolean): void {
    this.request(Request.SET_VRING_ENABLE, vringStatePayload({ index, num: enable ? 1 : 0 }));
  }

  /** SET_STATUS (the virtio device status byte). */
  setStatus(status: number): void {
    this.request(Request.SET_STATUS, u64Payload(BigInt(status)));
  }

  /** GET_STATUS. */
  getStatus(): number {
    return Number(this.#u64(this.query(Request.GET_STATUS, undefined, 8)));
  }

  /** RESET_DEVICE. */
  resetDevice(): void {
    this.request(Request.RESET_DEVICE);
  }

  /**
   * GET_INFLIGHT_FD: asks the back-end for an inflight-tracking buffer for `numQueues` queues of
   * `queueSize`. Returns its description and the memfd (the caller owns it).
   */
  getInflightFd(numQueues: number, queueSize: number): { info: InflightInfo; fd: number } {
    const r = this.query(
      Request.GET_INFLIGHT_FD,
      inflightPayload({ mmapSize: 0, mmapOffset: 0, numQueues, queueSize }),
    );
    const fd = r.fds.shift();
    for (const extra of r.fds) closeQuietly(extra);
    if (fd === undefined) throw new ProtocolError("GET_INFLIGHT_FD: reply without an fd");
    return { info: decodeInflight(new DataView(r.payload.buffer)), fd };
  }

  /** SET_INFLIGHT_FD: hands the inflight buffer back (QEMU does so on every start). */
  setInflightFd(info: InflightInfo, fd: number): void {
    this.request(Request.SET_INFLIGHT_FD, inflightPayload(info), [fd]);
  }

  /**
   * SET_LOG_BASE with LOG_SHMFD: hands over the dirty log (`size` bytes at `offset` in `fd`). QEMU
   * waits for the back-end's reply whether or not REPLY_ACK was negotiated, and so does this.
   */
  setLogBase(fd: number, size: number, offset = 0): void {
    const payload = new Uint8Array(16);
    const dv = new DataView(payload.buffer);
    dv.setBigUint64(0, BigInt(size), true);
    dv.setBigUint64(8, BigInt(offset), true);
    this.sendRaw(Request.SET_LOG_BASE, Flags.VERSION, payload, [fd]);
    this.receiveReply(Request.SET_LOG_BASE);
  }

  /** SEND_RARP: asks the back-end to announce `mac` (the first 6 of 8 payload bytes). */
  sendRarp(mac: Uint8Array): void {
    const payload = new Uint8Array(8);
    payload.set(mac.subarray(0, 6));
    this.request(Request.SEND_RARP, payload);
  }

  /** SET_BACKEND_REQ_FD (QEMU's SET_SLAVE_REQ_FD), handing over one end of a socket pair. */
  setBackendReqFd(fd: number): void {
    this.request(Request.SET_BACKEND_REQ_FD, undefined, [fd]);
  }

  /**
   * A barrier: GET_FEATURES is answered only after every earlier message was handled, so once it
   * returns the back-end has processed everything sent before (with or without REPLY_ACK).
   */
  sync(): void {
    this.getFeatures();
  }

  /** Closes the connection (the back-end sees a disconnect). Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#conn.close();
  }
}
