/**
 * Prometheus metrics and a health check over HTTP, served by the main thread from the counters
 * the workers keep in shared memory (daemon/stats.ts). Serving a scrape never touches a worker.
 *
 * @module
 */

import { UsageError } from "../sys/errors.ts";
import {
  IoDirection,
  ioSlotBase,
  IoStat,
  LATENCY_BUCKETS,
  latencyBucketLimit,
  QueueStat,
} from "../ring/queue_stats.ts";
import type { MetricSeries } from "../devices/device.ts";
import { VERSION } from "./version.ts";
import type { PortSnapshot } from "./stats.ts";
import { isLoopback, parseIpAddress } from "../sys/socket.ts";

/** Where the metrics server listens. */
export interface MetricsAddress {
  /** Host name or address, e.g. `127.0.0.1`. */
  hostname: string;
  /** TCP port (0: any free port). */
  port: number;
}

/** Parses `HOST:PORT` (`[v6]:PORT` for IPv6). */
export function parseMetricsAddress(s: string): MetricsAddress {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$/.exec(s);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) {
    throw new UsageError(`--metrics must be HOST:PORT like 127.0.0.1:61910, not "${s}"`);
  }
  return { hostname: m[1] ?? m[2], port };
}

/**
 * Refuses a metrics address that is not loopback unless `anyAddress` says so: `/metrics` and
 * `/healthz` have no authentication, and they tell anyone who reaches them which devices a VM has
 * and how busy they are. A host name other than `localhost` counts as not loopback (what it
 * resolves to is not ours to know). `allowedBy` names the flag or field that allows it.
 */
export function checkMetricsExposure(
  address: MetricsAddress,
  anyAddress: boolean,
  allowedBy: string,
): void {
  if (anyAddress || isLoopbackHost(address.hostname)) return;
  throw new UsageError(
    `--metrics ${address.hostname}:${address.port} would serve metrics without authentication ` +
      `to every host that reaches ${address.hostname}; use a loopback address like ` +
      `127.0.0.1:${address.port}, or allow it with ${allowedBy}`,
  );
}

/** Whether metrics on `hostname` are reachable from this machine only. */
export function isLoopbackHost(hostname: string): boolean {
  if (hostname === "localhost") return true;
  const addr = parseIpAddress(hostname);
  return addr !== null && isLoopback(addr);
}

/** A device as the metrics and status endpoints see it. */
export interface ObservedDevice {
  /** Device name (the config's id), the `device` label. */
  name: string;
  /** Device type (`blk`, `net`, ...). */
  type: string;
  /** The name of the service the device belongs to (a switch's, for its ports). */
  service: string;
  /** Its vhost-user socket. */
  socket: string;
  /** Whether its worker is still serving. */
  running: boolean;
  /** The number of the data-plane worker serving it. */
  worker: number;
  /** The latest state and counters. */
  snapshot: PortSnapshot;
  /** The series of the device's own counters (values in `snapshot.device`). */
  metrics: readonly MetricSeries[];
}

const COUNTERS: [string, number, string][] = [
  ["requests_total", QueueStat.REQUESTS, "Requests completed."],
  [
    "bytes_total",
    QueueStat.BYTES,
    "Bytes in completed requests: driver-supplied plus device-written, headers included.",
  ],
  ["errors_total", QueueStat.ERRORS, "Requests that failed, and ring errors."],
  ["kicks_total", QueueStat.KICKS, "Driver notifications (kicks) received."],
  ["interrupts_total", QueueStat.INTERRUPTS, "Interrupts (call eventfd signals) sent."],
];

const DIRECTIONS: [string, number][] = [["read", IoDirection.READ], ["write", IoDirection.WRITE]];

const esc = (v: string) => v.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");

/** `{k="v",...}` of `labels`, values escaped. */
function labelText(labels: Record<string, string>): string {
  return "{" + Object.entries(labels).map(([k, v]) => `${k}="${esc(v)}"`).join(",") + "}";
}

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;

/** What the exposition says about the daemon itself. */
export interface DaemonInfo {
  /** The VM (daemon) name: the `vm` label of every series. */
  vm: string;
}

/**
 * Renders the Prometheus text exposition (format 0.0.4) of `devices`: every series is labelled
 * `vm`, and the daemon's build and process metrics come first.
 */
export function renderMetrics(devices: readonly ObservedDevice[], info: DaemonInfo): string {
  const out: string[] = [];
  const families = new Set<string>();
  const family = (name: string, type: string, help: string) => {
    families.add(name);
    // HELP text escapes only backslashes and line feeds (the format's rule, unlike label values).
    out.push(
      `# HELP ${name} ${help.replace(/\\/g, "\\\\").replace(/\n/g, "\\n")}`,
      `# TYPE ${name} ${type}`,
    );
  };
  const vm = { vm: info.vm };
  const sample = (name: string, labels: Record<string, string>, value: number) => {
    out.push(`${name}${labelText({ ...vm, ...labels })} ${value}`);
  };
  family("vhostd_build_info", "gauge", "Always 1; its labels say which vhostd and Deno run.");
  sample("vhostd_build_info", { version: VERSION, deno: Deno.version.deno }, 1);
  for (const p of processMetrics()) {
    family(p.name, p.type, p.help);
    sample(p.name, {}, p.value);
  }
  family("vhostd_device_up", "gauge", "1 while the device's worker serves, 0 after it stopped.");
  for (const d of devices) {
    sample("vhostd_device_up", { device: d.name, type: d.type }, d.running ? 1 : 0);
  }
  family("vhostd_device_connected", "gauge", "1 while a front-end (QEMU) is connected.");
  for (const d of devices) {
    sample("vhostd_device_connected", { device: d.name }, d.snapshot.connected ? 1 : 0);
  }
  family("vhostd_device_connects_total", "counter", "Front-end connections accepted.");
  for (const d of devices) {
    sample("vhostd_device_connects_total", { device: d.name }, d.snapshot.connects);
  }
  for (const [name, slot, help] of COUNTERS) {
    family(`vhostd_queue_${name}`, "counter", help);
    for (const d of devices) {
      for (const q of d.snapshot.queues) {
        sample(
          `vhostd_queue_${name}`,
          { device: d.name, queue: String(q.index) },
          q.counters[slot],
        );
      }
    }
  }
  family("vhostd_queue_in_flight", "gauge", "Requests taken from the ring and not yet completed.");
  for (const d of devices) {
    for (const q of d.snapshot.queues) {
      sample(
        "vhostd_queue_in_flight",
        { device: d.name, queue: String(q.index) },
        q.counters[QueueStat.IN_FLIGHT],
      );
    }
  }
  family(
    "vhostd_queue_latency_seconds",
    "histogram",
    "Request latency, from the start of the batch the back-end took it in to its completion.",
  );
  for (const d of devices) {
    for (const q of d.snapshot.queues) {
      histogram(
        sample,
        "vhostd_queue_latency_seconds",
        { device: d.name, queue: String(q.index) },
        q.counters,
        QueueStat.LATENCY_BUCKET0,
        q.counters[QueueStat.LATENCY_SUM],
      );
    }
  }
  // Reads and writes: for disks, and any other device that counts them.
  const io = devices.filter((d) => d.type === "blk" || d.snapshot.io.some((v) => v !== 0));
  family(
    "vhostd_io_requests_total",
    "counter",
    "Reads and writes completed (direction read or write), failed ones included.",
  );
  for (const d of io) {
    for (const [direction, dir] of DIRECTIONS) {
      const at = ioSlotBase(dir) + IoStat.REQUESTS;
      sample("vhostd_io_requests_total", { device: d.name, direction }, d.snapshot.io[at]);
    }
  }
  family("vhostd_io_bytes_total", "counter", "Data bytes read or written by successful requests.");
  for (const d of io) {
    for (const [direction, dir] of DIRECTIONS) {
      const at = ioSlotBase(dir) + IoStat.BYTES;
      sample("vhostd_io_bytes_total", { device: d.name, direction }, d.snapshot.io[at]);
    }
  }
  family(
    "vhostd_io_latency_seconds",
    "histogram",
    "Read or write latency, from the start of the batch the back-end took it in to its completion.",
  );
  for (const d of io) {
    for (const [direction, dir] of DIRECTIONS) {
      const base = ioSlotBase(dir);
      histogram(
        sample,
        "vhostd_io_latency_seconds",
        { device: d.name, direction },
        d.snapshot.io,
        base + IoStat.LATENCY_BUCKET0,
        d.snapshot.io[base + IoStat.LATENCY_SUM],
      );
    }
  }
  // The devices' own counters, grouped by name (a family's lines must be together).
  const own = new Map<string, { series: MetricSeries; device: ObservedDevice; value: number }[]>();
  for (const d of devices) {
    d.metrics.forEach((series, i) => {
      const name = `vhostd_${series.name}`;
      if (!METRIC_NAME.test(name) || families.has(name)) return;
      const list = own.get(name) ?? [];
      list.push({ series, device: d, value: d.snapshot.device[i] ?? 0 });
      own.set(name, list);
    });
  }
  for (const [name, list] of own) {
    const first = list[0].series;
    family(name, first.type === "gauge" ? "gauge" : "counter", first.help);
    for (const { series, device, value } of list) {
      const labels: Record<string, string> = {
        device: series.part ? `${device.service}.${series.part}` : device.name,
      };
      for (const [k, v] of Object.entries(series.labels ?? {})) {
        if (LABEL_NAME.test(k) && k !== "vm" && k !== "device" && !k.startsWith("__")) {
          labels[k] = v;
        }
      }
      sample(name, labels, value);
    }
  }
  return out.join("\n") + "\n";
}

/** Adds a histogram's cumulative buckets, sum and count (buckets from `values[first]` on). */
function histogram(
  sample: (name: string, labels: Record<string, string>, value: number) => void,
  name: string,
  labels: Record<string, string>,
  values: Float64Array,
  first: number,
  sum: number,
): void {
  let cumulative = 0;
  for (let i = 0; i < LATENCY_BUCKETS; i++) {
    cumulative += values[first + i];
    const le = latencyBucketLimit(i);
    sample(`${name}_bucket`, { ...labels, le: le === Infinity ? "+Inf" : String(le) }, cumulative);
  }
  sample(`${name}_sum`, labels, sum);
  sample(`${name}_count`, labels, cumulative);
}

/**
 * Clock ticks per second of /proc's CPU times: the kernel's USER_HZ, 100 on every architecture
 * Linux runs on (it is part of the ABI, whatever the kernel's own HZ).
 */
const USER_HZ = 100;

/**
 * The standard process metrics, read from /proc/self: resident memory, CPU time (all threads),
 * open and maximum file descriptors, start time. One that cannot be read is left out.
 */
export function processMetrics(): { name: string; type: string; help: string; value: number }[] {
  const out: { name: string; type: string; help: string; value: number }[] = [];
  const read = (path: string) => {
    try {
      return Deno.readTextFileSync(path);
    } catch {
      return "";
    }
  };
  const stat = read("/proc/self/stat");
  // Fields after the command name, which is in parentheses and may hold anything, ")" too.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  if (fields.length > 19) {
    out.push({
      name: "process_cpu_seconds_total",
      type: "counter",
      help: "User and system CPU time of all the daemon's threads, in seconds.",
      value: (Number(fields[11]) + Number(fields[12])) / USER_HZ,
    });
  }
  const rss = /^VmRSS:\s+(\d+) kB$/m.exec(read("/proc/self/status"));
  if (rss) {
    out.push({
      name: "process_resident_memory_bytes",
      type: "gauge",
      help: "Resident memory size in bytes.",
      value: Number(rss[1]) * 1024,
    });
  }
  try {
    let fds = 0;
    for (const _ of Deno.readDirSync("/proc/self/fd")) fds++;
    out.push({
      name: "process_open_fds",
      type: "gauge",
      help: "Open file descriptors.",
      value: fds,
    });
  } catch {
    // no /proc
  }
  const limit = /^Max open files\s+(\d+)/m.exec(read("/proc/self/limits"));
  if (limit) {
    out.push({
      name: "process_max_fds",
      type: "gauge",
      help: "Most open file descriptors allowed (the soft limit).",
      value: Number(limit[1]),
    });
  }
  const boot = /^btime (\d+)$/m.exec(read("/proc/stat"));
  if (boot && fields.length > 19) {
    out.push({
      name: "process_start_time_seconds",
      type: "gauge",
      help: "Start time of the process since the Unix epoch, in seconds.",
      value: Number(boot[1]) + Number(fields[19]) / USER_HZ,
    });
  }
  return out;
}

/** A running metrics server. */
export interface MetricsServer {
  /** The address actually bound (useful with port 0). */
  address: MetricsAddress;
  /** Stops serving. */
  close(): Promise<void>;
}

/**
 * Serves `/metrics` (Prometheus text) and `/healthz` (200 while every device serves, else 503) on
 * `address`. Resolves once the port listens; a port in use is a {@link UsageError}.
 */
export async function startMetricsServer(
  address: MetricsAddress,
  devices: () => ObservedDevice[],
  info: DaemonInfo,
): Promise<MetricsServer> {
  let onListen!: (a: Deno.NetAddr) => void;
  const listening = new Promise<Deno.NetAddr>((res) => onListen = res);
  let server: Deno.HttpServer<Deno.NetAddr>;
  try {
    server = Deno.serve({
      hostname: address.hostname,
      port: address.port,
      onListen: (a) => onListen(a),
      onError: () => new Response("internal error\n", { status: 500 }),
    }, (req) => {
      const path = new URL(req.url).pathname;
      if (req.method !== "GET" && req.method !== "HEAD") {
        return new Response("method not allowed\n", { status: 405 });
      }
      if (path === "/metrics") {
        return new Response(renderMetrics(devices(), info), {
          headers: { "content-type": "text/plain; version=0.0.4; charset=utf-8" },
        });
      }
      if (path === "/healthz") {
        const down = devices().filter((d) => !d.running).map((d) => d.name);
        return down.length === 0
          ? new Response("ok\n")
          : new Response(`stopped: ${down.join(", ")}\n`, { status: 503 });
      }
      return new Response("not found: try /metrics or /healthz\n", { status: 404 });
    });
  } catch (e) {
    throw new UsageError(
      `--metrics ${address.hostname}:${address.port}: ${(e as Error).message.split("\n")[0]}`,
    );
  }
  const bound = await listening;
  return {
    address: { hostname: bound.hostname, port: bound.port },
    close: () => server.shutdown(),
  };
}
