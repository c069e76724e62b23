/**
 * vhostd's sink for the logger: stderr, as text or JSON lines, with journald's priorities when
 * stderr is the journal. Every thread (the main thread, each data-plane worker, the chardev
 * console worker) calls {@link setupLogging} with the same settings, so that every line looks the
 * same whichever thread wrote it.
 *
 * @module
 */

import {
  configureLogging,
  type LogLevel,
  type LogRecord,
  renderMessage,
  showValue,
} from "./mod.ts";

/** How to log: level and format. Plain data, so it can be posted to workers. */
export interface LogSettings {
  /** Lowest level written. */
  level: LogLevel;
  /** `text` for people, `json` for collectors. */
  format: "text" | "json";
}

/** Default settings: info, text. */
export const defaultLogSettings: LogSettings = { level: "info", format: "text" };

/**
 * Sends this thread's logs to stderr, synchronously, in the chosen format. When stderr is
 * journald's stream (see {@link stderrIsJournal}), each line starts with its syslog priority
 * (`<3>`), which journald strips and records, and text lines carry no time of their own (the
 * journal stamps every entry).
 */
export function setupLogging(settings: LogSettings): void {
  const journal = stderrIsJournal();
  const format = settings.format === "json"
    ? jsonLine
    : (journal ? (r: LogRecord) => textLine(r, false) : textLine);
  const render = journal ? (r: LogRecord) => `<${PRIORITY[r.level]}>${format(r)}` : format;
  // Synchronous writes: a data-plane worker blocks in epoll_wait, so nothing may wait for its
  // event loop to flush.
  configureLogging({
    lowestLevel: settings.level,
    write: (record) => writeAll(encoder.encode(render(record))),
  });
}

/** syslog priority of each level, as journald reads it from a `<N>` line prefix. */
const PRIORITY: Record<LogLevel, number> = {
  trace: 7,
  debug: 7,
  info: 6,
  warning: 4,
  error: 3,
  fatal: 2,
};

let journalStream: boolean | undefined;

/**
 * Whether stderr is connected to journald: systemd sets `JOURNAL_STREAM` to the `device:inode`
 * of the stream it connected, and a process whose stderr was redirected elsewhere since (a shell
 * pipe inside the unit) still inherits the variable, hence the comparison with stderr itself.
 */
export function stderrIsJournal(): boolean {
  if (journalStream !== undefined) return journalStream;
  journalStream = false;
  const expected = Deno.env.get("JOURNAL_STREAM");
  if (expected) {
    try {
      const st = Deno.statSync("/proc/self/fd/2");
      journalStream = `${st.dev}:${st.ino}` === expected;
    } catch {
      // no /proc: not a systemd host
    }
  }
  return journalStream;
}

/**
 * An error message for stderr outside the logger (a usage error, a failed start): with the
 * error priority when stderr is the journal, so that `journalctl -p err` finds it.
 */
export function errorLine(message: string): string {
  if (!stderrIsJournal()) return message;
  return message.split("\n").map((line) => `<${PRIORITY.error}>${line}`).join("\n");
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

const SHORT: Record<LogLevel, string> = {
  trace: "TRC",
  debug: "DBG",
  info: "INF",
  warning: "WRN",
  error: "ERR",
  fatal: "FTL",
};

/** `2026-11-21 08:25:54.892 +00` (UTC). */
function utcTime(ms: number): string {
  const iso = new Date(ms).toISOString(); // 2026-11-21T08:25:54.892Z
  return `${iso.slice(0, 10)} ${iso.slice(11, 23)} +00`;
}

/**
 * Text for people: `<time> [INF] vhostd.<device>: [queue N] message` (without the time when
 * `withTime` is false). The category names the device; a queue the message is about, when not
 * already in its text, is prefixed.
 */
export function textLine(record: LogRecord, withTime = true): string {
  const q = record.properties.queue;
  const prefix = q !== undefined && !record.rawMessage.includes("{queue}") ? `[queue ${q}] ` : "";
  const time = withTime ? `${utcTime(record.timestamp)} ` : "";
  return `${time}[${SHORT[record.level]}] ${record.category.join(".")}: ` +
    `${prefix}${renderMessage(record)}\n`;
}

/**
 * JSON lines for collectors: `@timestamp`, `level`, `message` (rendered), `logger` (the
 * category), `properties`, and top-level `device` and `queue` when the record is about one.
 */
export function jsonLine(record: LogRecord): string {
  const line: Record<string, unknown> = {
    "@timestamp": new Date(record.timestamp).toISOString(),
    level: record.level.toUpperCase(),
    message: renderMessage(record),
    logger: record.category.join("."),
    properties: Object.fromEntries(
      Object.entries(record.properties).map(([k, v]) => [k, jsonValue(v)]),
    ),
  };
  const device = recordDevice(record);
  if (device !== undefined) line.device = device;
  const q = record.properties.queue;
  if (typeof q === "number") line.queue = q;
  return JSON.stringify(line) + "\n";
}

/** Values JSON can carry as they are; the rest (errors, bigints, ...) as text. */
function jsonValue(v: unknown): unknown {
  if (v === null || typeof v === "string" || typeof v === "number" || typeof v === "boolean") {
    return v;
  }
  return showValue(v);
}

function writeAll(bytes: Uint8Array): void {
  for (let off = 0; off < bytes.length;) off += Deno.stderr.writeSync(bytes.subarray(off));
}
