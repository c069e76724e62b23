/**
 * Serves one or more vhostd block devices from one process, for benchmarks: a null target (no
 * I/O at all, to measure protocol and ring cost alone) or image files, one data-plane worker per
 * device. The CLI has no `--null` flag yet, so the benchmark starts the null target from here,
 * through the public {@link runServices}.
 *
 * Usage:
 *   deno run -A bench/blk_targets.ts --null --size BYTES --queues N SOCKET...
 *   deno run -A bench/blk_targets.ts --image PATH --queues N SOCKET...   (one image per socket:
 *     repeat --image, or give one to share it)
 *
 * Prints `vhostd: serving ...` once every socket listens; serves until SIGTERM/SIGINT.
 *
 * @module
 */

import { DEFAULT_POLL_US } from "../daemon/blk.ts";
import { parseArgs } from "node:util";
import type { BlkOptions } from "../mod.ts";
import { runServices } from "../daemon/serve.ts";
import type { ServiceOptions } from "../daemon/service.ts";
import { openImage } from "../devices/blk/image.ts";

/** What {@link targetPlans} builds services from. */
export interface TargetSpec {
  /** vhost-user sockets, one device each. */
  sockets: string[];
  /** Serve null targets of `sizeBytes` instead of images. */
  null: boolean;
  /** Size of a null target in bytes. */
  sizeBytes: number;
  /** Images: one per socket, or a single one for every socket. */
  images: string[];
  /** Queues per device. */
  queues: number;
  /** Open images with O_DIRECT. */
  direct: boolean;
  /** Busy-poll window in µs (default: vhostd blk's). */
  pollUs?: number;
  /** Shared data-plane workers (default 1); 0 gives every device a worker of its own. */
  workers?: number;
}

const log = { level: "warning", format: "text" } as const;

/** The services for a {@link TargetSpec}: a null or file-backed blk device per socket. */
export function targetPlans(spec: TargetSpec): ServiceOptions[] {
  return spec.sockets.map((socket, i) => {
    const name = `bench${i}`;
    let options: BlkOptions;
    if (spec.null) {
      options = {
        fd: -1,
        null: true,
        path: "null",
        sizeBytes: spec.sizeBytes,
        readOnly: false,
        queues: spec.queues,
        serial: name,
        name,
      };
    } else {
      const path = spec.images.length === 1 ? spec.images[0] : spec.images[i];
      if (!path) throw new Error(`no --image for socket ${socket}`);
      const { fd, sizeBytes } = openImage(path, false, spec.direct);
      options = {
        fd,
        path,
        sizeBytes,
        readOnly: false,
        queues: spec.queues,
        serial: name,
        name,
      };
    }
    return {
      socket,
      module: new URL("../devices/blk/mod.ts", import.meta.url),
      options,
      name,
      log,
      pollUs: spec.pollUs ?? DEFAULT_POLL_US,
      ownWorker: spec.workers === 0,
    };
  });
}

if (import.meta.main) {
  const { values, positionals } = parseArgs({
    args: Deno.args,
    allowPositionals: true,
    options: {
      null: { type: "boolean" },
      size: { type: "string" },
      image: { type: "string", multiple: true },
      queues: { type: "string" },
      direct: { type: "boolean" },
      "poll-us": { type: "string" },
      workers: { type: "string" },
    },
  });
  if (positionals.length === 0) {
    console.error("blk_targets.ts: give at least one socket path");
    Deno.exit(2);
  }
  const spec: TargetSpec = {
    sockets: positionals,
    null: values.null === true,
    sizeBytes: Number(values.size ?? 1 << 30),
    images: values.image ?? [],
    queues: Number(values.queues ?? 4),
    direct: values.direct === true,
    pollUs: values["poll-us"] === undefined ? undefined : Number(values["poll-us"]),
    workers: Number(values.workers ?? 1),
  };
  const what = spec.null ? "null target(s)" : "image(s)";
  Deno.exit(
    await runServices(
      targetPlans(spec),
      log,
      `vhostd: serving ${spec.sockets.length} blk ${what} on ${spec.sockets.join(", ")}`,
      { workers: Math.max(1, spec.workers ?? 1) },
    ),
  );
}
