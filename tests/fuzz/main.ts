/**
 * A longer fuzzing run than CI's: `deno task fuzz [--cases N] [--seed S]`. Starts its own
 * two-device daemon, runs N cases against one device while checking the other after every 25,
 * and stops at the first crash, hang or broken bystander, printing the seed to replay.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { fuzzRun } from "./harness.ts";

const { values } = parseArgs({ options: { cases: { type: "string" }, seed: { type: "string" } } });
const cases = Number(values.cases ?? 2000);
const seed = Number(values.seed ?? Date.now() % 1_000_000);
const r = await fuzzRun(cases, seed, (done) => {
  if (done % 250 === 0) console.log(`${done}/${cases} cases`);
});
console.log(
  `${r.cases} cases from seed ${seed}: ${r.dropped} dropped, ${r.survived} survived; ` +
    `daemon alive, bystander verified ${r.bystanderChecks} times, fds ${r.fdsBefore} -> ${r.fdsAfter}`,
);
