/**
 * `vhostd console`: the console server, in vhost-user mode (vhostd is the virtio-console device;
 * QEMU >= 10.2's `vhost-user-test-device-pci` fronts it) or in character-device mode (QEMU's own
 * virtio-console, any version, connects a `-chardev socket` per port).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { getLogger } from "@logtape/logtape";
import { UsageError } from "../devices/blk/image.ts";
import type { ConsoleOptions } from "../devices/console/device.ts";
import {
  DEFAULT_INPUT_LIMIT,
  DEFAULT_SCROLLBACK,
  type PortConfig,
} from "../devices/console/port_hub.ts";
import type { ChardevWorkerInit, ChardevWorkerReport } from "../devices/console/chardev_worker.ts";
import { queueCount } from "../devices/console/protocol.ts";
import { createEventFd, signalEventFd } from "../sys/event.ts";
import { closeQuietly, O, openFile } from "../sys/libc.ts";
import { defaultLogSettings, LOG_LEVELS, type LogSettings, setupLogging } from "./log.ts";
import { runServices } from "./serve.ts";
import { bindSocket } from "./service.ts";

const O_APPEND = 0o2000;

/** `vhostd console --help`. */
export const CONSOLE_HELP = `Usage: deno task vhostd console --socket PATH [options]

Serves a console with per-port logs, scrollback and attach sockets, until SIGINT or SIGTERM.

Two modes:
  vhost-user (default)  vhostd is the virtio-console device (id 3) on the vhost-user socket
                        PATH. Needs QEMU 10.2 or newer (vhost-user-test-device-pci):
      -chardev socket,id=con0,path=PATH,reconnect=1
      -device vhost-user-test-device-pci,chardev=con0,virtio-id=3,num_vqs=<2*(ports+1)>,config_size=12
  --chardev             QEMU's own virtio-console (any QEMU, 7.2 included) connects a plain
                        character device per port; port 0 to PATH, port N to PATH.<name>.chardev:
      -chardev socket,id=con0,path=PATH,reconnect=1 -device virtio-serial-pci
      -device virtconsole,chardev=con0
      -chardev socket,id=con1,path=PATH.agent.chardev,reconnect=1
      -device virtserialport,chardev=con1,name=agent

Ports: port 0 is the console (/dev/hvc0 in the guest), named "console". Ports 1.. are named
channels (/dev/virtio-ports/<name>), named by --name in order (default port<N>).

Per port:
  attach socket  PATH.<name> (Unix stream; any number of clients). A client first gets the
                 scrollback, then live output; what it sends goes to the guest. Sending
                 ESC [ 8 ; ROWS ; COLS t resizes the console instead.
  log            every byte the guest wrote, appended: --log FILE for port 0 and FILE.<name>
                 for the others, or PATH.<name>.log without --log.

Options:
  --socket PATH       vhost-user socket (or port 0's chardev socket with --chardev); required
  --chardev           character-device mode (see above)
  --ports N           number of ports, 1-31 (default: 1 + number of --name)
  --name NAME         name of the next port from port 1 on; repeat for more ports
  --log FILE          log file of port 0 (others get FILE.<name>)
  --attach unix:PATH  attach socket of the next port from port 0 on (repeatable); only unix:
                      is built (tcp:, pty and stdio are not)
  --size COLSxROWS    initial console size (default 80x24)
  --scrollback BYTES  scrollback per port (default ${DEFAULT_SCROLLBACK})
  --socket-mode MODE  octal mode of every socket file (default 0600)
  --log-level LEVEL   trace, debug, info, warning, error (default info)
  --log-format FMT    text or json (default text)
  -h, --help          show this text

Example:
  deno task vhostd console --socket /run/vm1/con.sock --name agent --log /var/log/vm1.console
  socat -,raw,echo=0 UNIX-CONNECT:/run/vm1/con.sock.console
`;

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** A fully resolved console server plan. */
export interface ConsolePlan {
  /** vhost-user socket, or port 0's chardev socket. */
  socket: string;
  /** Character-device mode. */
  chardev: boolean;
  /** Port names, port 0 first. */
  names: string[];
  /** Attach socket per port. */
  attachPaths: string[];
  /** Log file per port. */
  logPaths: string[];
  /** Chardev socket per port (chardev mode). */
  chardevPaths: string[];
  /** Initial size. */
  cols: number;
  /** Initial size. */
  rows: number;
  /** Scrollback bytes per port. */
  scrollback: number;
  /** Socket file mode. */
  socketMode: number;
}

/** Turns the command line into a plan, or throws {@link UsageError}. */
export function planConsole(args: string[]): ConsolePlan | "help" {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      strict: true,
      options: {
        socket: { type: "string" },
        chardev: { type: "boolean" },
        ports: { type: "string" },
        name: { type: "string", multiple: true },
        log: { type: "string" },
        attach: { type: "string", multiple: true },
        size: { type: "string" },
        scrollback: { type: "string" },
        "socket-mode": { type: "string" },
        "log-level": { type: "string" },
        "log-format": { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (e) {
    throw new UsageError((e as Error).message.split("\n")[0]);
  }
  const v = parsed.values;
  if (v.help) return "help";
  if (!v.socket) throw new UsageError("console needs --socket PATH");
  const socket = v.socket;
  const given = v.name ?? [];
  for (const n of given) {
    if (!NAME_RE.test(n)) {
      throw new UsageError(`--name must be letters, digits, ".", "_" or "-", not "${n}"`);
    }
  }
  const ports = v.ports === undefined ? given.length + 1 : Number(v.ports);
  if (!Number.isInteger(ports) || ports < 1 || ports > 31) {
    throw new UsageError(`--ports must be a whole number from 1 to 31, not "${v.ports}"`);
  }
  if (given.length > ports - 1) {
    throw new UsageError(`${given.length} --name for ${ports} port(s): port 0 is the console`);
  }
  const names = ["console"];
  for (let i = 1; i < ports; i++) names.push(given[i - 1] ?? `port${i}`);
  if (new Set(names).size !== names.length) {
    throw new UsageError(
      `port names must be unique (and "console" is port 0): ${names.join(", ")}`,
    );
  }
  const attach = v.attach ?? [];
  if (attach.length > ports) throw new UsageError(`${attach.length} --attach for ${ports} port(s)`);
  const attachPaths = names.map((n, i) => {
    const a = attach[i];
    if (a === undefined) return `${socket}.${n}`;
    if (a.startsWith("unix:") && a.length > 5) return a.slice(5);
    if (/^(tcp:|pty$|stdio$)/.test(a)) {
      throw new UsageError(`--attach ${a} is not built yet; use unix:PATH`);
    }
    throw new UsageError(`--attach must be unix:PATH, not "${a}"`);
  });
  const logPaths = names.map((n, i) =>
    v.log === undefined ? `${socket}.${n}.log` : i === 0 ? v.log : `${v.log}.${n}`
  );
  const chardevPaths = names.map((n, i) => i === 0 ? socket : `${socket}.${n}.chardev`);
  const size = /^(\d{1,5})x(\d{1,5})$/.exec(v.size ?? "80x24");
  if (!size || Number(size[1]) > 0xffff || Number(size[2]) > 0xffff) {
    throw new UsageError(`--size must be COLSxROWS like 120x40, not "${v.size}"`);
  }
  const scrollback = v.scrollback === undefined ? DEFAULT_SCROLLBACK : Number(v.scrollback);
  if (!Number.isInteger(scrollback) || scrollback < 1024 || scrollback > 64 << 20) {
    throw new UsageError(`--scrollback must be from 1024 to ${64 << 20} bytes`);
  }
  const all = [socket, ...attachPaths, ...(v.chardev ? chardevPaths.slice(1) : [])];
  if (new Set(all).size !== all.length) throw new UsageError("two sockets would share a path");
  const mode = v["socket-mode"] ?? "0600";
  if (!/^[0-7]{3,4}$/.test(mode)) {
    throw new UsageError(`--socket-mode must be octal like 0660, not "${mode}"`);
  }
  return {
    socket,
    chardev: v.chardev ?? false,
    names,
    attachPaths,
    logPaths,
    chardevPaths,
    cols: Number(size[1]),
    rows: Number(size[2]),
    scrollback,
    socketMode: parseInt(mode, 8),
  };
}

function logSettingsOf(args: string[]): LogSettings {
  const i = args.indexOf("--log-level"), j = args.indexOf("--log-format");
  const level = i >= 0 ? args[i + 1] : defaultLogSettings.level;
  const format = j >= 0 ? args[j + 1] : defaultLogSettings.format;
  if (!(LOG_LEVELS as readonly string[]).includes(level)) {
    throw new UsageError(`--log-level must be one of ${LOG_LEVELS.join(", ")}, not "${level}"`);
  }
  if (format !== "text" && format !== "json") {
    throw new UsageError(`--log-format must be text or json, not "${format}"`);
  }
  return { level: level as LogSettings["level"], format };
}

/** Opens logs and binds attach sockets in the main thread, so problems are usage errors. */
function openPorts(plan: ConsolePlan, opened: { fds: number[]; paths: string[] }): PortConfig[] {
  return plan.names.map((name, id) => {
    let logFd: number;
    try {
      logFd = openFile(plan.logPaths[id], O.WRONLY | O.CREAT | O_APPEND, 0o640);
    } catch (e) {
      throw new UsageError(`cannot open log ${plan.logPaths[id]}: ${(e as Error).message}`);
    }
    opened.fds.push(logFd);
    const attachFd = bindSocket(plan.attachPaths[id], plan.socketMode);
    opened.fds.push(attachFd);
    opened.paths.push(plan.attachPaths[id]);
    return {
      id,
      name,
      attachFd,
      attachPath: plan.attachPaths[id],
      logFd,
      scrollbackBytes: plan.scrollback,
      inputBytes: DEFAULT_INPUT_LIMIT,
    };
  });
}

function banner(plan: ConsolePlan): string {
  const lines = [
    `vhostd: serving console (${plan.names.length} port(s), ${
      plan.chardev ? "character-device" : "vhost-user"
    } mode) on ${plan.socket}`,
  ];
  plan.names.forEach((n, i) => {
    const via = plan.chardev ? ` chardev ${plan.chardevPaths[i]},` : "";
    lines.push(`  port ${i} ${n}:${via} attach ${plan.attachPaths[i]}, log ${plan.logPaths[i]}`);
  });
  if (plan.chardev) {
    lines.push("Attach it to QEMU (any version) with:");
    lines.push("  -device virtio-serial-pci \\");
    plan.names.forEach((n, i) => {
      lines.push(`  -chardev socket,id=con${i},path=${plan.chardevPaths[i]},reconnect=1 \\`);
      lines.push(
        i === 0
          ? `  -device virtconsole,chardev=con0 \\`
          : `  -device virtserialport,chardev=con${i},name=${n} \\`,
      );
    });
  } else {
    lines.push("Attach it to QEMU 10.2 or newer with:");
    lines.push(`  -chardev socket,id=con0,path=${plan.socket},reconnect=1 \\`);
    lines.push(
      `  -device vhost-user-test-device-pci,chardev=con0,virtio-id=3,num_vqs=${
        queueCount(plan.names.length)
      },config_size=12`,
    );
  }
  return lines.join("\n");
}

/** Runs `vhostd console`. */
export async function cmdConsole(args: string[]): Promise<number> {
  const plan = planConsole(args);
  if (plan === "help") {
    console.log(CONSOLE_HELP);
    return 0;
  }
  const log = logSettingsOf(args);
  const opened = { fds: [] as number[], paths: [] as string[] };
  const cleanup = () => {
    for (const fd of opened.fds) closeQuietly(fd);
    for (const p of opened.paths) {
      try {
        Deno.removeSync(p);
      } catch {
        // never created
      }
    }
  };
  let ports: PortConfig[];
  try {
    ports = openPorts(plan, opened);
  } catch (e) {
    cleanup();
    throw e;
  }
  if (plan.chardev) return await runChardev(plan, ports, log, opened, cleanup);
  const options: ConsoleOptions = { ports, cols: plan.cols, rows: plan.rows };
  try {
    return await runServices(
      [{
        socket: plan.socket,
        module: new URL("../devices/console/mod.ts", import.meta.url),
        options,
        name: "console",
        log,
        socketMode: plan.socketMode,
      }],
      log,
      banner(plan),
    );
  } finally {
    // The worker closed the ports; this removes whatever a failed start left behind.
    for (const p of opened.paths) {
      try {
        Deno.removeSync(p);
      } catch {
        // removed by the worker
      }
    }
  }
}

async function runChardev(
  plan: ConsolePlan,
  ports: PortConfig[],
  log: LogSettings,
  opened: { fds: number[]; paths: string[] },
  cleanup: () => void,
): Promise<number> {
  const chardevFds: number[] = [];
  let shutdownFd = -1;
  try {
    for (const p of plan.chardevPaths) {
      chardevFds.push(bindSocket(p, plan.socketMode));
      opened.fds.push(chardevFds[chardevFds.length - 1]);
      opened.paths.push(p);
    }
    shutdownFd = createEventFd();
  } catch (e) {
    cleanup();
    throw e;
  }
  await setupLogging(log);
  const logger = getLogger(["vhostd", "daemon"]);
  const worker = new Worker(new URL("../devices/console/chardev_worker.ts", import.meta.url), {
    type: "module",
  });
  let onReady!: () => void, onFail!: (e: Error) => void, onDone!: () => void;
  const ready = new Promise<void>((res, rej) => [onReady, onFail] = [res, rej]);
  const done = new Promise<void>((res) => onDone = res);
  worker.onmessage = (e: MessageEvent<ChardevWorkerReport>) => {
    if (e.data.type === "ready") onReady();
    else if (e.data.type === "failed") onFail(new Error(e.data.message));
    else onDone();
  };
  worker.onerror = (e) => {
    e.preventDefault();
    onFail(new Error(`console worker crashed: ${e.message}`));
    onDone();
  };
  const init: ChardevWorkerInit = {
    ports,
    chardevFds,
    chardevPaths: plan.chardevPaths,
    shutdownFd,
    log,
  };
  worker.postMessage(init);
  const finish = () => {
    worker.terminate();
    closeQuietly(shutdownFd);
    for (const p of opened.paths) {
      try {
        Deno.removeSync(p);
      } catch {
        // removed by the worker
      }
    }
  };
  try {
    await ready;
  } catch (e) {
    finish();
    throw e;
  }
  console.log(banner(plan));
  let stopping = false;
  const onSignal = (sig: Deno.Signal) => {
    if (stopping) {
      finish();
      Deno.exit(1);
    }
    stopping = true;
    logger.info("{signal}: stopping", { signal: sig });
    signalEventFd(shutdownFd);
  };
  const sigint = () => onSignal("SIGINT");
  const sigterm = () => onSignal("SIGTERM");
  Deno.addSignalListener("SIGINT", sigint);
  Deno.addSignalListener("SIGTERM", sigterm);
  try {
    await done;
    return stopping ? 0 : 1;
  } finally {
    Deno.removeSignalListener("SIGINT", sigint);
    Deno.removeSignalListener("SIGTERM", sigterm);
    finish();
  }
}
