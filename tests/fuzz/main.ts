/**
 * A longer fuzzing run than CI's: `deno task fuzz [--cases N] [--seed S]`. Starts its own
 * daemon (tests/fuzz/target.ts), runs N cases against its block device, switch port and console
 * while checking the other block device and switch ports after every 25, and stops at the first
 * crash, hang, finding or broken bystander, printing the seed to replay.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { fuzzRun } from "./harness.ts";

const { values } = parseArgs({ options: { cases: { type: "string" }, seed: { type: "string" } } });
const cases = Number(values.cases ?? 2000);
const seed = Number(values.seed ?? Date.now() % 1_000_000);
const started = Date.now();
const r = await fuzzRun(cases, seed, (done) => {
  if (done % 250 === 0) console.log(`${done}/${cases} cases`);
});
const classes = Object.entries(r.byClass).map(([name, c]) =>
  `${name} ${c.cases} (${c.dropped} dropped, ${c.broken} broken)`
);
console.log(
  `${r.cases} cases from seed ${seed} in ${Math.round((Date.now() - started) / 1000)} s: ` +
    `${r.dropped} dropped, ${r.broken} with a queue stopped, ${r.survived} served; ` +
    `${classes.join(", ")}; daemon alive, bystander disk verified ${r.bystanderChecks} times, ` +
    `switch ports ${r.switchChecks} frames; fds ${r.fdsBefore} -> ${r.fdsAfter}; ` +
    `exit code ${r.exitCode}`,
);
