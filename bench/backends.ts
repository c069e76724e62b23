/**
 * Starting the block back-ends the benchmark compares: vhostd (its CLI, or bench/blk_targets.ts
 * for the null target) and qemu-storage-daemon's vhost-user-blk export. Every lever that changes
 * how a back-end does I/O is a field here, so its effect can be measured by changing one value.
 *
 * @module
 */

import { pinnedArgv } from "./placement.ts";
import { DENO, type RunningBackend, socketExists, startProcess } from "./lib.ts";

/** Back-ends under test. */
export type BackendName = "vhostd" | "qsd";

/** Where the data lives. */
export type Storage = "tmpfs" | "disk" | "null";

/** How a back-end should serve one image (or a null target). */
export interface BlkTarget {
  /** Image path; ignored for `null`. */
  image: string;
  /** Kind of storage, which picks the I/O mode. */
  storage: Storage;
  /** Size of a null target in bytes. */
  nullSizeBytes: number;
  /** Queues the device offers. */
  queues: number;
  /** vhost-user socket to listen on. */
  socket: string;
  /**
   * Other processes have the image open too (taking turns at I/O): qsd and vhostd then skip
   * their image locks (`locking=off`, `--no-locking`), which would otherwise refuse the sharing.
   */
  shared?: boolean;
}

/** The switchable I/O levers of each back-end. */
export interface BackendLevers {
  /** vhostd: open disk images with O_DIRECT (`--direct`). Default true on disk, never on tmpfs. */
  vhostdDirect: boolean;
  /** qsd on disk: `aio=` of the file driver (`native` or `io_uring`; both need cache.direct=on). */
  qsdDiskAio: "native" | "io_uring" | "threads";
  /** qsd on tmpfs: `aio=` (`threads` is the default; tmpfs cannot do O_DIRECT for native). */
  qsdTmpfsAio: "threads" | "io_uring";
  /** vhostd: busy-poll window in µs (`--poll-us`); undefined runs vhostd's default. */
  vhostdPollUs?: number;
  /** vhostd: I/O engine of image targets (`--io-engine`); undefined runs vhostd's default. */
  vhostdIoEngine?: "auto" | "sync" | "uring";
}

/** Levers as the benchmark uses them unless told otherwise. */
export const DEFAULT_LEVERS: BackendLevers = {
  vhostdDirect: true,
  qsdDiskAio: "native",
  qsdTmpfsAio: "threads",
};

/** The argv that starts `backend` serving `t` (binary first). */
export function backendCommand(
  backend: BackendName,
  t: BlkTarget,
  levers: BackendLevers,
): string[] {
  if (backend === "vhostd") {
    if (t.storage === "null") {
      return [
        DENO,
        "run",
        "-A",
        "bench/blk_targets.ts",
        "--null",
        "--size",
        String(t.nullSizeBytes),
        "--queues",
        String(t.queues),
        ...pollArgs(levers),
        t.socket,
      ];
    }
    const argv = [
      DENO,
      "run",
      "-A",
      "daemon/main.ts",
      "blk",
      "--socket",
      t.socket,
      "--image",
      t.image,
      "--queues",
      String(t.queues),
      "--log-level",
      "warning",
    ];
    if (t.storage === "disk" && levers.vhostdDirect) argv.push("--direct");
    if (t.shared) argv.push("--no-locking");
    if (levers.vhostdIoEngine !== undefined) argv.push("--io-engine", levers.vhostdIoEngine);
    argv.push(...pollArgs(levers));
    return argv;
  }
  let blockdev: string;
  if (t.storage === "null") {
    blockdev = `driver=null-co,node-name=n0,size=${t.nullSizeBytes},read-zeroes=off`;
  } else if (t.storage === "disk") {
    const direct = levers.qsdDiskAio === "threads" ? "" : ",cache.direct=on";
    blockdev = `driver=file,node-name=n0,filename=${t.image}${direct},aio=${levers.qsdDiskAio}`;
    if (t.shared) blockdev += ",locking=off";
  } else {
    blockdev = `driver=file,node-name=n0,filename=${t.image},aio=${levers.qsdTmpfsAio}`;
  }
  return [
    "qemu-storage-daemon",
    "--blockdev",
    blockdev,
    "--export",
    `type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=${t.socket},` +
    `writable=on,num-queues=${t.queues}`,
  ];
}

function pollArgs(levers: BackendLevers): string[] {
  return levers.vhostdPollUs === undefined ? [] : ["--poll-us", String(levers.vhostdPollUs)];
}

/** Starts `backend` on `t` (on `cpus`, if given) and waits until its socket listens. */
export function startBackend(
  backend: BackendName,
  t: BlkTarget,
  levers: BackendLevers,
  cpus?: number[],
): Promise<RunningBackend> {
  const argv = pinnedArgv(backendCommand(backend, t, levers), cpus);
  try {
    Deno.removeSync(t.socket);
  } catch {
    // not there
  }
  return startProcess(
    argv,
    (out) =>
      backend === "vhostd"
        ? out.includes("vhostd: serving") && socketExists(t.socket)
        : socketExists(t.socket),
  );
}
