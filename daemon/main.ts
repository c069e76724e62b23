/**
 * The `vhostd` command line: `deno task vhostd <command> [options]`.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { openImage, UsageError } from "../devices/blk/image.ts";
import type { BlkOptions } from "../devices/blk/device.ts";
import { defaultLogSettings, LOG_LEVELS, type LogSettings } from "./log.ts";
import type { ServiceOptions } from "./service.ts";
import { runServices } from "./serve.ts";
import { cmdProbe } from "./probe.ts";
import { cmdLoad } from "./load.ts";
import { cmdConsole } from "./console.ts";

const HELP = `vhostd: virtio devices for QEMU over vhost-user

Usage: deno task vhostd <command> [options]

Commands:
  blk      serve a disk image as a virtio-blk device
  start    serve a 1 GiB scratch disk with default settings (no options needed)
  console  serve a virtio console with logs, scrollback and attach sockets
  probe    show what any vhost-user back-end offers (features, queues, config)
  load     measure a vhost-user-blk back-end: IOPS, MB/s, latency
  help     show this text, or "help <command>"

Run "deno task vhostd <command> --help" for a command's options.
`;

const BLK_HELP = `Usage: deno task vhostd blk --socket PATH --image FILE [options]

Serves FILE (a raw image or a block device) as a virtio-blk device on the vhost-user
socket PATH, until SIGINT or SIGTERM.

Options:
  --socket PATH       vhost-user socket to create (required)
  --image FILE        raw disk image or block device (required)
  --read-only         serve read-only (VIRTIO_BLK_F_RO); writes fail
  --queues N          queues offered, 1-64 (default 16; QEMU uses one per vCPU by default)
  --direct            open the image with O_DIRECT (bypass the host page cache)
  --serial ID         serial number the guest sees (default: vhostd-<image name>)
  --socket-mode MODE  octal mode of the socket file (default 0600: only the owner may connect)
  --socket-group GRP  group of the socket file (name or gid; use with --socket-mode 0660)
  --allow-uid UID     accept front-ends of these uids only (repeatable or comma-separated)
  --log-level LEVEL   trace, debug, info, warning, error (default info)
  --log-format FMT    text or json (default text)
  -h, --help          show this text

Example:
  deno task vhostd blk --socket /run/vhostd/vm1-disk.sock --image /var/lib/vm1.img --queues 4
`;

const START_HELP = `Usage: deno task start

Creates a sparse 1 GiB image (once) in vhostd's own folder
($XDG_STATE_HOME/vhostd/default, or ~/.local/state/vhostd/default) and serves it as a
virtio-blk device, printing the QEMU arguments that attach to it.
`;

const commonOptions = {
  "log-level": { type: "string" },
  "log-format": { type: "string" },
  "socket-mode": { type: "string" },
  "socket-group": { type: "string" },
  "allow-uid": { type: "string", multiple: true },
  help: { type: "boolean", short: "h" },
} as const;

function logSettings(values: { "log-level"?: string; "log-format"?: string }): LogSettings {
  const level = values["log-level"] ?? defaultLogSettings.level;
  if (!(LOG_LEVELS as readonly string[]).includes(level)) {
    throw new UsageError(`--log-level must be one of ${LOG_LEVELS.join(", ")}, not "${level}"`);
  }
  const format = values["log-format"] ?? defaultLogSettings.format;
  if (format !== "text" && format !== "json") {
    throw new UsageError(`--log-format must be text or json, not "${format}"`);
  }
  return { level: level as LogSettings["level"], format };
}

function parseMode(s: string | undefined): number {
  if (s === undefined) return 0o600;
  if (!/^[0-7]{3,4}$/.test(s)) {
    throw new UsageError(`--socket-mode must be octal like 0660, not "${s}"`);
  }
  return parseInt(s, 8);
}

/** Who may connect: the socket's mode and group, and the peer uids accepted. */
interface Access {
  socketMode: number;
  socketGroup?: number;
  allowUids?: number[];
}

function parseAccess(
  values: { "socket-mode"?: string; "socket-group"?: string; "allow-uid"?: string[] },
): Access {
  const access: Access = { socketMode: parseMode(values["socket-mode"]) };
  const group = values["socket-group"];
  if (group !== undefined) {
    if (/^\d+$/.test(group)) access.socketGroup = Number(group);
    else {
      const line = Deno.readTextFileSync("/etc/group").split("\n").find((l) =>
        l.split(":")[0] === group
      );
      if (!line) throw new UsageError(`--socket-group: no group named "${group}"`);
      access.socketGroup = Number(line.split(":")[2]);
    }
  }
  const uids = values["allow-uid"]?.flatMap((s) => s.split(","));
  if (uids) {
    access.allowUids = uids.map((u) => {
      if (!/^\d+$/.test(u)) throw new UsageError(`--allow-uid takes numeric uids, not "${u}"`);
      return Number(u);
    });
  }
  return access;
}

function parseIntOption(
  name: string,
  s: string | undefined,
  def: number,
  min: number,
  max: number,
) {
  if (s === undefined) return def;
  const n = Number(s);
  if (!Number.isInteger(n) || n < min || n > max) {
    throw new UsageError(`--${name} must be a whole number from ${min} to ${max}, not "${s}"`);
  }
  return n;
}

/** Runs parseArgs, turning its errors (unknown flag, missing value) into a UsageError. */
function usage<T>(parse: () => T): T {
  try {
    return parse();
  } catch (e) {
    throw new UsageError((e as Error).message.split("\n")[0]);
  }
}

/** Everything needed to serve one block device. */
interface BlkPlan {
  socket: string;
  service: ServiceOptions;
  blk: BlkOptions;
}

function planBlk(
  socket: string,
  image: string,
  flags: { readOnly: boolean; direct: boolean; queues: number; serial?: string },
  log: LogSettings,
  access: Access,
): BlkPlan {
  const { fd, sizeBytes } = openImage(image, flags.readOnly, flags.direct);
  const base = image.split("/").pop() ?? "disk";
  const blk: BlkOptions = {
    fd,
    path: image,
    sizeBytes,
    readOnly: flags.readOnly,
    queues: flags.queues,
    serial: flags.serial ?? `vhostd-${base}`.slice(0, 20),
    faultKillAfter: Number(Deno.env.get("VHOSTD_FAULT_KILL_AFTER") ?? 0) || undefined,
  };
  const service: ServiceOptions = {
    socket,
    module: new URL("../devices/blk/mod.ts", import.meta.url),
    options: blk,
    name: "blk",
    log,
    ...access,
  };
  return { socket, service, blk };
}

function qemuLine(socket: string): string {
  return [
    "qemu-system-x86_64 -m 1G \\",
    "  -object memory-backend-memfd,id=mem,size=1G,share=on -machine q35,memory-backend=mem \\",
    `  -chardev socket,id=vhostd0,path=${socket},reconnect=1 \\`,
    "  -device vhost-user-blk-pci,chardev=vhostd0 ...",
  ].join("\n");
}

function describe(plan: BlkPlan): string {
  const b = plan.blk;
  const mib = (b.sizeBytes / 1048576).toFixed(b.sizeBytes % 1048576 ? 1 : 0);
  return `vhostd: serving ${b.path} (${mib} MiB, ${b.readOnly ? "read-only" : "read-write"}, ` +
    `${b.queues} queues) on ${plan.socket}\nAttach it to QEMU 7.2 or newer with:\n` +
    qemuLine(plan.socket) + "\n";
}

async function cmdBlk(args: string[]): Promise<number> {
  const { values } = usage(() =>
    parseArgs({
      args,
      strict: true,
      options: {
        ...commonOptions,
        socket: { type: "string" },
        image: { type: "string" },
        "read-only": { type: "boolean" },
        queues: { type: "string" },
        direct: { type: "boolean" },
        serial: { type: "string" },
      },
    })
  );
  if (values.help) {
    console.log(BLK_HELP);
    return 0;
  }
  if (!values.socket) throw new UsageError("blk needs --socket PATH");
  if (!values.image) throw new UsageError("blk needs --image FILE");
  const log = logSettings(values);
  const plan = planBlk(
    values.socket,
    values.image,
    {
      readOnly: values["read-only"] ?? false,
      direct: values.direct ?? false,
      queues: parseIntOption("queues", values.queues, 16, 1, 64),
      serial: values.serial,
    },
    log,
    parseAccess(values),
  );
  return await runServices([plan.service], log, describe(plan));
}

async function cmdStart(args: string[]): Promise<number> {
  const { values } = usage(() => parseArgs({ args, strict: true, options: commonOptions }));
  if (values.help) {
    console.log(START_HELP);
    return 0;
  }
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
  const log = logSettings(values);
  const plan = planBlk(
    `${dir}/blk.sock`,
    image,
    {
      readOnly: false,
      direct: false,
      queues: 16,
    },
    log,
    parseAccess(values),
  );
  return await runServices([plan.service], log, describe(plan));
}

const commands: Record<string, (args: string[]) => Promise<number>> = {
  blk: cmdBlk,
  start: cmdStart,
  probe: cmdProbe,
  load: cmdLoad,
  console: cmdConsole,
};

/** Runs the command line; returns the exit code. */
export async function main(args: string[]): Promise<number> {
  const [command, ...rest] = args;
  if (command === undefined || command === "help" || command === "--help" || command === "-h") {
    const sub = rest[0];
    if (sub && commands[sub]) return await commands[sub](["--help"]);
    console.log(HELP);
    return command === undefined ? 2 : 0;
  }
  const run = commands[command];
  if (!run) {
    console.error(`vhostd: unknown command "${command}" (try "deno task vhostd help")`);
    return 2;
  }
  try {
    return await run(rest);
  } catch (e) {
    if (e instanceof UsageError) {
      console.error(`vhostd ${command}: ${e.message}`);
      return 2;
    }
    console.error(`vhostd ${command}: ${(e as Error).message}`);
    return 1;
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
