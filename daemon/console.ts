/**
 * `vhostd console`: the console server, in vhost-user mode (vhostd is the virtio-console device;
 * QEMU >= 10.2's `vhost-user-test-device-pci` fronts it) or in character-device mode (QEMU's own
 * virtio-console, any version, connects a `-chardev socket` per port). Also the `console` planner
 * of config files (vhost-user mode only).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { getLogger } from "../log/mod.ts";
import { UsageError } from "../sys/errors.ts";
import type { ConsoleOptions } from "../devices/console/device.ts";
import {
  type AttachAccess,
  DEFAULT_INPUT_LIMIT,
  DEFAULT_MAX_CLIENTS,
  DEFAULT_SCROLLBACK,
  type PortConfig,
  type TerminalConfig,
} from "../devices/console/port_hub.ts";
import { parseToken } from "../devices/console/attach_token.ts";
import {
  DEFAULT_LOG_MAX_BYTES,
  MIN_LOG_MAX_BYTES,
  type OpenedLog,
  openLogFile,
} from "../devices/console/console_log.ts";
import type { ChardevWorkerInit, ChardevWorkerReport } from "../devices/console/chardev_worker.ts";
import { queueCount } from "../devices/console/protocol.ts";
import { createEventFd, signalEventFd } from "../sys/event.ts";
import { closeQuietly, O, openFile } from "../sys/libc.ts";
import {
  type IpAddress,
  ipText,
  isLoopback,
  listenTcp,
  parseIpAddress,
  type SocketFileMode,
} from "../sys/socket.ts";
import { isTerminal, makeRaw, openPty, restoreTerminal } from "../sys/pty.ts";
import { type LogSettings, setupLogging } from "../log/setup.ts";
import { runServices } from "./serve.ts";
import { bindSocket, type ServiceOptions } from "./service.ts";
import {
  type Access,
  accessOptions,
  conventionOptions,
  deviceSocket,
  parseAccess,
  parseGroup,
  parseIntOption,
  parseMode,
  parseServeOptions,
  parseUids,
  SERVE_OPTIONS_HELP,
  type ServeExtras,
  serveOptions,
  usage,
  VM_OPTION_HELP,
  vmOptions,
} from "./cli.ts";
import {
  ConfigError,
  type DevicePlan,
  groupField,
  modeField,
  type PlanContext,
  uidsField,
} from "./config.ts";

const O_APPEND = 0o2000;
const O_NOCTTY = 0o400;

/** Ports of one console at most (port 0 included). */
export const MAX_PORTS = 31;
/** Smallest scrollback per port, in bytes. */
export const MIN_SCROLLBACK = 1024;
/** Largest scrollback per port, in bytes. */
export const MAX_SCROLLBACK = 64 << 20;
/** Largest log rotation size accepted, in bytes (1 TiB: a cap is the point). */
export const MAX_LOG_MAX_BYTES = 2 ** 40;
/** Most socket clients a port may be allowed at once. */
export const MAX_ATTACH_CLIENTS = 1024;

/** `vhostd console --help`. */
export const CONSOLE_HELP = `Usage: vhostd console --socket PATH [options]

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
                        Only vhostd's own uid, root and --allow-uid may connect as QEMU
                        (SO_PEERCRED): whoever holds a port's socket reads what is typed into it.

Ports: port 0 is the console (/dev/hvc0 in the guest), named "console". Ports 1.. are named
channels (/dev/virtio-ports/<name>), named by --name in order (default port<N>).

Per port:
  attach socket  PATH.<name> (Unix stream, mode 0600 whatever --socket-mode says), or what
                 --attach says. A client first gets the scrollback, then live output; what it
                 sends goes to the guest. Sending ESC [ 8 ; ROWS ; COLS t resizes the console
                 instead. Only vhostd's own uid, root and --attach-allow-uid may attach
                 (SO_PEERCRED), at most --attach-max-clients at once.
  log            every byte the guest wrote, appended: --log FILE for port 0 and FILE.<name>
                 for the others, or PATH.<name>.log without --log. A symlink, or a file that
                 is not regular or has other hard links, is refused. At --log-max-size the log
                 becomes FILE.1 (replacing the one before) and a new one starts.

Attach modes (--attach, one per port from port 0 on; ports without one get unix:PATH.<name>):
  unix:SOCK       the attach socket is SOCK instead of PATH.<name>
  tcp:[HOST:]PORT the attach socket is TCP on HOST (default 127.0.0.1; [::1] for IPv6), in place
                  of the Unix one; PORT 0 picks a free port (printed in the banner). Needs
                  --attach-token-file: a client's first line (ended by Enter) must be the token,
                  else it is disconnected. A HOST that is not loopback is refused unless
                  --attach-any-address is given.
  pty             a pseudo-terminal (mode 0600) attached for the daemon's life, besides the Unix
                  socket; its path is printed and linked as PATH.<name>.pty (screen, minicom or
                  cat open it). Output nobody reads fills the pty's buffer (about 20 KiB) and is
                  then skipped (the log and scrollback keep all). A size set on the pty reaches
                  the guest with the next input from it.
  stdio           port 0 only: the daemon's own stdin and stdout (a terminal or a pipe), besides
                  the Unix socket. A terminal is put in raw mode (Ctrl-C still stops vhostd) and
                  restored on exit; its size becomes the console's, and a resize reaches the guest
                  with the next keystroke. The banner is printed to stdout before guest output.

Options:
  --socket PATH       vhost-user socket (or port 0's chardev socket with --chardev); required
                      (--socket-path is the same)
  --chardev           character-device mode (see above)
  --ports N           number of ports, 1-${MAX_PORTS} (default: 1 + number of --name)
  --name NAME         name of the next port from port 1 on; repeat for more ports
  --log FILE          log file of port 0 (others get FILE.<name>)
  --log-max-size BYTES  rotate each log at this size: 0 (never) or ${MIN_LOG_MAX_BYTES} and up
                      (default ${DEFAULT_LOG_MAX_BYTES}, 16 MiB: twice that on disk per port at most)
  --attach MODE       unix:SOCK, tcp:[HOST:]PORT, pty or stdio for the next port from port 0
                      on (repeatable; see above)
  --attach-mode MODE  octal mode of the Unix attach sockets (default 0600)
  --attach-group GRP  group of the Unix attach sockets (name or gid; with --attach-mode 0660)
  --attach-allow-uid UID  also let these uids attach over Unix sockets (repeatable or
                      comma-separated; their access to the socket file is needed too)
  --attach-token-file FILE  the token tcp: clients must send first (16-256 bytes, one line; the
                      file must not be readable by every user)
  --attach-max-clients N  socket clients per port at once, 1-${MAX_ATTACH_CLIENTS} (default ${DEFAULT_MAX_CLIENTS});
                      more are told so and disconnected
  --attach-any-address  allow tcp: on an address that is not loopback
  --size COLSxROWS    initial console size (default 80x24; a terminal on stdio gives its own)
  --scrollback BYTES  scrollback per port, ${MIN_SCROLLBACK}-${MAX_SCROLLBACK} (default ${DEFAULT_SCROLLBACK})
  --socket-mode MODE  octal mode of the vhost-user socket or the chardev sockets (default 0600;
                      attach sockets keep their own, see --attach-mode)
  --socket-group GRP  group of those sockets (name or gid; use with --socket-mode 0660)
  --allow-uid UID     accept front-ends of these uids only on the vhost-user socket; with
                      --chardev, the uids besides vhostd's own and root whose QEMU may connect
                      (repeatable or comma-separated)
${VM_OPTION_HELP}
${SERVE_OPTIONS_HELP}
  (--metrics and --control need vhost-user mode)

Example:
  vhostd console --socket /run/vm1/con.sock --name agent --log /var/log/vm1.console
  socat -,raw,echo=0 UNIX-CONNECT:/run/vm1/con.sock.console
`;

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** How one port's clients attach (resolved from `--attach` or a config's `attach`). */
export interface PortAttach {
  /** Listening Unix socket, or null when {@link tcp} replaces it. */
  unix: string | null;
  /** Listening TCP address (port 0: the kernel chooses). */
  tcp: { addr: IpAddress; port: number } | null;
  /** A terminal attached for the daemon's life. */
  terminal: "pty" | "stdio" | null;
  /** The symlink to the pty (`pty` only). */
  ptyLink: string;
}

/**
 * Parses one attach value for the port named `name` of the console on `socket`; throws an Error
 * whose message completes "--attach ..." or "attach[i] ...". TCP defaults to loopback: a TCP
 * client is authenticated by the token alone, and whoever gets in types into the guest's console.
 */
export function parseAttach(
  text: string,
  socket: string,
  name: string,
  anyAddress: boolean,
  anyAddressName: string,
): PortAttach {
  const base: PortAttach = { unix: `${socket}.${name}`, tcp: null, terminal: null, ptyLink: "" };
  if (text.startsWith("unix:") && text.length > 5) return { ...base, unix: text.slice(5) };
  if (text === "pty") return { ...base, terminal: "pty", ptyLink: `${socket}.${name}.pty` };
  if (text === "stdio") return { ...base, terminal: "stdio" };
  const tcp = /^tcp:(?:(\[[^\]]*\]|[^:[\]]*):)?(\d{1,5})$/.exec(text);
  if (!tcp) {
    throw new Error(`must be unix:PATH, tcp:[HOST:]PORT, pty or stdio, not "${text}"`);
  }
  const port = Number(tcp[2]);
  if (port > 65535) throw new Error(`${text}: port must be 0-65535`);
  const host = tcp[1] === undefined || tcp[1] === "localhost"
    ? "127.0.0.1"
    : tcp[1].replace(/^\[(.*)\]$/, "$1");
  const addr = parseIpAddress(host);
  if (addr === null || (addr.family === 6) !== (tcp[1]?.startsWith("[") ?? false)) {
    throw new Error(
      `${text}: HOST must be an IPv4 address, [IPv6] in brackets, or localhost`,
    );
  }
  if (!isLoopback(addr) && !anyAddress) {
    throw new Error(
      `${text} would let anyone who reaches ${host} try to get into the console (only the token ` +
        `keeps them out); use a loopback address, or allow it with ${anyAddressName}`,
    );
  }
  return { ...base, unix: null, tcp: { addr, port } };
}

/** `HOST:PORT` of a TCP attach socket, IPv6 in brackets. */
function tcpText(addr: IpAddress, port: number): string {
  return addr.family === 6 ? `[${ipText(addr)}]:${port}` : `${ipText(addr)}:${port}`;
}

/** A fully resolved console server plan. */
export interface ConsolePlan {
  /** vhost-user socket, or port 0's chardev socket. */
  socket: string;
  /** Character-device mode. */
  chardev: boolean;
  /** Port names, port 0 first. */
  names: string[];
  /** How clients attach, per port. */
  attach: PortAttach[];
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
  /** Rotation size of every log (0: never). */
  logMaxBytes: number;
  /** Mode and group of the vhost-user or chardev sockets; the front-end uids they accept. */
  access: Access;
  /** Mode and group of the Unix attach sockets (their own: QEMU's group must not type in). */
  attachFile: SocketFileMode;
  /** Who may attach (the token read from its file), and how many at once. */
  attachAccess: AttachAccess;
}

/** What the command line and a config file both give, before it is checked. */
interface ConsoleRequest {
  /** vhost-user socket, or port 0's chardev socket. */
  socket: string;
  /** Character-device mode. */
  chardev: boolean;
  /** Names of ports 1.. (port 0 is "console"). */
  names: string[];
  /** Log file of port 0 (the others get FILE.<name>); default PATH.<name>.log per port. */
  log?: string;
  /** `--attach` values from port 0 on (default unix:PATH.<name>). */
  attach?: string[];
  /** Whether tcp: may bind an address that is not loopback. */
  anyAddress: boolean;
  /** What to name when refusing a non-loopback address (the flag or the config field). */
  anyAddressName: string;
  /** Whether stdio may be used (not in a config file: the daemon then runs as a service). */
  allowStdio: boolean;
  /** Initial size, COLSxROWS (default 80x24). */
  size?: string;
  /** Scrollback bytes per port (already range-checked by the caller). */
  scrollback: number;
  /** Rotation size of every log (0, or range-checked by the caller). */
  logMaxBytes: number;
  /** Socket access. */
  access: Access;
  /** Mode and group of the Unix attach sockets. */
  attachFile: SocketFileMode;
  /** Uids besides the daemon's and root that may attach over Unix sockets. */
  attachAllowUids: number[];
  /** The file holding the token of tcp: clients. */
  tokenFile?: string;
  /** What to name when tcp: has no token file (the flag or the config field). */
  tokenFileName: string;
  /** Socket clients per port at most (range-checked by the caller). */
  maxClients: number;
}

/** A setting {@link resolveConsole} may reject: a config field, or the flag it comes from. */
type ConsoleSetting = "names" | "size" | "attach" | "attachTokenFile" | "logMaxSize";

/** Throws the caller's error for a bad setting (a usage error naming a flag or a field). */
type Reject = (setting: ConsoleSetting, message: string, index?: number) => never;

/**
 * Checks port names and size, reads the attach token, and derives every path: the one validation
 * both `vhostd console` and the config planner use. Nothing is opened yet (see
 * {@link openConsole}).
 */
function resolveConsole(req: ConsoleRequest, reject: Reject): ConsolePlan {
  const { socket } = req;
  if (req.names.length > MAX_PORTS - 1) {
    reject(
      "names",
      `must name at most ${MAX_PORTS - 1} ports besides the console, not ${req.names.length}`,
    );
  }
  req.names.forEach((n, i) => {
    if (!NAME_RE.test(n)) {
      reject("names", `must be letters, digits, ".", "_" or "-" (at most 64), not "${n}"`, i);
    }
  });
  const names = ["console", ...req.names];
  if (new Set(names).size !== names.length) {
    reject("names", `must be unique (and "console" is port 0): ${names.join(", ")}`);
  }
  const attach = names.map((n, i) => {
    try {
      return parseAttach(
        req.attach?.[i] ?? `unix:${socket}.${n}`,
        socket,
        n,
        req.anyAddress,
        req.anyAddressName,
      );
    } catch (e) {
      return reject("attach", (e as Error).message, i);
    }
  });
  attach.forEach((a, i) => {
    if (a.terminal === "stdio" && !req.allowStdio) {
      reject("attach", "stdio is for `vhostd console` run interactively, not a config file", i);
    }
    if (a.terminal === "stdio" && i !== 0) {
      reject("attach", `stdio is for port 0 (the console) only, not port ${i}`, i);
    }
  });
  const endpoints = attach.flatMap((a) =>
    a.tcp && a.tcp.port !== 0 ? [tcpText(a.tcp.addr, a.tcp.port)] : []
  );
  const sharedTcp = endpoints.find((p, i) => endpoints.indexOf(p) !== i);
  if (sharedTcp !== undefined) reject("attach", `would put two ports on tcp:${sharedTcp}`);
  const logPaths = names.map((n, i) =>
    req.log === undefined ? `${socket}.${n}.log` : i === 0 ? req.log : `${req.log}.${n}`
  );
  const chardevPaths = names.map((n, i) => i === 0 ? socket : `${socket}.${n}.chardev`);
  let token: Uint8Array<ArrayBuffer> | undefined;
  if (req.tokenFile !== undefined) {
    try {
      token = readAttachToken(req.tokenFile);
    } catch (e) {
      reject("attachTokenFile", (e as Error).message);
    }
  }
  const tcpPort = attach.findIndex((a) => a.tcp !== null);
  if (tcpPort >= 0 && token === undefined) {
    reject(
      "attach",
      `${req.attach![tcpPort]} needs a token (TCP says nothing of who connects): give one with ` +
        req.tokenFileName,
      tcpPort,
    );
  }
  if (req.logMaxBytes !== 0 && req.logMaxBytes < MIN_LOG_MAX_BYTES) {
    reject("logMaxSize", `must be 0 (never rotate) or at least ${MIN_LOG_MAX_BYTES} bytes`);
  }
  const size = /^(\d{1,5})x(\d{1,5})$/.exec(req.size ?? "80x24");
  if (!size || Number(size[1]) > 0xffff || Number(size[2]) > 0xffff) {
    reject("size", `must be COLSxROWS like 120x40, not "${req.size}"`);
  }
  const all = [
    socket,
    ...attach.flatMap((a) => [a.unix ?? "", a.ptyLink].filter((p) => p !== "")),
    ...(req.chardev ? chardevPaths.slice(1) : []),
  ];
  const shared = all.find((p, i) => all.indexOf(p) !== i);
  if (shared !== undefined) reject("attach", `would put two sockets on ${shared}`);
  return {
    socket,
    chardev: req.chardev,
    names,
    attach,
    logPaths,
    chardevPaths,
    cols: Number(size![1]),
    rows: Number(size![2]),
    scrollback: req.scrollback,
    logMaxBytes: req.logMaxBytes,
    access: req.access,
    attachFile: req.attachFile,
    attachAccess: { allowUids: req.attachAllowUids, token, maxClients: req.maxClients },
  };
}

/**
 * Reads the token of tcp: clients from `path`. The file must not be open to every user: whoever
 * reads it can type into the console.
 */
function readAttachToken(path: string): Uint8Array<ArrayBuffer> {
  let info: Deno.FileInfo, bytes: Uint8Array;
  try {
    info = Deno.statSync(path);
    if (!info.isFile) throw new Error(`${path} is not a regular file`);
    bytes = Deno.readFileSync(path);
  } catch (e) {
    const why = e instanceof Deno.errors.NotFound ? "file not found" : (e as Error).message;
    throw new Error(
      `${path}: ${why} (make one with: head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE)`,
    );
  }
  if (((info.mode ?? 0) & 0o007) !== 0) {
    throw new Error(
      `${path} is open to every user (mode 0${(info.mode! & 0o777).toString(8)}); chmod o-rwx it`,
    );
  }
  try {
    return parseToken(bytes);
  } catch (e) {
    throw new Error(`${path} ${(e as Error).message}`);
  }
}

/** What `vhostd console` was asked to do. */
export interface ConsoleCommand {
  /** The console. */
  plan: ConsolePlan;
  /** Logging settings. */
  log: LogSettings;
  /** Metrics and control socket (vhost-user mode). */
  extras: ServeExtras;
}

const FLAG_OF: Record<ConsoleSetting, string> = {
  names: "name",
  size: "size",
  attach: "attach",
  attachTokenFile: "attach-token-file",
  logMaxSize: "log-max-size",
};

/** Turns the command line into a plan, or throws {@link UsageError}. */
export function planConsole(args: string[]): ConsoleCommand | "help" {
  const { values: v } = usage(() =>
    parseArgs({
      args,
      strict: true,
      options: {
        ...serveOptions,
        ...accessOptions,
        ...conventionOptions,
        ...vmOptions,
        socket: { type: "string" },
        chardev: { type: "boolean" },
        ports: { type: "string" },
        name: { type: "string", multiple: true },
        log: { type: "string" },
        attach: { type: "string", multiple: true },
        "attach-any-address": { type: "boolean" },
        "attach-mode": { type: "string" },
        "attach-group": { type: "string" },
        "attach-allow-uid": { type: "string", multiple: true },
        "attach-token-file": { type: "string" },
        "attach-max-clients": { type: "string" },
        "log-max-size": { type: "string" },
        size: { type: "string" },
        scrollback: { type: "string" },
      },
    })
  );
  if (v.help) return "help";
  const socket = deviceSocket(v, "console");
  const chardev = v.chardev ?? false;
  if (chardev) {
    // The chardev worker is served outside runServices: no metrics or control socket.
    for (const flag of ["metrics", "control"] as const) {
      if (v[flag] !== undefined) {
        throw new UsageError(`--${flag} needs vhost-user mode (no --chardev)`);
      }
    }
  }
  const { log, extras } = parseServeOptions(v);
  const access = parseAccess(v);
  const given = v.name ?? [];
  const ports = parseIntOption("ports", v.ports, given.length + 1, 1, MAX_PORTS);
  if (given.length > ports - 1) {
    throw new UsageError(`${given.length} --name for ${ports} port(s): port 0 is the console`);
  }
  const names = [...given];
  for (let i = given.length + 1; i < ports; i++) names.push(`port${i}`);
  const attach = v.attach ?? [];
  if (attach.length > ports) throw new UsageError(`${attach.length} --attach for ${ports} port(s)`);
  const scrollback = parseIntOption(
    "scrollback",
    v.scrollback,
    DEFAULT_SCROLLBACK,
    MIN_SCROLLBACK,
    MAX_SCROLLBACK,
  );
  const group = v["attach-group"];
  const plan = resolveConsole(
    {
      socket,
      chardev,
      names,
      log: v.log,
      attach,
      anyAddress: v["attach-any-address"] ?? false,
      anyAddressName: "--attach-any-address",
      allowStdio: true,
      size: v.size,
      scrollback,
      logMaxBytes: parseIntOption(
        "log-max-size",
        v["log-max-size"],
        DEFAULT_LOG_MAX_BYTES,
        0,
        MAX_LOG_MAX_BYTES,
      ),
      access,
      attachFile: {
        mode: parseMode(v["attach-mode"], "--attach-mode"),
        gid: group === undefined ? undefined : parseGroup(group, "--attach-group"),
      },
      attachAllowUids: parseUids(v["attach-allow-uid"] ?? [], "--attach-allow-uid"),
      tokenFile: v["attach-token-file"],
      tokenFileName: "--attach-token-file FILE",
      maxClients: parseIntOption(
        "attach-max-clients",
        v["attach-max-clients"],
        DEFAULT_MAX_CLIENTS,
        1,
        MAX_ATTACH_CLIENTS,
      ),
    },
    (setting, message) => {
      throw new UsageError(`--${FLAG_OF[setting]} ${message}`);
    },
  );
  return { plan, log, extras };
}

/** What a console opened in the main thread, to undo if it does not start. */
interface Opened {
  /** Log and attach socket fds (and chardev sockets, ptys, reopened stdin and stdout). */
  fds: number[];
  /** Sockets bound and pty links made. */
  paths: string[];
  /** Log files that did not exist before (removed by {@link closePorts} while still empty). */
  newLogs: string[];
  /** Puts a terminal in raw mode back as it was (run whether or not the console started). */
  restore: (() => void)[];
  /** Per port, where clients attach, for the banner: "PATH", "tcp 127.0.0.1:4000", ... */
  where: string[];
}

/** A port's log or attach socket could not be opened; `setting` is the config field to blame. */
class PortOpenError extends UsageError {
  /** `log`, `socket` (attach sockets are named after the socket) or `attach`. */
  readonly setting: "log" | "socket" | "attach";
  /** The port whose attach mode failed. */
  readonly port: number;
  constructor(setting: "log" | "socket" | "attach", message: string, port = 0) {
    super(message);
    this.setting = setting;
    this.port = port;
  }
}

/** Opens logs and binds attach sockets in the main thread, so problems are usage errors. */
function openPorts(plan: ConsolePlan, opened: Opened): PortConfig[] {
  const { mode, gid } = plan.attachFile;
  return plan.names.map((name, id) => {
    const logPath = plan.logPaths[id];
    let existed = true;
    try {
      Deno.lstatSync(logPath);
    } catch {
      existed = false;
    }
    let log: OpenedLog;
    try {
      log = openLogFile(logPath);
    } catch (e) {
      throw new PortOpenError("log", `cannot open log ${logPath}: ${(e as Error).message}`);
    }
    opened.fds.push(log.fd);
    if (!existed) opened.newLogs.push(logPath);
    const a = plan.attach[id];
    let attachFd: number;
    const where: string[] = [];
    if (a.unix !== null) {
      try {
        attachFd = bindSocket(a.unix, mode, gid);
      } catch (e) {
        throw new PortOpenError("socket", (e as Error).message);
      }
      opened.paths.push(a.unix);
      where.push(a.unix);
    } else {
      const { addr, port } = a.tcp!;
      let bound: number;
      try {
        ({ fd: attachFd, port: bound } = listenTcp(addr, port));
      } catch (e) {
        throw new PortOpenError(
          "attach",
          `cannot listen on tcp:${tcpText(addr, port)}: ${(e as Error).message}`,
          id,
        );
      }
      where.push(`tcp ${tcpText(addr, bound)}`);
    }
    opened.fds.push(attachFd);
    let terminal: TerminalConfig | undefined;
    try {
      if (a.terminal === "pty") {
        terminal = openPortPty(a.ptyLink, opened);
        where.push(`pty ${Deno.readLinkSync(a.ptyLink)} (linked as ${a.ptyLink})`);
      } else if (a.terminal === "stdio") {
        terminal = openStdio(opened);
        where.push("stdio");
      }
    } catch (e) {
      if (e instanceof PortOpenError) throw new PortOpenError(e.setting, e.message, id);
      throw e;
    }
    opened.where.push(where.join(", "));
    return {
      id,
      name,
      attachFd,
      attachPath: a.unix ?? "",
      attachTcp: a.tcp !== null,
      access: plan.attachAccess,
      terminal,
      log: { path: logPath, ...log, maxBytes: plan.logMaxBytes },
      scrollbackBytes: plan.scrollback,
      inputBytes: DEFAULT_INPUT_LIMIT,
    };
  });
}

/** Opens a pty for a port and links it at `link`, replacing a link a previous run left. */
function openPortPty(link: string, opened: Opened): TerminalConfig {
  let old: Deno.FileInfo | null = null;
  try {
    old = Deno.lstatSync(link);
  } catch {
    // absent, as it should be
  }
  if (old !== null && !old.isSymlink) {
    throw new PortOpenError(
      "attach",
      `${link} exists and is not a symlink; refusing to replace it`,
    );
  }
  let pty;
  try {
    pty = openPty();
  } catch (e) {
    throw new PortOpenError("attach", `cannot open a pty: ${(e as Error).message}`);
  }
  opened.fds.push(pty.master, pty.slave);
  try {
    if (old !== null) Deno.removeSync(link);
    Deno.symlinkSync(pty.path, link);
  } catch (e) {
    throw new PortOpenError(
      "attach",
      `cannot link ${link} to ${pty.path}: ${(e as Error).message}`,
    );
  }
  opened.paths.push(link);
  return {
    kind: "pty",
    readFd: pty.master,
    writeFd: pty.master,
    sizeFd: pty.master,
    holdFds: [pty.slave],
    linkPath: link,
  };
}

/**
 * Attaches the daemon's stdin and stdout. They are reopened through /proc rather than used as
 * fds 0 and 1: O_NONBLOCK belongs to the open file description, and setting it on the inherited
 * one would leak into the shell (and into this process's own stdout writes).
 */
function openStdio(opened: Opened): TerminalConfig {
  const tty = isTerminal(0);
  let fifo = false;
  try {
    fifo = Deno.statSync("/proc/self/fd/0").isFifo === true;
  } catch {
    // no stdin at all
  }
  if (!tty && !fifo) {
    throw new PortOpenError("attach", "stdio needs stdin to be a terminal or a pipe");
  }
  let readFd: number, writeFd: number;
  try {
    readFd = openFile("/proc/self/fd/0", O.RDONLY | O.NONBLOCK | O_NOCTTY);
  } catch (e) {
    throw new PortOpenError("attach", `cannot reopen stdin: ${(e as Error).message}`);
  }
  opened.fds.push(readFd);
  try {
    writeFd = openFile("/proc/self/fd/1", O.WRONLY | O.NONBLOCK | O_NOCTTY | O_APPEND);
  } catch (e) {
    throw new PortOpenError(
      "attach",
      `stdio needs stdout to be a terminal, pipe or file: ${(e as Error).message}`,
    );
  }
  opened.fds.push(writeFd);
  if (tty) {
    let saved: Uint8Array<ArrayBuffer>;
    try {
      saved = makeRaw(0, true);
    } catch (e) {
      throw new PortOpenError("attach", `cannot set the terminal raw: ${(e as Error).message}`);
    }
    const restore = () => restoreTerminal(0, saved);
    opened.restore.push(restore);
    // A second Ctrl-C exits at once (Deno.exit), past every finally: unload still runs.
    globalThis.addEventListener("unload", restore);
  }
  return { kind: "stdio", readFd, writeFd, sizeFd: tty ? readFd : -1, holdFds: [], linkPath: "" };
}

/** Puts terminals back as they were; safe to call more than once. */
function restoreTerminals(opened: Opened): void {
  for (const r of opened.restore.splice(0)) r();
}

/** Closes what {@link openPorts} opened and removes its sockets and still-empty new logs. */
function closePorts(opened: Opened): void {
  restoreTerminals(opened);
  for (const fd of opened.fds.splice(0)) closeQuietly(fd);
  removeAll(opened.paths.splice(0));
  for (const p of opened.newLogs.splice(0)) {
    try {
      if (Deno.statSync(p).size === 0) Deno.removeSync(p);
    } catch {
      // gone already
    }
  }
}

function removeAll(paths: string[]): void {
  for (const p of paths) {
    try {
      Deno.removeSync(p);
    } catch {
      // never created, or removed by the worker
    }
  }
}

/** Opens every port's log and attach socket; on failure, undoes what was opened and rethrows. */
function openConsole(plan: ConsolePlan): { ports: PortConfig[]; opened: Opened } {
  const opened: Opened = { fds: [], paths: [], newLogs: [], restore: [], where: [] };
  try {
    return { ports: openPorts(plan, opened), opened };
  } catch (e) {
    closePorts(opened);
    throw e;
  }
}

/** The vhost-user service of an opened console. */
function consoleService(
  plan: ConsolePlan,
  ports: PortConfig[],
  name: string,
  log: LogSettings,
): ServiceOptions {
  const options: ConsoleOptions = { ports, cols: plan.cols, rows: plan.rows };
  return {
    socket: plan.socket,
    module: new URL("../devices/console/mod.ts", import.meta.url),
    options,
    name,
    type: "console",
    log,
    ...plan.access,
  };
}

/** The QEMU 10.2 arguments attaching a vhost-user console of `ports` ports on `socket`. */
export function consoleQemuArgs(socket: string, id: string, ports: number): string[] {
  return [
    "-chardev",
    `socket,id=${id},path=${socket},reconnect=1`,
    "-device",
    `vhost-user-test-device-pci,chardev=${id},virtio-id=3,num_vqs=${
      queueCount(ports)
    },config_size=12`,
  ];
}

function banner(plan: ConsolePlan, opened: Opened): string {
  const lines = [
    `vhostd: serving console (${plan.names.length} port(s), ${
      plan.chardev ? "character-device" : "vhost-user"
    } mode) on ${plan.socket}`,
  ];
  plan.names.forEach((n, i) => {
    const via = plan.chardev ? ` chardev ${plan.chardevPaths[i]},` : "";
    lines.push(`  port ${i} ${n}:${via} attach ${opened.where[i]}, log ${plan.logPaths[i]}`);
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
    const [c, chardev, d, device] = consoleQemuArgs(plan.socket, "con0", plan.names.length);
    lines.push("Attach it to QEMU 10.2 or newer with:");
    lines.push(`  ${c} ${chardev} \\`);
    lines.push(`  ${d} ${device}`);
  }
  return lines.join("\n");
}

/** Runs `vhostd console`. */
export async function cmdConsole(args: string[]): Promise<number> {
  const command = planConsole(args);
  if (command === "help") {
    console.log(CONSOLE_HELP);
    return 0;
  }
  const { plan, log, extras } = command;
  const { ports, opened } = openConsole(plan);
  try {
    if (plan.chardev) return await runChardev(plan, ports, log, opened);
    return await runServices(
      [consoleService(plan, ports, "console", log)],
      log,
      banner(plan, opened),
      extras,
    );
  } finally {
    // The worker closed the ports; this removes whatever a failed start left behind, and gives
    // a terminal on stdin its settings back.
    removeAll(opened.paths);
    restoreTerminals(opened);
  }
}

/**
 * The `console` planner of config files (vhost-user mode; QEMU 10.2 or newer). Fields: `socket`,
 * `names` (ports besides the console), `log` (port 0's log; the others FILE.<name>; default
 * `<socket>.<name>.log`), `logMaxSize` (rotation size in bytes, 0: never), `size` (COLSxROWS,
 * default 80x24), `scrollback` (bytes per port), `attach` (the `--attach` strings from port 0 on,
 * stdio excepted: a service has no terminal), `attachAnyAddress` (allow TCP beyond loopback),
 * `attachMode` and `attachGroup` (the Unix attach sockets' own mode, default "0600", and group),
 * `attachAllowUids` (who may attach besides the daemon's uid and root), `attachTokenFile` (the
 * token of tcp: clients) and `attachMaxClients`. The logs, attach sockets (`<socket>.<name>` by
 * default) and ptys are opened while planning, as the command line does, so their problems are
 * config errors too.
 */
export function planConsoleDevice(ctx: PlanContext): DevicePlan {
  const f = ctx.fields;
  if (f.boolean("chardev", false)) {
    throw new ConfigError(
      f.at("chardev"),
      "character-device mode is only served by `vhostd console --chardev`; " +
        "in a config file the console is a vhost-user device (QEMU 10.2 or newer)",
    );
  }
  const names = f.array("names").map((n, i) => {
    if (typeof n !== "string") {
      throw new ConfigError(`${f.at("names")}[${i}]`, `must be a string, not ${JSON.stringify(n)}`);
    }
    return n;
  });
  const attach = f.has("attach")
    ? f.array("attach").map((a, i) => {
      if (typeof a !== "string") {
        throw new ConfigError(
          `${f.at("attach")}[${i}]`,
          `must be a string, not ${JSON.stringify(a)}`,
        );
      }
      return a;
    })
    : undefined;
  if (attach !== undefined && attach.length > names.length + 1) {
    throw new ConfigError(
      f.at("attach"),
      `has ${attach.length} entries for ${names.length + 1} port(s) (port 0 is the console)`,
    );
  }
  const anyAddress = f.boolean("attachAnyAddress", false);
  const logField = f.string("log");
  const size = f.string("size");
  const scrollback = f.integer("scrollback", DEFAULT_SCROLLBACK, MIN_SCROLLBACK, MAX_SCROLLBACK);
  const logMaxBytes = f.integer("logMaxSize", DEFAULT_LOG_MAX_BYTES, 0, MAX_LOG_MAX_BYTES);
  const attachFile = { mode: modeField(f, "attachMode"), gid: groupField(f, "attachGroup") };
  const attachAllowUids = uidsField(f, "attachAllowUids");
  const tokenFile = f.string("attachTokenFile");
  const maxClients = f.integer("attachMaxClients", DEFAULT_MAX_CLIENTS, 1, MAX_ATTACH_CLIENTS);
  const socket = ctx.socketPath();
  const plan = resolveConsole(
    {
      socket,
      chardev: false,
      names,
      log: logField,
      attach,
      anyAddress,
      anyAddressName: `"attachAnyAddress": true`,
      allowStdio: false,
      size,
      scrollback,
      logMaxBytes,
      access: ctx.access,
      attachFile,
      attachAllowUids,
      tokenFile,
      tokenFileName: `"attachTokenFile"`,
      maxClients,
    },
    (setting, message, index) => {
      throw new ConfigError(f.at(setting) + (index === undefined ? "" : `[${index}]`), message);
    },
  );
  let opened: Opened, ports: PortConfig[];
  try {
    ({ ports, opened } = openConsole(plan));
  } catch (e) {
    if (e instanceof PortOpenError) {
      const at = e.setting === "attach" && attach !== undefined ? `[${e.port}]` : "";
      throw new ConfigError(f.at(e.setting) + at, e.message);
    }
    throw e;
  }
  const n = plan.names.length;
  const logs = logField === undefined
    ? `${socket}.<port>.log`
    : n > 1
    ? `${logField} (others ${logField}.<port>)`
    : logField;
  return {
    services: [consoleService(plan, ports, ctx.id, ctx.log)],
    describe: `${ctx.id}: console (${n} port(s): ${plan.names.join(", ")}; QEMU 10.2 or newer) ` +
      `on ${socket}, attach ${
        attach === undefined
          ? `${socket}.<port>`
          : plan.names.map((name, i) => `${name} ${opened.where[i]}`).join("; ")
      }, log ${logs}`,
    qemuArgs: consoleQemuArgs(socket, ctx.id, n),
    release: () => closePorts(opened),
  };
}

async function runChardev(
  plan: ConsolePlan,
  ports: PortConfig[],
  log: LogSettings,
  opened: Opened,
): Promise<number> {
  const chardevFds: number[] = [];
  let shutdownFd = -1;
  try {
    for (const p of plan.chardevPaths) {
      chardevFds.push(bindSocket(p, plan.access.socketMode, plan.access.socketGroup));
      opened.fds.push(chardevFds[chardevFds.length - 1]);
      opened.paths.push(p);
    }
    shutdownFd = createEventFd();
  } catch (e) {
    closePorts(opened);
    throw e;
  }
  setupLogging(log);
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
    allowUids: plan.access.allowUids ?? [],
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
  console.log(banner(plan, opened));
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
