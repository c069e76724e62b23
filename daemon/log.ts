/**
 * Logging setup, shared by the main thread and the data-plane workers so that every line looks
 * the same whichever thread wrote it.
 *
 * @module
 */

import {
  configure,
  getTextFormatter,
  jsonLinesFormatter,
  type LogRecord,
  reset,
  type TextFormatter,
} from "@logtape/logtape";

/** Log levels, lowest first (LogTape's names). */
export type LogLevel = "trace" | "debug" | "info" | "warning" | "error" | "fatal";

/** How to log: level and format. Plain data, so it can be posted to workers. */
export interface LogSettings {
  /** Lowest level written. */
  level: LogLevel;
  /** `text` for people, `json` for collectors. */
  format: "text" | "json";
}

/** Default settings: info, text. */
export const defaultLogSettings: LogSettings = { level: "info", format: "text" };

/** Log levels accepted on the command line. */
export const LOG_LEVELS: readonly LogLevel[] = [
  "trace",
  "debug",
  "info",
  "warning",
  "error",
  "fatal",
];

/** Configures LogTape to write to stderr. */
export async function setupLogging(settings: LogSettings): Promise<void> {
  await reset();
  const formatter = settings.format === "json" ? jsonFormatter : textFormatter;
  await configure({
    reset: true,
    // Synchronous writes: a data-plane worker blocks in epoll_wait, so nothing may wait for its
    // event loop to flush.
    sinks: { stderr: (record) => writeAll(encoder.encode(formatter(record))) },
    loggers: [
      { category: ["vhostd"], sinks: ["stderr"], lowestLevel: settings.level },
      { category: ["logtape", "meta"], sinks: ["stderr"], lowestLevel: "warning" },
    ],
  });
}

const encoder = new TextEncoder();

/** Logger categories under `vhostd` that are not devices. */
const NOT_DEVICES = new Set(["daemon", "loop"]);

/**
 * The device a record is about: its `device` property, else the category below `vhostd` (every
 * device logs as `vhostd.<device name>`), else none.
 */
export function recordDevice(record: LogRecord): string | undefined {
  const d = record.properties.device;
  if (typeof d === "string") return d;
  const c = record.category;
  return c.length >= 2 && c[0] === "vhostd" && !NOT_DEVICES.has(c[1]) ? c[1] : undefined;
}

const baseText = getTextFormatter({ timestamp: "date-time-tz", category: ".", value: "bare" });

/**
 * Text for people: `<time> [INF] vhostd.<device>: [queue N] message`. The category names the
 * device; a queue the message is about, when not already in its text, is prefixed.
 */
const textFormatter: TextFormatter = (record) => {
  const q = record.properties.queue;
  if (q === undefined || record.rawMessage.toString().includes("{queue}")) return baseText(record);
  const [first, ...rest] = record.message;
  return baseText({ ...record, message: [`[queue ${q}] ${first}`, ...rest] });
};

/** JSON lines for collectors: LogTape's fields plus top-level `device` and `queue`. */
const jsonFormatter: TextFormatter = (record) => {
  const line = JSON.parse(jsonLinesFormatter(record)) as Record<string, unknown>;
  const device = recordDevice(record);
  if (device !== undefined) line.device = device;
  const q = record.properties.queue;
  if (typeof q === "number") line.queue = q;
  return JSON.stringify(line) + "\n";
};

function writeAll(bytes: Uint8Array): void {
  for (let off = 0; off < bytes.length;) off += Deno.stderr.writeSync(bytes.subarray(off));
}
