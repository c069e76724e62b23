/**
 * A device served from a data-plane worker, seen from the main thread: it owns the listening
 * socket (checked before anything starts) and the shutdown and refresh eventfds; the worker is its
 * own or one it shares with other devices of the daemon (daemon/worker_pool.ts).
 *
 * @module
 */

import { createEventFd, signalEventFd } from "../sys/event.ts";
import { closeQuietly } from "../sys/libc.ts";
import { listenUnix, probeSocketPath } from "../sys/socket.ts";
import { UsageError } from "../sys/errors.ts";
import type { LogSettings } from "../log/setup.ts";
import type { RefreshResult } from "./worker.ts";
import { DataPlaneWorker, type WorkerPool } from "./worker_pool.ts";
import type { MetricSeries } from "../devices/device.ts";
import { allocateStats, ServiceStats } from "./stats.ts";
import { takePassedSocket } from "./activation.ts";

/** What to serve and where. */
export interface ServiceOptions {
  /** Path of the vhost-user socket to listen on; several paths serve several ports. */
  socket: string | string[];
  /** URL of the device module (exports `createDevice`). */
  module: string | URL;
  /** Options for `createDevice` (structured-clonable). */
  options: unknown;
  /** Device name, for logs, metrics and status. */
  name: string;
  /** Device type shown by metrics and status (`blk`, `net`, ...); default: the name. */
  type?: string;
  /** Logging settings for the worker. */
  log: LogSettings;
  /** Socket file mode; default 0o600. */
  socketMode?: number;
  /** Group id to give the socket file (with a mode that lets the group in). */
  socketGroup?: number;
  /** User ids allowed to connect. */
  allowUids?: number[];
  /** Busy-poll window of the worker's event loop in µs (see EventLoopOptions); default 0. */
  pollUs?: number;
  /**
   * Give this device a data-plane worker of its own instead of a shared one (a hot device that
   * should not share a thread). Without a pool every device has its own.
   */
  ownWorker?: boolean;
}

/**
 * Makes room for a socket at `path`: a live socket is never taken over (a usage error saying
 * that `what` is in use by a running `owner`), a stale one is removed, and anything that is not a
 * socket is left alone.
 */
export function clearSocketPath(path: string, what = "socket", owner = "back-end"): void {
  const state = probeSocketPath(path);
  if (state === "live") {
    throw new UsageError(`${what} ${path} is in use by a running ${owner}`);
  }
  if (state === "not-a-socket") {
    throw new UsageError(`${path} exists and is not a socket; refusing to replace it`);
  }
  if (state === "stale") Deno.removeSync(path);
}

/**
 * Binds `path` with `mode` and group `gid` from its first moment (see `bindSocketFile`): a live
 * socket is never taken over, a stale one is replaced, and anything that is not a socket is left
 * alone.
 */
export function bindSocket(path: string, mode = 0o600, gid?: number): number {
  clearSocketPath(path);
  try {
    return listenUnix(path, { mode, gid });
  } catch (e) {
    throw new UsageError(`cannot listen on ${path}: ${(e as Error).message}`);
  }
}

/** What one device said when asked to refresh ({@link DeviceService.refresh}). */
export interface DeviceRefresh {
  /** The device's name, as status shows it (`name`, or `name.port` for a service of several). */
  device: string;
  /** What it did, in a line. */
  message: string;
}

/** A {@link DeviceService.refresh} call waiting for the worker's answer. */
interface RefreshWaiter {
  resolve(results: RefreshResult[] | null): void;
}

/** How long {@link DeviceService.refresh} waits for the worker by default. */
const REFRESH_TIMEOUT_MS = 10_000;

/** One running device. */
export class DeviceService {
  /** The options it was started with. */
  readonly options: ServiceOptions;
  /** Settles when the worker has stopped (resolves) or died (rejects). */
  readonly done: Promise<void>;
  /** Counters and state the worker publishes, one port per socket. */
  readonly stats: ServiceStats;
  /** Whether the worker is still serving (false once it stopped or died). */
  running = true;
  /** The number of the data-plane worker it runs on (devices that share one show the same). */
  get worker(): number {
    return this.#worker.number;
  }
  /**
   * The series of each port's device's own counters (its `metrics`), as the worker reported them
   * when it was ready; their values are in {@link stats}.
   */
  metrics: MetricSeries[][] = [];
  readonly #worker: DataPlaneWorker;
  /** Its id in {@link #worker}. */
  #id = 0;
  readonly #listenFds: number[];
  readonly #shutdownFd: number;
  readonly #refreshFd: number;
  /** Refresh calls in the order they signalled the worker, which answers them in that order. */
  readonly #refreshWaiters: RefreshWaiter[] = [];
  /** Sockets systemd passed (socket activation): their files are systemd's, never removed. */
  readonly #passed: Map<string, () => void>;
  #stopped = false;

  private constructor(
    options: ServiceOptions,
    worker: DataPlaneWorker,
    listenFds: number[],
    shutdownFd: number,
    refreshFd: number,
    done: Promise<void>,
    stats: ServiceStats,
    passed: Map<string, () => void>,
  ) {
    this.options = options;
    this.stats = stats;
    this.#worker = worker;
    this.#listenFds = listenFds;
    this.#shutdownFd = shutdownFd;
    this.#refreshFd = refreshFd;
    this.done = done;
    this.#passed = passed;
  }

  /**
   * Binds the socket (or takes the one systemd passed for its path: see daemon/activation.ts),
   * places the device on a worker of `pool` (a worker of its own without one, or when
   * {@link ServiceOptions.ownWorker}) and waits until the device is built.
   */
  static async start(options: ServiceOptions, pool?: WorkerPool): Promise<DeviceService> {
    const listenFds: number[] = [];
    const passed = new Map<string, () => void>();
    const unbind = () => {
      for (const fd of listenFds) closeQuietly(fd);
      for (const path of socketPaths(options).slice(0, listenFds.length)) {
        const release = passed.get(path);
        if (release) release();
        else removeQuietly(path);
      }
    };
    try {
      for (const path of socketPaths(options)) {
        const given = takePassedSocket(path, options.name);
        if (given !== null) {
          passed.set(path, given.release);
          listenFds.push(given.fd);
        } else listenFds.push(bindSocket(path, options.socketMode, options.socketGroup));
      }
    } catch (e) {
      unbind();
      throw e;
    }
    const shutdownFd = createEventFd();
    const refreshFd = createEventFd();
    const worker = pool === undefined || options.ownWorker
      ? new DataPlaneWorker(options.log, false)
      : pool.place(options.log, false);
    let onReady!: () => void, onFail!: (e: Error) => void;
    const ready = new Promise<void>((res, rej) => [onReady, onFail] = [res, rej]);
    let onDone!: () => void, onDead!: (e: Error) => void;
    const done = new Promise<void>((res, rej) => [onDone, onDead] = [res, rej]);
    done.catch(() => {});
    const sab = allocateStats(listenFds.length);
    const stats = new ServiceStats(sab, listenFds.length);
    const service = new DeviceService(
      options,
      worker,
      listenFds,
      shutdownFd,
      refreshFd,
      done,
      stats,
      passed,
    );
    service.#id = worker.host({
      moduleUrl: new URL(options.module).href,
      options: options.options,
      listenFds,
      shutdownFd,
      refreshFd,
      name: options.name,
      allowUids: options.allowUids,
      stats: sab,
      pollUs: options.pollUs ?? 0,
    }, {
      ready(metrics) {
        service.metrics = metrics;
        onReady();
      },
      refreshed(requests, results) {
        for (const w of service.#refreshWaiters.splice(0, requests)) w.resolve(results);
      },
      stopped: () => onDone(),
      failed(message) {
        const err = new Error(`${options.name}: ${message}`);
        onFail(err);
        onDead(err);
      },
    });
    const gone = () => {
      service.running = false;
      worker.release(service.#id);
      for (const w of service.#refreshWaiters.splice(0)) w.resolve(null);
    };
    done.then(gone, gone);
    try {
      await ready;
    } catch (e) {
      service.#cleanup();
      throw e;
    }
    return service;
  }

  /** Asks the worker to finish, waits up to `timeoutMs`, then removes the socket. */
  async stop(timeoutMs = 10_000): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    signalEventFd(this.#shutdownFd);
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<void>((res) => timer = setTimeout(res, timeoutMs));
    try {
      await Promise.race([this.done.catch(() => {}), timeout]);
    } finally {
      clearTimeout(timer);
      this.#cleanup();
    }
  }

  /**
   * Asks every device of this service to look at what backs it again (a disk re-reads its
   * image's size and tells the guest when it grew; see {@link VirtioDevice.refresh}), and waits
   * up to `timeoutMs` for what each says. The worker is woken through an eventfd its loop
   * watches; requests that come while it refreshes are answered by its next round.
   */
  refresh(timeoutMs = REFRESH_TIMEOUT_MS): Promise<DeviceRefresh[]> {
    const names = (results: RefreshResult[]) =>
      results.map((r) => ({ device: deviceName(this.options, r.port), message: r.message }));
    const all = (message: string) =>
      socketPaths(this.options).map((_, port) => ({
        device: deviceName(this.options, port),
        message,
      }));
    if (this.#stopped || !this.running) return Promise.resolve(all("not running"));
    return new Promise((resolve) => {
      let settled = false;
      const timer = setTimeout(() => settle(null, "no answer from the device's worker"), timeoutMs);
      const settle = (results: RefreshResult[] | null, otherwise: string) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        resolve(results === null ? all(otherwise) : names(results));
      };
      // A waiter that timed out keeps its place: the worker still answers its signal.
      this.#refreshWaiters.push({ resolve: (results) => settle(results, "stopped") });
      signalEventFd(this.#refreshFd);
    });
  }

  /**
   * Removes the socket files now (for an immediate exit), except those systemd passed: they
   * outlive the daemon, so that QEMU's next connection waits for the next daemon.
   */
  removeSocket(): void {
    for (const path of socketPaths(this.options)) {
      if (!this.#passed.has(path)) removeQuietly(path);
    }
  }

  #cleanup(): void {
    // Its worker forgets it (and finishes if it hosts nothing else); a service that did not stop
    // in time is given up on, its eventfds closed: the worker no longer hears from them.
    this.#worker.release(this.#id);
    this.removeSocket();
    for (const fd of this.#listenFds) closeQuietly(fd);
    closeQuietly(this.#shutdownFd);
    closeQuietly(this.#refreshFd);
    // Only the copies are closed: the passed sockets stay open for a device a reload starts.
    for (const release of this.#passed.values()) release();
  }
}

/** The name of a service's device on socket `port`: the service's, or `name.port` for several. */
export function deviceName(options: ServiceOptions, port: number): string {
  return socketPaths(options).length > 1 ? `${options.name}.${port}` : options.name;
}

/** The socket paths a service listens on. */
export function socketPaths(options: ServiceOptions): string[] {
  return typeof options.socket === "string" ? [options.socket] : options.socket;
}

function removeQuietly(path: string): void {
  try {
    Deno.removeSync(path);
  } catch {
    // already gone
  }
}
