/**
 * A daemon serving two block devices from one process (two data-plane workers), for the hostile
 * guest test and the soak. Usage: deno run -A tests/fuzz/two_blk.ts SOCK_A IMG_A SOCK_B IMG_B
 *
 * @module
 */

import { runServices } from "../../daemon/serve.ts";
import { blkService } from "./target.ts";

const log = { level: "info", format: "text" } as const;
const [sockA, imgA, sockB, imgB] = Deno.args;
const plans = [
  blkService(sockA, imgA, "victim"),
  blkService(sockB, imgB, "bystander"),
];
Deno.exit(
  await runServices(plans, log, `vhostd: serving two blk devices on ${sockA} and ${sockB}`),
);
