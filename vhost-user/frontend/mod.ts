/**
 * The vhost-user front-end: QEMU's side of the protocol and the guest driver's side of the
 * virtqueues, for testing and measuring any vhost-user back-end without a guest.
 *
 * @example
 * ```ts
 * import { BlkFrontend } from "./mod.ts";
 * const fe = await BlkFrontend.open({ socket: "/tmp/blk.sock", queues: 1 });
 * try {
 *   const c = fe.blk.read(0, 4096);
 *   console.log(c.status, c.data.length);
 * } finally {
 *   fe.close();
 * }
 * ```
 *
 * @module
 */

export * from "./connection.ts";
export * from "./memory.ts";
export * from "./driver_queue.ts";
export * from "./blk_config.ts";
export * from "./blk_driver.ts";
export * from "./blk_frontend.ts";
export * from "./dirty_log.ts";
export * from "./net_driver.ts";
export * from "./console_driver.ts";
// The protocol's vocabulary, for speaking it by hand (FrontendConnection.query, sendBytes).
export {
  BackendRequest,
  bit,
  type ConfigAccess,
  encodeMessage,
  featureNames,
  Flags,
  type InflightInfo,
  type MemRegion,
  ProtocolFeature,
  Request,
  requestName,
  VirtioFeature,
  type VringAddr,
  type VringState,
} from "../message.ts";
