import assert from "node:assert/strict";
import { configureLogging, getLogger, type LogRecord, renderMessage } from "./mod.ts";
import { rateLimited, RateLimiter } from "./rate_limit.ts";

Deno.test("RateLimiter: a burst, then one per interval; dropped events are counted", () => {
  const r = new RateLimiter({ burst: 3, intervalMs: 1000 }, 0);
  assert.deepEqual([0, 1, 2, 3, 4].map(() => r.admit(10)), [true, true, true, false, false]);
  assert.equal(r.takeDropped(), 2);
  assert.equal(r.takeDropped(), 0, "the count starts again");
  assert.equal(r.admit(999), false, "no token before the interval");
  assert.equal(r.admit(1000), true, "one token per interval");
  assert.equal(r.admit(1001), false);
  // A long quiet spell refills the bucket, but never beyond the burst.
  assert.deepEqual([1, 2, 3, 4].map(() => r.admit(60_000)), [true, true, true, false]);
  assert.throws(() => new RateLimiter({ burst: 0, intervalMs: 1 }), RangeError);
});

Deno.test("rateLimited: each template has its own budget; the next line says how many were dropped", () => {
  const records: LogRecord[] = [];
  configureLogging({ lowestLevel: "trace", write: (r) => records.push(r) });
  try {
    const log = rateLimited(getLogger(["test"]), { burst: 2, intervalMs: 60_000 });
    for (let i = 0; i < 50; i++) log.warn("flood {i}", { i });
    log.info("other line");
    assert.deepEqual(records.map(renderMessage), ["flood 0", "flood 1", "other line"]);
    assert.equal(records[0].level, "warning");
    assert.deepEqual(records.map((r) => r.category), [["test"], ["test"], ["test"]]);
  } finally {
    configureLogging(null);
  }
});

Deno.test("rateLimited: the first line after a flood says how many like it were dropped", async () => {
  const records: LogRecord[] = [];
  configureLogging({ lowestLevel: "trace", write: (r) => records.push(r) });
  try {
    const log = rateLimited(getLogger(["test"]), { burst: 1, intervalMs: 50 });
    for (let i = 0; i < 10; i++) log.info("line {i}", { i });
    await new Promise((r) => setTimeout(r, 120));
    log.info("line {i}", { i: 10 });
    assert.deepEqual(records.map(renderMessage), ["line 0", "line 10 (9 more like this dropped)"]);
  } finally {
    configureLogging(null);
  }
});
