import assert from "node:assert/strict";
import {
  allowedCpus,
  describePlacement,
  guestPlacement,
  parseCpuList,
  pinnedArgv,
} from "./placement.ts";

Deno.test("parseCpuList reads ranges and single CPUs, and refuses anything else", () => {
  assert.deepEqual(parseCpuList("0-3,8,10-11\n"), [0, 1, 2, 3, 8, 10, 11]);
  assert.deepEqual(parseCpuList("5"), [5]);
  assert.throws(() => parseCpuList("0-x"), /not a CPU list/);
});

Deno.test("guestPlacement gives the vCPUs the first CPUs and the rest to everything else", () => {
  assert.deepEqual(guestPlacement(1, [2, 3]), { vcpus: [2], housekeeping: [3] });
  assert.deepEqual(guestPlacement(2, [0, 1, 2, 3]), { vcpus: [0, 1], housekeeping: [2, 3] });
  assert.equal(guestPlacement(2, [0, 1]), null, "nothing would be left for the back-ends");
  assert.match(describePlacement(null), /not pinned/);
  assert.match(describePlacement({ vcpus: [0], housekeeping: [1, 2] }), /CPU 0;.*CPUs 1,2/);
});

Deno.test("pinnedArgv runs the command under taskset, or as it is without CPUs", () => {
  assert.deepEqual(pinnedArgv(["qsd", "-x"], [1, 2]), ["taskset", "-c", "1,2", "qsd", "-x"]);
  assert.deepEqual(pinnedArgv(["qsd"], undefined), ["qsd"]);
});

Deno.test("allowedCpus matches what taskset reports for this process", async () => {
  const out = await new Deno.Command("taskset", { args: ["-pc", String(Deno.pid)] }).output();
  assert.ok(out.success, "taskset -pc works here");
  const list = new TextDecoder().decode(out.stdout).trim().split(" ").pop()!;
  assert.deepEqual(allowedCpus(), parseCpuList(list));
});
