/**
 * A data-plane worker: it hosts one or more services (a device module's devices, one per listening
 * socket) on one event loop, blocking in epoll_wait. Several devices of a VM share a worker (see
 * daemon/worker_pool.ts): a V8 isolate per device would cost 10-14 MiB each.
 *
 * The main thread talks to a worker blocked in epoll_wait through eventfds: each service has a
 * shutdown and a refresh eventfd its loop watches, and the worker has a wake eventfd the main
 * thread signals once per message it posts ({@link WorkerCommand}). The loop then returns, the
 * worker takes that many messages (adds a service, or exits) and goes back into the loop.
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

/** A service for a worker to host: a device module and the sockets it serves. */
export interface ServiceInit {
  /** The service's number in its worker's reports. */
  id: number;
  /** URL of a module exporting `createDevice`. */
  moduleUrl: string;
  /** Options for `createDevice`. */
  options: unknown;
  /** The listening sockets' fds: one device (port) per socket. */
  listenFds: number[];
  /** The eventfd that stops this service. */
  shutdownFd: number;
  /** The eventfd that asks this service's devices to refresh ({@link VirtioDevice.refresh}). */
  refreshFd: number;
  /** Device name, for logs. */
  name: string;
  /** User ids allowed to connect. */
  allowUids?: number[];
  /**
   * Shared memory for counters and state, one block per listening socket (see daemon/stats.ts):
   * the only way the main thread learns anything from a worker blocked in epoll_wait.
   */
  stats: SharedArrayBuffer;
  /** Busy-poll window in µs (0: none); the worker's loop polls with the largest of its devices'. */
  pollUs: number;
}

/** What the main thread posts to a worker; it signals the worker's wake eventfd once for each. */
export type WorkerCommand =
  /** The first message: how to log, and the eventfd that wakes the worker for the others. */
  | { type: "init"; wakeFd: number; log: LogSettings }
  /** Host this service too. */
  | { type: "add"; service: ServiceInit }
  /** No services are left: finish. */
  | { type: "exit" };

/** What one device said when asked to refresh. */
export interface RefreshResult {
  /** The port (socket index) of the device in its service. */
  port: number;
  /** What it did, in a line (see {@link VirtioDevice.refresh}). */
  message: string;
}

/** What a worker reports to the main thread; `id` names the service. */
export type WorkerReport =
  | {
    type: "ready";
    id: number;
    /** Each port's device's own metric series (see `DeviceMetrics`), their values in `stats`. */
    metrics: MetricSeries[][];
  }
  | { type: "stopped"; id: number }
  | { type: "failed"; id: number; message: string }
  /** The devices refreshed, answering `requests` signals of the refresh eventfd. */
  | { type: "refreshed"; id: number; requests: number; results: RefreshResult[] }
  /** The worker finished (after an `exit` command, or when its loop failed). */
  | { type: "exited" };

/**
 * The worker's global scope, as far as this module uses it. Declared here instead of by a
 * `deno.worker` lib directive: a published package may not change its users' globals.
 */
interface WorkerScope {
  postMessage(message: WorkerReport): void;
  onmessage: ((event: MessageEvent<WorkerCommand>) => void) | null;
  close(): void;
}
const scope = self as unknown as WorkerScope;

const report = (r: WorkerReport) => scope.postMessage(r);

/** Messages posted to this worker, in order, until the worker takes them. */
class Inbox {
  readonly #queue: WorkerCommand[] = [];
  #waiting: (() => void) | null = null;

  /** Adds a message (from onmessage). */
  put(command: WorkerCommand): void {
    this.#queue.push(command);
    this.#waiting?.();
  }

  /** The next message; waits (the JS event loop runs) until one is there. */
  async take(): Promise<WorkerCommand> {
    while (this.#queue.length === 0) {
      await new Promise<void>((resolve) => this.#waiting = resolve);
      this.#waiting = null;
    }
    return this.#queue.shift()!;
  }
}

/** One service this worker hosts: its devices and their servers. */
class HostedService {
  readonly init: ServiceInit;
  readonly devices: VirtioDevice[];
  readonly servers: VhostUserServer[];
  readonly #metrics: MetricSeries[][] = [];
  readonly #loop: EventLoop;

  constructor(init: ServiceInit, devices: VirtioDevice[], loop: EventLoop) {
    this.init = init;
    this.devices = devices;
    this.#loop = loop;
    this.servers = devices.map((device, i) => {
      const stats = new PortStatsWriter(init.stats, i);
      this.#metrics.push(bindMetrics(device, init.name, stats.device));
      const server = new VhostUserServer(init.listenFds[i], device, loop, {
        allowUids: init.allowUids,
        dirtyLogging: !skipDirtyLogForTests,
        queueStats: (queue) => stats.queue(queue),
        ioStats: stats.io,
        onStateChange: (s) => stats.publish(s),
        pollUs: init.pollUs,
      });
      stats.publish(server);
      return server;
    });
  }

  /** Starts accepting front-ends and watching the service's eventfds; then reports it ready. */
  start(): void {
    const { init, devices } = this;
    for (const s of this.servers) s.start();
    this.#loop.watch(init.refreshFd, () => {
      const requests = drainEventFd(init.refreshFd);
      if (requests > 0) {
        report({ type: "refreshed", id: init.id, requests, results: refresh(devices, init.name) });
      }
    });
    this.#loop.watch(init.shutdownFd, () => this.stop());
    report({ type: "ready", id: init.id, metrics: this.#metrics });
  }

  /** Disconnects the front-ends, closes the devices and reports the service stopped. */
  stop(): void {
    hosted.delete(this.init.id);
    try {
      this.close();
    } finally {
      report({ type: "stopped", id: this.init.id });
    }
  }

  /** Stops serving: the loop forgets the service's fds, and its devices are closed. */
  close(): void {
    this.#loop.unwatch(this.init.shutdownFd);
    this.#loop.unwatch(this.init.refreshFd);
    for (const s of this.servers) s.close();
    slowShutdownForTests();
    closeDevices(this.devices, this.init.name);
  }
}

/** Closes devices; one that throws is logged and the others are still closed. */
function closeDevices(devices: VirtioDevice[], name: string): void {
  for (const d of devices) {
    try {
      d.close?.();
    } catch (e) {
      getLogger(["vhostd", name]).error("closing the device failed: {error}", {
        error: (e as Error).message ?? String(e),
      });
    }
  }
}

/** The services this worker hosts, by id. */
const hosted = new Map<number, HostedService>();

/**
 * Builds a service's devices (its module is imported here) and starts serving them. A service
 * that fails to build or start is closed and reported failed; the others in the worker go on.
 */
async function add(init: ServiceInit, loop: EventLoop): Promise<void> {
  const devices: VirtioDevice[] = [];
  let service: HostedService | null = null;
  try {
    // The device's module is the user's, known only at run time (deno publish warns that it
    // cannot analyze this import; a URL needs no import map to resolve).
    const mod = (await import(init.moduleUrl)) as DeviceModule;
    for (let port = 0; port < init.listenFds.length; port++) {
      devices.push(await mod.createDevice(init.options, port));
    }
    service = new HostedService(init, devices, loop);
    service.start();
  } catch (e) {
    if (service !== null) service.close();
    else closeDevices(devices, init.name);
    report({ type: "failed", id: init.id, message: (e as Error).message ?? String(e) });
    return;
  }
  hosted.set(init.id, service);
}

const inbox = new Inbox();
scope.onmessage = (event: MessageEvent<WorkerCommand>) => inbox.put(event.data);

async function main(): Promise<void> {
  const first = await inbox.take();
  if (first.type !== "init") throw new Error(`worker: expected init, got ${first.type}`);
  setupLogging(first.log);
  const loop = new EventLoop();
  let exiting = false;
  try {
    while (!exiting) {
      // Every message is announced by one signal of the wake eventfd; the loop returns with
      // their count, and the messages are in the inbox by the time the JS event loop turns.
      let commands = loop.run(first.wakeFd);
      for (; commands > 0; commands--) {
        const command = await inbox.take();
        if (command.type === "add") await add(command.service, loop);
        else if (command.type === "exit") exiting = true;
      }
    }
  } catch (e) {
    getLogger(["vhostd", "worker"]).fatal("data plane stopped: {error}", {
      error: (e as Error).stack ?? String(e),
    });
  } finally {
    try {
      for (const service of [...hosted.values()]) service.stop();
    } finally {
      loop.close();
      report({ type: "exited" });
      scope.close();
    }
  }
}

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

main();
