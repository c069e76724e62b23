/**
 * A device written against `mod.ts` alone that logs once when it is built, with the logger
 * `mod.ts` exports: `tests/public_api_test.ts` serves it to see the record in vhostd's format.
 *
 * @module
 */

import { getLogger, serveDevice, type VirtioDevice } from "../../mod.ts";

/** Builds a one-queue device that takes nothing from its queue; logs that it was built. */
export function createDevice(options: { greeting: string }): VirtioDevice {
  getLogger(["vhostd", "logging-device"]).warn("built: {greeting}", options);
  return { deviceId: 4, name: "logging-device", numQueues: 1, features: 0n, processQueue() {} };
}

if (import.meta.main) {
  Deno.exit(
    await serveDevice({
      socket: Deno.args[0],
      module: import.meta.url,
      options: { greeting: "hello from a device" },
      log: { level: "info", format: "json" },
    }),
  );
}
