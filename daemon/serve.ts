/**
 * Running devices until a signal: the main thread's supervision loop, used by the CLI and by
 * {@link serveDevice} for devices written against the public API.
 *
 * @module
 */

import { getLogger } from "../log/mod.ts";
import { defaultLogSettings, type LogSettings, setupLogging } from "../log/setup.ts";
import {
  deviceName,
  type DeviceRefresh,
  DeviceService,
  type ServiceOptions,
  socketPaths,
} from "./service.ts";
import { WorkerPool } from "./worker_pool.ts";
import type { ServeExtras } from "./cli.ts";
import {
  isLoopbackHost,
  type MetricsServer,
  type ObservedDevice,
  startMetricsServer,
} from "./metrics.ts";
import { type ControlServer, startControlServer, statusReport } from "./control.ts";
import { SdNotifier } from "./notify.ts";
import { UsageError } from "../sys/errors.ts";
import { adoptPassedSockets, describePassed } from "./activation.ts";

/** The devices of running services, one per socket, as metrics and status see them. */
export function observe(services: readonly DeviceService[]): ObservedDevice[] {
  const out: ObservedDevice[] = [];
  for (const s of services) {
    const paths = socketPaths(s.options);
    for (let port = 0; port < s.stats.ports; port++) {
      out.push({
        name: deviceName(s.options, port),
        type: s.options.type ?? s.options.name,
        service: s.options.name,
        socket: paths[port],
        running: s.running,
        worker: s.worker,
        snapshot: s.stats.read(port),
        metrics: s.metrics[port] ?? [],
      });
    }
  }
  return out;
}

/**
 * Asks the services' devices to refresh ({@link DeviceService.refresh}): all of them, or the one
 * named `device` (a service's name, or `name.port`). Throws a UsageError naming the devices there
 * are when none is called `device`.
 */
export async function refreshDevices(
  services: readonly DeviceService[],
  device?: string,
): Promise<DeviceRefresh[]> {
  if (device === undefined) return (await Promise.all(services.map((s) => s.refresh()))).flat();
  const service = services.find((s) =>
    s.options.name === device ||
    socketPaths(s.options).some((_, port) => deviceName(s.options, port) === device)
  );
  if (service === undefined) {
    const names = observe(services).map((d) => d.name).join(", ");
    throw new UsageError(`no device named "${device}" (there are: ${names})`);
  }
  const results = await service.refresh();
  return results.filter((r) => r.device === device || service.options.name === device);
}

/**
 * Asks `services` to refresh (SIGHUP: the operator grew an image and wants the guest to see it),
 * without waiting: each device logs what it did.
 */
function refreshInBackground(services: readonly DeviceService[], why: string): void {
  const logger = getLogger(["vhostd", "daemon"]);
  logger.info("{why}: asking {count} device(s) to refresh", { why, count: services.length });
  refreshDevices(services).catch((e) =>
    logger.error("refresh failed: {error}", { error: (e as Error).message })
  );
}

/**
 * A checked new set of services, for a reload (SIGHUP); see {@link ServeExtras.reload}.
 */
export interface ServiceReload {
  /**
   * Every service that should run once the reload is done, in order. An entry that is the very
   * `options` object of a running service keeps that service running, connections and all; the
   * others are started, and running services not listed are stopped.
   */
  services: ServiceOptions[];
  /**
   * Called once, when the reload is done (or given up), with the options of every service running
   * then: whatever was opened for a listed service that is not running (it failed to start) is
   * released here.
   */
  settle(running: ReadonlySet<ServiceOptions>): void;
}

/**
 * Starts the services, prints `banner` to stdout, and serves until SIGINT/SIGTERM (a second signal
 * exits at once). With `extras`, also serves metrics over HTTP and status on a control socket.
 * Under systemd (NOTIFY_SOCKET), READY=1 is sent once every socket listens and every worker has
 * built its device; the watchdog is pinged while all workers run. Sockets systemd passed (socket
 * activation, LISTEN_FDS) are served instead of binding new ones. With `extras.reload`, SIGHUP
 * changes the running set to what it returns (see {@link ServiceReload}), reloads running one at
 * a time, and the devices kept refresh ({@link DeviceService.refresh}); without it, SIGHUP makes
 * every device refresh. Returns the exit code: 0 after a clean stop, 1 if a device failed.
 */
export async function runServices(
  plans: ServiceOptions[],
  log: LogSettings,
  banner: string,
  extras: ServeExtras = {},
): Promise<number> {
  setupLogging(log);
  const logger = getLogger(["vhostd", "daemon"]);
  const notifier = new SdNotifier();
  const name = extras.name ?? plans.map((p) => p.name).join(",");
  const startedAt = Date.now();
  // Replaced as a whole (never changed in place) by a reload: whoever iterates it meanwhile
  // (a scrape, the watchdog, a stop) sees one consistent set.
  let services: DeviceService[] = [];
  const pool = new WorkerPool({ workers: extras.workers ?? 1 });
  let metrics: MetricsServer | null = null;
  let control: ControlServer | null = null;
  const closeEndpoints = async () => {
    control?.close();
    control = null;
    await metrics?.close();
    metrics = null;
  };
  // Wakes the supervision loop when the set of services changed (or a stop began).
  let wake = () => {};
  let changed = new Promise<void>((r) => wake = r);
  const setChanged = () => {
    const previous = wake;
    changed = new Promise<void>((r) => wake = r);
    previous();
  };
  // Reloads run one after the other: a stop waits for the one under way.
  let reloads: Promise<void> = Promise.resolve();
  let reloadQueued = false;
  let reloadBeforeStart = false;
  // Signal handlers go in before anything starts: a supervisor may send SIGTERM the moment it
  // sees READY=1, and the default action would kill us without removing the sockets.
  let firstSignalAt = 0;
  let stopRequested: Deno.Signal | null = null;
  let started = false;
  let stopping: Promise<unknown> | null = null;
  const beginStop = (sig: Deno.Signal) => {
    logger.info("{signal}: finishing in-flight requests and stopping", { signal: sig });
    notifier.stopping(`${name}: stopping (${sig})`);
    stopping = reloads.then(() => Promise.all(services.map((s) => s.stop())));
    setChanged();
  };
  const onSignal = (sig: Deno.Signal) => {
    // Under `deno task` or npx a terminal's Ctrl-C reaches us twice at once (from the terminal
    // and forwarded by the wrapper): a repeat within 300 ms is the same request.
    const now = Date.now();
    if (firstSignalAt !== 0 && now - firstSignalAt < 300) return;
    if (firstSignalAt !== 0) {
      logger.warn("second {signal}: exiting now", { signal: sig });
      for (const s of services) s.removeSocket();
      control?.close();
      Deno.exit(1);
    }
    firstSignalAt = now;
    stopRequested = sig;
    if (started) beginStop(sig);
  };
  const summary = () => {
    const devices = observe(services);
    const connected = devices.filter((d) => d.snapshot.connected).length;
    return `${name}: serving ${devices.length} device(s), ${connected} front-end(s) connected`;
  };
  const reload = async (reloader: () => ServiceReload) => {
    if (stopRequested !== null) return;
    logger.info("SIGHUP: reloading the configuration");
    notifier.reloading(`${name}: reloading`);
    let next: ServiceReload;
    try {
      next = reloader();
    } catch (e) {
      logger.error("reload failed, still serving the previous configuration: {error}", {
        error: (e as Error).message,
      });
      notifier.ready(summary());
      return;
    }
    const wanted = new Set(next.services);
    const runningOptions = new Set(services.map((s) => s.options));
    const gone = services.filter((s) => !wanted.has(s.options));
    const fresh = next.services.filter((o) => !runningOptions.has(o));
    const kept = services.filter((s) => wanted.has(s.options));
    const startedNow = new Map<ServiceOptions, DeviceService>();
    try {
      // Those going stop first: a changed device usually keeps its socket path.
      services = kept;
      await Promise.all(gone.map((s) => s.stop()));
      for (const s of gone) {
        const again = fresh.some((o) => o.name === s.options.name);
        logger.info("{device}: stopped ({why})", {
          device: s.options.name,
          why: again ? "changed; restarting it" : "removed",
        });
      }
      for (const o of fresh) {
        if (stopRequested !== null) break;
        try {
          startedNow.set(o, await DeviceService.start(o, pool));
          logger.info("{device}: started", { device: o.name });
        } catch (e) {
          logger.error("{device}: did not start: {error}", {
            device: o.name,
            error: (e as Error).message,
          });
        }
      }
    } finally {
      const byOptions = new Map(kept.map((s) => [s.options, s]));
      services = next.services.map((o) => byOptions.get(o) ?? startedNow.get(o))
        .filter((s): s is DeviceService => s !== undefined);
      next.settle(new Set(services.map((s) => s.options)));
      setChanged();
    }
    logger.info("reloaded: {kept} device(s) kept, {started} started, {stopped} stopped", {
      kept: kept.length,
      started: startedNow.size,
      stopped: gone.length,
    });
    // Devices kept as they were go on serving their connections untouched; they hear of the
    // reload for what they re-read themselves (a disk's image size, which may have grown).
    if (kept.length > 0) refreshInBackground(kept, "reload");
    notifier.ready(summary());
  };
  const requestReload = () => {
    const reloader = extras.reload;
    if (reloader === undefined || stopRequested !== null) return;
    if (!started) {
      reloadBeforeStart = true;
      return;
    }
    // One queued reload covers every SIGHUP that comes while another reload runs: it reads the
    // file after all of them.
    if (reloadQueued) return;
    reloadQueued = true;
    reloads = reloads.then(() => {
      reloadQueued = false;
      return reload(reloader);
    }).catch((e) => {
      logger.error("reload: {error}", { error: (e as Error).stack ?? String(e) });
    });
  };
  const sigint = () => onSignal("SIGINT");
  const sigterm = () => onSignal("SIGTERM");
  Deno.addSignalListener("SIGINT", sigint);
  Deno.addSignalListener("SIGTERM", sigterm);
  // SIGHUP reloads the configuration when there is one (the devices kept then refresh), and
  // otherwise asks every device to refresh (a disk re-reads its image's size). It is taken before
  // the devices start, like the others: its default action would end the process.
  const sighup = extras.reload ? requestReload : () => refreshInBackground(services, "SIGHUP");
  Deno.addSignalListener("SIGHUP", sighup);
  const removeSignalListeners = () => {
    Deno.removeSignalListener("SIGINT", sigint);
    Deno.removeSignalListener("SIGTERM", sigterm);
    Deno.removeSignalListener("SIGHUP", sighup);
  };
  try {
    const passed = adoptPassedSockets();
    // The endpoints first: a metrics port in use should fail before any device socket appears.
    if (extras.metrics) {
      metrics = await startMetricsServer(extras.metrics, () => observe(services), { vm: name });
    }
    if (extras.control) {
      control = startControlServer(
        extras.control,
        () => statusReport(name, startedAt, observe(services)),
        (device) => refreshDevices(services, device),
      );
    }
    for (const p of plans) services.push(await DeviceService.start(p, pool));
    for (const s of passed) {
      if (!s.inUse) {
        logger.warn("socket activation: {socket} matches no device; it stays unused", {
          socket: describePassed(s),
        });
      }
    }
  } catch (e) {
    await Promise.all(services.map((s) => s.stop()));
    await closeEndpoints();
    removeSignalListeners();
    throw e;
  }
  started = true;
  console.log(banner);
  if (metrics) {
    const m = (metrics as MetricsServer).address;
    logger.info("metrics on http://{host}:{port}/metrics", { host: m.hostname, port: m.port });
    if (!isLoopbackHost(m.hostname)) {
      logger.warn("metrics on {host} are served to every host that reaches it, unauthenticated", {
        host: m.hostname,
      });
    }
  }
  // STATUS= follows front-ends coming and going (read from shared memory, like everything else),
  // starting from what READY=1 said: a front-end connecting right after it is news.
  let lastStatus = summary();
  const notifyError = notifier.ready(lastStatus);
  if (notifyError) logger.warn("sd_notify failed: {error}", { error: notifyError.message });
  notifier.startWatchdog(() => services.every((s) => s.running));
  const statusTimer = notifier.socket === null ? undefined : setInterval(() => {
    const now = summary();
    if (now !== lastStatus) notifier.status(lastStatus = now);
  }, 1000);
  // A signal that came while the devices were starting is acted on now that they run.
  if (stopRequested !== null) beginStop(stopRequested);
  else if (reloadBeforeStart) requestReload();
  try {
    for (;;) {
      const current = services;
      const ended = await Promise.race([
        changed.then(() => null),
        ...current.map((s) => s.done.then(() => ({ s, error: null }), (error) => ({ s, error }))),
      ]);
      if (stopping) {
        if (ended?.error) throw ended.error;
        await stopping;
        logger.info("stopped");
        return 0;
      }
      // The set changed, or a device a reload stopped has finished: nothing to do.
      if (ended === null || !services.includes(ended.s)) continue;
      if (ended.error) throw ended.error;
      // A worker stopped on its own: stop the rest too.
      notifier.stopping(`${name}: a device stopped; stopping the others`);
      await reloads;
      await Promise.all(services.map((s) => s.stop()));
      return 1;
    }
  } catch (e) {
    logger.fatal("{error}", { error: (e as Error).message });
    notifier.stopping(`${name}: ${(e as Error).message}`);
    await reloads;
    await Promise.all(services.map((s) => s.stop()));
    return 1;
  } finally {
    clearInterval(statusTimer);
    notifier.stopWatchdog();
    await closeEndpoints();
    removeSignalListeners();
  }
}

/** Options of {@link serveDevice}. */
export interface ServeDeviceOptions {
  /** vhost-user socket path. */
  socket: string;
  /** URL of the module exporting `createDevice` (often `import.meta.url`). */
  module: string | URL;
  /** Options passed to `createDevice` (structured-clonable). */
  options?: unknown;
  /** Name in logs; default `device`. */
  name?: string;
  /** Logging settings. */
  log?: LogSettings;
  /**
   * Busy-poll window of the device's worker in µs (default 0: sleep at once). Queues are polled
   * with kicks off only if the device sets `pollQueues`; otherwise only its fds are.
   */
  pollUs?: number;
}

/**
 * Serves one device from a module that exports `createDevice`, in a data-plane worker, until
 * SIGINT or SIGTERM. Resolves to the exit code.
 *
 * @example
 * ```ts
 * if (import.meta.main) {
 *   Deno.exit(await serveDevice({ socket: "/tmp/rng.sock", module: import.meta.url }));
 * }
 * ```
 */
export function serveDevice(opts: ServeDeviceOptions): Promise<number> {
  const log = opts.log ?? defaultLogSettings;
  const name = opts.name ?? "device";
  return runServices(
    [{
      socket: opts.socket,
      module: opts.module,
      options: opts.options ?? {},
      name,
      log,
      pollUs: opts.pollUs,
    }],
    log,
    `vhostd: serving ${name} on ${opts.socket}`,
  );
}
