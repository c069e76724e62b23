/**
 * vhostd: virtio devices served to QEMU over vhost-user, in TypeScript.
 *
 * Write a device by implementing {@link VirtioDevice} in a module that exports `createDevice`,
 * then serve it with {@link serveDevice}. The protocol, guest memory and rings are handled for you:
 * a device sees its queues only through {@link Virtqueue} and each request only as a read-only
 * {@link DescriptorChain}, so it cannot reach outside the guest memory the queue checked. Log
 * with {@link getLogger}: records come out in vhostd's format, on whichever thread logs.
 *
 * The devices vhostd ships ({@link createBlkDevice}, {@link createNetTapDevice},
 * {@link createConsoleDevice}) can be served through a `createDevice` of your own;
 * {@link frontend} is the other side of the protocol (QEMU's and the guest driver's), for testing
 * a back-end without a guest.
 *
 * @example
 * ```ts
 * import { serveDevice, type VirtioDevice } from "./mod.ts";
 *
 * export function createDevice(): VirtioDevice {
 *   return {
 *     deviceId: 4, // entropy
 *     name: "rng",
 *     numQueues: 1,
 *     features: 0n,
 *     processQueue(queue) {
 *       for (let chain = queue.pop(); chain !== null; chain = queue.pop()) {
 *         let written = 0;
 *         for (const buffer of chain.writableViews()) {
 *           crypto.getRandomValues(buffer.subarray(0, 65536));
 *           written += Math.min(buffer.length, 65536);
 *         }
 *         queue.push(chain, written);
 *       }
 *     },
 *   };
 * }
 *
 * if (import.meta.main) {
 *   Deno.exit(await serveDevice({ socket: "/tmp/rng.sock", module: import.meta.url }));
 * }
 * ```
 *
 * @module
 */

import type { VirtioDevice } from "./devices/device.ts";
import { BlkDevice, type BlkOptions } from "./devices/blk/device.ts";
import { NetTapDevice, type NetTapOptions } from "./devices/net/tap_device.ts";
import { ConsoleDevice, type ConsoleOptions } from "./devices/console/device.ts";

// The device contract.
export {
  type DeviceEventLoop,
  type DeviceMetrics,
  type DeviceModule,
  IoDirection,
  type MetricSeries,
  type VirtioDevice,
  type Virtqueue,
} from "./devices/device.ts";
export type { ByteRef, DescriptorChain } from "./ring/descriptor_chain.ts";
export type { MemoryRegion, MemoryRegionInfo } from "./ring/guest_memory.ts";
export { IoVec } from "./sys/io.ts";
export {
  blockMetrics,
  type CounterBlock,
  type CounterStorage,
  defineCounters,
} from "./devices/counter_block.ts";

// Serving a device.
export { serveDevice, type ServeDeviceOptions } from "./daemon/serve.ts";
export type { LogSettings } from "./log/setup.ts";

// Logging in vhostd's format.
export { getLogger, type Logger, type LogLevel } from "./log/mod.ts";

// The devices vhostd ships, for a `createDevice` of your own (`export const createDevice =
// createBlkDevice;`). Only their options are public: the devices' own members are vhostd's.
export type { BlkIoEngine, BlkOptions } from "./devices/blk/device.ts";
export type { NetTapOptions } from "./devices/net/tap_device.ts";
export type { ConsoleOptions } from "./devices/console/device.ts";
export type {
  AttachAccess,
  PortConfig,
  PortLogConfig,
  TerminalConfig,
} from "./devices/console/port_hub.ts";

/** Builds vhostd's virtio-blk device (a raw disk image). */
export function createBlkDevice(options: BlkOptions): VirtioDevice {
  return new BlkDevice(options);
}

/** Builds vhostd's virtio-net device on a TAP interface. */
export function createNetTapDevice(options: NetTapOptions): VirtioDevice {
  return new NetTapDevice(options);
}

/**
 * Builds vhostd's virtio-console device. Its ports' attach sockets and logs are fds opened
 * beforehand, in the thread that serves the device (the `vhostd console` command does this).
 */
export function createConsoleDevice(options: ConsoleOptions): VirtioDevice {
  return new ConsoleDevice(options);
}

// The front-end library.
export * as frontend from "./vhost-user/frontend/mod.ts";
