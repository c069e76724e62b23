/**
 * The memory floor of vhostd's process shape with none of its code: a Deno main thread and one
 * idle worker, as `vhostd blk` has. Comparison 4 reports its RSS beside vhostd's, so a reader can
 * see which part of an idle daemon is the runtime and which part is vhostd.
 *
 *   deno run -A bench/deno_floor.ts
 *
 * Prints `deno floor: ready` once the worker runs, then idles until killed.
 *
 * @module
 */

const worker = new Worker(
  `data:text/javascript,${encodeURIComponent("self.postMessage('up')")}`,
  { type: "module" },
);
await new Promise((resolve) => worker.onmessage = resolve);
console.log("deno floor: ready");
setInterval(() => {}, 1 << 30);
