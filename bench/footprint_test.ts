import assert from "node:assert/strict";
import { startProcess } from "./lib.ts";
import { configSockets, deriveIncrements, type MemoryCaseResult, vmConfig } from "./memory.ts";
import {
  increment,
  memoryIncrement,
  parseProcStatus,
  parsePssMiB,
  type ProcMemory,
  procMemory,
  pssMiB,
} from "./procmem.ts";
import { startBounded } from "./scale.ts";
import { planRun } from "../daemon/run.ts";

const STATUS = `Name:\tdeno
Umask:\t0022
State:\tS (sleeping)
VmPeak:\t 3401876 kB
VmRSS:\t   62976 kB
RssAnon:\t   23552 kB
RssFile:\t   39424 kB
RssShmem:\t       0 kB
VmSwap:\t       0 kB
Threads:\t8
`;

Deno.test("parseProcStatus: RSS by kind in MiB and threads; a missing field is named", () => {
  assert.deepEqual(parseProcStatus(STATUS), {
    rssMiB: 61.5,
    anonMiB: 23,
    fileMiB: 38.5,
    shmemMiB: 0,
    threads: 8,
  });
  assert.throws(() => parseProcStatus(STATUS.replace(/^RssFile.*\n/m, "")), /no RssFile in kB/);
  assert.throws(() => parseProcStatus(STATUS.replace(/^Threads.*\n/m, "")), /no Threads/);
  // Another field whose name ends like one we read must not be taken for it.
  assert.throws(() => parseProcStatus("XVmRSS:\t1 kB\nThreads:\t1\n"), /no VmRSS/);
  const self = procMemory(Deno.pid);
  assert.ok(self.rssMiB > 0 && self.threads >= 1, "this process's own figures read");
  assert.ok(
    Math.abs(self.rssMiB - self.anonMiB - self.fileMiB - self.shmemMiB) <= 0.3,
    "RSS is the sum of its kinds",
  );
});

Deno.test("parsePssMiB reads smaps_rollup's Pss, not SwapPss or Pss_Anon", () => {
  const rollup = "56207f9d0000-7ffd610e7000 ---p 00000000 00:00 0  [rollup]\n" +
    "Rss:                1780 kB\nPss:                 512 kB\nPss_Anon:  100 kB\n" +
    "SwapPss:   0 kB\n";
  assert.equal(parsePssMiB(rollup), 0.5);
  assert.throws(() => parsePssMiB("Pss_Anon: 100 kB\nSwapPss: 3 kB\n"), /no Pss/);
  assert.ok(pssMiB(Deno.pid) > 0);
});

Deno.test("increment divides by the steps, and is NaN without both ends or steps", () => {
  assert.equal(increment(62.6, 220.4, 15), 10.5);
  assert.equal(increment(50, 48, 1), -2);
  assert.ok(Number.isNaN(increment(undefined, 5, 1)));
  assert.ok(Number.isNaN(increment(1, 5, 0)));
  assert.ok(Number.isNaN(increment(NaN, 5, 2)));
  const a: ProcMemory = { rssMiB: 60, anonMiB: 20, fileMiB: 40, shmemMiB: 0, threads: 8 };
  const b: ProcMemory = { rssMiB: 90, anonMiB: 44, fileMiB: 46, shmemMiB: 0, threads: 11 };
  assert.deepEqual(memoryIncrement(a, b, 3), {
    rssMiB: 10,
    anonMiB: 8,
    fileMiB: 2,
    shmemMiB: 0,
    threads: 1,
  });
});

function fakeCase(id: string, rssMiB: number, threads: number): MemoryCaseResult {
  const memory = { rssMiB, anonMiB: rssMiB / 2, fileMiB: rssMiB / 2, shmemMiB: 0, threads };
  return {
    id,
    label: id,
    group: "devices",
    devices: 1,
    queues: 4,
    memory,
    pssMiB: rssMiB / 2,
    samples: [{ ...memory, pssMiB: rssMiB / 2 }],
    command: "",
  };
}

Deno.test("deriveIncrements: per worker, per device and per queue; none for cases not measured", () => {
  const cases = [
    fakeCase("floor-0", 35, 7),
    fakeCase("floor-1", 50, 8),
    fakeCase("run-blk-1", 60, 8),
    fakeCase("run-blk-4", 66, 8),
    fakeCase("run-blk-16", 90, 8),
    fakeCase("run-q-1", 60, 8),
    fakeCase("run-q-64", 66.3, 8),
  ];
  const inc = deriveIncrements(cases, { deviceCounts: [1, 4, 16], queueCounts: [1, 64] });
  const by = new Map(inc.map((i) => [`${i.from}>${i.to}`, i]));
  assert.equal(by.get("floor-0>floor-1")?.memory.rssMiB, 15);
  assert.equal(by.get("floor-1>run-blk-1")?.memory.rssMiB, 10);
  assert.equal(by.get("run-blk-1>run-blk-4")?.memory.rssMiB, 2);
  assert.equal(by.get("run-blk-1>run-blk-16")?.steps, 15);
  assert.equal(by.get("run-blk-1>run-blk-16")?.memory.rssMiB, 2);
  assert.equal(by.get("run-q-1>run-q-64")?.memory.rssMiB, 0.1);
  assert.equal(
    inc.filter((i) => i.from.endsWith("-own")).length,
    0,
    "a worker each was not measured: no rows for it",
  );
  assert.equal(inc.length, 5);
});

Deno.test("vmConfig writes a config that vhostd run accepts, with a socket per device", () => {
  const dir = Deno.makeTempDirSync({ prefix: "vhostd-bench-cfg-" });
  try {
    const images = [0, 1].map((i) => {
      const p = `${dir}/d${i}.img`;
      Deno.writeFileSync(p, new Uint8Array(1 << 20));
      return p;
    });
    // No TAP here: planning a net device would make one on this host.
    const config = vmConfig({ name: "t", socketDir: dir, images, queues: 2, console: true });
    assert.deepEqual(configSockets(config), [
      `${dir}/disk0.sock`,
      `${dir}/disk1.sock`,
      `${dir}/con0.sock`,
    ]);
    const path = `${dir}/vm.json`;
    Deno.writeTextFileSync(path, JSON.stringify(config));
    const planned = planRun(["--config", path, "--check"]);
    assert.ok(typeof planned === "object" && "check" in planned);
    try {
      assert.deepEqual(planned.check.devices.map((d) => d.id), ["disk0", "disk1", "con0"]);
      assert.deepEqual(
        planned.check.devices.flatMap((d) => d.services.map((s) => s.socket)),
        configSockets(config),
      );
    } finally {
      for (const d of planned.check.devices) d.release();
    }
    const net = vmConfig({ name: "t", socketDir: dir, images, queues: 1, tap: "x0" });
    assert.deepEqual((net.devices as { type: string }[]).map((d) => d.type), ["blk", "blk", "net"]);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

function alive(pid: number): boolean {
  try {
    const state = /^State:\s+(\S)/m.exec(Deno.readTextFileSync(`/proc/${pid}/status`))?.[1];
    return state !== "Z";
  } catch {
    return false;
  }
}

Deno.test("startBounded: at most `parallel` at once; a failed start stops every one started", async () => {
  let running = 0, most = 0;
  const pids: number[] = [];
  const start = async (i: number) => {
    running++;
    most = Math.max(most, running);
    try {
      if (i === 3) throw new Error("start 3 failed");
      const be = await startProcess(["sleep", "60"], () => true);
      pids.push(be.pid);
      return be;
    } finally {
      running--;
    }
  };
  await assert.rejects(startBounded(6, 2, start), /start 3 failed/);
  assert.ok(most <= 2, `at most 2 starting at once, saw ${most}`);
  assert.ok(pids.length >= 3, "the starts before the failure ran");
  for (const pid of pids) assert.ok(!alive(pid), `process ${pid} was stopped`);

  const ok = await startBounded(3, 8, () => startProcess(["sleep", "60"], () => true));
  assert.equal(ok.length, 3);
  await Promise.all(ok.map((b) => b.stop()));
});
