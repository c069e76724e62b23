/**
 * `vhostd net` (a guest on a TAP interface) and `vhostd switch` (guests joined by vhostd's own
 * learning switch, optionally with a TAP uplink).
 *
 * TAP fds are opened here, in the main thread, so that a missing permission or a bad name is
 * reported as one line before anything listens; the worker gets the fds.
 *
 * @module
 */

import { parseArgs } from "./args.ts";
import { UsageError } from "../sys/errors.ts";
import { formatMac, parseMac } from "../devices/net/header.ts";
import {
  DEFAULT_FLOOD_RATE,
  DEFAULT_MAC_AGE_S,
  DEFAULT_MAX_MACS,
  DEFAULT_UPLINK_MAX_MACS,
  type NetSwitchOptions,
} from "../devices/net/switch.ts";
import type { NetTapOptions } from "../devices/net/tap_device.ts";
import { SysError } from "../sys/libc.ts";
import { MAX_IFNAME, TapDevice, TUN_F_CSUM } from "../sys/tap.ts";
import {
  type Access,
  accessOptions,
  conventionOptions,
  deviceSocket,
  MAX_POLL_US,
  parseAccess,
  parseIntOption,
  parsePollUs,
  parseServeOptions,
  pollOptions,
  SERVE_OPTIONS_HELP,
  serveOptions,
  usage,
  VM_OPTION_HELP,
  vmOptions,
} from "./cli.ts";
import { ConfigError, type DevicePlan, type PlanContext } from "./config.ts";
import type { LogSettings } from "../log/setup.ts";
import { runServices } from "./serve.ts";
import type { ServiceOptions } from "./service.ts";

/**
 * Default busy-poll window of a TAP-backed net device, in µs: none, as vhost-net's busyloop is
 * off by default. Polling spares the guest its transmit kicks at the cost of a busy CPU while
 * traffic flows; BENCHMARKS.md measures it as a lever.
 */
export const DEFAULT_NET_POLL_US = 0;

/**
 * Queue pairs a TAP-backed net device offers unless told otherwise (`--queues`, a config's
 * `queues`): one, as QEMU's vhost-user netdev asks for one pair unless `queues=N` says otherwise.
 * The QEMU lines vhostd prints always name the number.
 */
export const DEFAULT_NET_QUEUES = 1;

/** `vhostd net --help`. */
export const NET_HELP = `Usage: vhostd net --socket PATH --tap NAME [options]

Serves a virtio-net device on the vhost-user socket PATH whose frames go to and come from the
TAP interface NAME (created if it does not exist; needs CAP_NET_ADMIN), until SIGINT or SIGTERM.
Checksum and segmentation offloads pass through to the host stack.

Options:
  --socket PATH       vhost-user socket to create (required; --socket-path is the same)
  --fd N              serve the listening socket inherited as fd N instead
  --tap NAME          TAP interface to open or create (required, at most ${MAX_IFNAME} characters)
  --queues N          queue pairs, 1-16 (default ${DEFAULT_NET_QUEUES}). A TAP vhostd creates is multi-queue, so a
                      migration's destination daemon can open it too; one made beforehand
                      without multi_queue serves one queue pair and cannot be shared
  --socket-mode MODE  octal mode of the socket file (default 0600)
  --socket-group GRP  group of the socket file (name or gid)
  --allow-uid UID     accept front-ends of these uids only (repeatable or comma-separated)
  --poll-us N         after the last frame, keep polling the transmit queues (the guest's kicks
                      off) and the TAP for N µs before sleeping (0-${MAX_POLL_US}; default ${DEFAULT_NET_POLL_US}: none)
${VM_OPTION_HELP}
${SERVE_OPTIONS_HELP}

QEMU (7.2 under TCG needs vectors=0 on the device; with KVM use vectors=2N+2):
  -object memory-backend-memfd,id=mem,size=1G,share=on -machine q35,memory-backend=mem -m 1G
  -chardev socket,id=net0c,path=PATH,reconnect=1
  -netdev vhost-user,id=net0,chardev=net0c,queues=N
  -device virtio-net-pci,netdev=net0,mq=on
`;

/**
 * Highest `--max-macs`: a port at its limit scans its own addresses for idle ones (at most once
 * per address it learned), so the limit bounds that cost too.
 */
const MAX_PORT_MACS = 4096;
/** Highest `--uplink-max-macs` (the same scan, over the uplink's addresses). */
const MAX_UPLINK_MACS = 16384;
/** Highest flood rate accepted (`--flood-rate`), in frames per second. */
const MAX_FLOOD_RATE = 1_000_000;

/** `vhostd switch --help`. */
export const SWITCH_HELP = `Usage: vhostd switch --socket A.sock --socket B.sock [...] [options]

Serves one virtio-net port per --socket (port 0, 1, ... in order), joined by a learning L2
switch (unknown and broadcast frames are flooded), until SIGINT or SIGTERM. Partial checksums are
carried to guests that accept them and completed by the switch for the others. Ports offer no
segmentation offload (TSO): use a large MTU (up to 9000 tested) for large frames.

Guests are not trusted. An address a port sends from is that port's while the port runs: frames
from any other port with that source are dropped and counted. A port lets go of its addresses
when its VM stops or pauses, migrates away, or disconnects; the next port to send from one (the
VM on its new port, or QEMU's announcement after a migration) takes it. --port-mac pins addresses
to ports instead: such a port sends from those only, and no other port ever sends from them (give
two ports the same address to migrate a VM between them: the running one holds it).

Options:
  --socket PATH       a port's vhost-user socket (repeat: at least one)
  --uplink-tap NAME   also switch to and from this TAP interface (created if missing)
  --port-mac N=MAC[,MAC...]
                      port N sends from these addresses only (repeatable)
  --max-macs N        addresses a port without --port-mac may learn (default ${DEFAULT_MAX_MACS}); frames
                      from a new address beyond that are dropped
  --uplink-max-macs N
                      addresses learned on the uplink (default ${DEFAULT_UPLINK_MAX_MACS})
  --flood-rate N      broadcast, multicast and unknown-unicast frames a port may send per second,
                      in bursts of up to N (default ${DEFAULT_FLOOD_RATE}; 0: no limit); the excess is dropped
  --mac-age SECONDS   how long an address learned on the uplink is kept, and how long a port's
                      address must be unused before the port may replace it at its limit
                      (default ${DEFAULT_MAC_AGE_S})
  --socket-mode MODE  octal mode of the socket files (default 0600)
  --socket-group GRP  group of the socket files (name or gid)
  --allow-uid UID     accept front-ends of these uids only (repeatable or comma-separated)
${VM_OPTION_HELP}
${SERVE_OPTIONS_HELP}

QEMU, one per port (7.2 under TCG needs vectors=0 on the device):
  -object memory-backend-memfd,id=mem,size=1G,share=on -machine q35,memory-backend=mem -m 1G
  -chardev socket,id=net0c,path=A.sock,reconnect=1
  -netdev vhost-user,id=net0,chardev=net0c
  -device virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01
`;

/**
 * Parses the `--port-mac N=MAC[,MAC...]` values for a switch of `ports` ports: the configured
 * addresses of each port (a port named twice gets both lists). Addresses must be unicast and not
 * zero; one address may be given to several ports (a VM migrating between them).
 */
export function parsePortMacs(values: readonly string[], ports: number): number[][] {
  const out: number[][] = Array.from({ length: ports }, () => []);
  for (const v of values) {
    const m = /^(\d+)=(.+)$/.exec(v);
    if (!m) throw new UsageError(`--port-mac takes PORT=MAC[,MAC...], not "${v}"`);
    const port = Number(m[1]);
    if (port >= ports) {
      throw new UsageError(
        `--port-mac ${v}: there is no port ${port} (ports are 0 to ${ports - 1}, one per --socket)`,
      );
    }
    for (const text of m[2].split(",")) {
      const mac = parseMac(text);
      if (mac === null) throw new UsageError(`--port-mac ${v}: "${text}" is not a MAC address`);
      if (mac === 0 || Math.floor(mac / 0x10000000000) & 1) {
        throw new UsageError(`--port-mac ${v}: ${text} is not a unicast address`);
      }
      if (!out[port].includes(mac)) out[port].push(mac);
    }
  }
  return out;
}

/** Opens a TAP, turning the usual failures into one-line usage errors. */
function openTap(name: string, queues: number): TapDevice {
  if (name.length === 0 || name.length > MAX_IFNAME || /[\s/:]/.test(name)) {
    throw new UsageError(`TAP name "${name}" must be 1-${MAX_IFNAME} characters, no / : or space`);
  }
  try {
    return TapDevice.open(name, queues);
  } catch (e) {
    if (e instanceof SysError && (e.code === "EPERM" || e.code === "EACCES")) {
      throw new UsageError(`cannot open TAP ${name}: needs CAP_NET_ADMIN (run as root)`);
    }
    if (e instanceof SysError && e.code === "EINVAL") {
      throw new UsageError(
        `cannot open TAP ${name}: it exists with other flags (not a multi-queue TAP with ` +
          `vnet_hdr, or not a TAP at all)`,
      );
    }
    if (e instanceof SysError && e.code === "ENOENT") {
      throw new UsageError("cannot open /dev/net/tun: the tun module is not loaded");
    }
    throw new UsageError(`cannot open TAP ${name}: ${(e as Error).message}`);
  }
}

const netModule = new URL("../devices/net/mod.ts", import.meta.url);

/** A TAP-backed net device, ready to serve. */
interface NetPlan {
  service: ServiceOptions;
  tap: TapDevice;
  qemuArgs: string[];
}

function planNet(
  socket: string,
  tapName: string,
  queues: number,
  pollUs: number,
  log: LogSettings,
  access: Access,
  name: string,
): NetPlan {
  const tap = openTap(tapName, queues);
  const options: NetTapOptions = {
    kind: "tap",
    tap: tap.name,
    fds: tap.fds,
    multiQueue: tap.multiQueue,
    name,
  };
  const service: ServiceOptions = {
    socket,
    module: netModule,
    options,
    name,
    type: "net",
    log,
    pollUs,
    ...access,
  };
  const qemuArgs = [
    "-chardev",
    `socket,id=${name}c,path=${socket},reconnect=1`,
    "-netdev",
    `vhost-user,id=${name},chardev=${name}c,queues=${queues}`,
    "-device",
    `virtio-net-pci,netdev=${name}${queues > 1 ? ",mq=on" : ""}`,
  ];
  return { service, tap, qemuArgs };
}

/**
 * Plans a `"type": "net"` device of a config file: `tap` (required), `queues` (1-16, default
 * {@link DEFAULT_NET_QUEUES}), `pollUs` (0-1000).
 */
export function planNetDevice(ctx: PlanContext): DevicePlan {
  const f = ctx.fields;
  const tapName = f.string("tap", true);
  const queues = f.integer("queues", DEFAULT_NET_QUEUES, 1, 16);
  const pollUs = f.integer("pollUs", DEFAULT_NET_POLL_US, 0, MAX_POLL_US);
  let plan: NetPlan;
  try {
    plan = planNet(ctx.socketPath(), tapName, queues, pollUs, ctx.log, ctx.access, ctx.id);
  } catch (e) {
    throw new ConfigError(f.at("tap"), (e as Error).message);
  }
  return {
    services: [plan.service],
    describe: `${ctx.id}: net on TAP ${plan.tap.name} (${queues} queue pair${
      queues > 1 ? "s" : ""
    }) on ${plan.service.socket}`,
    qemuArgs: plan.qemuArgs,
    release: () => plan.tap.close(),
  };
}

/** `vhostd net`. */
export async function cmdNet(args: string[]): Promise<number> {
  const { values } = usage(() =>
    parseArgs({
      args,
      strict: true,
      options: {
        ...serveOptions,
        ...accessOptions,
        ...pollOptions,
        ...conventionOptions,
        ...vmOptions,
        socket: { type: "string" },
        tap: { type: "string" },
        queues: { type: "string" },
      },
    })
  );
  if (values.help) {
    console.log(NET_HELP);
    return 0;
  }
  const socket = deviceSocket(values, "net");
  if (!values.tap) throw new UsageError("net needs --tap NAME");
  const { log, extras } = parseServeOptions(values);
  const queues = parseIntOption("queues", values.queues, DEFAULT_NET_QUEUES, 1, 16);
  const { service, tap, qemuArgs } = planNet(
    socket,
    values.tap,
    queues,
    parsePollUs(values, DEFAULT_NET_POLL_US),
    log,
    parseAccess(values),
    "net0",
  );
  const banner = `vhostd: serving net on ${socket} (TAP ${tap.name}, ${queues} queue ` +
    `pair${queues > 1 ? "s" : ""})\nAttach it to QEMU 7.2 or newer with:\n  ` +
    [0, 2, 4].map((i) => `${qemuArgs[i]} ${qemuArgs[i + 1]}`).join(" \\\n  ") + "\n";
  try {
    return await runServices([service], log, banner, extras);
  } catch (e) {
    // The worker never took the fds over (it closes them itself once it has).
    tap.close();
    throw e;
  }
}

/** `vhostd switch`. */
export async function cmdSwitch(args: string[]): Promise<number> {
  const { values } = usage(() =>
    parseArgs({
      args,
      strict: true,
      options: {
        ...serveOptions,
        ...accessOptions,
        ...vmOptions,
        socket: { type: "string", multiple: true },
        "uplink-tap": { type: "string" },
        "mac-age": { type: "string" },
        "port-mac": { type: "string", multiple: true },
        "max-macs": { type: "string" },
        "uplink-max-macs": { type: "string" },
        "flood-rate": { type: "string" },
      },
    })
  );
  if (values.help) {
    console.log(SWITCH_HELP);
    return 0;
  }
  const sockets = values.socket ?? [];
  if (sockets.length === 0) throw new UsageError("switch needs at least one --socket PATH");
  if (new Set(sockets).size !== sockets.length) {
    throw new UsageError("switch: each --socket must be a different path");
  }
  if (sockets.length > 64) throw new UsageError("switch: at most 64 ports");
  const { log, extras } = parseServeOptions(values);
  const acc = parseAccess(values);
  const macAge = parseIntOption("mac-age", values["mac-age"], DEFAULT_MAC_AGE_S, 1, 86400);
  const portMacs = parsePortMacs(values["port-mac"] ?? [], sockets.length);
  const maxMacs = parseIntOption(
    "max-macs",
    values["max-macs"],
    DEFAULT_MAX_MACS,
    1,
    MAX_PORT_MACS,
  );
  const uplinkMaxMacs = parseIntOption(
    "uplink-max-macs",
    values["uplink-max-macs"],
    DEFAULT_UPLINK_MAX_MACS,
    1,
    MAX_UPLINK_MACS,
  );
  const floodRate = parseIntOption(
    "flood-rate",
    values["flood-rate"],
    DEFAULT_FLOOD_RATE,
    0,
    MAX_FLOOD_RATE,
  );
  let uplink: TapDevice | null = null;
  if (values["uplink-tap"] !== undefined) {
    uplink = openTap(values["uplink-tap"], 1);
    // The switch completes partial checksums for guests that need it, so the kernel may hand
    // them over; it never segments, so no TSO.
    uplink.setOffload(TUN_F_CSUM);
  }
  const options: NetSwitchOptions = {
    kind: "switch",
    ports: sockets.length,
    uplinkFd: uplink?.fds[0] ?? -1,
    uplinkName: uplink?.name,
    macAgeMs: macAge * 1000,
    portMacs,
    maxMacs,
    uplinkMaxMacs,
    floodRate,
  };
  const service: ServiceOptions = {
    socket: sockets,
    module: netModule,
    options,
    name: "switch",
    log,
    ...acc,
  };
  const lines = sockets.map((s, i) =>
    `  port ${i}: -chardev socket,id=net${i}c,path=${s},reconnect=1 ` +
    `-netdev vhost-user,id=net${i},chardev=net${i}c -device virtio-net-pci,netdev=net${i}` +
    (portMacs[i].length > 0 ? `,mac=${formatMac(portMacs[i][0])}` : "")
  );
  const banner =
    `vhostd: serving switch with ${sockets.length} port${sockets.length > 1 ? "s" : ""}` +
    (uplink ? ` and uplink TAP ${uplink.name}` : "") +
    `\nAttach each QEMU 7.2 or newer guest to its port:\n${lines.join("\n")}\n`;
  try {
    return await runServices([service], log, banner, extras);
  } catch (e) {
    // The worker never took the fd over (it closes it itself once it has).
    uplink?.close();
    throw e;
  }
}
