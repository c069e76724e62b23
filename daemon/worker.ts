/**
 * The data-plane worker: builds one device from its module and runs its vhost-user server loop,
 * blocking in epoll_wait until the main thread signals the shutdown eventfd.
 *
 * @module
 */

/// <reference lib="deno.worker" />

import { getLogger } from "@logtape/logtape";
import type { DeviceModule } from "../devices/device.ts";
import { VhostUserServer } from "../vhost-user/server.ts";
import { type LogSettings, setupLogging } from "./log.ts";

/** The first message a worker receives. */
export interface WorkerInit {
  /** URL of a module exporting `createDevice`. */
  moduleUrl: string;
  /** Options for `createDevice`. */
  options: unknown;
  /** The listening socket's fd. */
  listenFd: number;
  /** The eventfd that stops the loop. */
  shutdownFd: number;
  /** Logging settings. */
  log: LogSettings;
  /** Device name, for logs. */
  name: string;
  /** User ids allowed to connect. */
  allowUids?: number[];
}

/** What a worker reports to the main thread. */
export type WorkerReport =
  | { type: "ready" }
  | { type: "stopped" }
  | { type: "failed"; message: string };

const report = (r: WorkerReport) => self.postMessage(r);

self.onmessage = async (event: MessageEvent<WorkerInit>) => {
  const init = event.data;
  await setupLogging(init.log);
  let device;
  try {
    const mod = (await import(init.moduleUrl)) as DeviceModule;
    device = await mod.createDevice(init.options);
  } catch (e) {
    report({ type: "failed", message: (e as Error).message ?? String(e) });
    self.close();
    return;
  }
  report({ type: "ready" });
  const server = new VhostUserServer(init.listenFd, device, {
    shutdownFd: init.shutdownFd,
    allowUids: init.allowUids,
  });
  try {
    server.run();
  } catch (e) {
    getLogger(["vhostd", init.name]).fatal("data plane stopped: {error}", {
      error: (e as Error).stack ?? String(e),
    });
  } finally {
    try {
      device.close?.();
    } finally {
      report({ type: "stopped" });
      self.close();
    }
  }
};
