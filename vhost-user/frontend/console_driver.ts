/**
 * A virtio-console driver playing the guest, for tests: it negotiates a vhost-user session the
 * way QEMU does, keeps every receive queue stocked with buffers, and speaks the MULTIPORT control
 * protocol the way Linux's virtio_console does (DEVICE_READY, PORT_READY, PORT_OPEN).
 *
 * Everything is synchronous and bounded by time-outs; the back-end must run in another thread or
 * process.
 *
 * @module
 */

import { bit, ProtocolFeature, VirtioFeature } from "../message.ts";
import { FrontendConnection } from "./connection.ts";
import { DriverQueue } from "./driver_queue.ts";
import { type GuestBuffer, GuestRam } from "./memory.ts";
import {
  CONFIG_SIZE,
  ConsoleFeature,
  CONTROL_HEADER_SIZE,
  CONTROL_RX_QUEUE,
  CONTROL_TX_QUEUE,
  ControlEvent,
  decodeControl,
  encodeControl,
  queueCount,
  rxQueueOf,
  txQueueOf,
} from "../../devices/console/protocol.ts";

/** A control message the device sent, with whatever followed the header. */
export interface ReceivedControl {
  /** Port id. */
  id: number;
  /** Event. */
  event: number;
  /** Value. */
  value: number;
  /** Bytes after the header (a name, a size). */
  extra: Uint8Array;
}

/** Options of {@link ConsoleDriver.connect}. */
export interface ConsoleDriverOptions {
  /** Ports the driver sets up queues for (must match the device's max_nr_ports). */
  ports: number;
  /** Negotiate MULTIPORT (default true). */
  multiport?: boolean;
  /** Queue size (default 16). */
  queueSize?: number;
  /** Receive buffer size (default 256). */
  bufferSize?: number;
  /** Post receive buffers on data queues at start-up (default true). */
  postRx?: boolean;
}

/** One driver-side queue with its buffers, by head. */
class Queue {
  readonly q: DriverQueue;
  readonly buffers = new Map<number, GuestBuffer>();
  constructor(q: DriverQueue) {
    this.q = q;
  }
}

/** The guest side of one virtio-console device. */
export class ConsoleDriver {
  /** The vhost-user connection. */
  readonly conn: FrontendConnection;
  /** Guest RAM. */
  readonly ram: GuestRam;
  /** Features acknowledged. */
  readonly features: bigint;
  readonly #queues: Queue[];
  readonly #bufferSize: number;
  readonly #received: Uint8Array[][];
  readonly #control: ReceivedControl[] = [];

  private constructor(
    conn: FrontendConnection,
    ram: GuestRam,
    queues: Queue[],
    features: bigint,
    bufferSize: number,
  ) {
    this.conn = conn;
    this.ram = ram;
    this.#queues = queues;
    this.features = features;
    this.#bufferSize = bufferSize;
    this.#received = queues.map(() => []);
  }

  /** Connects to `path` and sets up a session with all queues running. */
  static async connect(path: string, options: ConsoleDriverOptions): Promise<ConsoleDriver> {
    const conn = await FrontendConnection.connect(path, { retryMs: 5000 });
    const ram = GuestRam.create();
    try {
      const offered = conn.getFeatures();
      const pf = conn.getProtocolFeatures();
      conn.setProtocolFeatures(
        pf & (bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG) |
          bit(ProtocolFeature.MQ)),
      );
      conn.setOwner();
      let want = bit(VirtioFeature.VERSION_1) | bit(VirtioFeature.PROTOCOL_FEATURES) |
        bit(ConsoleFeature.SIZE) | bit(ConsoleFeature.EMERG_WRITE);
      if (options.multiport ?? true) want |= bit(ConsoleFeature.MULTIPORT);
      const features = offered & want;
      conn.setFeatures(features);
      conn.setMemTable([...ram.regions], ram.fds);
      const multiport = (features & bit(ConsoleFeature.MULTIPORT)) !== 0n;
      const count = multiport ? queueCount(options.ports) : 2;
      const size = options.queueSize ?? 16;
      const queues: Queue[] = [];
      for (let i = 0; i < count; i++) {
        const q = DriverQueue.create(ram, i, size);
        conn.setVringNum(i, size);
        conn.setVringBase(i, 0);
        conn.setVringAddr(q.vringAddr());
        conn.setVringCall(i, q.layout.callFd);
        conn.setVringKick(i, q.layout.kickFd);
        conn.setVringEnable(i, true);
        queues.push(new Queue(q));
      }
      const driver = new ConsoleDriver(conn, ram, queues, features, options.bufferSize ?? 256);
      if (multiport) driver.#fill(CONTROL_RX_QUEUE, 8);
      if (options.postRx ?? true) {
        for (let p = 0; p < (multiport ? options.ports : 1); p++) driver.postRx(p, 4);
      }
      conn.sync();
      return driver;
    } catch (e) {
      conn.close();
      ram.close();
      throw e;
    }
  }

  /** Whether MULTIPORT was negotiated. */
  get multiport(): boolean {
    return (this.features & bit(ConsoleFeature.MULTIPORT)) !== 0n;
  }

  #fill(index: number, count: number): void {
    const q = this.#queues[index];
    for (let i = 0; i < count; i++) {
      const b = this.ram.alloc(this.#bufferSize, 16);
      const head = q.q.add([{ gpa: b.gpa, length: b.length, writable: true }]);
      if (head < 0) throw new Error(`queue ${index}: no free descriptors`);
      q.buffers.set(head, b);
    }
    q.q.publish();
    q.q.kick();
  }

  /** Posts `count` receive buffers on `port`'s receiveq. */
  postRx(port: number, count: number): void {
    this.#fill(rxQueueOf(port), count);
  }

  /** Sends `data` on `port`'s transmitq and waits until the device returned the buffer. */
  write(port: number, data: Uint8Array): void {
    this.#send(txQueueOf(port), data);
  }

  /** Sends a control message and waits until the device consumed it. */
  sendControl(id: number, event: number, value: number): void {
    this.#send(CONTROL_TX_QUEUE, encodeControl(id, event, value));
  }

  #send(index: number, data: Uint8Array): void {
    const q = this.#queues[index];
    const b = this.ram.alloc(Math.max(data.length, 1), 16);
    this.ram.u8.set(data, b.offset);
    const head = q.q.add([{ gpa: b.gpa, length: data.length, writable: false }]);
    if (head < 0) throw new Error(`queue ${index}: no free descriptors`);
    q.q.publish();
    q.q.kick();
    const done = q.q.waitUsed(5000);
    if (done !== head) throw new Error(`queue ${index}: used head ${done}, expected ${head}`);
  }

  /** Collects whatever the device put on receive queue `index`, re-posting each buffer. */
  #drain(index: number, into: (bytes: Uint8Array) => void): number {
    const q = this.#queues[index];
    let n = 0;
    for (let head = q.q.poll(); head >= 0; head = q.q.poll()) {
      const b = q.buffers.get(head);
      if (b === undefined) throw new Error(`queue ${index}: unknown head ${head}`);
      into(this.ram.u8.slice(b.offset, b.offset + q.q.lastLen));
      q.buffers.delete(head);
      const again = q.q.add([{ gpa: b.gpa, length: b.length, writable: true }]);
      q.buffers.set(again, b);
      n++;
    }
    if (n > 0) {
      q.q.publish();
      q.q.kick();
    }
    return n;
  }

  /**
   * Reads what the device sent on `port` until `text` shows up (or, with `text` "", until
   * anything arrives); returns all the bytes read, decoded. Throws after `timeoutMs`. Each used
   * buffer is posted again.
   */
  readUntil(port: number, text: string, timeoutMs = 5000): string {
    const index = rxQueueOf(port);
    const dec = new TextDecoder();
    const deadline = Date.now() + timeoutMs;
    let got = "";
    for (;;) {
      this.#drain(index, (b) => got += dec.decode(b, { stream: true }));
      if (text === "" ? got.length > 0 : got.includes(text)) return got;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`port ${port}: no ${JSON.stringify(text)}; got ${got}`);
      this.#queues[index].q.waitCall(Math.min(left, 100));
    }
  }

  /** Whether receive queue of `port` has unread used buffers right now (after `waitMs`). */
  rxPending(port: number, waitMs = 0): boolean {
    const q = this.#queues[rxQueueOf(port)].q;
    if (waitMs > 0) q.waitCall(waitMs);
    return q.usedIdx !== q.lastUsedIdx;
  }

  /** Waits for a control message matching `match`; earlier ones are kept for later calls. */
  waitControl(
    match: (m: ReceivedControl) => boolean,
    timeoutMs = 5000,
  ): ReceivedControl {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      this.#drain(CONTROL_RX_QUEUE, (b) => {
        const m = decodeControl(b);
        if (m) this.#control.push({ ...m, extra: b.slice(CONTROL_HEADER_SIZE) });
      });
      const i = this.#control.findIndex(match);
      if (i >= 0) return this.#control.splice(i, 1)[0];
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(
          `no matching control message; have ${JSON.stringify(this.#control.map((m) => m))}`,
        );
      }
      this.#queues[CONTROL_RX_QUEUE].q.waitCall(Math.min(left, 100));
    }
  }

  /**
   * The Linux driver's handshake: DEVICE_READY, then PORT_READY for each PORT_ADD. Returns the
   * messages the device sent after each PORT_READY (CONSOLE_PORT, PORT_NAME, PORT_OPEN...).
   */
  handshake(ports: number): Map<number, ReceivedControl[]> {
    this.sendControl(0, ControlEvent.DEVICE_READY, 1);
    const out = new Map<number, ReceivedControl[]>();
    for (let id = 0; id < ports; id++) {
      this.waitControl((m) => m.event === ControlEvent.PORT_ADD && m.id === id);
      this.sendControl(id, ControlEvent.PORT_READY, 1);
      const got: ReceivedControl[] = [];
      // The device ends its answer to PORT_READY with PORT_OPEN (host side connected).
      for (;;) {
        const m = this.waitControl((m) => m.id === id);
        got.push(m);
        if (m.event === ControlEvent.PORT_OPEN) break;
      }
      out.set(id, got);
    }
    return out;
  }

  /** Reads the whole config space. */
  config(): { cols: number; rows: number; maxNrPorts: number } {
    const c = this.conn.getConfig(0, CONFIG_SIZE);
    const dv = new DataView(c.buffer);
    return {
      cols: dv.getUint16(0, true),
      rows: dv.getUint16(2, true),
      maxNrPorts: dv.getUint32(4, true),
    };
  }

  /** Disconnects and frees guest RAM. */
  close(): void {
    this.conn.close();
    for (const q of this.#queues) q.q.close();
    this.ram.close();
  }
}
