/**
 * Logging setup, shared by the main thread and the data-plane workers so that every line looks
 * the same whichever thread wrote it.
 *
 * @module
 */

import { configure, getTextFormatter, jsonLinesFormatter, reset } from "@logtape/logtape";

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
  const formatter = settings.format === "json"
    ? jsonLinesFormatter
    : getTextFormatter({ timestamp: "date-time-tz", category: ".", value: "bare" });
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

function writeAll(bytes: Uint8Array): void {
  for (let off = 0; off < bytes.length;) off += Deno.stderr.writeSync(bytes.subarray(off));
}
