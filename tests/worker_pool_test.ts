/**
 * Shared data-plane workers: `vhostd run` puts a VM's devices on one worker by default, `workers`
 * (or `--workers`) spreads them over more, and `"ownWorker": true` gives a device its own. Each
 * Deno worker is a thread named `worker-N`, so the test counts them in /proc; every disk must
 * still serve its own data, and a reload that empties a worker must not disturb the others.
 */

import assert from "node:assert/strict";
import { DaemonProcess, runVhostd, sparseFile, withDir } from "./helpers/daemon.ts";
import { BlkFrontend } from "../vhost-user/frontend/mod.ts";
import { requestStatus } from "../daemon/control.ts";
import { DeviceService } from "../daemon/service.ts";
import { WorkerPool } from "../daemon/worker_pool.ts";
import { serveBlkInProcess } from "./helpers/in_process.ts";

const MiB = 1 << 20;

/** The data-plane worker threads of process `pid` (Deno names a worker's thread `worker-N`). */
function workerThreads(pid: number): number {
  let n = 0;
  for (const t of Deno.readDirSync(`/proc/${pid}/task`)) {
    try {
      if (Deno.readTextFileSync(`/proc/${pid}/task/${t.name}/comm`).startsWith("worker-")) n++;
    } catch {
      // the thread ended meanwhile
    }
  }
  return n;
}

/** Waits until `pid` has `n` worker threads (a finished worker's thread ends a little later). */
async function expectWorkers(d: DaemonProcess, n: number, what: string): Promise<void> {
  let seen = -1;
  await d.waitFor(
    () => (seen = workerThreads(d.child.pid)) === n,
    20_000,
    `${what}: ${n} worker threads (saw ${seen})`,
  );
}

function writeConfig(dir: string, devices: Record<string, unknown>[], extra = {}): string {
  const path = `${dir}/vm.json`;
  Deno.writeTextFileSync(
    path,
    JSON.stringify({ name: "poolvm", socketDir: dir, ...extra, devices }),
  );
  return path;
}

function disk(dir: string, id: string, more: Record<string, unknown> = {}) {
  sparseFile(`${dir}/${id}.img`, 8 * MiB);
  return { type: "blk", id, image: `${dir}/${id}.img`, queues: 1, ...more };
}

/** Writes a pattern naming `id` through the device and reads it back. */
async function checkServes(dir: string, id: string): Promise<void> {
  const s = await BlkFrontend.open({ socket: `${dir}/${id}.sock`, queues: 1 });
  try {
    const data = new Uint8Array(4096).fill(id.charCodeAt(0));
    assert.equal(s.blk.write(8, data).status, 0, `${id}: write`);
    const back = s.blk.read(8, 4096);
    assert.equal(back.status, 0, `${id}: read`);
    assert.deepEqual(back.data.subarray(0, 4096), data, `${id}: the data written`);
  } finally {
    s.close();
  }
}

Deno.test("workers: a VM's disks share one worker by default; ownWorker and --workers give more", () =>
  withDir("vhostd-pool-", async (dir) => {
    const config = writeConfig(dir, [
      disk(dir, "a"),
      disk(dir, "b"),
      disk(dir, "c"),
      disk(dir, "d", { ownWorker: true }),
    ]);
    let d = DaemonProcess.spawn(["run", "--config", config]);
    try {
      await d.waitFor(() => d.stdout.includes("Attach them"), 30_000, "the banner");
      // a, b and c on the shared worker, d on its own; status says which.
      await expectWorkers(d, 2, "default");
      const status = await requestStatus(`${dir}/control.sock`);
      const worker = new Map(status.devices.map((x) => [x.name, x.worker]));
      assert.equal(worker.get("b"), worker.get("a"), JSON.stringify([...worker]));
      assert.equal(worker.get("c"), worker.get("a"), JSON.stringify([...worker]));
      assert.notEqual(worker.get("d"), worker.get("a"), JSON.stringify([...worker]));
      for (const id of ["a", "b", "c", "d"]) await checkServes(dir, id);
    } finally {
      assert.equal(await d.stop(), 0, d.stderr);
    }
    d = DaemonProcess.spawn(["run", "--config", config, "--workers", "2"]);
    try {
      await d.waitFor(() => d.stdout.includes("Attach them"), 30_000, "the banner");
      await expectWorkers(d, 3, "--workers 2");
      for (const id of ["a", "b", "c", "d"]) await checkServes(dir, id);
    } finally {
      assert.equal(await d.stop(), 0, d.stderr);
    }
  }));

Deno.test("workers: a bad worker count is one error naming the field", () =>
  withDir("vhostd-pool-", async (dir) => {
    const config = writeConfig(dir, [disk(dir, "a")], { workers: 0 });
    const file = await runVhostd(["run", "--config", config], 20_000);
    assert.equal(file.code, 2, file.stderr);
    assert.match(file.stderr, /workers/);
    const flag = await runVhostd(["run", "--config", config, "--workers", "many"], 20_000);
    assert.equal(flag.code, 2, flag.stderr);
    assert.match(flag.stderr, /--workers/);
  }));

Deno.test("workers: a reload that empties the shared worker keeps the other devices serving", () =>
  withDir("vhostd-pool-", async (dir) => {
    const a = disk(dir, "a"), b = disk(dir, "b"), c = disk(dir, "c");
    const config = writeConfig(dir, [a, b], { workers: 2 });
    const d = DaemonProcess.spawn(["run", "--config", config]);
    try {
      await d.waitFor(() => d.stdout.includes("Attach them"), 30_000, "the banner");
      await expectWorkers(d, 2, "two disks, two workers");
      // a's front-end stays connected through the reload, on its worker.
      const s = await BlkFrontend.open({ socket: `${dir}/a.sock`, queues: 1 });
      try {
        // b leaves (its worker has nothing left and finishes); c comes.
        writeConfig(dir, [a, c], { workers: 2 });
        Deno.kill(d.child.pid, "SIGHUP");
        await d.waitFor(() => /reloaded:/.test(d.stderr), 30_000, "the reload");
        await expectWorkers(d, 2, "after the reload");
        const data = new Uint8Array(4096).fill(0x5a);
        assert.equal(s.blk.write(0, data).status, 0);
        assert.deepEqual(s.blk.read(0, 4096).data.subarray(0, 4096), data);
        await checkServes(dir, "c");
      } finally {
        s.close();
      }
    } finally {
      assert.equal(await d.stop(), 0, d.stderr);
    }
  }));

Deno.test("workers: a device that fails to start on a shared worker leaves the others serving", async () => {
  const pool = new WorkerPool({ workers: 1 });
  const blk = await serveBlkInProcess({ queues: 1, pool });
  const dir = await Deno.makeTempDir({ prefix: "vhostd-pool-" });
  try {
    const s = await blk.open({ queues: 1 });
    const broken = DeviceService.start({
      socket: `${dir}/broken.sock`,
      module: new URL("./helpers/failing_device.ts", import.meta.url),
      options: { missing: "/dev/nothing" },
      name: "broken",
      log: { level: "error", format: "text" },
    }, pool);
    await assert.rejects(broken, /broken: cannot open \/dev\/nothing/);
    assert.equal(pool.sharedWorkers, 1);
    // The disk on the same worker goes on: its session's I/O and a new connection.
    const data = new Uint8Array(4096).fill(7);
    assert.equal(s.blk.write(0, data).status, 0);
    assert.deepEqual(s.blk.read(0, 4096).data.subarray(0, 4096), data);
    assert.equal(blk.service.running, true);
  } finally {
    await blk.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
