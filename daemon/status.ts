/**
 * `vhostd status`: asks a running daemon over its control socket and prints its devices,
 * front-ends, negotiated features, queue states and counters.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { UsageError } from "../sys/errors.ts";
import { usage } from "./cli.ts";
import { CONTROL_SOCKET, controlSocketOf, readConfigFile } from "./config.ts";
import { requestStatus, type StatusReport } from "./control.ts";

/** `vhostd status --help`. */
export const STATUS_HELP =
  `Usage: vhostd status (--config FILE | --socket-dir DIR | --control PATH) [--json]

Asks a running vhostd for its state, through its control socket (${CONTROL_SOCKET} in the
socket folder for "run"; "--control PATH" for the other commands), and prints a table: devices,
the connected front-end (pid, uid), negotiated features, and per queue its state and counters.

Options:
  --config FILE       the VM config the daemon runs ("run --config FILE")
  --socket-dir DIR    the daemon's socket folder (status asks DIR/${CONTROL_SOCKET})
  --control PATH      the control socket itself
  --all-queues        also list queues the front-end has not set up
  --json              print the daemon's answer as JSON
  -h, --help          show this text

Example:
  vhostd status --config /etc/vhostd/vm1.json
`;

const STATUS_BITS: [number, string][] = [
  [128, "failed"],
  [64, "needs-reset"],
  [4, "driver-ok"],
  [8, "features-ok"],
  [2, "driver"],
  [1, "acknowledge"],
];

function statusText(s: number): string {
  const first = STATUS_BITS.find(([bit]) => s & bit);
  return s === 0 ? "0 (reset)" : `0x${s.toString(16)} (${first ? first[1] : "?"})`;
}

function bytesText(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) [n, i] = [n / 1024, i + 1];
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

function table(rows: string[][]): string {
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
  return rows.map((r) => r.map((cell, c) => cell.padEnd(widths[c])).join("  ").trimEnd()).join(
    "\n",
  );
}

/** Formats a status report as the tables `status` prints. */
export function formatStatus(r: StatusReport, allQueues = false): string {
  // A daemon from before the version was reported answers without one.
  const version = r.version ?? "(version unknown)";
  const out = [
    `${r.name}: vhostd ${version}, pid ${r.pid}, up ${r.uptimeSeconds} s, ` +
    `${r.devices.length} device(s)`,
    "",
  ];
  const devices = [[
    "DEVICE",
    "TYPE",
    "SOCKET",
    "WORKER",
    "FRONT-END",
    "STATUS",
    "FEATURES (acked/offered)",
    "PROTOCOL",
  ]];
  for (const d of r.devices) {
    devices.push([
      d.name,
      d.type,
      d.socket,
      String(d.worker),
      !d.running
        ? "(stopped)"
        : d.frontEnd
        ? `pid ${d.frontEnd.pid} uid ${d.frontEnd.uid}`
        : `- (${d.connects} so far)`,
      statusText(d.status),
      `${d.ackedFeatures}/${d.offeredFeatures}`,
      d.protocolFeatures,
    ]);
  }
  out.push(table(devices), "");
  const queues = [[
    "DEVICE",
    "QUEUE",
    "SIZE",
    "STATE",
    "REQUESTS",
    "BYTES",
    "ERRORS",
    "KICKS",
    "IRQS",
    "IN-FLIGHT",
    "MEAN-LATENCY",
  ]];
  let hidden = 0;
  for (const d of r.devices) {
    for (const q of d.queues) {
      if (!allQueues && q.size === 0 && q.requests === 0) {
        hidden++;
        continue;
      }
      const state = q.broken
        ? "broken"
        : [q.started ? "started" : "stopped", q.enabled ? "enabled" : "disabled"].join(",");
      queues.push([
        d.name,
        String(q.index),
        String(q.size),
        state,
        String(q.requests),
        bytesText(q.bytes),
        String(q.errors),
        String(q.kicks),
        String(q.interrupts),
        String(q.inFlight),
        `${q.meanLatencyUs} µs`,
      ]);
    }
  }
  out.push(table(queues));
  if (hidden) out.push(`(${hidden} queue(s) not set up by the front-end; --all-queues lists them)`);
  return out.join("\n");
}

/** `parseArgs` options naming a running daemon's control socket (see {@link controlPathOf}). */
export const controlPathOptions = {
  config: { type: "string" },
  "socket-dir": { type: "string" },
  control: { type: "string" },
} as const;

/**
 * The control socket `command` talks to, from `--control PATH`, `--config FILE` (with
 * `--socket-dir DIR`, as `run` was given) or `--socket-dir DIR` alone.
 */
export function controlPathOf(
  values: { control?: string; config?: string; "socket-dir"?: string },
  command: string,
): string {
  if (values.control !== undefined) return values.control;
  if (values.config !== undefined) {
    return controlSocketOf(readConfigFile(values.config), { socketDir: values["socket-dir"] });
  }
  if (values["socket-dir"] !== undefined) return `${values["socket-dir"]}/${CONTROL_SOCKET}`;
  throw new UsageError(`${command} needs --config FILE, --socket-dir DIR or --control PATH`);
}

/** `vhostd status`. */
export async function cmdStatus(args: string[]): Promise<number> {
  const { values } = usage(() =>
    parseArgs({
      args,
      strict: true,
      options: {
        ...controlPathOptions,
        "all-queues": { type: "boolean" },
        json: { type: "boolean" },
        help: { type: "boolean", short: "h" },
      },
    })
  );
  if (values.help) {
    console.log(STATUS_HELP);
    return 0;
  }
  const report = await requestStatus(controlPathOf(values, "status"));
  console.log(
    values.json ? JSON.stringify(report, null, 2) : formatStatus(report, values["all-queues"]),
  );
  return 0;
}
