/**
 * The control socket: a Unix stream socket on the main thread that answers `vhostd status` and
 * `vhostd resize`. A client sends one JSON line (`{"command":"status"}`, or
 * `{"command":"resize","device":"disk0"}` with the device optional) and gets one JSON line back.
 *
 * Status is built from shared memory only (daemon/stats.ts): the workers are never asked. Resize
 * wakes the devices' workers (see `DeviceService.refresh`) and answers with what each said.
 *
 * @module
 */

import { UsageError } from "../sys/errors.ts";
import { bindSocketFile } from "../sys/socket.ts";
import { clearSocketPath } from "./service.ts";
import { QueueFlag } from "./stats.ts";
import { LATENCY_BUCKETS, QueueStat } from "../ring/queue_stats.ts";
import type { ObservedDevice } from "./metrics.ts";
import type { DeviceRefresh } from "./service.ts";
import { VERSION } from "./version.ts";

/** One queue in a status report. */
export interface QueueStatus {
  /** Queue index. */
  index: number;
  /** Ring size (0: not set up). */
  size: number;
  /** SET_VRING_ENABLE state. */
  enabled: boolean;
  /** Started by SET_VRING_KICK and not stopped since. */
  started: boolean;
  /** Broken by the guest (stopped until reset). */
  broken: boolean;
  /** Requests completed. */
  requests: number;
  /** Bytes moved. */
  bytes: number;
  /** Failed requests and ring errors. */
  errors: number;
  /** Kicks received. */
  kicks: number;
  /** Interrupts sent. */
  interrupts: number;
  /** Requests in flight now. */
  inFlight: number;
  /** Mean latency in microseconds (0 without requests). */
  meanLatencyUs: number;
}

/** One device in a status report. */
export interface DeviceStatus {
  /** Device name (config id). */
  name: string;
  /** Device type. */
  type: string;
  /** vhost-user socket. */
  socket: string;
  /** Worker still serving. */
  running: boolean;
  /** The number of the data-plane worker serving it (devices sharing a worker show the same). */
  worker: number;
  /** Connected front-end, or null. */
  frontEnd: { pid: number; uid: number; gid: number } | null;
  /** Front-end connections since start. */
  connects: number;
  /** Virtio status byte. */
  status: number;
  /** Offered virtio features, hex. */
  offeredFeatures: string;
  /** Negotiated virtio features, hex. */
  ackedFeatures: string;
  /** Negotiated vhost-user protocol features, hex. */
  protocolFeatures: string;
  /** Queues. */
  queues: QueueStatus[];
}

/** What `status` receives. */
export interface StatusReport {
  /** Daemon name (the VM). */
  name: string;
  /** vhostd's version (deno.json's). */
  version: string;
  /** Daemon pid. */
  pid: number;
  /** Seconds since start. */
  uptimeSeconds: number;
  /** Devices. */
  devices: DeviceStatus[];
}

/** Builds a status report from the devices' shared state. */
export function statusReport(
  name: string,
  startedAt: number,
  devices: readonly ObservedDevice[],
): StatusReport {
  return {
    name,
    version: VERSION,
    pid: Deno.pid,
    uptimeSeconds: Math.round((Date.now() - startedAt) / 1000),
    devices: devices.map((d) => {
      const s = d.snapshot;
      return {
        name: d.name,
        type: d.type,
        socket: d.socket,
        running: d.running,
        worker: d.worker,
        frontEnd: s.connected ? s.peer : null,
        connects: s.connects,
        status: s.status,
        offeredFeatures: "0x" + s.offeredFeatures.toString(16),
        ackedFeatures: "0x" + s.ackedFeatures.toString(16),
        protocolFeatures: "0x" + s.protocolFeatures.toString(16),
        queues: s.queues.map((q) => {
          const c = q.counters;
          let timed = 0;
          for (let i = 0; i < LATENCY_BUCKETS; i++) timed += c[QueueStat.LATENCY_BUCKET0 + i];
          return {
            index: q.index,
            size: q.size,
            enabled: (q.flags & QueueFlag.ENABLED) !== 0,
            started: (q.flags & QueueFlag.STARTED) !== 0,
            broken: (q.flags & QueueFlag.BROKEN) !== 0,
            requests: c[QueueStat.REQUESTS],
            bytes: c[QueueStat.BYTES],
            errors: c[QueueStat.ERRORS],
            kicks: c[QueueStat.KICKS],
            interrupts: c[QueueStat.INTERRUPTS],
            inFlight: c[QueueStat.IN_FLIGHT],
            meanLatencyUs: timed ? Math.round(c[QueueStat.LATENCY_SUM] / timed * 1e7) / 10 : 0,
          };
        }),
      };
    }),
  };
}

/** A listening control socket. */
export interface ControlServer {
  /** Its path. */
  path: string;
  /** Stops listening and removes the socket file. */
  close(): void;
}

/** What `resize` does: refresh every device, or the one named; throws for an unknown name. */
export type ResizeHandler = (device?: string) => Promise<DeviceRefresh[]>;

/** What `resize` receives. */
export interface ResizeReport {
  /** What each device refreshed said. */
  devices: DeviceRefresh[];
}

/**
 * Listens on `path` (mode 0600: status shows who is connected, and resize acts, so only the
 * daemon's user may ask) and answers `status` with `report()` and `resize` with `resize`.
 */
export function startControlServer(
  path: string,
  report: () => StatusReport,
  resize?: ResizeHandler,
): ControlServer {
  clearSocketPath(path, "control socket", "daemon");
  let listener: Deno.UnixListener;
  try {
    listener = bindSocketFile(
      path,
      { mode: 0o600 },
      (at) => Deno.listen({ transport: "unix", path: at }),
      (l) => l.close(),
    );
  } catch (e) {
    throw new UsageError(`cannot listen on ${path}: ${(e as Error).message}`);
  }
  (async () => {
    try {
      for await (const conn of listener) answer(conn, report, resize).catch(() => {});
    } catch {
      // the listener was closed
    }
  })();
  return {
    path,
    close() {
      try {
        listener.close();
      } catch {
        // already closed
      }
      try {
        Deno.removeSync(path);
      } catch {
        // already gone
      }
    },
  };
}

async function answer(
  conn: Deno.UnixConn,
  report: () => StatusReport,
  resize: ResizeHandler | undefined,
): Promise<void> {
  const encoder = new TextEncoder();
  try {
    const request = await readLine(conn, 4096, 2000);
    let reply: unknown;
    let cmd: { command?: unknown; device?: unknown };
    try {
      cmd = JSON.parse(request);
      if (typeof cmd !== "object" || cmd === null) throw new TypeError();
    } catch {
      cmd = {};
      reply = { error: 'expected one JSON line like {"command":"status"}' };
    }
    if (reply !== undefined) {
      // already refused
    } else if (cmd.command === "status") {
      reply = report();
    } else if (cmd.command === "resize" && resize !== undefined) {
      const device = cmd.device;
      if (device !== undefined && typeof device !== "string") {
        reply = { error: "resize: device must be a device name" };
      } else {
        try {
          reply = { devices: await resize(device) } satisfies ResizeReport;
        } catch (e) {
          reply = { error: (e as Error).message };
        }
      }
    } else {
      reply = { error: `unknown command ${JSON.stringify(cmd.command)}` };
    }
    const bytes = encoder.encode(JSON.stringify(reply) + "\n");
    for (let off = 0; off < bytes.length;) off += await conn.write(bytes.subarray(off));
  } finally {
    try {
      conn.close();
    } catch {
      // closed by the read time-out
    }
  }
}

/** Reads up to a newline (or EOF), at most `max` bytes, within `timeoutMs`. */
async function readLine(conn: Deno.Conn, max: number, timeoutMs: number): Promise<string> {
  const buf = new Uint8Array(max);
  let len = 0;
  const timer = setTimeout(() => conn.close(), timeoutMs);
  try {
    while (len < max) {
      const n = await conn.read(buf.subarray(len));
      if (n === null) break;
      len += n;
      if (buf.subarray(0, len).includes(10)) break;
    }
  } finally {
    clearTimeout(timer);
  }
  return new TextDecoder().decode(buf.subarray(0, len)).split("\n")[0];
}

/** Asks the daemon listening on `path` for its status. */
export function requestStatus(path: string): Promise<StatusReport> {
  return request<StatusReport>(path, { command: "status" });
}

/**
 * Asks the daemon listening on `path` to refresh its devices, or the one named `device` (a disk
 * re-reads its image's size and tells the guest when it grew), and returns what each said.
 */
export function requestResize(path: string, device?: string): Promise<ResizeReport> {
  return request<ResizeReport>(path, { command: "resize", device });
}

/** Sends one command line to the daemon on `path` and returns its answer (throws its error). */
async function request<T>(path: string, command: Record<string, unknown>): Promise<T> {
  let conn: Deno.UnixConn;
  try {
    conn = await Deno.connect({ transport: "unix", path });
  } catch (e) {
    throw new Error(`no daemon answers on ${path}: ${(e as Error).message.split("\n")[0]}`);
  }
  try {
    await conn.write(new TextEncoder().encode(JSON.stringify(command) + "\n"));
    const chunks: Uint8Array<ArrayBuffer>[] = [];
    const buf = new Uint8Array(65536);
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) break;
      chunks.push(buf.slice(0, n));
    }
    const text = new TextDecoder().decode(await new Blob(chunks).bytes());
    const reply = JSON.parse(text) as T | { error: string };
    if (typeof reply === "object" && reply !== null && "error" in reply) {
      throw new Error(reply.error);
    }
    return reply as T;
  } finally {
    try {
      conn.close();
    } catch {
      // closed by the daemon
    }
  }
}
