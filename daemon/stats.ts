/**
 * What a data-plane worker shares with the main thread: per-queue counters and the protocol state
 * that `status` shows, in one SharedArrayBuffer per service.
 *
 * A worker blocks in epoll_wait and never reads its messages, so the main thread cannot ask it
 * anything; instead the worker writes here (counters on every request, state on every change)
 * and the main thread reads whenever it likes. State is published under a sequence lock so that a
 * reader never sees half of an update; counters need no lock (see ring/queue_stats.ts).
 *
 * @module
 */

import { IO_STAT_SLOTS, QUEUE_STAT_SLOTS } from "../ring/queue_stats.ts";

/** Queues per port that get shared counters; more are counted privately (never seen so far). */
export const MAX_STATS_QUEUES = 256;

/**
 * Slots for a device's own counters (its `metrics`): a TAP device with 16 queue pairs uses 80;
 * series past this many are not exported.
 */
export const MAX_DEVICE_STATS = 128;

/** Int32 slots of a port's header. */
const H = {
  SEQ: 0,
  CONNECTED: 1,
  PID: 2,
  UID: 3,
  GID: 4,
  STATUS: 5,
  NUM_QUEUES: 6,
  DEVICE_ID: 7,
  OFFERED_LO: 8,
  OFFERED_HI: 9,
  ACKED_LO: 10,
  ACKED_HI: 11,
  PROTOCOL_LO: 12,
  PROTOCOL_HI: 13,
  CONNECTS: 14,
} as const;
const HEADER_INTS = 16;
/** Per queue: size and flag bits. */
const QUEUE_INTS = 2;
const STATE_BYTES = (HEADER_INTS + QUEUE_INTS * MAX_STATS_QUEUES) * 4;
const COUNTER_BYTES = MAX_STATS_QUEUES * QUEUE_STAT_SLOTS * 8;
/** After the queues' counters: the device's reads and writes (all queues), then its own. */
const IO_OFFSET = STATE_BYTES + COUNTER_BYTES;
const DEVICE_OFFSET = IO_OFFSET + IO_STAT_SLOTS * 8;
/** Bytes of shared memory per port (socket) of a service. */
export const PORT_STATS_BYTES: number = DEVICE_OFFSET + MAX_DEVICE_STATS * 8;

/** Queue flag bits in the shared state. */
export const QueueFlag = { ENABLED: 1, STARTED: 2, READY: 4, BROKEN: 8 } as const;

/** The protocol state a server exposes (structurally, a `VhostUserServer`). */
export interface PublishedServer {
  /** The connected front-end, if any. */
  peer: { pid: number; uid: number; gid: number } | null;
  /** Protocol state. */
  backend: {
    features: bigint;
    ackedFeatures: bigint;
    ackedProtocolFeatures: bigint;
    status: number;
    device: { deviceId: number };
    queues: readonly {
      size: number;
      enabled: boolean;
      started: boolean;
      ready: boolean;
      broken: boolean;
    }[];
  };
}

/** Allocates the shared memory of a service with `ports` sockets. */
export function allocateStats(ports: number): SharedArrayBuffer {
  return new SharedArrayBuffer(PORT_STATS_BYTES * ports);
}

/** The worker's side of one port: hands out counter arrays and publishes state. */
export class PortStatsWriter {
  readonly #state: Int32Array;
  readonly #counters: Float64Array;
  /** The device's read/write accounting (`IoStat`), shared by its queues. */
  readonly io: Float64Array;
  /** The device's own counters (see `DeviceMetrics`), {@link MAX_DEVICE_STATS} slots. */
  readonly device: Float64Array;
  #connected = false;

  /** Writes into port `port` of `sab`. */
  constructor(sab: SharedArrayBuffer, port: number) {
    const base = port * PORT_STATS_BYTES;
    this.#state = new Int32Array(sab, base, STATE_BYTES / 4);
    this.#counters = new Float64Array(sab, base + STATE_BYTES, COUNTER_BYTES / 8);
    this.io = new Float64Array(sab, base + IO_OFFSET, IO_STAT_SLOTS);
    this.device = new Float64Array(sab, base + DEVICE_OFFSET, MAX_DEVICE_STATS);
  }

  /** The counter array of queue `index` (a private one past {@link MAX_STATS_QUEUES}). */
  queue(index: number): Float64Array {
    if (index >= MAX_STATS_QUEUES) return new Float64Array(QUEUE_STAT_SLOTS);
    return this.#counters.subarray(index * QUEUE_STAT_SLOTS, (index + 1) * QUEUE_STAT_SLOTS);
  }

  /** Copies the server's current state into shared memory (called on changes only). */
  publish(server: PublishedServer): void {
    const s = this.#state;
    const b = server.backend;
    Atomics.add(s, H.SEQ, 1); // odd: an update is in progress
    const connected = server.peer !== null;
    if (connected && !this.#connected) s[H.CONNECTS]++;
    this.#connected = connected;
    s[H.CONNECTED] = connected ? 1 : 0;
    s[H.PID] = server.peer?.pid ?? 0;
    s[H.UID] = server.peer?.uid ?? 0;
    s[H.GID] = server.peer?.gid ?? 0;
    s[H.STATUS] = b.status;
    s[H.DEVICE_ID] = b.device.deviceId;
    s[H.NUM_QUEUES] = Math.min(b.queues.length, MAX_STATS_QUEUES);
    s[H.OFFERED_LO] = Number(b.features & 0xffffffffn);
    s[H.OFFERED_HI] = Number(b.features >> 32n);
    s[H.ACKED_LO] = Number(b.ackedFeatures & 0xffffffffn);
    s[H.ACKED_HI] = Number(b.ackedFeatures >> 32n);
    s[H.PROTOCOL_LO] = Number(b.ackedProtocolFeatures & 0xffffffffn);
    s[H.PROTOCOL_HI] = Number(b.ackedProtocolFeatures >> 32n);
    const n = s[H.NUM_QUEUES];
    for (let i = 0; i < n; i++) {
      const q = b.queues[i];
      s[HEADER_INTS + i * QUEUE_INTS] = q.size;
      s[HEADER_INTS + i * QUEUE_INTS + 1] = (q.enabled ? QueueFlag.ENABLED : 0) |
        (q.started ? QueueFlag.STARTED : 0) | (q.ready ? QueueFlag.READY : 0) |
        (q.broken ? QueueFlag.BROKEN : 0);
    }
    Atomics.add(s, H.SEQ, 1); // even again: consistent
  }
}

/** One queue as the main thread sees it. */
export interface QueueSnapshot {
  /** Queue index. */
  index: number;
  /** Ring size (0 until set up). */
  size: number;
  /** {@link QueueFlag} bits. */
  flags: number;
  /** The counters, copied (see `QueueStat` for the slots). */
  counters: Float64Array;
}

/** One port (socket) as the main thread sees it. */
export interface PortSnapshot {
  /** Whether a front-end is connected. */
  connected: boolean;
  /** The front-end's pid, uid and gid (zeros when none). */
  peer: { pid: number; uid: number; gid: number };
  /** How many front-ends have connected since start. */
  connects: number;
  /** virtio device id (0 before the worker published anything). */
  deviceId: number;
  /** Virtio status byte. */
  status: number;
  /** Features offered. */
  offeredFeatures: bigint;
  /** Features the driver acknowledged. */
  ackedFeatures: bigint;
  /** Protocol features the front-end acknowledged. */
  protocolFeatures: bigint;
  /** The queues. */
  queues: QueueSnapshot[];
  /** The device's reads and writes (see `IoStat`), copied. */
  io: Float64Array;
  /** The device's own counters (see `DeviceMetrics`), copied. */
  device: Float64Array;
}

const u64 = (lo: number, hi: number) => (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);

/** The main thread's side of a service's shared memory. */
export class ServiceStats {
  /** Number of ports. */
  readonly ports: number;
  readonly #sab: SharedArrayBuffer;

  /** Reads `sab`, laid out for `ports` ports. */
  constructor(sab: SharedArrayBuffer, ports: number) {
    this.#sab = sab;
    this.ports = ports;
  }

  /** A consistent copy of port `port`'s state and counters. */
  read(port: number): PortSnapshot {
    const base = port * PORT_STATS_BYTES;
    const s = new Int32Array(this.#sab, base, STATE_BYTES / 4);
    const counters = new Float64Array(this.#sab, base + STATE_BYTES, COUNTER_BYTES / 8);
    for (let attempt = 0;; attempt++) {
      const seq = Atomics.load(s, H.SEQ);
      // A writer is mid-update: try again (it holds the lock for microseconds), or after many
      // tries take what is there rather than hang the status endpoint.
      if (seq & 1 && attempt < 1000) continue;
      const snap: PortSnapshot = {
        connected: s[H.CONNECTED] === 1,
        peer: { pid: s[H.PID], uid: s[H.UID] >>> 0, gid: s[H.GID] >>> 0 },
        connects: s[H.CONNECTS],
        deviceId: s[H.DEVICE_ID],
        status: s[H.STATUS],
        offeredFeatures: u64(s[H.OFFERED_LO], s[H.OFFERED_HI]),
        ackedFeatures: u64(s[H.ACKED_LO], s[H.ACKED_HI]),
        protocolFeatures: u64(s[H.PROTOCOL_LO], s[H.PROTOCOL_HI]),
        queues: [],
        io: new Float64Array(this.#sab, base + IO_OFFSET, IO_STAT_SLOTS).slice(),
        device: new Float64Array(this.#sab, base + DEVICE_OFFSET, MAX_DEVICE_STATS).slice(),
      };
      for (let i = 0; i < s[H.NUM_QUEUES]; i++) {
        snap.queues.push({
          index: i,
          size: s[HEADER_INTS + i * QUEUE_INTS],
          flags: s[HEADER_INTS + i * QUEUE_INTS + 1],
          counters: counters.slice(i * QUEUE_STAT_SLOTS, (i + 1) * QUEUE_STAT_SLOTS),
        });
      }
      if (Atomics.load(s, H.SEQ) === seq || attempt >= 1000) return snap;
    }
  }
}
