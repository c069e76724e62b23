/**
 * Prometheus metrics and a health check over HTTP, served by the main thread from the counters
 * the workers keep in shared memory (daemon/stats.ts). Serving a scrape never touches a worker.
 *
 * @module
 */

import { UsageError } from "../devices/blk/image.ts";
import { LATENCY_BUCKETS, latencyBucketLimit, QueueStat } from "../ring/queue_stats.ts";
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
    throw new UsageError(`--metrics must be HOST:PORT like 127.0.0.1:9101, not "${s}"`);
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
  /** Its vhost-user socket. */
  socket: string;
  /** Whether its worker is still serving. */
  running: boolean;
  /** The latest state and counters. */
  snapshot: PortSnapshot;
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

const esc = (v: string) => v.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");

/** Renders the Prometheus text exposition (format 0.0.4) of `devices`. */
export function renderMetrics(devices: readonly ObservedDevice[]): string {
  const out: string[] = [];
  const family = (name: string, type: string, help: string) => {
    out.push(`# HELP vhostd_${name} ${help}`, `# TYPE vhostd_${name} ${type}`);
  };
  family("device_up", "gauge", "1 while the device's worker serves, 0 after it stopped.");
  for (const d of devices) {
    out.push(`vhostd_device_up{device="${esc(d.name)}",type="${d.type}"} ${d.running ? 1 : 0}`);
  }
  family("device_connected", "gauge", "1 while a front-end (QEMU) is connected.");
  for (const d of devices) {
    out.push(`vhostd_device_connected{device="${esc(d.name)}"} ${d.snapshot.connected ? 1 : 0}`);
  }
  family("device_connects_total", "counter", "Front-end connections accepted.");
  for (const d of devices) {
    out.push(`vhostd_device_connects_total{device="${esc(d.name)}"} ${d.snapshot.connects}`);
  }
  for (const [name, slot, help] of COUNTERS) {
    family(`queue_${name}`, "counter", help);
    for (const d of devices) {
      for (const q of d.snapshot.queues) {
        out.push(
          `vhostd_queue_${name}{device="${esc(d.name)}",queue="${q.index}"} ${q.counters[slot]}`,
        );
      }
    }
  }
  family("queue_in_flight", "gauge", "Requests taken from the ring and not yet completed.");
  for (const d of devices) {
    for (const q of d.snapshot.queues) {
      out.push(
        `vhostd_queue_in_flight{device="${esc(d.name)}",queue="${q.index}"} ${
          q.counters[QueueStat.IN_FLIGHT]
        }`,
      );
    }
  }
  family(
    "queue_latency_seconds",
    "histogram",
    "Request latency, from the start of the batch the back-end took it in to its completion.",
  );
  for (const d of devices) {
    for (const q of d.snapshot.queues) {
      const labels = `device="${esc(d.name)}",queue="${q.index}"`;
      let cumulative = 0;
      for (let i = 0; i < LATENCY_BUCKETS; i++) {
        cumulative += q.counters[QueueStat.LATENCY_BUCKET0 + i];
        const le = latencyBucketLimit(i);
        out.push(
          `vhostd_queue_latency_seconds_bucket{${labels},le="${
            le === Infinity ? "+Inf" : le
          }"} ${cumulative}`,
        );
      }
      out.push(
        `vhostd_queue_latency_seconds_sum{${labels}} ${q.counters[QueueStat.LATENCY_SUM]}`,
        `vhostd_queue_latency_seconds_count{${labels}} ${cumulative}`,
      );
    }
  }
  return out.join("\n") + "\n";
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
        return new Response(renderMetrics(devices()), {
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
