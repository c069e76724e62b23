/**
 * A vhostd block device served inside the test process: the same worker, event loop, vhost-user
 * back-end and {@link BlkDevice} the daemon runs (daemon/service.ts starts them as `vhostd blk`
 * would), with the in-repo front-end library ({@link BlkFrontend}) driving it from the test's own
 * thread through a real socket and a real memfd of guest RAM. No process is spawned, so a protocol
 * or device test takes milliseconds.
 *
 * The front-end blocks on the back-end's replies; the back-end runs in its worker's thread
 * meanwhile, so the test thread may block freely.
 *
 * @module
 */

import { planBlk } from "../../daemon/blk.ts";
import type { BlkIoEngine } from "../../devices/blk/device.ts";
import { DeviceService } from "../../daemon/service.ts";
import type { WorkerPool } from "../../daemon/worker_pool.ts";
import type { PortSnapshot } from "../../daemon/stats.ts";
import { BlkFrontend, type BlkFrontendOptions } from "../../vhost-user/frontend/mod.ts";
import { sparseFile } from "./daemon.ts";

/** How to serve the device. */
export interface InProcessBlkOptions {
  /** Image size in bytes; default 16 MiB. */
  sizeBytes?: number;
  /** Serve this existing image (left in place) instead of a fresh sparse one. */
  image?: string;
  /** Queues offered; default 2. */
  queues?: number;
  /** Serve read-only; default false. */
  readOnly?: boolean;
  /** The I/O engine (`BlkOptions.ioEngine`); default `sync`. */
  ioEngine?: BlkIoEngine;
  /** Busy-poll window of the worker's loop in µs; default 0 (kicks only). */
  pollUs?: number;
  /** Place the device on a worker of this pool (shared with other devices); default its own. */
  pool?: WorkerPool;
}

/** A block device served in this process. */
export interface InProcessBlk {
  /** Its vhost-user socket. */
  socket: string;
  /** The image file it serves. */
  image: string;
  /** The running service (worker, socket, counters). */
  service: DeviceService;
  /**
   * What the back-end publishes about its connection and queues. The worker publishes just after
   * it answers a message, so with a session `s` this first asks GET_STATUS: once that reply is
   * in, what every earlier message changed has been published.
   */
  snapshot(s?: BlkFrontend): PortSnapshot;
  /** Opens a started front-end session on the device (closed by {@link stop} if still open). */
  open(options?: Omit<BlkFrontendOptions, "socket">): Promise<BlkFrontend>;
  /** Closes sessions, stops the worker and removes the image and socket. */
  stop(): Promise<void>;
}

/** Serves a fresh sparse image of `options.sizeBytes` in a worker of this process. */
export async function serveBlkInProcess(options: InProcessBlkOptions = {}): Promise<InProcessBlk> {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-inproc-" });
  const image = options.image ?? `${dir}/disk.img`;
  const socket = `${dir}/blk.sock`;
  if (options.image === undefined) sparseFile(image, options.sizeBytes ?? 16 << 20);
  const plan = planBlk(
    socket,
    image,
    {
      readOnly: options.readOnly ?? false,
      direct: false,
      queues: options.queues ?? 2,
      pollUs: options.pollUs ?? 0,
    },
    { level: "warning", format: "text" },
    { socketMode: 0o600 },
  );
  plan.blk.ioEngine = options.ioEngine ?? "sync";
  let service: DeviceService;
  try {
    service = await DeviceService.start(plan.service, options.pool);
  } catch (e) {
    await Deno.remove(dir, { recursive: true });
    throw e;
  }
  const sessions: BlkFrontend[] = [];
  return {
    socket,
    image,
    service,
    snapshot: (s) => {
      s?.conn.getStatus();
      return service.stats.read(0);
    },
    async open(fe = {}) {
      const s = await BlkFrontend.open({ socket, queues: options.queues ?? 2, ...fe });
      sessions.push(s);
      return s;
    },
    async stop() {
      for (const s of sessions) s.close();
      await service.stop();
      await Deno.remove(dir, { recursive: true });
    },
  };
}

/** Runs `fn` with a device served in this process, stopping it afterwards. */
export async function withInProcessBlk(
  options: InProcessBlkOptions,
  fn: (blk: InProcessBlk) => Promise<void> | void,
): Promise<void> {
  const blk = await serveBlkInProcess(options);
  try {
    await fn(blk);
  } finally {
    await blk.stop();
  }
}

/**
 * Waits, without blocking the event loop of the test, until `check` holds; throws after
 * `timeoutMs` naming `what`.
 */
export async function waitUntil(check: () => boolean, what: string, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}
