/**
 * Running devices until a signal: the main thread's supervision loop, used by the CLI and by
 * {@link serveDevice} for devices written against the public API.
 *
 * @module
 */

import { getLogger } from "../log/mod.ts";
import { defaultLogSettings, type LogSettings, setupLogging } from "./log.ts";
import { DeviceService, type ServiceOptions, socketPaths } from "./service.ts";
import type { ServeExtras } from "./cli.ts";
import {
  isLoopbackHost,
  type MetricsServer,
  type ObservedDevice,
  startMetricsServer,
} from "./metrics.ts";
import { type ControlServer, startControlServer, statusReport } from "./control.ts";
import { SdNotifier } from "./notify.ts";

/** The devices of running services, one per socket, as metrics and status see them. */
export function observe(services: readonly DeviceService[]): ObservedDevice[] {
  const out: ObservedDevice[] = [];
  for (const s of services) {
    const paths = socketPaths(s.options);
    for (let port = 0; port < s.stats.ports; port++) {
      out.push({
        name: paths.length > 1 ? `${s.options.name}.${port}` : s.options.name,
        type: s.options.type ?? s.options.name,
        service: s.options.name,
        socket: paths[port],
        running: s.running,
        snapshot: s.stats.read(port),
        metrics: s.metrics[port] ?? [],
      });
    }
  }
  return out;
}

/**
 * Starts the services, prints `banner` to stdout, and serves until SIGINT/SIGTERM (a second signal
 * exits at once). With `extras`, also serves metrics over HTTP and status on a control socket.
 * Under systemd (NOTIFY_SOCKET), READY=1 is sent once every socket listens and every worker has
 * built its device; the watchdog is pinged while all workers run. Returns the exit code: 0 after
 * a clean stop, 1 if a device failed.
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
  const services: DeviceService[] = [];
  let metrics: MetricsServer | null = null;
  let control: ControlServer | null = null;
  const closeEndpoints = async () => {
    control?.close();
    control = null;
    await metrics?.close();
    metrics = null;
  };
  // Signal handlers go in before anything starts: a supervisor may send SIGTERM the moment it
  // sees READY=1, and the default action would kill us without removing the sockets.
  let firstSignalAt = 0;
  let stopRequested: Deno.Signal | null = null;
  let started = false;
  let stopping: Promise<unknown> | null = null;
  const beginStop = (sig: Deno.Signal) => {
    logger.info("{signal}: finishing in-flight requests and stopping", { signal: sig });
    notifier.stopping(`${name}: stopping (${sig})`);
    stopping = Promise.all(services.map((s) => s.stop()));
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
  const sigint = () => onSignal("SIGINT");
  const sigterm = () => onSignal("SIGTERM");
  Deno.addSignalListener("SIGINT", sigint);
  Deno.addSignalListener("SIGTERM", sigterm);
  const removeSignalListeners = () => {
    Deno.removeSignalListener("SIGINT", sigint);
    Deno.removeSignalListener("SIGTERM", sigterm);
  };
  try {
    // The endpoints first: a metrics port in use should fail before any device socket appears.
    if (extras.metrics) {
      metrics = await startMetricsServer(extras.metrics, () => observe(services), { vm: name });
    }
    if (extras.control) {
      control = startControlServer(
        extras.control,
        () => statusReport(name, startedAt, observe(services)),
      );
    }
    for (const p of plans) services.push(await DeviceService.start(p));
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
  const summary = () => {
    const devices = observe(services);
    const connected = devices.filter((d) => d.snapshot.connected).length;
    return `${name}: serving ${devices.length} device(s), ${connected} front-end(s) connected`;
  };
  const notifyError = notifier.ready(summary());
  if (notifyError) logger.warn("sd_notify failed: {error}", { error: notifyError.message });
  notifier.startWatchdog(() => services.every((s) => s.running));
  // STATUS= follows front-ends coming and going (read from shared memory, like everything else).
  let lastStatus = summary();
  const statusTimer = notifier.socket === null ? undefined : setInterval(() => {
    const now = summary();
    if (now !== lastStatus) notifier.status(lastStatus = now);
  }, 1000);
  // A signal that came while the devices were starting is acted on now that they run.
  if (stopRequested !== null) beginStop(stopRequested);
  try {
    await Promise.race(services.map((s) => s.done));
    if (stopping) await stopping;
    else {
      // A worker stopped on its own: stop the rest too.
      notifier.stopping(`${name}: a device stopped; stopping the others`);
      await Promise.all(services.map((s) => s.stop()));
      return 1;
    }
    logger.info("stopped");
    return 0;
  } catch (e) {
    logger.fatal("{error}", { error: (e as Error).message });
    notifier.stopping(`${name}: ${(e as Error).message}`);
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
