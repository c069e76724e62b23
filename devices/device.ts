/**
 * The contract between vhostd's protocol, memory and ring handling and a device.
 *
 * A device says what it is (virtio id, features, queue count, config space) and processes its
 * queues when the driver kicks them. Everything else (the vhost-user conversation, guest memory
 * mapping, descriptor parsing and bounds checks, notification suppression) is done for it.
 *
 * @module
 */

import type { Virtqueue } from "../ring/split_queue.ts";

export type { Virtqueue };
export type { DescriptorChain } from "../ring/descriptor_chain.ts";
export { IoDirection } from "../ring/queue_stats.ts";

/**
 * One series of a device's own counters, as the metrics endpoint shows it:
 * `vhostd_<name>{vm=...,device=...,<labels>} <value>`. Series of one name share its help and type.
 */
export interface MetricSeries {
  /** Metric name without the `vhostd_` prefix, e.g. `net_dropped_total`. */
  name: string;
  /** The HELP text of the metric. */
  help: string;
  /** `counter` (only goes up) or `gauge`. */
  type: "counter" | "gauge";
  /** Labels besides `vm` and `device`. */
  labels?: Record<string, string>;
  /**
   * A part of the service other than the device itself that the series is about (a switch's
   * uplink: `uplink`): its `device` label is then `<service name>.<part>`.
   */
  part?: string;
}

/**
 * Counters a device keeps besides the per-queue ones (a net device's drops, say), for the
 * metrics endpoint. The device counts in an array; vhostd moves that array to shared memory the
 * main thread reads, so counting stays a plain store into a typed array.
 */
export interface DeviceMetrics {
  /** The series, one per slot of the array. */
  readonly series: readonly MetricSeries[];
  /**
   * Moves the counters into `slots` (at least as long as {@link series}), carrying over what was
   * counted so far. Called once, in the worker, before the device starts.
   */
  bind(slots: Float64Array): void;
}

/**
 * The data-plane worker's event loop, as a device sees it: devices with their own fds (attach
 * sockets, a TAP) watch them here, and push to queues outside a kick.
 */
export interface DeviceEventLoop {
  /** Calls `handler` whenever `fd` is readable or hung up, until {@link unwatch}. */
  watch(fd: number, handler: () => void): void;
  /** Stops watching `fd`. */
  unwatch(fd: number): void;
  /** Queue `index` if the driver has it set up, started and enabled; otherwise null. */
  queue(index: number): Virtqueue | null;
  /**
   * Interrupts the driver for queue `index` if it has new used buffers and wants to know; if the
   * driver broke the queue (found by a pop outside a kick), stops and reports it instead.
   */
  notify(index: number): void;
  /**
   * Tells the front-end that the device's config space changed (a disk grew), over the
   * vhost-user back-end request channel; QEMU then reads the config again and interrupts the
   * guest, which sees the change without a reboot. Never waits for the front-end. Returns whether
   * a front-end will hear of it (false: none is connected, or it gave no channel).
   */
  configChanged(): boolean;
}

/** A virtio device served over vhost-user. Optional members have sensible defaults. */
export interface VirtioDevice {
  /** virtio device id (1 net, 2 block, 3 console, 4 entropy, ...). */
  readonly deviceId: number;
  /** Short name used in logs and metrics, e.g. `"blk"`. */
  readonly name: string;
  /** Number of queues offered (GET_QUEUE_NUM). */
  readonly numQueues: number;
  /** Largest queue size accepted; default 1024. */
  readonly maxQueueSize?: number;
  /**
   * Device-specific feature bits. vhostd adds the transport bits itself (VERSION_1,
   * INDIRECT_DESC, EVENT_IDX and vhost-user's PROTOCOL_FEATURES).
   */
  readonly features: bigint;
  /** Extra vhost-user protocol feature bits (CONFIG is added when {@link getConfig} exists). */
  readonly protocolFeatures?: bigint;

  /**
   * Which queues vhostd may busy-poll with kicks switched off (`--poll-us`): `true` for all, or a
   * predicate of the queue index. Only for queues whose {@link processQueue} takes every chain it
   * can, as a block device or a transmit queue does: a receive queue holding buffers until frames
   * arrive would look busy forever.
   */
  readonly pollQueues?: boolean | ((index: number) => boolean);

  /** Called once in the worker, before the first front-end connects. */
  start?(loop: DeviceEventLoop): void;
  /** Reads `size` bytes of the config space from `offset` (bytes past its end read as zero). */
  getConfig?(offset: number, size: number): Uint8Array;
  /** Writes to the config space; returns false to refuse (e.g. a read-only field). */
  setConfig?(offset: number, data: Uint8Array, fromMigration: boolean): boolean;
  /** Told the features the driver acknowledged (SET_FEATURES). */
  setFeatures?(features: bigint): void;
  /**
   * Processes what the driver made available on `queue`: pop chains, handle them, push them back.
   * vhostd calls it after a kick and handles notification suppression and interrupts around it.
   */
  processQueue(queue: Virtqueue): void;
  /**
   * Completes every request still in flight (a device doing asynchronous I/O). vhostd calls it
   * before a ring is stopped, guest memory changes, the device is reset or the front-end leaves:
   * after those, guest memory must no longer be written.
   */
  quiesce?(): void;
  /**
   * Every ring the front-end had started is stopped again (GET_VRING_BASE): the VM was paused, is
   * migrating away, or the driver is going. Guest memory must not be written until
   * {@link resumed}; make what was written durable and let go of what another host may need next
   * (a disk's lock, a TAP queue, a switch port's addresses). Called after {@link quiesce}; also
   * on RESET_DEVICE and on disconnect when rings were running.
   */
  suspended?(): void;
  /** The front-end started a ring while none was running: the device is live again. */
  resumed?(): void;
  /**
   * A live migration started (`true`: QEMU turned dirty logging on) or ended (`false`). The core
   * logs guest memory writes itself; a device may use the time to shorten its {@link suspended}
   * at the switch-over, which the guest sits out (a disk flushes ahead, in the background).
   */
  migrating?(on: boolean): void;
  /**
   * QEMU asks the device to announce the guest's MAC address on its network (vhost-user
   * SEND_RARP), after a migration, for a guest that cannot announce itself. A device with this
   * method is offered the RARP protocol feature.
   */
  announce?(mac: Uint8Array): void;
  /**
   * The operator asked the device to look at what backs it again (SIGHUP, `vhostd resize`): a
   * disk re-reads its image's size. Returns one line saying what happened, for the operator. Runs
   * in the worker, between events.
   */
  refresh?(): string;
  /** The device was reset or the front-end disconnected: forget per-session state. */
  reset?(): void;
  /** The daemon is shutting down: make everything durable and release resources. */
  close?(): void;
  /** Counters of the device's own, for the metrics endpoint. */
  readonly metrics?: DeviceMetrics;
}

/**
 * What a device module exports so that vhostd can build the device inside a data-plane worker:
 * `export function createDevice(options) { ... }`.
 */
export interface DeviceModule<Options = unknown> {
  /**
   * Builds the device from options that survived structured cloning. A service with several
   * sockets calls it once per socket, with `port` counting from 0, in one worker: the devices
   * can share module state (a switch does).
   */
  createDevice(options: Options, port: number): VirtioDevice | Promise<VirtioDevice>;
}
