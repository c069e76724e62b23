/**
 * Running devices until a signal: the main thread's supervision loop, used by the CLI and by
 * {@link serveDevice} for devices written against the public API.
 *
 * @module
 */

import { getLogger } from "@logtape/logtape";
import { defaultLogSettings, type LogSettings, setupLogging } from "./log.ts";
import { DeviceService, type ServiceOptions } from "./service.ts";

/**
 * Starts the services, prints `banner` to stdout, and serves until SIGINT/SIGTERM (a second signal
 * exits at once). Returns the exit code: 0 after a clean stop, 1 if a device failed.
 */
export async function runServices(
  plans: ServiceOptions[],
  log: LogSettings,
  banner: string,
): Promise<number> {
  await setupLogging(log);
  const logger = getLogger(["vhostd", "daemon"]);
  const services: DeviceService[] = [];
  try {
    for (const p of plans) services.push(await DeviceService.start(p));
  } catch (e) {
    await Promise.all(services.map((s) => s.stop()));
    throw e;
  }
  console.log(banner);
  let firstSignalAt = 0;
  let stopping: Promise<unknown> | null = null;
  const onSignal = (sig: Deno.Signal) => {
    // Under `deno task` or npx a terminal's Ctrl-C reaches us twice at once (from the terminal
    // and forwarded by the wrapper): a repeat within 300 ms is the same request.
    const now = Date.now();
    if (firstSignalAt !== 0 && now - firstSignalAt < 300) return;
    if (firstSignalAt !== 0) {
      logger.warn("second {signal}: exiting now", { signal: sig });
      for (const s of services) s.removeSocket();
      Deno.exit(1);
    }
    firstSignalAt = now;
    logger.info("{signal}: finishing in-flight requests and stopping", { signal: sig });
    stopping = Promise.all(services.map((s) => s.stop()));
  };
  const sigint = () => onSignal("SIGINT");
  const sigterm = () => onSignal("SIGTERM");
  Deno.addSignalListener("SIGINT", sigint);
  Deno.addSignalListener("SIGTERM", sigterm);
  try {
    await Promise.race(services.map((s) => s.done));
    if (stopping) await stopping;
    else {
      // A worker stopped on its own: stop the rest too.
      await Promise.all(services.map((s) => s.stop()));
      return 1;
    }
    logger.info("stopped");
    return 0;
  } catch (e) {
    logger.fatal("{error}", { error: (e as Error).message });
    await Promise.all(services.map((s) => s.stop()));
    return 1;
  } finally {
    Deno.removeSignalListener("SIGINT", sigint);
    Deno.removeSignalListener("SIGTERM", sigterm);
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
    [{ socket: opts.socket, module: opts.module, options: opts.options ?? {}, name, log }],
    log,
    `vhostd: serving ${name} on ${opts.socket}`,
  );
}
