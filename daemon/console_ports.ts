/**
 * Opening a console's ports in the main thread, before any worker starts, so that every problem
 * is a usage error: each port's log, its attach socket (Unix or TCP), and a terminal attached
 * for the daemon's life (a pty linked beside the socket, or the daemon's own stdin and stdout).
 * What was opened is recorded so that a failed start, or a config reload that drops the console,
 * undoes it.
 *
 * @module
 */

import { UsageError } from "../sys/errors.ts";
import {
  DEFAULT_INPUT_LIMIT,
  type PortConfig,
  type TerminalConfig,
} from "../devices/console/port_hub.ts";
import { type OpenedLog, openLogFile } from "../devices/console/console_log.ts";
import { closeQuietly, O, openFile } from "../sys/libc.ts";
import { listenTcp } from "../sys/socket.ts";
import { isTerminal, makeRaw, openPty, restoreTerminal } from "../sys/pty.ts";
import { bindSocket } from "./service.ts";
import { type ConsolePlan, tcpText } from "./console_plan.ts";

/** What a console opened in the main thread, to undo if it does not start. */
export interface Opened {
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
export class PortOpenError extends UsageError {
  /** `log`, `socket` (attach sockets are named after the socket) or `attach`. */
  readonly setting: "log" | "socket" | "attach";
  /** The port whose attach mode failed. */
  readonly port: number;
  /** Blames `setting` (of `port`, for an attach mode) with `message`, the whole line. */
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
    readFd = openFile("/proc/self/fd/0", O.RDONLY | O.NONBLOCK | O.NOCTTY);
  } catch (e) {
    throw new PortOpenError("attach", `cannot reopen stdin: ${(e as Error).message}`);
  }
  opened.fds.push(readFd);
  try {
    writeFd = openFile("/proc/self/fd/1", O.WRONLY | O.NONBLOCK | O.NOCTTY | O.APPEND);
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
export function restoreTerminals(opened: Opened): void {
  for (const r of opened.restore.splice(0)) r();
}

/** Closes what {@link openPorts} opened and removes its sockets and still-empty new logs. */
export function closePorts(opened: Opened): void {
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

/** Removes each path, ignoring the ones already gone. */
export function removeAll(paths: string[]): void {
  for (const p of paths) {
    try {
      Deno.removeSync(p);
    } catch {
      // never created, or removed by the worker
    }
  }
}

/** Opens every port's log and attach socket; on failure, undoes what was opened and rethrows. */
export function openConsole(plan: ConsolePlan): { ports: PortConfig[]; opened: Opened } {
  const opened: Opened = { fds: [], paths: [], newLogs: [], restore: [], where: [] };
  try {
    return { ports: openPorts(plan, opened), opened };
  } catch (e) {
    closePorts(opened);
    throw e;
  }
}
