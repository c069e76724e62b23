/**
 * The fuzzer's target: one process serving a block device, a three-port switch and a console to
 * the fuzzer, and a second block device that must keep serving throughout. Each service has its
 * own data-plane worker; the switch's three ports share one, so ports 1 and 2 show whether a
 * hostile port 0 holds up the others of its worker.
 *
 * Usage: deno run -A tests/fuzz/target.ts DIR (sockets blk.sock, bystander.sock, net0.sock ...
 * net2.sock and console.sock, and images blk.img and bystander.img, all in DIR).
 *
 * @module
 */

import { runServices } from "../../daemon/serve.ts";
import type { ServiceOptions } from "../../daemon/service.ts";
import { openImage } from "../../devices/blk/image.ts";
import type { BlkOptions } from "../../devices/blk/device.ts";
import type { NetSwitchOptions } from "../../devices/net/switch.ts";
import type { ConsoleOptions } from "../../devices/console/device.ts";

const log = { level: "info", format: "text" } as const;

/** The sockets the target serves, by role, in `dir`. */
export function targetSockets(dir: string) {
  return {
    blk: `${dir}/blk.sock`,
    bystander: `${dir}/bystander.sock`,
    net: [0, 1, 2].map((p) => `${dir}/net${p}.sock`),
    console: `${dir}/console.sock`,
  };
}

/** A block device service (2 queues) for the image at `path`, on `socket`. */
export function blkService(socket: string, path: string, name: string): ServiceOptions {
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
}

if (import.meta.main) {
  const [dir] = Deno.args;
  const sockets = targetSockets(dir);
  const net: NetSwitchOptions = {
    kind: "switch",
    ports: 3,
    uplinkFd: -1,
    macAgeMs: 300_000,
    // No flood limit: the harness floods its markers between the bystander ports.
    floodRate: 0,
  };
  const consoleOptions: ConsoleOptions = {
    ports: [{
      id: 0,
      name: "console",
      attachFd: -1,
      attachPath: "",
      access: { allowUids: [], maxClients: 4 },
      log: null,
      scrollbackBytes: 64 * 1024,
      inputBytes: 64 * 1024,
    }],
    cols: 80,
    rows: 25,
  };
  const plans: ServiceOptions[] = [
    blkService(sockets.blk, `${dir}/blk.img`, "blk"),
    blkService(sockets.bystander, `${dir}/bystander.img`, "bystander"),
    {
      socket: sockets.net,
      module: new URL("../../devices/net/mod.ts", import.meta.url),
      options: net,
      name: "switch",
      log,
    },
    {
      socket: sockets.console,
      module: new URL("../../devices/console/mod.ts", import.meta.url),
      options: consoleOptions,
      name: "console",
      log,
    },
  ];
  Deno.exit(await runServices(plans, log, `vhostd: serving the fuzz target in ${dir}`));
}
