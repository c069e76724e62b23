/**
 * The virtio-console device (id 3) over vhost-user: port 0 is the console (`/dev/hvc0`), further
 * ports are named channels (`/dev/virtio-ports/NAME`). With MULTIPORT the control queues carry
 * the port handshake: the driver says DEVICE_READY, the device adds each port, the driver says
 * PORT_READY, the device marks port 0 as the console, names the others and opens them.
 *
 * @module
 */

import { getLogger, type Logger } from "../../log/mod.ts";
import { rateLimited } from "../../log/rate_limit.ts";
import type { DeviceEventLoop, VirtioDevice, Virtqueue } from "../device.ts";
import {
  CONFIG_COLS,
  CONFIG_EMERG_WR,
  CONFIG_MAX_NR_PORTS,
  CONFIG_ROWS,
  CONFIG_SIZE,
  ConsoleFeature,
  CONTROL_HEADER_SIZE,
  CONTROL_RX_QUEUE,
  CONTROL_TX_QUEUE,
  ControlEvent,
  decodeControl,
  encodeControl,
  portOfQueue,
  queueCount,
  resizePayload,
  rxQueueOf,
  VIRTIO_ID_CONSOLE,
} from "./protocol.ts";
import { type PortConfig, PortHub } from "./port_hub.ts";

/** Options of the console device (structured-clonable: they cross into the worker). */
export interface ConsoleOptions {
  /** The ports, port 0 first. */
  ports: PortConfig[];
  /** Initial terminal size. */
  cols: number;
  /** Initial terminal size. */
  rows: number;
}

/** Bytes copied out of the guest per step. */
const COPY_CHUNK = 64 * 1024;
/** Control messages queued for the driver at most (a driver that never posts buffers). */
const MAX_PENDING_CONTROL = 1024;

const bit = (n: number) => 1n << BigInt(n);

/** Per-session state of one port, as the driver sees it. */
interface PortState {
  /** The driver sent PORT_READY(1). */
  ready: boolean;
  /** The driver opened the port (PORT_OPEN 1); input is delivered only then. */
  guestOpen: boolean;
}

/** A virtio-console device with a {@link PortHub} per port. */
export class ConsoleDevice implements VirtioDevice {
  /** virtio id 3. */
  readonly deviceId = VIRTIO_ID_CONSOLE;
  /** Name in logs. */
  readonly name = "console";
  /** Data queue pair per port plus the control pair. */
  readonly numQueues: number;
  /** Small queues are plenty for a console; QEMU sizes data queues 128, control 32. */
  readonly maxQueueSize = 1024;
  /** SIZE, MULTIPORT and EMERG_WRITE. */
  readonly features = bit(ConsoleFeature.SIZE) | bit(ConsoleFeature.MULTIPORT) |
    bit(ConsoleFeature.EMERG_WRITE);
  /** The ports' host sides. */
  readonly ports: PortHub[];
  /** Current terminal size. */
  cols: number;
  /** Current terminal size. */
  rows: number;
  readonly #state: PortState[];
  readonly #config = new Uint8Array(CONFIG_SIZE);
  readonly #configView = new DataView(this.#config.buffer);
  readonly #copy = new Uint8Array(COPY_CHUNK);
  readonly #emerg = new Uint8Array(1);
  readonly #pendingControl: Uint8Array[] = [];
  /** Rate-limited: every line here is caused by the guest's driver or a console client. */
  readonly #log: Logger;
  #loop: DeviceEventLoop | null = null;
  #multiport = false;

  /** Builds the device; the port fds were opened by the main thread. */
  constructor(options: ConsoleOptions) {
    if (options.ports.length < 1) throw new RangeError("a console needs at least one port");
    this.ports = options.ports.map((p) => new PortHub(p));
    this.numQueues = queueCount(this.ports.length);
    this.#state = this.ports.map(() => ({ ready: false, guestOpen: false }));
    this.cols = options.cols;
    this.rows = options.rows;
    this.#log = rateLimited(getLogger(["vhostd", "console"]));
    for (const p of this.ports) {
      p.onInput = () => this.#deliver(p.id, true);
      p.onResize = (cols, rows) => this.resize(cols, rows);
    }
  }

  /** Starts the attach sockets in the worker's loop. */
  start(loop: DeviceEventLoop): void {
    this.#loop = loop;
    for (const p of this.ports) p.start(loop);
  }

  /** Reads the config space. */
  getConfig(offset: number, size: number): Uint8Array {
    const v = this.#configView;
    v.setUint16(CONFIG_COLS, this.cols, true);
    v.setUint16(CONFIG_ROWS, this.rows, true);
    v.setUint32(CONFIG_MAX_NR_PORTS, this.ports.length, true);
    v.setUint32(CONFIG_EMERG_WR, 0, true);
    const out = new Uint8Array(size);
    if (offset < CONFIG_SIZE) out.set(this.#config.subarray(offset, offset + size));
    return out;
  }

  /** Only `emerg_wr` is writable: its low byte is output of port 0. */
  setConfig(offset: number, data: Uint8Array): boolean {
    if (offset !== CONFIG_EMERG_WR || data.length < 1 || data.length > 4) return false;
    this.#emerg[0] = data[0];
    this.ports[0].output(this.#emerg);
    return true;
  }

  /** Records whether the driver took MULTIPORT. */
  setFeatures(features: bigint): void {
    this.#multiport = (features & bit(ConsoleFeature.MULTIPORT)) !== 0n;
  }

  /** Handles a kick. */
  processQueue(queue: Virtqueue): void {
    if (queue.index === CONTROL_TX_QUEUE) this.#controlFromDriver(queue);
    else if (queue.index === CONTROL_RX_QUEUE) this.#flushControl(false);
    else {
      const where = portOfQueue(queue.index);
      if (where === null || where.port >= this.ports.length) return;
      if (where.tx) this.#outputFrom(queue, this.ports[where.port]);
      else this.#deliver(where.port, false);
    }
  }

  /**
   * The terminal size changed. The driver hears of it through a RESIZE control message for the
   * console port. The config space is updated too, but vhostd has no back-end request channel
   * yet, so a driver without MULTIPORT only sees the new size when it next reads the config.
   */
  resize(cols: number, rows: number): void {
    this.cols = cols;
    this.rows = rows;
    this.#log.info("console resized to {cols}x{rows}", { cols, rows });
    if (this.#multiport && this.#state[0].ready) {
      this.#sendControl(0, ControlEvent.RESIZE, 0, resizePayload(cols, rows));
    }
  }

  /** Whether the driver has port `id` open (for status and tests). */
  guestOpen(id: number): boolean {
    return this.#multiport ? this.#state[id]?.guestOpen ?? false : id === 0;
  }

  /** Forgets the driver's session; attached clients, logs and pending input stay. */
  reset(): void {
    this.#multiport = false;
    this.#pendingControl.length = 0;
    for (const s of this.#state) s.ready = s.guestOpen = false;
  }

  /** Closes every port. */
  close(): void {
    for (const p of this.ports) p.close();
  }

  #outputFrom(queue: Virtqueue, port: PortHub): void {
    for (let chain = queue.pop(); chain !== null; chain = queue.pop()) {
      for (let off = 0; off < chain.readableBytes;) {
        const n = chain.read(this.#copy, off);
        if (n === 0) break;
        port.output(this.#copy.subarray(0, n));
        off += n;
      }
      queue.push(chain, 0);
    }
  }

  /** Moves waiting client input into the port's receive buffers. */
  #deliver(id: number, notify: boolean): void {
    const port = this.ports[id];
    if (port.input.length === 0) return;
    if (this.#multiport && !this.#state[id].guestOpen) return; // held until the guest opens it
    if (!this.#multiport && id !== 0) return;
    const rx = rxQueueOf(id);
    const q = this.#loop?.queue(rx);
    if (!q) return;
    let pushed = false;
    while (port.input.length > 0) {
      const chain = q.pop();
      if (chain === null) break;
      const a = port.input.segment(0);
      let n = chain.write(a);
      if (n === a.length) n += chain.write(port.input.segment(1), n);
      q.push(chain, n);
      port.consumed(n);
      pushed = true;
    }
    if (pushed && notify) this.#loop?.notify(rx);
  }

  #controlFromDriver(queue: Virtqueue): void {
    const msg = this.#copy;
    for (let chain = queue.pop(); chain !== null; chain = queue.pop()) {
      const n = chain.read(msg.subarray(0, CONTROL_HEADER_SIZE));
      queue.push(chain, 0);
      const m = n === CONTROL_HEADER_SIZE ? decodeControl(msg.subarray(0, n)) : null;
      if (m === null) {
        this.#log.warn("ignoring a control message of {n} bytes", { n });
        continue;
      }
      this.#onControl(m.id, m.event, m.value);
    }
  }

  #onControl(id: number, event: number, value: number): void {
    if (event === ControlEvent.DEVICE_READY) {
      if (value !== 1) {
        this.#log.warn("the driver failed to set up the console device");
        return;
      }
      for (const p of this.ports) this.#sendControl(p.id, ControlEvent.PORT_ADD, 1);
      return;
    }
    const state = this.#state[id];
    if (state === undefined) {
      this.#log.warn("control event {event} for unknown port {id}", { event, id });
      return;
    }
    const port = this.ports[id];
    switch (event) {
      case ControlEvent.PORT_READY:
        if (value !== 1) {
          this.#log.warn("the driver failed to add port {id}", { id });
          return;
        }
        state.ready = true;
        if (id === 0) {
          this.#sendControl(0, ControlEvent.CONSOLE_PORT, 1);
          this.#sendControl(0, ControlEvent.RESIZE, 0, resizePayload(this.cols, this.rows));
        } else {
          this.#sendControl(id, ControlEvent.PORT_NAME, 1, new TextEncoder().encode(port.name));
        }
        // The host side is always connected: the server keeps the log whether or not a client
        // is attached.
        this.#sendControl(id, ControlEvent.PORT_OPEN, 1);
        break;
      case ControlEvent.PORT_OPEN:
        state.guestOpen = value === 1;
        this.#log.info("guest {action} port {id} ({name})", {
          action: state.guestOpen ? "opened" : "closed",
          id,
          name: port.name,
        });
        if (state.guestOpen) this.#deliver(id, true);
        break;
      default:
        this.#log.warn("ignoring control event {event} for port {id}", { event, id });
    }
  }

  #sendControl(id: number, event: number, value: number, extra?: Uint8Array): void {
    if (this.#pendingControl.length >= MAX_PENDING_CONTROL) {
      this.#log.warn("dropping a control message: the driver posts no control buffers");
      return;
    }
    this.#pendingControl.push(encodeControl(id, event, value, extra));
    this.#flushControl(true);
  }

  #flushControl(notify: boolean): void {
    const q = this.#loop?.queue(CONTROL_RX_QUEUE);
    if (!q) return;
    let pushed = false;
    while (this.#pendingControl.length > 0) {
      const chain = q.pop();
      if (chain === null) break;
      const msg = this.#pendingControl.shift()!;
      q.push(chain, chain.write(msg));
      pushed = true;
    }
    if (pushed && notify) this.#loop?.notify(CONTROL_RX_QUEUE);
  }
}

/** Builds the device inside the data-plane worker. */
export function createDevice(options: ConsoleOptions): VirtioDevice {
  return new ConsoleDevice(options);
}
