import assert from "node:assert/strict";
import { type FioJob, guestDevices, guestScript, parseTerse } from "./guest_fio.ts";

const JOBS: FioJob[] = [
  { name: "randread-4k", rw: "randread", bs: 4096, depth: 32 },
  { name: "randwrite-4k", rw: "randwrite", bs: 4096, depth: 32 },
];

/** The variants in the order a job ran them, per round: `BEGIN` markers of the script. */
function orders(script: string, job: string): string[][] {
  const byRound = new Map<string, string[]>();
  for (const line of script.split("\n")) {
    const m = /^echo "BENCH-BEGIN (\S+) (\S+) (\d+)"$/.exec(line);
    if (!m || m[1] !== job) continue;
    byRound.set(m[3], [...byRound.get(m[3]) ?? [], m[2]]);
  }
  return [...byRound.values()];
}

Deno.test("guestDevices: vhost-user disks first, as QEMU attaches them, then in-QEMU", () => {
  const d = guestDevices(["in-qemu", "qsd", "vhostd"]);
  assert.deepEqual([...d], [["qsd", "/dev/vda"], ["vhostd", "/dev/vdb"], ["in-qemu", "/dev/vdc"]]);
});

Deno.test("guestScript: every round runs every job on every disk, the order rotating", () => {
  const devices = guestDevices(["in-qemu", "qsd", "vhostd", "vhostd-nopoll"]);
  const script = guestScript(JOBS, 5, devices, 0, 2);
  const reads = orders(script, "randread-4k");
  assert.equal(reads.length, 2);
  for (const o of reads) assert.deepEqual([...o].sort(), [...devices.keys()].sort());
  assert.notDeepEqual(reads[0], reads[1], "the order rotates from round to round");
  assert.notDeepEqual(orders(script, "randwrite-4k")[0], reads[0], "and from job to job");
  // Over as many rotations as there are variants, each variant takes every place once.
  const four = [0, 1].flatMap((boot) =>
    orders(guestScript(JOBS, 5, devices, boot * 2, 2), "randread-4k")
  );
  for (const v of devices.keys()) {
    assert.deepEqual(four.map((o) => o.indexOf(v)).sort(), [0, 1, 2, 3], v);
  }
  assert.match(script, /--runtime=5 /);
  assert.match(script, /echo "BENCH-FIO randwrite-4k vhostd 1 \$out"/);
});

Deno.test("parseTerse: read plus write IOPS, and I/Os from the KiB moved", () => {
  const f = Array.from({ length: 60 }, () => "0");
  f[0] = "3";
  f[5] = "4000"; // read KiB
  f[7] = "100"; // read IOPS
  f[46] = "400"; // write KiB
  f[48] = "10"; // write IOPS
  assert.deepEqual(parseTerse(f.join(";"), 4096), { iops: 110, ios: 1100 });
  f[4] = "5";
  assert.throws(() => parseTerse(f.join(";"), 4096), /fio reported error 5/);
  assert.throws(() => parseTerse("fio: bad option", 4096), /not a fio terse v3 line/);
});
