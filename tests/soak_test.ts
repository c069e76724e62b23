/**
 * A short soak in CI (the documented long run is `deno task soak --minutes 30`): mixed block load
 * and front-end session churn, with no I/O errors, no fd growth and bounded RSS.
 */

import assert from "node:assert/strict";
import { soak } from "./soak/soak.ts";

Deno.test("soak (short): mixed load and session churn, nothing leaks", async () => {
  const r = await soak(24, 6);
  console.log(
    `${r.rounds} rounds, ${r.ios} I/Os, ${r.sessions} sessions; RSS ${r.rssStartKiB} -> ` +
      `${r.rssEndKiB} KiB; fds ${r.fdsStart} -> ${r.fdsEnd}`,
  );
  assert.ok(r.ios > 0 && r.sessions > 5);
  assert.equal(r.ioErrors, 0);
  assert.equal(r.sessionErrors, 0);
  assert.ok(r.fdsEnd <= r.fdsStart + 2, `fds ${r.fdsStart} -> ${r.fdsEnd}`);
  assert.ok(r.rssEndKiB < r.rssStartKiB * 1.5, `RSS ${r.rssStartKiB} -> ${r.rssEndKiB} KiB`);
});
