/**
 * A console's plan: the one validation `vhostd console` and the config planner share. Port names,
 * attach modes, sizes, limits and the attach token are checked here and every path is derived;
 * nothing is opened (see `console_ports.ts`).
 *
 * @module
 */

import type { ConsoleOptions } from "../devices/console/device.ts";
import type { AttachAccess, PortConfig } from "../devices/console/port_hub.ts";
import { parseToken } from "../devices/console/attach_token.ts";
import { MIN_LOG_MAX_BYTES } from "../devices/console/console_log.ts";
import { queueCount } from "../devices/console/protocol.ts";
import {
  type IpAddress,
  ipText,
  isLoopback,
  parseIpAddress,
  type SocketFileMode,
} from "../sys/socket.ts";
import type { LogSettings } from "../log/setup.ts";
import type { ServiceOptions } from "./service.ts";
import type { Access } from "./cli.ts";

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
export function tcpText(addr: IpAddress, port: number): string {
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
export interface ConsoleRequest {
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
export type ConsoleSetting = "names" | "size" | "attach" | "attachTokenFile" | "logMaxSize";

/** Throws the caller's error for a bad setting (a usage error naming a flag or a field). */
export type Reject = (setting: ConsoleSetting, message: string, index?: number) => never;

/**
 * Checks port names and size, reads the attach token, and derives every path: the one validation
 * both `vhostd console` and the config planner use. Nothing is opened yet (see
 * `openConsole` in `console_ports.ts`).
 */
export function resolveConsole(req: ConsoleRequest, reject: Reject): ConsolePlan {
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

/** The vhost-user service of an opened console. */
export function consoleService(
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
