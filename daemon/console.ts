/**
 * `vhostd console`: the console server, in vhost-user mode (vhostd is the virtio-console device;
 * QEMU >= 10.2's `vhost-user-test-device-pci` fronts it) or in character-device mode (QEMU's own
 * virtio-console, any version, connects a `-chardev socket` per port). This module is the
 * command: its help, its flags and its banner. The plan both this and config files check is in
 * `console_plan.ts`, opening the ports in `console_ports.ts`, the character-device runner in
 * `console_chardev.ts`, and the config planner in `console_config.ts`.
 *
 * @module
 */

import { parseArgs } from "./args.ts";
import { UsageError } from "../sys/errors.ts";
import { DEFAULT_MAX_CLIENTS, DEFAULT_SCROLLBACK } from "../devices/console/port_hub.ts";
import { DEFAULT_LOG_MAX_BYTES, MIN_LOG_MAX_BYTES } from "../devices/console/console_log.ts";
import type { LogSettings } from "../log/setup.ts";
import { runServices } from "./serve.ts";
import {
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
  type ConsolePlan,
  consoleQemuArgs,
  consoleService,
  type ConsoleSetting,
  MAX_ATTACH_CLIENTS,
  MAX_LOG_MAX_BYTES,
  MAX_PORTS,
  MAX_SCROLLBACK,
  MIN_SCROLLBACK,
  resolveConsole,
} from "./console_plan.ts";
import { openConsole, type Opened, removeAll, restoreTerminals } from "./console_ports.ts";
import { runChardev } from "./console_chardev.ts";

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

/** What `vhostd console` prints once it serves: each port, and the QEMU arguments to attach. */
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
    if (plan.chardev) return await runChardev(plan, ports, log, opened, banner(plan, opened));
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
