/**
 * A daemon serving two block devices from one process (two data-plane workers): the fuzzer's
 * target. Usage: deno run -A tests/fuzz/two_blk.ts SOCK_A IMG_A SOCK_B IMG_B
 *
 * @module
 */

import { runServices, type ServiceOptions } from "../../mod.ts";
import { openImage } from "../../devices/blk/image.ts";
import type { BlkOptions } from "../../devices/blk/device.ts";

const log = { level: "info", format: "text" } as const;
const [sockA, imgA, sockB, imgB] = Deno.args;
const plans: ServiceOptions[] = [[sockA, imgA, "victim"], [sockB, imgB, "bystander"]].map(
  ([socket, path, name]) => {
    const { fd, sizeBytes } = openImage(path, false, false);
    const options: BlkOptions = {
      fd,
      path,
      sizeBytes,
      readOnly: false,
      queues: 2,
      serial: name,
      name,
    };
    return {
      socket,
      module: new URL("../../devices/blk/mod.ts", import.meta.url),
      options,
      name,
      log,
    };
  },
);
Deno.exit(
  await runServices(plans, log, `vhostd: serving two blk devices on ${sockA} and ${sockB}`),
);
