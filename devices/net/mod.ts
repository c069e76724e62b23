/**
 * The virtio-net devices: {@link NetTapDevice} (a TAP back-end) and {@link SwitchPort} (a port
 * of the built-in L2 switch), and `createDevice` for vhostd's worker loader.
 *
 * @module
 */

import type { VirtioDevice } from "../device.ts";
import { createSwitchPort, type NetSwitchOptions } from "./switch.ts";
import { NetTapDevice, type NetTapOptions } from "./tap_device.ts";

export * from "./header.ts";
export * from "./mac_table.ts";
export * from "./port_macs.ts";
export * from "./rarp.ts";
export * from "./throttled_log.ts";
export * from "./token_bucket.ts";
export * from "./frame_io.ts";
export * from "./tap_device.ts";
export * from "./switch.ts";

/** Options of either kind of net service. */
export type NetOptions = NetTapOptions | NetSwitchOptions;

/** Builds the device for socket number `port` inside a data-plane worker. */
export function createDevice(options: NetOptions, port: number): VirtioDevice {
  return options.kind === "tap" ? new NetTapDevice(options) : createSwitchPort(options, port);
}
