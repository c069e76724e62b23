/**
 * A bounded fuzzing run in CI (longer runs: `deno task fuzz --cases N`): hostile front-end and
 * guest input never crashes or hangs the daemon, each bad connection is dropped with one log
 * line, no fd leaks, and the devices nobody attacks (a second disk and two switch ports, sharing
 * the attacked devices' one worker) keep doing verified I/O throughout.
 */

import assert from "node:assert/strict";
import { fuzzRun } from "./fuzz/harness.ts";

const CASES = 400;
const SEED = 20261121;

Deno.test(`hostile front-end: ${CASES} fuzz cases, the daemon and the devices sharing its worker carry on`, async () => {
  const r = await fuzzRun(CASES, SEED);
  console.log(
    `${r.cases} cases: ${r.dropped} dropped, ${r.broken} with a queue stopped, ${r.survived} ` +
      `served; ${JSON.stringify(r.byClass)}; bystander verified ${r.bystanderChecks} times, ` +
      `switch ${r.switchChecks} frames; daemon fds ${r.fdsBefore} -> ${r.fdsAfter}`,
  );
  assert.ok(r.dropped + r.broken > CASES / 4, "most hostile cases are refused");
  for (const [name, c] of Object.entries(r.byClass)) assert.ok(c.cases > 0, `${name} cases ran`);
  assert.ok(r.byClass.ring.broken > 0, "some corrupted rings were stopped");
  assert.ok(r.bystanderChecks >= CASES / 25);
  assert.ok(r.switchChecks >= CASES / 25);
  assert.ok(r.fdsAfter <= r.fdsBefore + 2, `fd leak: ${r.fdsBefore} -> ${r.fdsAfter}`);
  assert.equal(r.exitCode, 0, "SIGTERM stops the daemon");
  const drops = r.daemonLog.split("\n").filter((l) => l.includes("dropping the front-end"));
  assert.ok(drops.length >= r.dropped * 0.5, "dropped connections are logged");
  assert.doesNotMatch(r.daemonLog, /data plane stopped|FTL|worker crashed|event handler failed/);
});
