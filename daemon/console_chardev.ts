/**
 * `vhostd console --chardev`: QEMU's own virtio-console (any version) connects a plain character
 * device per port, and one worker (`devices/console/chardev_worker.ts`) serves them all. It runs
 * outside `runServices`: there is no vhost-user device, so no metrics or control socket.
 *
 * @module
 */

import { getLogger } from "../log/mod.ts";
import type { PortConfig } from "../devices/console/port_hub.ts";
import type { ChardevWorkerInit, ChardevWorkerReport } from "../devices/console/chardev_worker.ts";
import { createEventFd, signalEventFd } from "../sys/event.ts";
import { closeQuietly } from "../sys/libc.ts";
import { type LogSettings, setupLogging } from "../log/setup.ts";
import { bindSocket } from "./service.ts";
import type { ConsolePlan } from "./console_plan.ts";
import { closePorts, type Opened } from "./console_ports.ts";

/**
 * Serves an opened console in character-device mode until SIGINT or SIGTERM: binds each port's
 * chardev socket, starts the chardev worker, prints `banner` once it serves, and returns the exit
 * code (0 when stopped by a signal, 1 when the worker ended on its own). A second signal exits at
 * once.
 */
export async function runChardev(
  plan: ConsolePlan,
  ports: PortConfig[],
  log: LogSettings,
  opened: Opened,
  banner: string,
): Promise<number> {
  const chardevFds: number[] = [];
  let shutdownFd = -1;
  try {
    for (const p of plan.chardevPaths) {
      chardevFds.push(bindSocket(p, plan.access.socketMode, plan.access.socketGroup));
      opened.fds.push(chardevFds[chardevFds.length - 1]);
      opened.paths.push(p);
    }
    shutdownFd = createEventFd();
  } catch (e) {
    closePorts(opened);
    throw e;
  }
  setupLogging(log);
  const logger = getLogger(["vhostd", "daemon"]);
  const worker = new Worker(new URL("../devices/console/chardev_worker.ts", import.meta.url), {
    type: "module",
  });
  let onReady!: () => void, onFail!: (e: Error) => void, onDone!: () => void;
  const ready = new Promise<void>((res, rej) => [onReady, onFail] = [res, rej]);
  const done = new Promise<void>((res) => onDone = res);
  worker.onmessage = (e: MessageEvent<ChardevWorkerReport>) => {
    if (e.data.type === "ready") onReady();
    else if (e.data.type === "failed") onFail(new Error(e.data.message));
    else onDone();
  };
  worker.onerror = (e) => {
    e.preventDefault();
    onFail(new Error(`console worker crashed: ${e.message}`));
    onDone();
  };
  const init: ChardevWorkerInit = {
    ports,
    chardevFds,
    chardevPaths: plan.chardevPaths,
    allowUids: plan.access.allowUids ?? [],
    shutdownFd,
    log,
  };
  worker.postMessage(init);
  const finish = () => {
    worker.terminate();
    closeQuietly(shutdownFd);
    for (const p of opened.paths) {
      try {
        Deno.removeSync(p);
      } catch {
        // removed by the worker
      }
    }
  };
  try {
    await ready;
  } catch (e) {
    finish();
    throw e;
  }
  console.log(banner);
  let stopping = false;
  const onSignal = (sig: Deno.Signal) => {
    if (stopping) {
      finish();
      Deno.exit(1);
    }
    stopping = true;
    logger.info("{signal}: stopping", { signal: sig });
    signalEventFd(shutdownFd);
  };
  const sigint = () => onSignal("SIGINT");
  const sigterm = () => onSignal("SIGTERM");
  Deno.addSignalListener("SIGINT", sigint);
  Deno.addSignalListener("SIGTERM", sigterm);
  try {
    await done;
    return stopping ? 0 : 1;
  } finally {
    Deno.removeSignalListener("SIGINT", sigint);
    Deno.removeSignalListener("SIGTERM", sigterm);
    finish();
  }
}
