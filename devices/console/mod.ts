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
  type AttachAccess,
  DEFAULT_INPUT_LIMIT,
  DEFAULT_MAX_CLIENTS,
  DEFAULT_SCROLLBACK,
  type FdWatcher,
  findResize,
  type PortConfig,
  PortHub,
  type PortLogConfig,
  type ResizeRequest,
} from "./port_hub.ts";
export { Acceptor, refuse, tell } from "./acceptor.ts";
export { PeerPolicy } from "./peer_policy.ts";
export { parseToken, TokenCheck, type TokenProgress } from "./attach_token.ts";
export {
  ConsoleLog,
  DEFAULT_LOG_MAX_BYTES,
  MIN_LOG_MAX_BYTES,
  type OpenedLog,
  openLogFile,
} from "./console_log.ts";
export * from "./protocol.ts";
