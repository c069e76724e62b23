/**
 * The logger every vhostd thread uses: named by a category (`["vhostd", "blk"]`), message
 * templates with `{placeholders}` filled from a properties object, six levels, and one sink per
 * isolate that each thread (main or data-plane worker) sets up for itself with
 * {@link configureLogging}. Until then records are dropped, so library code may log freely.
 *
 * It replaces a general-purpose logging package whose module graph cost about 9 MiB of memory in
 * every worker isolate; vhostd needs only this much of one.
 *
 * @example
 * ```ts
 * import { getLogger } from "./mod.ts";
 * getLogger(["vhostd", "blk"]).info("front-end connected: pid {pid}", { pid: 1234 });
 * ```
 *
 * @module
 */

/** Log levels, lowest first. */
export type LogLevel = "trace" | "debug" | "info" | "warning" | "error" | "fatal";

/** The levels in order; a level's index is its severity. */
export const LOG_LEVELS: readonly LogLevel[] = [
  "trace",
  "debug",
  "info",
  "warning",
  "error",
  "fatal",
];

/** One log event, as a formatter sees it. */
export interface LogRecord {
  /** The logger's category, e.g. `["vhostd", "blk"]`. */
  readonly category: readonly string[];
  /** Severity. */
  readonly level: LogLevel;
  /** Milliseconds since the epoch. */
  readonly timestamp: number;
  /** The template as written, placeholders included. */
  readonly rawMessage: string;
  /** Values for the placeholders, and any other structured data. */
  readonly properties: Readonly<Record<string, unknown>>;
}

/** Where records go once a thread has configured logging. */
export interface LogSink {
  /** Records below this level are dropped before anything is formatted. */
  lowestLevel: LogLevel;
  /** Writes one record. */
  write(record: LogRecord): void;
}

/** A logger for one category. */
export interface Logger {
  /** The category. */
  readonly category: readonly string[];
  /** Logs at `trace`. */
  trace(message: string, properties?: Record<string, unknown>): void;
  /** Logs at `debug`. */
  debug(message: string, properties?: Record<string, unknown>): void;
  /** Logs at `info`. */
  info(message: string, properties?: Record<string, unknown>): void;
  /** Logs at `warning`. */
  warn(message: string, properties?: Record<string, unknown>): void;
  /** Logs at `error`. */
  error(message: string, properties?: Record<string, unknown>): void;
  /** Logs at `fatal`. */
  fatal(message: string, properties?: Record<string, unknown>): void;
}

let sink: LogSink | null = null;
let lowest = LOG_LEVELS.length; // nothing passes until configured

/** Sets this thread's sink (replacing any earlier one); `null` drops everything again. */
export function configureLogging(newSink: LogSink | null): void {
  sink = newSink;
  lowest = newSink === null ? LOG_LEVELS.length : LOG_LEVELS.indexOf(newSink.lowestLevel);
}

const EMPTY: Readonly<Record<string, unknown>> = Object.freeze({});

class CategoryLogger implements Logger {
  readonly category: readonly string[];

  constructor(category: readonly string[]) {
    this.category = category;
  }

  #log(level: number, message: string, properties?: Record<string, unknown>): void {
    if (level < lowest || sink === null) return;
    sink.write({
      category: this.category,
      level: LOG_LEVELS[level],
      timestamp: Date.now(),
      rawMessage: message,
      properties: properties ?? EMPTY,
    });
  }

  trace(message: string, properties?: Record<string, unknown>): void {
    this.#log(0, message, properties);
  }
  debug(message: string, properties?: Record<string, unknown>): void {
    this.#log(1, message, properties);
  }
  info(message: string, properties?: Record<string, unknown>): void {
    this.#log(2, message, properties);
  }
  warn(message: string, properties?: Record<string, unknown>): void {
    this.#log(3, message, properties);
  }
  error(message: string, properties?: Record<string, unknown>): void {
    this.#log(4, message, properties);
  }
  fatal(message: string, properties?: Record<string, unknown>): void {
    this.#log(5, message, properties);
  }
}

const loggers = new Map<string, Logger>();

/** The logger of `category` (one instance per category and thread). */
export function getLogger(category: string | readonly string[]): Logger {
  const parts = typeof category === "string" ? [category] : category;
  const key = parts.join("\u0000");
  let l = loggers.get(key);
  if (l === undefined) {
    l = new CategoryLogger(Object.freeze([...parts]));
    loggers.set(key, l);
  }
  return l;
}

/**
 * The message with its placeholders filled: `{name}` takes `properties.name` (strings as they
 * are, anything else through {@link showValue}); unknown names stay as written, `{{` and `}}` are
 * braces.
 */
export function renderMessage(record: LogRecord): string {
  return record.rawMessage.replace(/\{\{|\}\}|\{([^{}]*)\}/g, (whole, name?: string) => {
    if (whole === "{{") return "{";
    if (whole === "}}") return "}";
    if (name === undefined || !Object.hasOwn(record.properties, name)) return whole;
    const v = record.properties[name];
    return typeof v === "string" ? v : showValue(v);
  });
}

/** A value for a message: numbers, booleans and the like as text, objects as JSON. */
export function showValue(value: unknown): string {
  if (value === null || typeof value !== "object") return String(value);
  if (value instanceof Error) return value.stack ?? value.message;
  try {
    return JSON.stringify(value, (_k, v) => typeof v === "bigint" ? v.toString() : v);
  } catch {
    return String(value);
  }
}
