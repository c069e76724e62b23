/**
 * vhostd: virtio devices served to QEMU over vhost-user, in TypeScript.
 *
 * Write a device by implementing {@link VirtioDevice} in a module that exports `createDevice`,
 * then serve it with {@link serveDevice}. The protocol, guest memory and rings are handled for you.
 *
 * @module
 */

export {
  type DeviceEventLoop,
  type DeviceMetrics,
  type DeviceModule,
  IoDirection,
  type MetricSeries,
  type VirtioDevice,
  type Virtqueue,
} from "./devices/device.ts";
export {
  blockMetrics,
  type CounterBlock,
  type CounterStorage,
  defineCounters,
} from "./devices/counter_block.ts";
export { type ByteRef, DescriptorChain } from "./ring/descriptor_chain.ts";
export { GuestMemory, MemoryRegion, type MemoryRegionInfo } from "./ring/guest_memory.ts";
export { type RingAddresses, SplitQueue } from "./ring/split_queue.ts";
export { InflightRegion } from "./ring/inflight.ts";
export { DirtyLog } from "./ring/dirty_log.ts";
export { IoVec } from "./sys/io.ts";
export {
  runServices,
  serveDevice,
  type ServeDeviceOptions,
  type ServiceReload,
} from "./daemon/serve.ts";
export type { LogLevel } from "./log/mod.ts";
export type { LogSettings } from "./log/setup.ts";
export type { ServiceOptions } from "./daemon/service.ts";
export type { ServeExtras } from "./daemon/cli.ts";
export type { MetricsAddress } from "./daemon/metrics.ts";
export { BlkDevice, type BlkOptions } from "./devices/blk/device.ts";
export * as vhostUser from "./vhost-user/mod.ts";
export * as frontend from "./vhost-user/frontend/mod.ts";
