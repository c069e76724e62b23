/**
 * A bounded fuzzing run in CI (longer runs: `deno task fuzz --cases N`): hostile front-end input
 * never crashes or hangs the daemon, each bad connection is dropped with one log line, no fd leaks,
 * and another VM served by the same process keeps doing I/O throughout.
 */

import assert from "node:assert/strict";
import { fuzzRun } from "./fuzz/harness.ts";

const CASES = 400;
const SEED = 20261121;

Deno.test(`hostile front-end: ${CASES} fuzz cases, the daemon and the other VM carry on`, async () => {
  const r = await fuzzRun(CASES, SEED);
  console.log(
    `${r.cases} cases: ${r.dropped} dropped, ${r.survived} survived; bystander verified ` +
      `${r.bystanderChecks} times; daemon fds ${r.fdsBefore} -> ${r.fdsAfter}`,
  );
  assert.ok(r.dropped > CASES / 4, "most hostile cases are refused");
  assert.ok(r.bystanderChecks >= CASES / 25);
  assert.ok(r.fdsAfter <= r.fdsBefore + 2, `fd leak: ${r.fdsBefore} -> ${r.fdsAfter}`);
  const drops = r.daemonLog.split("\n").filter((l) => l.includes("dropping the front-end"));
  assert.ok(drops.length >= r.dropped * 0.5, "dropped connections are logged");
  assert.ok(drops.every((l) => !l.includes("\n")), "one line each");
  assert.doesNotMatch(r.daemonLog, /data plane stopped|FTL|worker crashed|event handler failed/);
});
