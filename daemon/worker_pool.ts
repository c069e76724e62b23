/**
 * Data-plane workers seen from the main thread, and the pool that places a VM's devices on them.
 *
 * A worker is a V8 isolate: 10-14 MiB before it does anything. One per device made a VM with two
 * disks, a NIC and a console cost four of them; a {@link WorkerPool} puts the devices of one
 * daemon on a few shared workers instead (one by default), and gives a device a worker of its own
 * only when asked. Devices sharing a worker share its thread: each request is served to the end
 * without blocking (io_uring for disk I/O), so one device's slow storage does not hold another's.
 *
 * @module
 */

import { createEventFd, signalEventFd } from "../sys/event.ts";
import { closeQuietly } from "../sys/libc.ts";
import type { LogSettings } from "../log/setup.ts";
import type { MetricSeries } from "../devices/device.ts";
import type { RefreshResult, ServiceInit, WorkerCommand, WorkerReport } from "./worker.ts";

/** What a hosted service hears from its worker. */
export interface HostedServiceEvents {
  /** Its devices are built and served; `metrics` are their own series. */
  ready(metrics: MetricSeries[][]): void;
  /** Its devices answered `requests` refresh signals. */
  refreshed(requests: number, results: RefreshResult[]): void;
  /** It stopped after its shutdown eventfd was signalled. */
  stopped(): void;
  /** Its devices could not be built (`message` says why), or its worker died. */
  failed(message: string): void;
}

/** How long a worker with nothing left to host may take to finish before it is terminated. */
const EXIT_TIMEOUT_MS = 10_000;

let nextServiceId = 1;
let nextWorkerNumber = 1;

/**
 * One data-plane worker (daemon/worker.ts) and the services it hosts. It finishes once the last
 * of them is released; a worker that dies fails every service it hosted.
 */
export class DataPlaneWorker {
  /** Whether other services may be placed here (false: a device's own worker). */
  readonly shared: boolean;
  /** Its number in this process (1, 2, ... in the order they started), shown by status. */
  readonly number: number = nextWorkerNumber++;
  readonly #worker: Worker;
  readonly #wakeFd: number;
  /** The services hosted, by id, with their ports (what {@link load} counts). */
  readonly #services = new Map<number, { events: HostedServiceEvents; ports: number }>();
  /** The ports of the services placed here: what the pool balances. */
  #load = 0;
  #exiting = false;
  #exitTimer: ReturnType<typeof setTimeout> | undefined;
  /** Called once when it takes no more services (finishing or dead). */
  #onRetire: (w: DataPlaneWorker) => void;

  /** Starts a worker that logs with `log`. */
  constructor(
    log: LogSettings,
    shared: boolean,
    onRetire: (w: DataPlaneWorker) => void = () => {},
  ) {
    this.shared = shared;
    this.#onRetire = onRetire;
    this.#wakeFd = createEventFd();
    this.#worker = new Worker(new URL("./worker.ts", import.meta.url).href, { type: "module" });
    this.#worker.onmessage = (e: MessageEvent<WorkerReport>) => this.#receive(e.data);
    this.#worker.onerror = (e) => {
      e.preventDefault();
      this.#die(`worker crashed: ${e.message}`);
    };
    // The first message needs no wake-up: the worker reads it before it enters its loop.
    this.#worker.postMessage({ type: "init", wakeFd: this.#wakeFd, log } satisfies WorkerCommand);
  }

  /** The ports of the services it hosts. */
  get load(): number {
    return this.#load;
  }

  /** Whether it takes services (not finishing, not dead). */
  get open(): boolean {
    return !this.#exiting;
  }

  /** Hosts a service; its events come to `events`. Returns its id, for {@link release}. */
  host(service: Omit<ServiceInit, "id">, events: HostedServiceEvents): number {
    if (this.#exiting) throw new Error("internal: placing a service on a finished worker");
    const id = nextServiceId++;
    this.#services.set(id, { events, ports: service.listenFds.length });
    this.#load += service.listenFds.length;
    this.#send({ type: "add", service: { ...service, id } });
    return id;
  }

  /**
   * Forgets service `id` (it stopped, failed or was given up on). The worker finishes when no
   * service is left; one that does not is terminated after a while.
   */
  release(id: number): void {
    const service = this.#services.get(id);
    if (service === undefined) return;
    this.#services.delete(id);
    this.#load -= service.ports;
    if (this.#services.size > 0 || this.#exiting) return;
    this.#retire();
    this.#send({ type: "exit" });
    const timer = setTimeout(() => this.#end(), EXIT_TIMEOUT_MS);
    Deno.unrefTimer(timer);
    this.#exitTimer = timer;
  }

  #send(command: WorkerCommand): void {
    this.#worker.postMessage(command);
    // One signal per message: the worker's loop returns with their count and takes them all.
    signalEventFd(this.#wakeFd);
  }

  #receive(r: WorkerReport): void {
    if (r.type === "exited") {
      this.#end();
      return;
    }
    const events = this.#services.get(r.id)?.events;
    if (events === undefined) return;
    if (r.type === "ready") events.ready(r.metrics);
    else if (r.type === "refreshed") events.refreshed(r.requests, r.results);
    else if (r.type === "failed") events.failed(r.message);
    else events.stopped();
  }

  #die(message: string): void {
    this.#retire();
    const services = [...this.#services.values()].map((s) => s.events);
    this.#services.clear();
    for (const events of services) events.failed(message);
    this.#end();
  }

  #retire(): void {
    if (this.#exiting) return;
    this.#exiting = true;
    this.#onRetire(this);
  }

  #end(): void {
    clearTimeout(this.#exitTimer);
    this.#worker.terminate();
    closeQuietly(this.#wakeFd);
  }
}

/** How a {@link WorkerPool} places devices. */
export interface WorkerPoolOptions {
  /** Shared workers at most (1 or more); devices are spread over them by their ports. */
  workers: number;
}

/**
 * Shared workers of a daemon by default: one. A VM's devices then cost one V8 isolate in all;
 * BENCHMARKS.md (memory) shows what sharing costs two busy disks against a worker each.
 */
export const DEFAULT_WORKERS = 1;

/** Most shared workers a pool may have: more than the CPUs anyone gives one VM. */
export const MAX_WORKERS = 64;

/**
 * The data-plane workers of one daemon: up to {@link WorkerPoolOptions.workers} shared ones,
 * started as devices need them (a new one while fewer than that run, then the least loaded), plus
 * a worker of its own for each device that asks for one.
 */
export class WorkerPool {
  readonly #max: number;
  readonly #shared: DataPlaneWorker[] = [];

  /** A pool; see {@link WorkerPoolOptions}. */
  constructor(options: WorkerPoolOptions) {
    if (!Number.isInteger(options.workers) || options.workers < 1) {
      throw new RangeError(`bad worker count ${options.workers}`);
    }
    this.#max = options.workers;
  }

  /** The shared workers running now. */
  get sharedWorkers(): number {
    return this.#shared.length;
  }

  /** A worker for a service: its own when `own`, else a shared one. */
  place(log: LogSettings, own: boolean): DataPlaneWorker {
    if (own) return new DataPlaneWorker(log, false);
    if (this.#shared.length < this.#max) {
      const w = new DataPlaneWorker(log, true, (gone) => {
        const i = this.#shared.indexOf(gone);
        if (i >= 0) this.#shared.splice(i, 1);
      });
      this.#shared.push(w);
      return w;
    }
    return this.#shared.reduce((a, b) => b.load < a.load ? b : a);
  }
}
