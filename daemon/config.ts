/**
 * The VM config file of `vhostd run`: JSON describing every device of one VM. It is checked
 * completely before anything is served; a mistake is one line naming the field
 * (`devices[1].image: file not found: /srv/vm1/data.img`), exit code 2.
 *
 * Each device has a `type`; a per-type *planner* checks that device's fields and turns them into
 * services. `blk` is built in; other device kinds register theirs with {@link registerPlanner}.
 *
 * @module
 */

import { UsageError } from "../sys/errors.ts";
import type { LogSettings } from "../log/setup.ts";
import { type ServiceOptions, socketPaths } from "./service.ts";
import { type Access, parseGroup, parseMode } from "./cli.ts";
import { checkMetricsExposure, type MetricsAddress, parseMetricsAddress } from "./metrics.ts";
import { LOG_LEVELS } from "../log/mod.ts";
import { DEFAULT_WORKERS, MAX_WORKERS } from "./worker_pool.ts";

/** A config mistake; its message starts with the field's path. */
export class ConfigError extends UsageError {
  /** Reports `message` about the field at `path` (e.g. `devices[1].image`). */
  constructor(path: string, message: string) {
    super(path ? `${path}: ${message}` : message);
    this.name = "ConfigError";
  }
}

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/**
 * Reads the fields of one JSON object, each check naming the field on failure. Call
 * {@link done} last: any field nobody read is reported as unknown (a typo must not be silently
 * ignored). Keys starting with `_` are comments.
 */
export class Fields {
  /** Path of this object, e.g. `devices[0]` (empty at the top). */
  readonly path: string;
  readonly #obj: { [key: string]: Json };
  readonly #read = new Set<string>();

  /** Wraps `value`, which must be an object, found at `path`. */
  constructor(value: unknown, path: string) {
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      throw new ConfigError(path, "must be an object");
    }
    this.#obj = value as { [key: string]: Json };
    this.path = path;
  }

  /** The path of field `key`. */
  at(key: string): string {
    return this.path ? `${this.path}.${key}` : key;
  }

  #get(key: string): Json | undefined {
    this.#read.add(key);
    return this.#obj[key];
  }

  /** Whether `key` is present. */
  has(key: string): boolean {
    return this.#obj[key] !== undefined;
  }

  /** A string field; `undefined` when absent and not required. */
  string(key: string, required: true): string;
  /** A string field; `undefined` when absent and not required. */
  string(key: string, required?: false): string | undefined;
  /** A string field; `undefined` when absent and not required. */
  string(key: string, required = false): string | undefined {
    const v = this.#get(key);
    if (v === undefined) {
      if (required) throw new ConfigError(this.at(key), "required");
      return undefined;
    }
    if (typeof v !== "string" || v === "") {
      throw new ConfigError(this.at(key), `must be a non-empty string, not ${show(v)}`);
    }
    return v;
  }

  /** A boolean field (`def` when absent). */
  boolean(key: string, def: boolean): boolean {
    const v = this.#get(key);
    if (v === undefined) return def;
    if (typeof v !== "boolean") {
      throw new ConfigError(this.at(key), `must be true or false, not ${show(v)}`);
    }
    return v;
  }

  /** A whole number from `min` to `max` (`def` when absent). */
  integer(key: string, def: number, min: number, max: number): number {
    const v = this.#get(key);
    if (v === undefined) return def;
    if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) {
      throw new ConfigError(
        this.at(key),
        `must be a whole number from ${min} to ${max}, not ${show(v)}`,
      );
    }
    return v;
  }

  /** One of `choices` (`def` when absent). */
  choice<T extends string>(key: string, choices: readonly T[], def: T): T {
    const v = this.#get(key);
    if (v === undefined) return def;
    if (typeof v !== "string" || !(choices as readonly string[]).includes(v)) {
      throw new ConfigError(this.at(key), `must be one of ${choices.join(", ")}, not ${show(v)}`);
    }
    return v as T;
  }

  /** A nested object (undefined when absent). */
  object(key: string): Fields | undefined {
    const v = this.#get(key);
    return v === undefined ? undefined : new Fields(v, this.at(key));
  }

  /** An array field (empty when absent). */
  array(key: string): Json[] {
    const v = this.#get(key);
    if (v === undefined) return [];
    if (!Array.isArray(v)) throw new ConfigError(this.at(key), `must be an array, not ${show(v)}`);
    return v;
  }

  /** A field read as-is (for planners with their own checks). */
  raw(key: string): unknown {
    return this.#get(key);
  }

  /** Fails on the first field that nobody read. */
  done(): void {
    for (const key of Object.keys(this.#obj)) {
      if (!this.#read.has(key) && !key.startsWith("_")) {
        const known = [...this.#read].filter((k) => near(k, key));
        const hint = known.length ? ` (did you mean "${known[0]}"?)` : "";
        throw new ConfigError(this.at(key), `unknown field${hint}`);
      }
    }
  }
}

function show(v: unknown): string {
  const s = JSON.stringify(v);
  return s.length > 40 ? s.slice(0, 37) + "..." : s;
}

/** Whether two field names differ by a typo (case, or at most two edits). */
function near(a: string, b: string): boolean {
  if (a.toLowerCase() === b.toLowerCase()) return true;
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) => [i]);
  for (let j = 1; j <= b.length; j++) d[0][j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      d[i][j] = Math.min(
        d[i - 1][j] + 1,
        d[i][j - 1] + 1,
        d[i - 1][j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1),
      );
    }
  }
  return d[a.length][b.length] <= 2;
}

/** What a planner gets: the device's fields and the VM-wide settings. */
export interface PlanContext {
  /** The device's fields (`type` and `id` already read). */
  fields: Fields;
  /** The device's id (unique in the file; its name in logs, metrics and status). */
  id: string;
  /** VM name. */
  vm: string;
  /** Socket access shared by all devices. */
  access: Access;
  /** Logging settings. */
  log: LogSettings;
  /**
   * Resolves the device's socket: field `key` (default `socket`), a name inside `socketDir` or an
   * absolute path; `<id>.sock` when absent. Checks the path fits a Unix socket address.
   */
  socketPath(key?: string, fallback?: string): string;
}

/** What a planner produced for one device. */
export interface DevicePlan {
  /** The services to start (usually one). */
  services: ServiceOptions[];
  /** One line for the start banner. */
  describe: string;
  /** The QEMU arguments that attach the device (for the banner and the docs). */
  qemuArgs: string[];
  /** Releases what planning opened (image fds), when a later device fails its checks. */
  release(): void;
}

/** Checks one device's fields and plans its services; throws {@link ConfigError}. */
export type DevicePlanner = (ctx: PlanContext) => DevicePlan;

const planners = new Map<string, DevicePlanner>();

/**
 * Makes device `type` usable in config files.
 *
 * @example
 * ```ts
 * registerPlanner("net", (ctx) => {
 *   const tap = ctx.fields.string("tap", true);
 *   return { services: [...], describe: `net ${ctx.id} on ${tap}`, qemuArgs: [...], release() {} };
 * });
 * ```
 */
export function registerPlanner(type: string, planner: DevicePlanner): void {
  planners.set(type, planner);
}

/** Device types that can be planned. */
export function plannerTypes(): string[] {
  return [...planners.keys()].sort();
}

/** One device of a {@link VmPlan}. */
export interface PlannedDevice extends DevicePlan {
  /** Its id. */
  id: string;
  /** Its type. */
  type: string;
  /**
   * Everything its plan was made from: its entry in the file (comments left out) and the VM-wide
   * settings it inherits (socketDir, socketMode, socketGroup, allowUids, log). A reload keeps a
   * running device whose id and fingerprint are unchanged.
   */
  fingerprint: string;
}

/** A checked VM config, ready to serve. */
export interface VmPlan {
  /** VM name. */
  name: string;
  /** Folder of the sockets. */
  socketDir: string;
  /** The devices, in file order. */
  devices: PlannedDevice[];
  /** Logging settings. */
  log: LogSettings;
  /** Metrics address, if any. */
  metrics?: MetricsAddress;
  /** Control socket path (`status` talks to it). */
  control: string;
  /** Shared data-plane workers for the devices (see `ServeExtras.workers`). */
  workers: number;
}

/** Overrides from the command line, applied over the file. */
export interface ConfigOverrides {
  /** `--socket-dir`. */
  socketDir?: string;
  /** `--workers`. */
  workers?: number;
  /** `--log-level`/`--log-format`, when given. */
  log?: Partial<LogSettings>;
  /** `--metrics`. */
  metrics?: MetricsAddress;
  /** `--metrics-any-address`: metrics may be served on an address that is not loopback. */
  metricsAnyAddress?: boolean;
  /** `--control`. */
  control?: string;
}

/** The control socket's default name inside the socket folder. */
export const CONTROL_SOCKET = "control.sock";

/** What a VM name or device id may be: letters, digits, ".", "_" or "-", at most 32. */
export const ID_RE: RegExp = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$/;

/** Reads and parses a config file (no checks beyond JSON syntax). */
export function readConfigFile(path: string): unknown {
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch (e) {
    const why = e instanceof Deno.errors.NotFound ? "file not found" : (e as Error).message;
    throw new ConfigError("", `--config ${path}: ${why}`);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new ConfigError("", `${path}: not valid JSON: ${(e as Error).message}`);
  }
}

/** The VM name and control socket a config names, without planning devices (for `status`). */
export function controlSocketOf(raw: unknown, overrides: ConfigOverrides = {}): string {
  const top = new Fields(raw, "");
  const dir = overrides.socketDir ?? top.string("socketDir") ?? Deno.env.get("RUNTIME_DIRECTORY");
  const control = overrides.control ?? top.string("control") ?? CONTROL_SOCKET;
  if (control.startsWith("/")) return control;
  if (!dir) throw new ConfigError("socketDir", "required (or --socket-dir, or RUNTIME_DIRECTORY)");
  return `${dir}/${control}`;
}

/**
 * Checks a parsed config and plans every device. On any mistake, whatever earlier devices opened
 * is released and a {@link ConfigError} is thrown.
 *
 * `running` (a reload) are the devices being served now: one whose id and {@link
 * PlannedDevice.fingerprint} are unchanged is taken over as it is (the same object, not planned
 * again: its image or TAP stays with its worker, and its entry was checked when it was planned),
 * and is never released here.
 */
export function planVm(
  raw: unknown,
  overrides: ConfigOverrides = {},
  running: readonly PlannedDevice[] = [],
): VmPlan {
  const top = new Fields(raw, "");
  const name = top.string("name") ?? "vhostd";
  if (!ID_RE.test(name)) {
    throw new ConfigError(
      "name",
      `must be letters, digits, ".", "_" or "-" (at most 32), not ${show(name)}`,
    );
  }
  // Every field is read even when the command line overrides it, so that done() does not call
  // it unknown and a mistake in it is still reported.
  const dirField = top.string("socketDir");
  const socketDir = overrides.socketDir ?? dirField ?? Deno.env.get("RUNTIME_DIRECTORY");
  if (!socketDir) {
    throw new ConfigError(
      "socketDir",
      "required (or --socket-dir, or run under systemd with RuntimeDirectory=)",
    );
  }
  checkDirectory(overrides.socketDir ? "--socket-dir" : "socketDir", socketDir);
  const access: Access = { socketMode: modeField(top, "socketMode") };
  const group = groupField(top, "socketGroup");
  if (group !== undefined) access.socketGroup = group;
  if (top.has("allowUids")) access.allowUids = uidsField(top, "allowUids");
  const logFields = top.object("log");
  const level = logFields?.choice("level", LOG_LEVELS, "info") ?? "info";
  const format = logFields?.choice("format", ["text", "json"] as const, "text") ?? "text";
  const log: LogSettings = {
    level: overrides.log?.level ?? level,
    format: overrides.log?.format ?? format,
  };
  logFields?.done();
  let metrics = overrides.metrics;
  const metricsField = top.string("metrics");
  if (metrics === undefined && metricsField !== undefined) {
    try {
      metrics = parseMetricsAddress(metricsField);
    } catch {
      throw new ConfigError(
        "metrics",
        `must be HOST:PORT like 127.0.0.1:61910, not ${show(metricsField)}`,
      );
    }
  }
  const metricsAnyAddress = top.boolean("metricsAnyAddress", false);
  if (metrics !== undefined) {
    const fromFile = overrides.metrics === undefined;
    try {
      checkMetricsExposure(
        metrics,
        metricsAnyAddress || overrides.metricsAnyAddress === true,
        fromFile ? `"metricsAnyAddress": true` : "--metrics-any-address",
      );
    } catch (e) {
      if (!fromFile) throw e;
      throw new ConfigError("metrics", (e as Error).message.replace(/^--metrics /, ""));
    }
  }
  const controlField = top.string("control");
  const controlName = overrides.control ?? controlField ?? CONTROL_SOCKET;
  const control = controlName.startsWith("/") ? controlName : `${socketDir}/${controlName}`;
  const workersField = top.integer("workers", DEFAULT_WORKERS, 1, MAX_WORKERS);
  const workers = overrides.workers ?? workersField;
  const list = top.array("devices");
  if (list.length === 0) throw new ConfigError("devices", "must list at least one device");
  top.done();

  const devices: PlannedDevice[] = [];
  const ids = new Map<string, string>();
  const sockets = new Map<string, string>([[control, "control"]]);
  const inherited = [socketDir, access, log];
  const runningById = new Map(running.map((d) => [d.id, d]));
  const kept = new Set<PlannedDevice>();
  try {
    list.forEach((entry, i) => {
      const fields = new Fields(entry, `devices[${i}]`);
      const type = fields.string("type", true);
      const planner = planners.get(type);
      if (!planner) {
        throw new ConfigError(
          fields.at("type"),
          `unknown device type ${show(type)} (this build knows: ${plannerTypes().join(", ")})`,
        );
      }
      const id = fields.string("id") ?? `${type}${i}`;
      if (!ID_RE.test(id)) {
        throw new ConfigError(
          fields.at("id"),
          `must be letters, digits, ".", "_" or "-" (at most 32), not ${show(id)}`,
        );
      }
      if (ids.has(id)) {
        throw new ConfigError(fields.at("id"), `${show(id)} is also ${ids.get(id)}'s id`);
      }
      ids.set(id, fields.path);
      const fingerprint = canonicalJson([entry, ...inherited]);
      const same = runningById.get(id);
      if (same !== undefined && same.fingerprint === fingerprint) {
        for (const s of same.services) {
          for (const path of socketPaths(s)) {
            const other = sockets.get(path);
            if (other) {
              throw new ConfigError(fields.at("socket"), `${path} is also ${other}'s socket`);
            }
            sockets.set(path, fields.at("socket"));
          }
        }
        devices.push(same);
        kept.add(same);
        return;
      }
      const ctx: PlanContext = {
        fields,
        id,
        vm: name,
        access,
        log,
        socketPath(key = "socket", fallback = `${id}.sock`) {
          const given = fields.string(key) ?? fallback;
          const path = given.startsWith("/") ? given : `${socketDir}/${given}`;
          if (new TextEncoder().encode(path).length > 107) {
            throw new ConfigError(fields.at(key), `socket path ${path} is longer than 107 bytes`);
          }
          const other = sockets.get(path);
          if (other) throw new ConfigError(fields.at(key), `${path} is also ${other}'s socket`);
          sockets.set(path, fields.at(key));
          return path;
        },
      };
      const ownWorker = fields.boolean("ownWorker", false);
      const plan = planner(ctx);
      if (ownWorker) { for (const s of plan.services) s.ownWorker = true; }
      devices.push({ ...plan, id, type, fingerprint });
      try {
        fields.done();
      } catch (e) {
        plan.release();
        devices.pop();
        throw e;
      }
    });
  } catch (e) {
    for (const d of devices) if (!kept.has(d)) d.release();
    throw e;
  }
  return { name, socketDir, devices, log, metrics, control, workers };
}

/** JSON with object keys sorted and comment keys (`_...`) left out: equal for equal meaning. */
function canonicalJson(value: unknown): string {
  return JSON.stringify(value, (_key, v) => {
    if (v === null || typeof v !== "object" || Array.isArray(v)) return v;
    const out: Record<string, unknown> = {};
    for (const k of Object.keys(v).sort()) if (!k.startsWith("_")) out[k] = v[k];
    return out;
  });
}

/** An octal file mode field such as `"0660"` (0600 when absent). */
export function modeField(f: Fields, key: string): number {
  const v = f.string(key);
  try {
    return parseMode(v, f.at(key));
  } catch (e) {
    throw new ConfigError("", (e as Error).message);
  }
}

/** A group field, by name or number, as a gid (undefined when absent). */
export function groupField(f: Fields, key: string): number | undefined {
  const group = f.string(key);
  if (group === undefined) return undefined;
  try {
    return parseGroup(group, f.at(key));
  } catch (e) {
    throw new ConfigError("", (e as Error).message);
  }
}

/** A list of numeric uids (empty when absent). */
export function uidsField(f: Fields, key: string): number[] {
  return f.array(key).map((u, i) => {
    if (typeof u !== "number" || !Number.isInteger(u) || u < 0 || u > 0xffffffff) {
      throw new ConfigError(`${f.at(key)}[${i}]`, `must be a numeric uid, not ${show(u)}`);
    }
    return u;
  });
}

function checkDirectory(field: string, path: string): void {
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(path);
  } catch {
    throw new ConfigError(field, `directory not found: ${path}`);
  }
  if (!info.isDirectory) throw new ConfigError(field, `${path} is not a directory`);
}
