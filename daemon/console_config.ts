/**
 * The `console` planner of config files: a console in vhost-user mode, checked with the same
 * rules as `vhostd console` (`console_plan.ts`) and opened while planning.
 *
 * @module
 */

import {
  DEFAULT_MAX_CLIENTS,
  DEFAULT_SCROLLBACK,
  type PortConfig,
} from "../devices/console/port_hub.ts";
import { DEFAULT_LOG_MAX_BYTES } from "../devices/console/console_log.ts";
import {
  ConfigError,
  type DevicePlan,
  groupField,
  modeField,
  type PlanContext,
  uidsField,
} from "./config.ts";
import {
  consoleQemuArgs,
  consoleService,
  MAX_ATTACH_CLIENTS,
  MAX_LOG_MAX_BYTES,
  MAX_SCROLLBACK,
  MIN_SCROLLBACK,
  resolveConsole,
} from "./console_plan.ts";
import { closePorts, openConsole, type Opened, PortOpenError } from "./console_ports.ts";

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
