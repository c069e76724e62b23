/**
 * The virtio-console device and the console server around it: per-port logs, scrollback and
 * attach sockets, served over vhost-user (QEMU >= 10.2) or as a plain QEMU character device
 * (any QEMU, with QEMU's own virtio-console).
 *
 * @module
 */

export { ConsoleDevice, type ConsoleOptions, createDevice } from "./device.ts";
export { ByteRing } from "./byte_ring.ts";
export {
  DEFAULT_INPUT_LIMIT,
  DEFAULT_SCROLLBACK,
  type FdWatcher,
  findResize,
  type PortConfig,
  PortHub,
  type ResizeRequest,
} from "./port_hub.ts";
export * from "./protocol.ts";
