/**
 * Smoke test of the benchmark harness: `deno task bench --quick` must finish, exit 0, and write
 * JSON holding every comparison with positive figures, plus the quick Markdown report and its
 * charts. Figures themselves are not judged.
 *
 * @module
 */

import assert from "node:assert/strict";
import type { BenchResult } from "../bench/report.ts";

const REPO = new URL("..", import.meta.url).pathname;

function positive(x: unknown, what: string): void {
  assert.ok(
    typeof x === "number" && Number.isFinite(x) && x > 0,
    `${what} should be > 0, got ${x}`,
  );
}

Deno.test("deno task bench --quick runs every comparison and writes its results", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-bench-smoke-" });
  const child = new Deno.Command(Deno.execPath(), {
    args: ["task", "bench", "--quick", "--results-dir", dir, "--markdown", `${dir}/never.md`],
    cwd: REPO,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
  try {
    const out = await child.output();
    const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 0, `bench --quick exited ${out.code}:\n${text}`);

    const names = [...Deno.readDirSync(dir)].map((e) => e.name);
    const json = names.find((n) => /^quick-\d{4}-\d\d-\d\d\.json$/.test(n));
    assert.ok(json, `no quick-DATE.json in ${names.join(", ")}`);
    assert.ok(names.some((n) => /^quick-.*\.md$/.test(n)), "no quick Markdown report");
    assert.ok(!names.includes("never.md"), "quick mode must not write the full report");
    assert.ok(names.filter((n) => n.endsWith(".svg")).length >= 8, "charts missing");
    for (const svg of names.filter((n) => n.endsWith(".svg"))) {
      const s = Deno.readTextFileSync(`${dir}/${svg}`);
      assert.ok(s.startsWith("<svg") && s.trimEnd().endsWith("</svg>"), `${svg} is not an SVG`);
    }

    const r = JSON.parse(Deno.readTextFileSync(`${dir}/${json}`)) as BenchResult;
    assert.equal(r.mode, "quick");
    assert.deepEqual(r.failures, []);
    assert.ok(["tcg", "kvm"].includes(r.system.accelerator));
    assert.ok(r.system.nproc > 0 && r.system.qemu && r.system.qsd && r.system.deno);

    const b = r.backendOnly;
    assert.ok(b, "backendOnly missing");
    assert.equal(b.cases.length, 3 * 2 * 2, "storages × shapes × back-ends");
    for (const c of b.cases) {
      const what = `back-end ${c.storage} ${c.shape} ${c.backend}`;
      positive(c.iops, `${what} IOPS`);
      positive(c.cpuUsPerIo, `${what} CPU/IO`);
      assert.ok(c.backendCommand && c.loadCommand);
    }
    for (const x of b.ratios) positive(x.iopsRatio, `ratio ${x.storage} ${x.shape}`);

    const g = r.guestFio;
    assert.ok(g, "guestFio missing");
    if (g.hangs.length) console.log(`guest boots made again after a hang: ${g.hangs.join("; ")}`);
    assert.equal(g.cases.length, 3 * 4, "jobs × variants");
    for (const c of g.cases) {
      positive(c.iops, `guest ${c.job} ${c.variant} IOPS`);
      positive(c.cpuUsPerIo, `guest ${c.job} ${c.variant} back-end CPU/IO`);
      positive(c.qemuTotalCpuUsPerIo, `guest ${c.job} ${c.variant} QEMU CPU/IO`);
    }
    assert.equal(Object.keys(g.commands).length, 4, "a command per variant");
    if (r.system.nproc > 1) {
      // The vCPU got a CPU of its own and every back-end ran on the others, under taskset.
      assert.ok(g.config.placement, "guest fio placement");
      for (const c of Object.values(g.commands)) {
        assert.match(c.backend ?? c.qemu, /^taskset -c /, "pinned commands");
      }
    }

    const idle = r.guestIdle;
    assert.ok(idle, "guestIdle missing");
    assert.deepEqual(idle.cases.map((c) => c.variant), ["qsd", "vhostd", "vhostd-nopoll"]);
    for (const c of idle.cases) {
      assert.ok(c.cpuSeconds >= 0 && c.samples.length === 1, `idle ${c.variant} CPU seconds`);
      assert.ok(idle.commands[c.variant].backend, `idle ${c.variant} command`);
    }

    const n = r.net;
    assert.ok(n, "net missing");
    assert.ok(n.testpmd, "net testpmd half missing");
    assert.equal(n.testpmd.cases.length, 2 * 2, "frame sizes × back-ends");
    for (const c of n.testpmd.cases) {
      positive(c.rxMpps, `testpmd ${c.frameBytes} B ${c.backend} received Mpps`);
      positive(c.txMpps, `testpmd ${c.frameBytes} B ${c.backend} sent Mpps`);
    }
    for (const x of n.testpmd.ratios) positive(x.mppsRatio, `testpmd ratio ${x.frameBytes} B`);
    assert.ok(n.iperf, "net guest half missing");
    assert.equal(n.iperf.cases.length, 2 * 3, "directions × variants");
    for (const c of n.iperf.cases) positive(c.gbps, `iperf3 ${c.direction} ${c.variant} Gbit/s`);
    for (const c of n.iperf.cases.filter((x) => x.variant !== "in-qemu")) {
      positive(c.backendCores ?? NaN, `iperf3 ${c.variant} back-end CPU`);
    }
    for (const x of n.iperf.ratios) positive(x.gbpsRatio, `iperf3 ratio ${x.direction}`);

    const m = r.memory;
    assert.ok(m, "memory missing");
    assert.ok(m.sharedWorkers, "this build has shared workers");
    for (const id of ["vm", "vm-own", "blk-cli", "qsd", "floor-0", "floor-1"]) {
      const c = m.cases.find((x) => x.id === id);
      assert.ok(c, `memory case ${id} missing: ${m.cases.map((x) => x.id).join(", ")}`);
      positive(c.memory.rssMiB, `RSS of ${id}`);
    }
    assert.ok(m.increments.length > 0, "memory increments");
    const scale = r.scale;
    assert.ok(scale, "scale missing");
    for (const c of scale.cases) positive(c.totalRssMiB, `scale ${c.backend} x${c.daemons}`);
    const sharing = r.sharing;
    assert.ok(sharing?.available, "sharing missing");
    for (const x of sharing.ratios) positive(x.iopsRatio, `sharing ${x.storage}`);

    const mig = r.migration;
    assert.ok(mig, "migration missing");
    assert.equal(mig.cases.length, 3, "one migration per variant");
    for (const c of mig.cases) {
      positive(c.totalTimeMs, `migration ${c.variant} total time`);
      positive(c.downtimeMs, `migration ${c.variant} downtime`);
    }
  } finally {
    try {
      child.kill("SIGKILL");
    } catch {
      // exited already
    }
    await child.status;
    await Deno.remove(dir, { recursive: true }).catch(() => undefined);
  }
});
