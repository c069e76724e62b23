import assert from "node:assert/strict";
import { configureLogging, getLogger, type LogRecord, renderMessage } from "./mod.ts";
import { jsonLine, textLine } from "./setup.ts";

function capture(level: "debug" | "info" | "warning"): LogRecord[] {
  const records: LogRecord[] = [];
  configureLogging({ lowestLevel: level, write: (r) => records.push(r) });
  return records;
}

Deno.test("log: records below the level are dropped, nothing is written until configured", () => {
  configureLogging(null);
  const log = getLogger(["vhostd", "blk"]);
  log.error("dropped: no sink yet");
  const records = capture("info");
  log.debug("too low");
  log.info("kept {n}", { n: 1 });
  log.fatal("kept too");
  assert.deepEqual(records.map((r) => r.level), ["info", "fatal"]);
  assert.deepEqual(records[0].category, ["vhostd", "blk"]);
  assert.equal(getLogger(["vhostd", "blk"]), log, "one logger per category");
  configureLogging(null);
});

Deno.test("log: placeholders take properties; unknown names and doubled braces stay text", () => {
  const r: LogRecord = {
    category: ["x"],
    level: "info",
    timestamp: 0,
    rawMessage: "{who} sent {n} {what} {missing} {{literal}}",
    properties: { who: "QEMU", n: 3, what: { a: 1n }, extra: true },
  };
  assert.equal(renderMessage(r), 'QEMU sent 3 {"a":"1"} {missing} {literal}');
});

Deno.test("log: text lines name the device and the queue; JSON lines carry both as fields", () => {
  const records = capture("debug");
  getLogger(["vhostd", "disk0"]).warn("queue stopped: {error}", { error: "bad chain", queue: 2 });
  getLogger(["vhostd", "daemon"]).info("stopped");
  configureLogging(null);
  const [q, d] = records;
  assert.match(
    textLine(q),
    /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \+00 \[WRN\] vhostd\.disk0: \[queue 2\] queue stopped: bad chain\n$/,
  );
  const j = JSON.parse(jsonLine(q));
  assert.equal(j.level, "WARNING");
  assert.equal(j.logger, "vhostd.disk0");
  assert.equal(j.device, "disk0");
  assert.equal(j.queue, 2);
  assert.equal(j.message, "queue stopped: bad chain");
  assert.deepEqual(j.properties, { error: "bad chain", queue: 2 });
  assert.equal(JSON.parse(jsonLine(d)).device, undefined, "the daemon is not a device");
  assert.match(textLine(d), /\[INF\] vhostd\.daemon: stopped\n$/);
});
