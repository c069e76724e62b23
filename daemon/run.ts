/**
 * `vhostd run --config FILE`: every device of one VM, from one process, each on its own socket.
 * This is what the systemd template unit `vhostd@<vm>` runs.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { UsageError } from "../sys/errors.ts";
import type { LogSettings } from "../log/setup.ts";
import { runServices, type ServiceReload } from "./serve.ts";
import { logSettings, parseIntOption, SERVE_OPTIONS_HELP, serveOptions, usage } from "./cli.ts";
import { DEFAULT_WORKERS, MAX_WORKERS } from "./worker_pool.ts";
import {
  ConfigError,
  type ConfigOverrides,
  planVm,
  readConfigFile,
  registerPlanner,
  type VmPlan,
} from "./config.ts";
import { parseMetricsAddress } from "./metrics.ts";
import { planBlkDevice } from "./blk.ts";
import { planConsoleDevice } from "./console_config.ts";
import { planNetDevice } from "./net.ts";

// The device types a config file may use, one planner per type. A device kind plugs in here:
// its module exports a DevicePlanner (see daemon/config.ts) and one line registers it.
registerPlanner("blk", planBlkDevice);
registerPlanner("console", planConsoleDevice);
registerPlanner("net", planNetDevice);

/** `vhostd run --help`. */
export const RUN_HELP = `Usage: vhostd run --config FILE [options]

Serves every device of one VM, described in the JSON file FILE, from one process: each
device on its own vhost-user socket, all in the socket folder. The whole file is checked
before anything starts; a mistake is reported as one line naming the field, exit code 2.
Under systemd (Type=notify) it sends READY=1 once every socket listens.

SIGHUP reloads FILE: it is checked again as a whole (a mistake is logged and the running
devices stay as they are); devices whose entry is unchanged keep running and connected,
new ones start, removed ones stop, and changed ones restart (QEMU reconnects). name,
socketDir, control, metrics, log and workers cannot change without a restart.
Sockets passed by systemd (socket activation, LISTEN_FDS) are served instead of binding
new ones; they are matched by path (or by FileDescriptorName= equal to a device id).

Options:
  --config FILE       the VM's config (required); format: examples/config/vm1.json
  --socket-dir DIR    folder of the sockets, overriding the file's socketDir
                      (default: socketDir, else $RUNTIME_DIRECTORY set by systemd)
  --check             check the file, print what would be served, and exit
  --workers N         data-plane workers (threads) the devices share, overriding the
                      file's workers (default 1); a device with "ownWorker": true gets
                      one of its own
${SERVE_OPTIONS_HELP}
  (--metrics, --control and the log options override the file's settings;
   --metrics-any-address also allows the file's metrics address)

Example:
  vhostd run --config /etc/vhostd/vm1.json --metrics 127.0.0.1:61910
  vhostd status --config /etc/vhostd/vm1.json
`;

/** The command line of `vhostd run`, checked. */
interface RunArgs {
  config: string;
  overrides: ConfigOverrides;
  check: boolean;
}

/** Turns the command line into a checked plan (or "help"). */
export function planRun(args: string[]): VmPlan | "help" | { check: VmPlan } {
  const parsed = runArgs(args);
  if (parsed === "help") return "help";
  const plan = planVm(readConfigFile(parsed.config), parsed.overrides);
  return parsed.check ? { check: plan } : plan;
}

function runArgs(args: string[]): RunArgs | "help" {
  const { values } = usage(() =>
    parseArgs({
      args,
      strict: true,
      options: {
        ...serveOptions,
        config: { type: "string" },
        "socket-dir": { type: "string" },
        check: { type: "boolean" },
        workers: { type: "string" },
      },
    })
  );
  if (values.help) return "help";
  if (!values.config) throw new UsageError("run needs --config FILE");
  const overrides: ConfigOverrides = {};
  if (values["socket-dir"] !== undefined) overrides.socketDir = values["socket-dir"];
  if (values["log-level"] !== undefined || values["log-format"] !== undefined) {
    const given: Partial<LogSettings> = {};
    const checked = logSettings(values);
    if (values["log-level"] !== undefined) given.level = checked.level;
    if (values["log-format"] !== undefined) given.format = checked.format;
    overrides.log = given;
  }
  if (values.metrics !== undefined) overrides.metrics = parseMetricsAddress(values.metrics);
  if (values["metrics-any-address"]) overrides.metricsAnyAddress = true;
  if (values.control !== undefined) overrides.control = values.control;
  if (values.workers !== undefined) {
    overrides.workers = parseIntOption("workers", values.workers, DEFAULT_WORKERS, 1, MAX_WORKERS);
  }
  return { config: values.config, overrides, check: values.check ?? false };
}

/**
 * The reload of `vhostd run` (SIGHUP): reads `config` again and checks all of it. Devices whose
 * entry and inherited settings are unchanged keep running (see planVm); the others are planned
 * anew. The settings of the daemon itself (name, socketDir, control, metrics, log) cannot change
 * while it runs: a new value is refused, naming the field, and nothing changes.
 */
export function configReloader(
  config: string,
  overrides: ConfigOverrides,
  first: VmPlan,
): () => ServiceReload {
  let current = first;
  return () => {
    const next = planVm(readConfigFile(config), overrides, current.devices);
    const fresh = next.devices.filter((d) => !current.devices.includes(d));
    const fixed: [string, unknown, unknown][] = [
      ["name", current.name, next.name],
      ["socketDir", current.socketDir, next.socketDir],
      ["control", current.control, next.control],
      ["metrics", current.metrics, next.metrics],
      ["log", current.log, next.log],
      ["workers", current.workers, next.workers],
    ];
    for (const [field, was, now] of fixed) {
      if (JSON.stringify(was) !== JSON.stringify(now)) {
        for (const d of fresh) d.release();
        throw new ConfigError(
          field,
          `cannot change while vhostd runs (${JSON.stringify(was) ?? "none"} before, ` +
            `${JSON.stringify(now) ?? "none"} now); restart vhostd to apply it`,
        );
      }
    }
    return {
      services: next.devices.flatMap((d) => d.services),
      settle(running) {
        const serving = next.devices.filter((d) => d.services.every((s) => running.has(s)));
        for (const d of fresh) if (!serving.includes(d)) d.release();
        current = { ...next, devices: serving };
      },
    };
  };
}

function banner(plan: VmPlan): string {
  const lines = [`vhostd: serving ${plan.name}: ${plan.devices.length} device(s)`];
  for (const d of plan.devices) lines.push(`  ${d.describe}`);
  lines.push(`  status: vhostd status --control ${plan.control}`);
  if (plan.metrics && plan.metrics.port !== 0) {
    lines.push(`  metrics: http://${plan.metrics.hostname}:${plan.metrics.port}/metrics`);
  }
  lines.push("Attach them to QEMU 7.2 or newer with (guest RAM must be a shared memfd):");
  const qemu = [
    "  -object memory-backend-memfd,id=mem,size=<RAM>,share=on -machine memory-backend=mem",
  ];
  for (const d of plan.devices) {
    for (let i = 0; i < d.qemuArgs.length; i += 2) {
      qemu.push(`  ${d.qemuArgs[i]} ${d.qemuArgs[i + 1] ?? ""}`.trimEnd());
    }
  }
  return lines.join("\n") + "\n" + qemu.join(" \\\n") + "\n";
}

/** `vhostd run`. */
export async function cmdRun(args: string[]): Promise<number> {
  const parsed = runArgs(args);
  if (parsed === "help") {
    console.log(RUN_HELP);
    return 0;
  }
  const plan = planVm(readConfigFile(parsed.config), parsed.overrides);
  if (parsed.check) {
    for (const d of plan.devices) d.release();
    console.log(`${plan.name}: configuration OK\n` + banner(plan).split("\n").slice(1).join("\n"));
    return 0;
  }
  return await runServices(
    plan.devices.flatMap((d) => d.services),
    plan.log,
    banner(plan),
    {
      metrics: plan.metrics,
      control: plan.control,
      name: plan.name,
      workers: plan.workers,
      reload: configReloader(parsed.config, parsed.overrides, plan),
    },
  );
}
