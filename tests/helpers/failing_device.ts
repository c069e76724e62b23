/**
 * A device module whose `createDevice` fails, as a user's device fails when what backs it is
 * missing: for tests that a device failing to start hurts no other device in its worker.
 *
 * @module
 */

import type { VirtioDevice } from "../../mod.ts";

/** Always throws, naming what `options.missing` says is missing. */
export function createDevice(options: { missing: string }): VirtioDevice {
  throw new Error(`cannot open ${options.missing}`);
}
