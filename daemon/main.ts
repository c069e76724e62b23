/**
 * The `vhostd` command line: `vhostd <command> [options]`.
 *
 * @module
 */

import { UsageError } from "../sys/errors.ts";
import { errorLine } from "../log/setup.ts";

const HELP = `vhostd: virtio devices for QEMU over vhost-user

Usage: vhostd <command> [options]

Commands:
  run      serve every device of one VM from a JSON config file (what systemd runs)
  status   show a running daemon's devices, front-ends, queues and counters
  resize   tell a running daemon's disks to read their images' sizes again (after growing one)
  blk      serve a disk image as a virtio-blk device
  start    serve a 1 GiB scratch disk with default settings (no options needed)
  console  serve a virtio console with logs, scrollback and attach sockets
  net      serve a virtio-net device on a TAP interface
  switch   join guests with a built-in L2 switch (one virtio-net port per socket)
  probe    show what any vhost-user back-end offers (features, queues, config)
  load     measure a vhost-user-blk back-end: IOPS, MB/s, latency
  help     show this text, or "help <command>"
  version  show vhostd's version (also --version)

Run "vhostd <command> --help" for a command's options.

Example:
  vhostd run --config examples/config/vm1.json --socket-dir /tmp/vm1
`;

// Each command's module is loaded when that command runs: a daemon serving one disk does not
// keep the console, net, probe and load code (and their heaps) resident.
const commands: Record<string, (args: string[]) => Promise<number>> = {
  run: async (a) => (await import("./run.ts")).cmdRun(a),
  status: async (a) => (await import("./status.ts")).cmdStatus(a),
  resize: async (a) => (await import("./resize.ts")).cmdResize(a),
  blk: async (a) => (await import("./blk.ts")).cmdBlk(a),
  start: async (a) => (await import("./blk.ts")).cmdStart(a),
  probe: async (a) => (await import("./probe.ts")).cmdProbe(a),
  load: async (a) => (await import("./load.ts")).cmdLoad(a),
  console: async (a) => (await import("./console.ts")).cmdConsole(a),
  net: async (a) => (await import("./net.ts")).cmdNet(a),
  switch: async (a) => (await import("./net.ts")).cmdSwitch(a),
};

/**
 * What `--print-capabilities` prints for the commands that serve one device, in the JSON of
 * QEMU's docs/interop/vhost-user.json (VHostUserBackendCapabilities): tools that discover
 * back-ends by those conventions call the program with only this option.
 */
const CAPABILITIES: Record<string, { type: string; features?: string[] }> = {
  blk: { type: "block", features: ["read-only", "blk-file"] },
  net: { type: "net" },
  console: { type: "console" },
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
  if (command === "version" || command === "--version" || command === "-V") {
    console.log((await import("./version.ts")).versionText());
    return 0;
  }
  // By the conventions, every other option is ignored then, whatever it is.
  if (rest.includes("--print-capabilities") && CAPABILITIES[command]) {
    console.log(JSON.stringify(CAPABILITIES[command], null, 2));
    return 0;
  }
  const run = commands[command];
  if (!run) {
    console.error(errorLine(`vhostd: unknown command "${command}" (try "vhostd help")`));
    return 2;
  }
  try {
    return await run(rest);
  } catch (e) {
    if (e instanceof UsageError) {
      console.error(errorLine(`vhostd ${command}: ${e.message}`));
      return 2;
    }
    console.error(errorLine(`vhostd ${command}: ${(e as Error).message}`));
    return 1;
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
