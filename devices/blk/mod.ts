/**
 * The virtio-blk device: {@link BlkDevice}, and `createDevice` for vhostd's worker loader.
 *
 * @module
 */

import { BlkDevice, type BlkOptions } from "./device.ts";

export * from "./device.ts";
export * from "./image.ts";

/** Builds a block device inside a data-plane worker. */
export function createDevice(options: BlkOptions): BlkDevice {
  return new BlkDevice(options);
}
export * from "./backend.ts";
