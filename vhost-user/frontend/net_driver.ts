/**
 * A virtio-net driver playing the guest, for tests: it negotiates a vhost-user session the way
 * QEMU does for `-netdev vhost-user` (one queue pair: receiveq 0, transmitq 1), keeps the receive
 * queue stocked with buffers, sends frames with whatever virtio-net header a test asks for, and
 * reads frames back with the header the device wrote. It can also stop and restart its rings as
 * QEMU does when a VM pauses or migrates (GET_VRING_BASE, then the ring set-up again), and send
 * SEND_RARP as QEMU does after a migration.
 *
 * Everything is synchronous and bounded by time-outs; the back-end must run in another thread or
 * process.
 *
 * @module
 */

import { featureBit, NET_HDR_SIZE, NetFeature } from "../../devices/net/header.ts";
import { bit, ProtocolFeature, Request, VirtioFeature } from "../message.ts";
import { FrontendConnection } from "./connection.ts";
import { DriverQueue } from "./driver_queue.ts";
import { type GuestBuffer, GuestRam } from "./memory.ts";

/** The fields of a virtio-net header (`struct virtio_net_hdr_v1`). */
export interface NetHeader {
  /** Flags (NEEDS_CSUM 1, DATA_VALID 2, RSC_INFO 4). */
  flags: number;
  /** Segmentation offload type (0: none). */
  gsoType: number;
  /** Length of the headers to copy into each segment. */
  hdrLen: number;
  /** Segment size. */
  gsoSize: number;
  /** Where checksumming starts. */
  csumStart: number;
  /** Where the checksum goes, from csumStart. */
  csumOffset: number;
  /** Buffers the packet spans (written by the device with MRG_RXBUF). */
  numBuffers: number;
}

/** A frame the device delivered, with its header. */
export interface ReceivedFrame {
  /** The header as the device wrote it. */
  header: NetHeader;
  /** The Ethernet frame. */
  frame: Uint8Array;
}

/** Options of {@link NetDriver.connect}. */
export interface NetDriverOptions {
  /** Ack VIRTIO_NET_F_CSUM (the driver may send partial checksums); default true. */
  csum?: boolean;
  /** Ack VIRTIO_NET_F_GUEST_CSUM (the driver takes partial checksums); default true. */
  guestCsum?: boolean;
  /** Queue size of both queues (default 256). */
  queueSize?: number;
  /** Size of each receive buffer (default 2048). */
  bufferSize?: number;
}

/** The all-zero header. */
const NO_HEADER: Readonly<Partial<NetHeader>> = {};

/** Encodes a header (missing fields zero) into `buf` at `at`. */
export function encodeNetHeader(h: Partial<NetHeader>, buf: Uint8Array, at = 0): void {
  const v = new DataView(buf.buffer, buf.byteOffset + at, NET_HDR_SIZE);
  v.setUint8(0, h.flags ?? 0);
  v.setUint8(1, h.gsoType ?? 0);
  v.setUint16(2, h.hdrLen ?? 0, true);
  v.setUint16(4, h.gsoSize ?? 0, true);
  v.setUint16(6, h.csumStart ?? 0, true);
  v.setUint16(8, h.csumOffset ?? 0, true);
  v.setUint16(10, h.numBuffers ?? 0, true);
}

/** Decodes the header at `buf[at]`. */
export function decodeNetHeader(buf: Uint8Array, at = 0): NetHeader {
  const v = new DataView(buf.buffer, buf.byteOffset + at, NET_HDR_SIZE);
  return {
    flags: v.getUint8(0),
    gsoType: v.getUint8(1),
    hdrLen: v.getUint16(2, true),
    gsoSize: v.getUint16(4, true),
    csumStart: v.getUint16(6, true),
    csumOffset: v.getUint16(8, true),
    numBuffers: v.getUint16(10, true),
  };
}

/** The guest side of one virtio-net device with a single queue pair. */
export class NetDriver {
  /** The vhost-user connection. */
  readonly conn: FrontendConnection;
  /** Guest RAM. */
  readonly ram: GuestRam;
  /** Features acknowledged. */
  readonly features: bigint;
  readonly #rx: DriverQueue;
  readonly #tx: DriverQueue;
  readonly #rxBuffers = new Map<number, GuestBuffer>();
  readonly #txPool: GuestBuffer[];
  readonly #txFree: number[];
  readonly #txInUse = new Map<number, number>();
  readonly #bufferSize: number;
  /** Ring indices saved by {@link stop}, given back by {@link start}. */
  #bases = [0, 0];
  #running = false;

  private constructor(
    conn: FrontendConnection,
    ram: GuestRam,
    features: bigint,
    queueSize: number,
    bufferSize: number,
  ) {
    this.conn = conn;
    this.ram = ram;
    this.features = features;
    this.#bufferSize = bufferSize;
    this.#rx = DriverQueue.create(ram, 0, queueSize);
    this.#tx = DriverQueue.create(ram, 1, queueSize);
    this.#txPool = Array.from({ length: queueSize }, () => ram.alloc(bufferSize, 16));
    this.#txFree = this.#txPool.map((_, i) => i);
  }

  /** Connects to `path`, negotiates, sets both rings running and posts every receive buffer. */
  static async connect(path: string, options: NetDriverOptions = {}): Promise<NetDriver> {
    const conn = await FrontendConnection.connect(path, { retryMs: 5000 });
    const ram = GuestRam.create();
    try {
      return NetDriver.#setUp(conn, ram, options);
    } catch (e) {
      conn.close();
      ram.close();
      throw e;
    }
  }

  /** The session set-up QEMU does for `-netdev vhost-user` with one queue pair. */
  static #setUp(conn: FrontendConnection, ram: GuestRam, options: NetDriverOptions): NetDriver {
    const offered = conn.getFeatures();
    const pf = conn.getProtocolFeatures();
    conn.setProtocolFeatures(pf & (bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.RARP)));
    conn.setOwner();
    let want = bit(VirtioFeature.VERSION_1) | bit(VirtioFeature.PROTOCOL_FEATURES) |
      featureBit(NetFeature.MRG_RXBUF) | featureBit(NetFeature.MTU);
    if (options.csum ?? true) want |= featureBit(NetFeature.CSUM);
    if (options.guestCsum ?? true) want |= featureBit(NetFeature.GUEST_CSUM);
    const features = offered & want;
    conn.setFeatures(features);
    conn.setMemTable([...ram.regions], ram.fds);
    const size = options.queueSize ?? 256;
    const driver = new NetDriver(conn, ram, features, size, options.bufferSize ?? 2048);
    driver.start();
    driver.#postRx(size);
    conn.sync();
    return driver;
  }

  /** Whether the driver acked `bit` (a {@link NetFeature} value). */
  has(feature: number): boolean {
    return (this.features & featureBit(feature)) !== 0n;
  }

  /**
   * Sets both rings up and running (SET_VRING_NUM, _BASE, _ADDR, _CALL, _KICK, _ENABLE), from
   * where {@link stop} left them: QEMU's vhost_dev_start, when the VM starts or resumes.
   */
  start(): void {
    if (this.#running) return;
    for (const q of [this.#rx, this.#tx]) {
      const i = q.index;
      this.conn.setVringNum(i, q.size);
      this.conn.setVringBase(i, this.#bases[i]);
      this.conn.setVringAddr(q.vringAddr());
      this.conn.setVringCall(i, q.layout.callFd);
      this.conn.setVringKick(i, q.layout.kickFd);
      this.conn.setVringEnable(i, true);
    }
    this.#running = true;
  }

  /**
   * Stops both rings (GET_VRING_BASE each, keeping the indices): QEMU's vhost_dev_stop, when the
   * VM pauses or its migration completes. The back-end then treats the device as suspended.
   */
  stop(): void {
    if (!this.#running) return;
    this.#bases = [this.conn.getVringBase(0), this.conn.getVringBase(1)];
    this.#running = false;
  }

  /**
   * Breaks the receive ring as a hostile guest would: its available index jumps by more than the
   * queue size. A device must stop that queue, not spin on it.
   */
  breakReceiveRing(): void {
    const rx = this.#rx;
    const slot = (rx.layout.avail.offset + 2) >> 1;
    Atomics.store(this.ram.u16, slot, (rx.availIdx + rx.size + 7) & 0xffff);
  }

  /** Sends SEND_RARP for `mac` (6 bytes), as QEMU does after a migration; returns once handled. */
  announce(mac: Uint8Array): void {
    const payload = new Uint8Array(8);
    payload.set(mac.subarray(0, 6));
    this.conn.request(Request.SEND_RARP, payload);
    this.conn.sync();
  }

  #postRx(count: number): void {
    for (let i = 0; i < count; i++) {
      const b = this.ram.alloc(this.#bufferSize, 16);
      this.#repost(b);
    }
    this.#rx.publish();
    this.#rx.kick();
  }

  #repost(b: GuestBuffer): void {
    const head = this.#rx.add([{ gpa: b.gpa, length: b.length, writable: true }]);
    if (head < 0) throw new Error("receive queue: no free descriptors");
    this.#rxBuffers.set(head, b);
  }

  /**
   * Sends `frames` (Ethernet frames) on the transmit queue, each behind the header `header`
   * (fields left out are zero), and waits until the device has taken every one.
   */
  send(frames: Uint8Array | readonly Uint8Array[], header: Partial<NetHeader> = NO_HEADER): void {
    const list = frames instanceof Uint8Array ? [frames] : frames;
    const q = this.#tx;
    for (const frame of list) {
      if (NET_HDR_SIZE + frame.length > this.#bufferSize) {
        throw new RangeError(`frame of ${frame.length} bytes does not fit a transmit buffer`);
      }
      while (this.#txFree.length === 0 || q.freeCount === 0) this.#reclaimTx(true);
      const slot = this.#txFree.pop()!;
      const b = this.#txPool[slot];
      encodeNetHeader(header, this.ram.u8, b.offset);
      this.ram.u8.set(frame, b.offset + NET_HDR_SIZE);
      const head = q.add([{ gpa: b.gpa, length: NET_HDR_SIZE + frame.length, writable: false }]);
      this.#txInUse.set(head, slot);
    }
    while (q.outstanding > 0) this.#reclaimTx(true);
  }

  /** Publishes what is queued, kicks, and takes back what the device used (waiting if asked). */
  #reclaimTx(wait: boolean): void {
    const q = this.#tx;
    q.publish();
    q.kick();
    let head = q.poll();
    if (head < 0 && wait) head = q.waitUsed(10_000);
    for (; head >= 0; head = q.poll()) {
      this.#txFree.push(this.#txInUse.get(head)!);
      this.#txInUse.delete(head);
    }
  }

  /**
   * The next frame the device delivered, waiting up to `timeoutMs`; null if none came. Buffers
   * are posted again once read.
   */
  receive(timeoutMs = 5000): ReceivedFrame | null {
    const q = this.#rx;
    const deadline = Date.now() + timeoutMs;
    let head = q.poll();
    while (head < 0) {
      const left = deadline - Date.now();
      if (left <= 0) return null;
      q.waitCall(Math.min(left, 100));
      head = q.poll();
    }
    const parts: Uint8Array[] = [this.#take(head)];
    const header = decodeNetHeader(parts[0]);
    // With MRG_RXBUF the header says how many buffers the packet spans, all published at once.
    for (let n = 1; n < header.numBuffers; n++) {
      const next = q.poll();
      if (next < 0) throw new Error(`packet spans ${header.numBuffers} buffers, ${n} were used`);
      parts.push(this.#take(next));
    }
    q.publish();
    q.kick();
    const total = parts.reduce((sum, p) => sum + p.length, 0);
    const bytes = new Uint8Array(total);
    let at = 0;
    for (const p of parts) {
      bytes.set(p, at);
      at += p.length;
    }
    return { header, frame: bytes.slice(NET_HDR_SIZE) };
  }

  /** Copies what the device wrote into the buffer of used `head`, and posts the buffer again. */
  #take(head: number): Uint8Array {
    const b = this.#rxBuffers.get(head);
    if (b === undefined) throw new Error(`receive queue: unknown head ${head}`);
    const data = this.ram.u8.slice(b.offset, b.offset + this.#rx.lastLen);
    this.#rxBuffers.delete(head);
    this.#repost(b);
    return data;
  }

  /** Every frame delivered until none comes for `quietMs`. */
  receiveAll(quietMs = 200): ReceivedFrame[] {
    const out: ReceivedFrame[] = [];
    for (let f = this.receive(quietMs); f !== null; f = this.receive(quietMs)) out.push(f);
    return out;
  }

  /** Disconnects and frees guest RAM. */
  close(): void {
    this.conn.close();
    this.#rx.close();
    this.#tx.close();
    this.ram.close();
  }
}
