/**
 * The memory floor of vhostd's process shape with none of its code: a Deno main thread and some
 * idle workers (one by default, as `vhostd blk` has). Comparison 4 reports its RSS beside
 * vhostd's, so a reader can see which part of an idle daemon is the runtime and which part is
 * vhostd; with `--workers 0` and `--workers 1` the difference is what one idle worker costs.
 *
 *   deno run -A bench/deno_floor.ts [--workers N]
 *
 * Prints `deno floor: ready` once every worker runs, then idles until killed.
 *
 * @module
 */

// No node:util here: loading Node's compatibility layer would raise the floor being measured.
const args = Deno.args;
const count = args.length === 0
  ? 1
  : args[0] === "--workers" && args.length === 2
  ? Number(args[1])
  : NaN;
if (!Number.isInteger(count) || count < 0 || count > 64) {
  console.error("deno_floor.ts: --workers must be a whole number from 0 to 64");
  Deno.exit(2);
}
const workers = Array.from({ length: count }, () =>
  new Worker(
    `data:text/javascript,${encodeURIComponent("self.postMessage('up')")}`,
    { type: "module" },
  ));
await Promise.all(workers.map((w) => new Promise((resolve) => w.onmessage = resolve)));
console.log("deno floor: ready");
setInterval(() => {}, 1 << 30);
