/**
 * The data-plane worker: builds one device from its module and runs its vhost-user server loop,
 * blocking in epoll_wait until the main thread signals the shutdown eventfd.
 *
 * @module
 */

import { getLogger } from "../log/mod.ts";
import { drainEventFd } from "../sys/event.ts";
import type { DeviceModule, MetricSeries, VirtioDevice } from "../devices/device.ts";
import { EventLoop } from "../vhost-user/event_loop.ts";
import { VhostUserServer } from "../vhost-user/server.ts";
import { type LogSettings, setupLogging } from "../log/setup.ts";
import { MAX_DEVICE_STATS, PortStatsWriter } from "./stats.ts";

/** The first message a worker receives. */
export interface WorkerInit {
  /** URL of a module exporting `createDevice`. */
  moduleUrl: string;
  /** Options for `createDevice`. */
  options: unknown;
  /** The listening sockets' fds: one device (port) per socket, all in this worker's loop. */
  listenFds: number[];
  /** The eventfd that stops the loop. */
  shutdownFd: number;
  /** The eventfd that asks every device to refresh ({@link VirtioDevice.refresh}). */
  refreshFd: number;
  /** Logging settings. */
  log: LogSettings;
  /** Device name, for logs. */
  name: string;
  /** User ids allowed to connect. */
  allowUids?: number[];
  /**
   * Shared memory for counters and state, one block per listening socket (see daemon/stats.ts):
   * the only way the main thread learns anything from a worker blocked in epoll_wait.
   */
  stats: SharedArrayBuffer;
  /** Busy-poll window of the event loop in µs (0: none). */
  pollUs: number;
}

/** What one device said when asked to refresh. */
export interface RefreshResult {
  /** The port (socket index) of the device in its service. */
  port: number;
  /** What it did, in a line (see {@link VirtioDevice.refresh}). */
  message: string;
}

/** What a worker reports to the main thread. */
export type WorkerReport =
  | {
    type: "ready";
    /** Each port's device's own metric series (see `DeviceMetrics`), their values in `stats`. */
    metrics: MetricSeries[][];
  }
  | { type: "stopped" }
  | { type: "failed"; message: string }
  /** The devices refreshed, answering `requests` signals of the refresh eventfd. */
  | { type: "refreshed"; requests: number; results: RefreshResult[] };

/**
 * The worker's global scope, as far as this module uses it. Declared here instead of by a
 * `deno.worker` lib directive: a published package may not change its users' globals.
 */
interface WorkerScope {
  postMessage(message: WorkerReport): void;
  onmessage: ((event: MessageEvent<WorkerInit>) => void) | null;
  close(): void;
}
const scope = self as unknown as WorkerScope;

const report = (r: WorkerReport) => scope.postMessage(r);

scope.onmessage = async (event: MessageEvent<WorkerInit>) => {
  const init = event.data;
  setupLogging(init.log);
  const devices: VirtioDevice[] = [];
  try {
    // The device's module is the user's, known only at run time (deno publish warns that it
    // cannot analyze this import; a URL needs no import map to resolve).
    const mod = (await import(init.moduleUrl)) as DeviceModule;
    for (let port = 0; port < init.listenFds.length; port++) {
      devices.push(await mod.createDevice(init.options, port));
    }
  } catch (e) {
    report({ type: "failed", message: (e as Error).message ?? String(e) });
    scope.close();
    return;
  }
  const loop = new EventLoop({ pollUs: init.pollUs });
  const metrics: MetricSeries[][] = [];
  const servers = devices.map((device, i) => {
    const stats = new PortStatsWriter(init.stats, i);
    metrics.push(bindMetrics(device, init.name, stats.device));
    const server = new VhostUserServer(init.listenFds[i], device, loop, {
      allowUids: init.allowUids,
      dirtyLogging: !skipDirtyLogForTests,
      queueStats: (queue) => stats.queue(queue),
      ioStats: stats.io,
      onStateChange: (s) => stats.publish(s),
    });
    stats.publish(server);
    return server;
  });
  report({ type: "ready", metrics });
  try {
    for (const s of servers) s.start();
    loop.watch(init.refreshFd, () => {
      const requests = drainEventFd(init.refreshFd);
      if (requests > 0) {
        report({ type: "refreshed", requests, results: refresh(devices, init.name) });
      }
    });
    loop.run(init.shutdownFd);
  } catch (e) {
    getLogger(["vhostd", init.name]).fatal("data plane stopped: {error}", {
      error: (e as Error).stack ?? String(e),
    });
  } finally {
    for (const s of servers) s.close();
    try {
      slowShutdownForTests();
      for (const d of devices) d.close?.();
    } finally {
      loop.close();
      report({ type: "stopped" });
      scope.close();
    }
  }
};

/** Asks each device to refresh; a device that throws says so in its result, the others go on. */
function refresh(devices: VirtioDevice[], name: string): RefreshResult[] {
  return devices.map((d, port) => {
    if (!d.refresh) return { port, message: "nothing to refresh" };
    try {
      return { port, message: d.refresh() };
    } catch (e) {
      const message = `refresh failed: ${(e as Error).message ?? String(e)}`;
      getLogger(["vhostd", name]).error(message);
      return { port, message };
    }
  });
}

/**
 * Moves the device's own counters into `slots` (shared memory) and returns their series. A device
 * with more than {@link MAX_DEVICE_STATS} (none has: 16 queue pairs of a TAP device take 80), or
 * whose `bind` fails, keeps them to itself, unexported.
 */
function bindMetrics(device: VirtioDevice, name: string, slots: Float64Array): MetricSeries[] {
  const m = device.metrics;
  if (m === undefined) return [];
  if (m.series.length > MAX_DEVICE_STATS) {
    getLogger(["vhostd", name]).warn("{count} device counters, more than {max}: not exported", {
      count: m.series.length,
      max: MAX_DEVICE_STATS,
    });
    return [];
  }
  try {
    m.bind(slots);
  } catch (e) {
    // A device's mistake in its metrics should not stop it serving.
    getLogger(["vhostd", name]).warn("device counters not exported: {error}", {
      error: (e as Error).message,
    });
    return [];
  }
  // Copied into plain objects: the device's may not survive structured cloning as they are.
  return m.series.map((s) => ({
    name: s.name,
    help: s.help,
    type: s.type,
    labels: s.labels ? { ...s.labels } : undefined,
    part: s.part,
  }));
}

/**
 * Fault injection for migration tests: VHOSTD_FAULT_SKIP_DIRTY_LOG=1 makes the back-end offer dirty
 * logging but never mark a page, so a test can show that it catches a back-end that does not log.
 */
const skipDirtyLogForTests = Deno.env.get("VHOSTD_FAULT_SKIP_DIRTY_LOG") === "1";

/**
 * Fault injection for shutdown tests: VHOSTD_FAULT_SLOW_SHUTDOWN_MS makes the worker take that
 * long to finish, as a flush to a slow disk would, so a test can send a second signal meanwhile.
 */
function slowShutdownForTests(): void {
  const ms = Number(Deno.env.get("VHOSTD_FAULT_SLOW_SHUTDOWN_MS") ?? 0);
  if (ms > 0) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}
