import assert from "node:assert/strict";
import { idleScript } from "./guest_idle.ts";
import { parseBenchArgs } from "./main.ts";

Deno.test("idleScript: reads from every disk, then one measured sleep between markers", () => {
  const s = idleScript(["/dev/vda", "/dev/vdb"], 60).split("\n");
  for (const d of ["/dev/vda", "/dev/vdb"]) {
    assert.ok(s.some((l) => l.startsWith(`waitfor ${d} `)), `waits for ${d}`);
    assert.ok(s.some((l) => l.startsWith(`dd if=${d} `)), `reads ${d}`);
  }
  const begin = s.indexOf('echo "BENCH-IDLE-BEGIN"'), end = s.indexOf('echo "BENCH-IDLE-END"');
  assert.ok(begin > s.findLastIndex((l) => l.startsWith("dd ")), "the reads come first");
  assert.deepEqual(s.slice(begin + 1, end), ["sleep 60"]);
});

Deno.test("parseBenchArgs: --idle-seconds is a whole number of seconds", () => {
  assert.equal(parseBenchArgs([])!.idleSeconds, undefined);
  assert.equal(parseBenchArgs(["--idle-seconds", "15"])!.idleSeconds, 15);
  assert.throws(() => parseBenchArgs(["--idle-seconds", "0"]), /--idle-seconds must be/);
});
