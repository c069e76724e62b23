import assert from "node:assert/strict";
import { parseBenchArgs } from "./main.ts";
import { guestNics, iperfGuestScript } from "./net.ts";

Deno.test("parseBenchArgs: defaults are left to runBench, seconds are whole numbers", () => {
  const d = parseBenchArgs([])!;
  assert.equal(d.quick, false);
  assert.deepEqual(d.only, [
    "backend",
    "guest",
    "net",
    "memory",
    "scale",
    "sharing",
    "migration",
  ]);
  assert.equal(d.iperfSeconds, undefined);
  assert.equal(d.netSeconds, undefined);
  const o = parseBenchArgs(["--iperf-seconds", "7", "--net-seconds", "4", "--only", "net"])!;
  assert.equal(o.iperfSeconds, 7);
  assert.equal(o.netSeconds, 4);
  assert.deepEqual(o.only, ["net"]);
  assert.deepEqual(parseBenchArgs(["--only", "memory,scale,sharing"])!.only, [
    "memory",
    "scale",
    "sharing",
  ]);
  assert.equal(parseBenchArgs(["-h"]), null);
});

Deno.test("parseBenchArgs: bad input is one clear error", () => {
  assert.throws(() => parseBenchArgs(["--iperf-seconds", "0"]), /--iperf-seconds must be/);
  assert.throws(() => parseBenchArgs(["--iperf-seconds", "2.5"]), /--iperf-seconds must be/);
  assert.throws(() => parseBenchArgs(["--only", "disk"]), /unknown comparison "disk"/);
  assert.throws(() => parseBenchArgs(["--vhostd-poll-us", "5000"]), /from 0 to 1000/);
  assert.throws(() => parseBenchArgs(["--qsd-disk-aio", "posix"]), /native, io_uring or threads/);
});

Deno.test("iperfGuestScript: every NIC in every place of the order, both directions", () => {
  const nics = guestNics(["in-qemu", "vhostd", "vhostd-poll"]);
  const script = iperfGuestScript(nics, 5, 4, 0);
  const runs = script.split("\n").filter((l) => l.startsWith("run "));
  assert.equal(runs.length, 4 * 2 * nics.length);
  for (const dir of ["guest-to-ns", "ns-to-guest"]) {
    const order = runs.filter((l) => l.endsWith(` ${dir}`)).map((l) => l.split(" ")[3]);
    const rounds = [0, 1, 2, 3].map((r) => order.slice(r * 3, r * 3 + 3));
    for (const round of rounds) {
      assert.deepEqual([...round].sort(), ["in-qemu", "vhostd", "vhostd-poll"]);
    }
    for (let place = 0; place < 3; place++) {
      assert.deepEqual(
        new Set(rounds.slice(0, 3).map((r) => r[place])),
        new Set(["in-qemu", "vhostd", "vhostd-poll"]),
        `${dir}: every NIC runs in place ${place} once in three rounds`,
      );
    }
  }
  assert.match(script, /iperf3 -f m -c \$1 -t 5 \$2/, "each run lasts the seconds asked");
  // The next boot carries the rotation on rather than starting it again.
  assert.equal(runs[0].split(" ")[3], "in-qemu");
  const next = iperfGuestScript(nics, 5, 4, 4).split("\n").filter((l) => l.startsWith("run "));
  assert.equal(next[0].split(" ")[3], "vhostd");
});
