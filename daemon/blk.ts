/**
 * Serving block devices: `vhostd blk`, `vhostd start`, and the `blk` planner of config files.
 *
 * @module
 */

import { parseArgs } from "./args.ts";
import { openImage, sizeText } from "../devices/blk/image.ts";
import { UsageError } from "../sys/errors.ts";
import { BLK_IO_ENGINES, type BlkIoEngine, type BlkOptions } from "../devices/blk/device.ts";
import type { LogSettings } from "../log/setup.ts";
import type { ServiceOptions } from "./service.ts";
import { runServices } from "./serve.ts";
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
import { closeQuietly } from "../sys/libc.ts";

/**
 * Default busy-poll window of a block device's worker, in µs (`--poll-us`): the longest gap after
 * the last request that polling covers; a later event closes the window (see EventLoop), so it
 * costs CPU only while it catches requests. Chosen in alternated guest fio runs against 20, 25,
 * 30 and 0 µs: with the window judged by the whole gap, 100 µs is at qemu-storage-daemon's back-end
 * CPU per request within the runs' spread, and spares the guest the most kicks.
 */
export const DEFAULT_POLL_US = 100;

/**
 * Queues a block device offers unless told otherwise (`--queues`, a config's `queues`). QEMU gives
 * a vhost-user-blk device one queue per vCPU unless `num-queues` says otherwise, and refuses a
 * back-end that offers fewer: 16 covers guests of up to 16 vCPUs attached without `num-queues`.
 * The QEMU lines vhostd prints always name the number.
 */
export const DEFAULT_BLK_QUEUES = 16;

/** `vhostd blk --help`. */
export const BLK_HELP = `Usage: vhostd blk --socket PATH --image FILE [options]

Serves FILE (a raw image or a block device) as a virtio-blk device on the vhost-user
socket PATH, until SIGINT or SIGTERM.

Options:
  --socket PATH       vhost-user socket to create (required; --socket-path is the same)
  --fd N              serve the listening socket inherited as fd N instead
  --image FILE        raw disk image or block device (required; --blk-file is the same)
  --read-only         serve read-only (VIRTIO_BLK_F_RO); writes fail
  --queues N          queues offered, 1-64 (default ${DEFAULT_BLK_QUEUES}; QEMU uses one per vCPU by
                      default and refuses a device with fewer: give it num-queues=N)
  --direct            open the image with O_DIRECT (bypass the host page cache)
  --io-engine E       auto (default): io_uring where the kernel allows it, so that a slow read
                      holds no other queue or device, else sync; sync: preadv/pwritev in the
                      data-plane worker; uring: io_uring or fail to start
  --poll-us N         after the last request, keep polling the queues and the disk for N µs
                      before sleeping (0-${MAX_POLL_US}, default ${DEFAULT_POLL_US}; 0: sleep at once)
  --serial ID         serial number the guest sees (default: vhostd-<image name>)
  --no-locking        do not lock the image (QEMU's byte locks); only for cluster file systems
                      that arbitrate access themselves, never to share an image by accident
  --socket-mode MODE  octal mode of the socket file (default 0600: only the owner may connect)
  --socket-group GRP  group of the socket file (name or gid; use with --socket-mode 0660)
  --allow-uid UID     accept front-ends of these uids only (repeatable or comma-separated)
${VM_OPTION_HELP}
${SERVE_OPTIONS_HELP}

Example:
  vhostd blk --socket /run/vhostd/vm1-disk.sock --image /var/lib/vm1.img --queues 4 \\
    --vm vm1 --metrics 127.0.0.1:61910
`;

/** `vhostd start --help`. */
export const START_HELP = `Usage: deno task start [options]

Creates a sparse 1 GiB image (once) in vhostd's own folder
($XDG_STATE_HOME/vhostd/default, or ~/.local/state/vhostd/default) and serves it as a
virtio-blk device, printing the QEMU arguments that attach to it.

Options:
  --socket-mode MODE  octal mode of the socket file (default 0600)
  --socket-group GRP  group of the socket file
  --allow-uid UID     accept front-ends of these uids only
${SERVE_OPTIONS_HELP}

Example:
  deno task start --metrics 127.0.0.1:61910
`;

/** Everything needed to serve one block device. */
export interface BlkPlan {
  /** The vhost-user socket. */
  socket: string;
  /** The service to start. */
  service: ServiceOptions;
  /** The device's options (holding the opened image fd). */
  blk: BlkOptions;
}

/** Block device settings, from flags or a config file. */
export interface BlkFlags {
  /** Serve read-only. */
  readOnly: boolean;
  /** Open with O_DIRECT. */
  direct: boolean;
  /** I/O engine (default `auto`: io_uring where available). */
  ioEngine?: BlkIoEngine;
  /** Queues offered. */
  queues: number;
  /** Busy-poll window in µs (default {@link DEFAULT_POLL_US}). */
  pollUs?: number;
  /** Serial number (default vhostd-<image name>). */
  serial?: string;
  /** Device name in logs, metrics and status (default `blk`). */
  name?: string;
  /** Lock the image while the device runs (default true). */
  locking?: boolean;
}

/** Opens the image (all its problems are usage errors) and plans the service. */
export function planBlk(
  socket: string,
  image: string,
  flags: BlkFlags,
  log: LogSettings,
  access: Access,
): BlkPlan {
  const { fd, sizeBytes } = openImage(image, flags.readOnly, flags.direct);
  const base = image.split("/").pop() ?? "disk";
  const name = flags.name ?? "blk";
  const blk: BlkOptions = {
    fd,
    path: image,
    sizeBytes,
    readOnly: flags.readOnly,
    queues: flags.queues,
    serial: flags.serial ?? `vhostd-${base}`.slice(0, 20),
    name,
    locking: flags.locking ?? true,
    ioEngine: flags.ioEngine ?? "auto",
    faultKillAfter: Number(Deno.env.get("VHOSTD_FAULT_KILL_AFTER") ?? 0) || undefined,
  };
  const service: ServiceOptions = {
    socket,
    module: new URL("../devices/blk/mod.ts", import.meta.url),
    options: blk,
    name,
    type: "blk",
    log,
    pollUs: flags.pollUs ?? DEFAULT_POLL_US,
    ...access,
  };
  return { socket, service, blk };
}

/**
 * The QEMU 7.2 arguments attaching a vhost-user-blk device of `queues` queues on `socket`.
 * `num-queues` is always given: without it QEMU asks for one queue per vCPU, and a guest with
 * more vCPUs than the device has queues does not start.
 */
export function blkQemuArgs(socket: string, id: string, queues: number): string[] {
  return [
    "-chardev",
    `socket,id=${id},path=${socket},reconnect=1`,
    "-device",
    `vhost-user-blk-pci,chardev=${id},num-queues=${queues}`,
  ];
}

function qemuLine(socket: string, queues: number): string {
  const [c, chardev, d, device] = blkQemuArgs(socket, "vhostd0", queues);
  return [
    "qemu-system-x86_64 -m 1G \\",
    "  -object memory-backend-memfd,id=mem,size=1G,share=on -machine q35,memory-backend=mem \\",
    `  ${c} ${chardev} \\`,
    `  ${d} ${device} ...`,
  ].join("\n");
}

function describe(plan: BlkPlan): string {
  const b = plan.blk;
  return `vhostd: serving ${b.path} (${sizeText(b.sizeBytes)}, ${
    b.readOnly ? "read-only" : "read-write"
  }, ` +
    `${b.queues} queue${
      b.queues > 1 ? "s" : ""
    }) on ${plan.socket}\nAttach it to QEMU 7.2 or newer with:\n` +
    qemuLine(plan.socket, b.queues) + "\n";
}

/** `vhostd blk`. */
export async function cmdBlk(args: string[]): Promise<number> {
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
        image: { type: "string" },
        "blk-file": { type: "string" },
        "read-only": { type: "boolean" },
        queues: { type: "string" },
        direct: { type: "boolean" },
        "io-engine": { type: "string" },
        serial: { type: "string" },
        "no-locking": { type: "boolean" },
      },
    })
  );
  if (values.help) {
    console.log(BLK_HELP);
    return 0;
  }
  const socket = deviceSocket(values, "blk");
  if (values.image !== undefined && values["blk-file"] !== undefined) {
    throw new UsageError("--image and --blk-file are the same option; give one");
  }
  const image = values.image ?? values["blk-file"];
  if (!image) throw new UsageError("blk needs --image FILE");
  const { log, extras } = parseServeOptions(values);
  const plan = planBlk(
    socket,
    image,
    {
      readOnly: values["read-only"] ?? false,
      direct: values.direct ?? false,
      ioEngine: parseIoEngine(values["io-engine"]),
      queues: parseIntOption("queues", values.queues, DEFAULT_BLK_QUEUES, 1, 64),
      pollUs: parsePollUs(values, DEFAULT_POLL_US),
      serial: values.serial,
      locking: !values["no-locking"],
    },
    log,
    parseAccess(values),
  );
  return await runServices([plan.service], log, describe(plan), extras);
}

/** `--io-engine`: one of {@link BLK_IO_ENGINES}, `auto` when absent. */
function parseIoEngine(s: string | undefined): BlkIoEngine {
  if (s === undefined) return "auto";
  if (!(BLK_IO_ENGINES as readonly string[]).includes(s)) {
    throw new UsageError(`--io-engine must be one of ${BLK_IO_ENGINES.join(", ")}, not "${s}"`);
  }
  return s as BlkIoEngine;
}

/** `vhostd start`. */
export async function cmdStart(args: string[]): Promise<number> {
  const { values } = usage(() =>
    parseArgs({ args, strict: true, options: { ...serveOptions, ...accessOptions } })
  );
  if (values.help) {
    console.log(START_HELP);
    return 0;
  }
  const { log, extras } = parseServeOptions(values);
  const home = Deno.env.get("HOME") ?? "/root";
  const dir = `${Deno.env.get("XDG_STATE_HOME") ?? `${home}/.local/state`}/vhostd/default`;
  Deno.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const image = `${dir}/disk.img`;
  try {
    Deno.statSync(image);
  } catch {
    const f = Deno.openSync(image, { create: true, write: true });
    f.truncateSync(1 << 30);
    f.close();
  }
  const plan = planBlk(
    `${dir}/blk.sock`,
    image,
    { readOnly: false, direct: false, queues: DEFAULT_BLK_QUEUES },
    log,
    parseAccess(values),
  );
  return await runServices([plan.service], log, describe(plan), extras);
}

/**
 * The `blk` planner of config files. Fields: `image` (required), `socket`, `readOnly`,
 * `direct`, `ioEngine` (`auto`, `sync` or `uring`; default `auto`), `queues` (1-64, default
 * {@link DEFAULT_BLK_QUEUES}), `pollUs` (0-1000), `serial`, `locking` (default true).
 */
export function planBlkDevice(ctx: PlanContext): DevicePlan {
  const f = ctx.fields;
  const image = f.string("image", true);
  try {
    const info = Deno.statSync(image);
    if (!info.isFile && !info.isBlockDevice) {
      throw new ConfigError(f.at("image"), `${image} is not a regular file or block device`);
    }
  } catch (e) {
    if (e instanceof ConfigError) throw e;
    if (e instanceof Deno.errors.NotFound) {
      throw new ConfigError(f.at("image"), `file not found: ${image}`);
    }
    throw new ConfigError(f.at("image"), (e as Error).message);
  }
  const flags: BlkFlags = {
    readOnly: f.boolean("readOnly", false),
    direct: f.boolean("direct", false),
    ioEngine: f.choice("ioEngine", BLK_IO_ENGINES, "auto"),
    queues: f.integer("queues", DEFAULT_BLK_QUEUES, 1, 64),
    pollUs: f.integer("pollUs", DEFAULT_POLL_US, 0, MAX_POLL_US),
    serial: f.string("serial"),
    name: ctx.id,
    locking: f.boolean("locking", true),
  };
  if (flags.serial !== undefined && new TextEncoder().encode(flags.serial).length > 20) {
    throw new ConfigError(f.at("serial"), "must be at most 20 bytes");
  }
  const socket = ctx.socketPath();
  let plan: BlkPlan;
  try {
    plan = planBlk(socket, image, flags, ctx.log, ctx.access);
  } catch (e) {
    // openImage's messages already name the image; say which field it came from.
    throw new ConfigError(f.at("image"), (e as Error).message);
  }
  const b = plan.blk;
  return {
    services: [plan.service],
    describe: `${ctx.id}: blk ${b.path} (${sizeText(b.sizeBytes)}, ${
      b.readOnly ? "read-only" : "read-write"
    }, ${b.queues} queue${b.queues > 1 ? "s" : ""}) on ${socket}`,
    qemuArgs: blkQemuArgs(socket, ctx.id, b.queues),
    release: () => closeQuietly(b.fd),
  };
}
