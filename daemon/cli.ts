/**
 * Command-line pieces every serving command shares: logging, metrics, control socket and socket
 * access options, with one parser so that `blk`, `net`, `switch`, `console` and `run` accept
 * them alike.
 *
 * A serving command spreads {@link serveOptions} into its `parseArgs` options and hands the values
 * to {@link parseServeOptions}; the result goes to `runServices`:
 *
 * @example
 * ```ts
 * import { parseArgs } from "node:util";
 * const { values } = usage(() =>
 *   parseArgs({ args, strict: true, options: { ...serveOptions, socket: { type: "string" } } })
 * );
 * const { log, extras } = parseServeOptions(values);
 * return await runServices([service], log, banner, extras);
 * ```
 *
 * @module
 */

import type { ServiceReload } from "./serve.ts";
import { UsageError } from "../sys/errors.ts";
import { adoptInheritedSocket } from "./activation.ts";
import { LOG_LEVELS } from "../log/mod.ts";
import { defaultLogSettings, type LogSettings } from "../log/setup.ts";
import { checkMetricsExposure, type MetricsAddress, parseMetricsAddress } from "./metrics.ts";
import { ID_RE } from "./config.ts";

/** `parseArgs` options of logging, metrics and the control socket (spread them in). */
export const serveOptions = {
  "log-level": { type: "string" },
  "log-format": { type: "string" },
  metrics: { type: "string" },
  "metrics-any-address": { type: "boolean" },
  control: { type: "string" },
  help: { type: "boolean", short: "h" },
} as const;

/**
 * `parseArgs` option naming the VM a standalone command serves (`run` takes the config's name):
 * the `vm` label of its metrics, and the name in status and systemd STATUS lines.
 */
export const vmOptions = {
  vm: { type: "string" },
} as const;

/** The help line of {@link vmOptions}. */
export const VM_OPTION_HELP =
  `  --vm NAME           the VM this serves: the "vm" label of every metric, and the name status
                      shows (letters, digits, ".", "_" or "-", at most 32; default: the device's)`;

/** `parseArgs` options of socket access: mode, group, allowed uids. */
export const accessOptions = {
  "socket-mode": { type: "string" },
  "socket-group": { type: "string" },
  "allow-uid": { type: "string", multiple: true },
} as const;

/**
 * `parseArgs` options of QEMU's back-end program conventions (docs/interop/vhost-user.rst,
 * "Backend program conventions"), which tools that start back-ends rely on: `--socket-path` is
 * `--socket` under its conventional name, `--fd N` serves a listening socket inherited as fd N.
 * (`--print-capabilities` is answered before any parsing, in main.ts.)
 */
export const conventionOptions = {
  "socket-path": { type: "string" },
  fd: { type: "string" },
} as const;

/**
 * The socket a single-device command serves: `--socket` or `--socket-path` (one of them), or an
 * inherited listening socket `--fd N`.
 */
export function deviceSocket(
  values: { socket?: string; "socket-path"?: string; fd?: string },
  command: string,
): string {
  const given = [values.socket, values["socket-path"], values.fd].filter((v) => v !== undefined);
  if (given.length > 1) {
    throw new UsageError("--socket, --socket-path and --fd are alternatives; give one");
  }
  // fds 0-2 are stdin, stdout and stderr by the conventions.
  if (values.fd !== undefined) {
    return adoptInheritedSocket(parseIntOption("fd", values.fd, 0, 3, 1 << 20));
  }
  const path = values.socket ?? values["socket-path"];
  if (!path) throw new UsageError(`${command} needs --socket PATH`);
  return path;
}

/** Largest busy-poll window accepted (`--poll-us`, `pollUs` in a config), in µs. */
export const MAX_POLL_US = 1000;

/** `parseArgs` option of the busy-poll window (for devices that can be polled). */
export const pollOptions = {
  "poll-us": { type: "string" },
} as const;

/** Checks {@link pollOptions}. */
export function parsePollUs(values: { "poll-us"?: string }, defaultUs: number): number {
  return parseIntOption("poll-us", values["poll-us"], defaultUs, 0, MAX_POLL_US);
}

/** The help lines of {@link serveOptions}, to paste into a command's help text. */
export const SERVE_OPTIONS_HELP =
  `  --metrics ADDR      serve Prometheus metrics on http://ADDR/metrics (and /healthz),
                      e.g. 127.0.0.1:61910; a loopback address only, since they have no
                      authentication, unless --metrics-any-address is given
  --metrics-any-address  allow --metrics on an address that is not loopback
  --control PATH      answer "vhostd status" and "vhostd resize" (--control PATH) on this
                      Unix socket
  --log-level LEVEL   trace, debug, info, warning, error (default info)
  --log-format FMT    text or json (default text)
  -h, --help          show this text`;

/** What the main thread serves besides the devices. */
export interface ServeExtras {
  /** Address of the metrics HTTP server, if any. */
  metrics?: MetricsAddress;
  /** Path of the control socket `status` talks to, if any. */
  control?: string;
  /** Name of this daemon (the VM): the `vm` label of metrics, the name in status and STATUS lines. */
  name?: string;
  /**
   * Makes SIGHUP reload: called on each SIGHUP (one at a time), it reads and checks the new
   * configuration and returns the services to run from then on, or throws to keep the running set
   * as it is (the error is logged); the devices kept then refresh (a disk re-reads its image's
   * size). Without it, SIGHUP only makes every device refresh.
   */
  reload?: () => ServiceReload;
  /**
   * Shared data-plane workers the devices are spread over (default 1: every device on one
   * worker, except those that ask for their own: `ServiceOptions.ownWorker`).
   */
  workers?: number;
}

/** Values of {@link serveOptions} as `parseArgs` returns them. */
export interface ServeOptionValues {
  "log-level"?: string;
  "log-format"?: string;
  metrics?: string;
  "metrics-any-address"?: boolean;
  control?: string;
  /** {@link vmOptions}' value, for the commands that take it. */
  vm?: string;
}

/** Checks the shared serving options: logging settings and {@link ServeExtras}. */
export function parseServeOptions(
  values: ServeOptionValues,
): { log: LogSettings; extras: ServeExtras } {
  const extras: ServeExtras = {};
  if (values.vm !== undefined) {
    if (!ID_RE.test(values.vm)) {
      throw new UsageError(
        `--vm must be letters, digits, ".", "_" or "-" (at most 32), not ${
          JSON.stringify(values.vm)
        }`,
      );
    }
    extras.name = values.vm;
  }
  if (values.metrics !== undefined) {
    extras.metrics = parseMetricsAddress(values.metrics);
    const anyAddress = values["metrics-any-address"] ?? false;
    checkMetricsExposure(extras.metrics, anyAddress, "--metrics-any-address");
  } else if (values["metrics-any-address"]) {
    throw new UsageError("--metrics-any-address goes with --metrics ADDR");
  }
  if (values.control !== undefined) extras.control = values.control;
  return { log: logSettings(values), extras };
}

/** Checks `--log-level` and `--log-format`. */
export function logSettings(values: { "log-level"?: string; "log-format"?: string }): LogSettings {
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

/** Who may connect: the socket's mode and group, and the peer uids accepted. */
export interface Access {
  /** Socket file mode. */
  socketMode: number;
  /** Group id of the socket file. */
  socketGroup?: number;
  /** Front-end uids accepted (default: anyone who can open the socket). */
  allowUids?: number[];
}

/** Parses an octal mode such as `0660` (default 0600). */
export function parseMode(s: string | undefined, what = "--socket-mode"): number {
  if (s === undefined) return 0o600;
  if (!/^[0-7]{3,4}$/.test(s)) throw new UsageError(`${what} must be octal like 0660, not "${s}"`);
  return parseInt(s, 8);
}

/** Resolves a group name or number to a gid. */
export function parseGroup(group: string, what = "--socket-group"): number {
  if (/^\d+$/.test(group)) return Number(group);
  const line = Deno.readTextFileSync("/etc/group").split("\n").find((l) =>
    l.split(":")[0] === group
  );
  if (!line) throw new UsageError(`${what}: no group named "${group}"`);
  return Number(line.split(":")[2]);
}

/** Checks {@link accessOptions}. */
export function parseAccess(
  values: { "socket-mode"?: string; "socket-group"?: string; "allow-uid"?: string[] },
): Access {
  const access: Access = { socketMode: parseMode(values["socket-mode"]) };
  const group = values["socket-group"];
  if (group !== undefined) access.socketGroup = parseGroup(group);
  const uids = values["allow-uid"];
  if (uids) access.allowUids = parseUids(uids, "--allow-uid");
  return access;
}

/** Parses a repeatable uid flag whose values may also be comma-separated lists. */
export function parseUids(values: string[], flag: string): number[] {
  return values.flatMap((s) => s.split(",")).map((u) => {
    if (!/^\d+$/.test(u) || Number(u) > 0xffffffff) {
      throw new UsageError(`${flag} takes numeric uids, not "${u}"`);
    }
    return Number(u);
  });
}

/** Parses a whole-number option within bounds (`def` when absent). */
export function parseIntOption(
  name: string,
  s: string | undefined,
  def: number,
  min: number,
  max: number,
): number {
  if (s === undefined) return def;
  const n = Number(s);
  if (!Number.isInteger(n) || n < min || n > max) {
    throw new UsageError(`--${name} must be a whole number from ${min} to ${max}, not "${s}"`);
  }
  return n;
}

/** Runs parseArgs, turning its errors (unknown flag, missing value) into a UsageError. */
export function usage<T>(parse: () => T): T {
  try {
    return parse();
  } catch (e) {
    throw new UsageError((e as Error).message.split("\n")[0]);
  }
}
