/**
 * Live migration of a guest with a vhostd disk, between two QEMU 7.2 processes, each with its own
 * vhostd started with the same command line on the same image (as on two hosts sharing storage).
 * The guest runs {@link migrationWorkload} throughout: it writes random data, reads it back
 * through the page cache and checks it again later, while fio writes and verifies elsewhere. The
 * migration is throttled so that QEMU makes several passes over guest RAM while the device keeps
 * writing it.
 *
 * The same test with dirty logging switched off in the source daemon (a fault-injection switch)
 * must see the guest read stale data: that shows the test can catch a back-end that does not log.
 *
 * @module
 */

import assert from "node:assert/strict";
import { DaemonProcess, sparseFile, withDir } from "./helpers/daemon.ts";
import {
  migrationWorkload,
  rounds,
  WORKLOAD_DISK_BYTES,
  writeMarker,
} from "./helpers/migration.ts";
import { parseResults } from "./guest/qemu.ts";
import { type MigrationInfo, Vm } from "./guest/vm.ts";

/** Bandwidth while QEMU makes its first passes (bytes/s), then the cap it finishes with. */
const SLOW = 16 * 1024 * 1024;
const FAST = 1024 * 1024 * 1024;

interface Host {
  daemon: DaemonProcess;
  socket: string;
}

/** Starts `vhostd blk` on `image` with the source's command line, on socket `name`. */
async function startDaemon(
  dir: string,
  name: string,
  image: string,
  env: Record<string, string> = {},
): Promise<Host> {
  const socket = `${dir}/${name}.sock`;
  const daemon = await DaemonProcess.start(
    ["blk", "--socket", socket, "--image", image, "--queues", "1"],
    env,
  );
  return { daemon, socket };
}

function vmOptions(dir: string, name: string, socket: string) {
  return {
    dir,
    name,
    script: migrationWorkload(),
    vhostUserBlk: [{ socket, numQueues: 1 }],
    chardevReconnect: 1,
    memoryMiB: 384,
    // Debian's kernel zeroes every page it allocates (init_on_alloc), and QEMU sees those CPU
    // writes: they would hide most pages a back-end fails to log. Off, the device alone fills
    // the page cache.
    kernelArgs: ["init_on_alloc=0"],
  };
}

/**
 * Migrates `src` to a new QEMU (`name`) on `dstSocket`, added to `vms`. QEMU first passes over
 * guest RAM slowly, aiming at a downtime it cannot reach; after its first pass the guest reads
 * its region through the page cache (read number `read`), and after one more pass the limits are
 * lifted so that the migration converges.
 */
async function migrate(
  dir: string,
  image: string,
  vms: Vm[],
  src: Vm,
  name: string,
  dstSocket: string,
  read: number,
): Promise<{ dst: Vm; info: MigrationInfo }> {
  const uri = `unix:${dir}/${name}.mig`;
  const dst = await Vm.start({
    ...vmOptions(dir, name, dstSocket),
    incoming: uri,
    initrdPath: src.initrd,
  });
  vms.push(dst);
  await src.startMigration(uri, SLOW, 1);
  await src.waitMigration((i) => (i.dirtySyncCount ?? 0) >= 2);
  writeMarker(image, `READ${read}`);
  await src.waitConsole(new RegExp(`^READ ${read} DONE`, "m"), 120_000);
  const after = (await src.migrationInfo()).dirtySyncCount ?? 0;
  await src.waitMigration((i) => (i.dirtySyncCount ?? 0) > after);
  await src.setMigrationLimits(FAST, 2000);
  const info = await src.waitMigration();
  if (info.status === "completed") {
    assert.ok((info.dirtySyncCount ?? 0) >= 3, "QEMU passed over guest RAM several times");
  }
  return { dst, info };
}

/**
 * Boots the workload on the first daemon and migrates it to each next one in turn; after each
 * migration the destination runs a few rounds, checking what came over. Returns the consoles.
 */
async function migrationRun(
  hops: { name: string; env?: Record<string, string> }[],
): Promise<{ console: string; results: Record<string, string>; infos: MigrationInfo[] }> {
  let text = "";
  const infos: MigrationInfo[] = [];
  await withDir("vhostd-mig-", async (dir) => {
    const image = `${dir}/disk.img`;
    sparseFile(image, WORKLOAD_DISK_BYTES);
    // The region the guest reads through its page cache holds random data (stale pages show).
    const f = Deno.openSync(image, { write: true });
    const random = new Uint8Array(1 << 20);
    for (let mib = 0; mib < 32; mib++) {
      for (let o = 0; o < random.length; o += 65536) {
        crypto.getRandomValues(random.subarray(o, o + 65536));
      }
      f.writeSync(random);
    }
    f.close();
    const hosts: Host[] = [];
    const vms: Vm[] = [];
    try {
      hosts.push(await startDaemon(dir, hops[0].name, image, hops[0].env));
      let vm = await Vm.start(vmOptions(dir, "vm0", hosts[0].socket));
      vms.push(vm);
      await vm.waitConsole(/^ROUND 1 /m, 240_000);
      for (let i = 1; i < hops.length; i++) {
        // The destination's daemon starts while the source runs, as it would on another host.
        hosts.push(await startDaemon(dir, hops[i].name, image, hops[i].env));
        const { dst, info } = await migrate(dir, image, vms, vm, `vm${i}`, hosts[i].socket, i);
        infos.push(info);
        assert.equal(info.status, "completed", `migration ${i}: ${JSON.stringify(info)}`);
        await vm.quit();
        text += vm.console();
        vm = dst;
        // The destination checks what came over, a few rounds.
        await vm.waitConsole((c) => rounds(c).length >= 3, 240_000);
      }
      writeMarker(image, "STOP");
      const exit = await Promise.race([
        vm.exited,
        new Promise<never>((_, reject) =>
          setTimeout(() => reject(new Error("the guest did not finish")), 240_000)
        ),
      ]);
      text += vm.console();
      assert.equal(exit.code, 0, `QEMU: ${exit.stderr}`);
    } catch (e) {
      for (const v of vms) text += `\n--- ${v.options.name} ---\n${v.console()}`;
      for (const h of hosts) text += `\n--- daemon ${h.socket} ---\n${h.daemon.stderr}`;
      (e as Error).message += `\n${text}`;
      throw e;
    } finally {
      for (const v of vms) await v.kill();
      for (const h of hosts) await h.daemon.stop();
      for (const h of hosts) text += `\n--- daemon ${h.socket} ---\n${h.daemon.stderr}`;
    }
  });
  return { console: text, results: parseResults(text, "RESULT "), infos };
}

function describe(infos: MigrationInfo[]): string {
  return infos.map((i) =>
    `${i.status}: ${i.totalTimeMs} ms in all, ${i.downtimeMs} ms down, ${i.dirtySyncCount} passes`
  ).join("; ");
}

Deno.test({
  name: "migration: a guest writing and checking its vhostd disk migrates with nothing lost",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const { console: guest, results, infos } = await migrationRun([
      { name: "src" },
      { name: "dst" },
    ]);
    console.log(`migration: ${describe(infos)}; ${results.checked} MiB checked`);
    assert.doesNotMatch(guest, /VERIFY-ERROR|FIO-FAILED/);
    // Image locking stayed on: the destination found the image locked by the running source,
    // and took it over at the switch without a single refused request.
    assert.match(guest, /is in use[^\n]*will use the image only once it is released/);
    assert.doesNotMatch(guest, /requests fail until it is released/);
    assert.equal(results.verify_errors, "0");
    assert.ok(Number(results.checked) > 0);
    assert.match(guest, /VHOSTD-GUEST-EXIT 0/);
  },
});

Deno.test({
  name: "migration: without dirty logging in the source daemon the same test sees stale data",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const { console: guest, results, infos } = await migrationRun([
      { name: "src", env: { VHOSTD_FAULT_SKIP_DIRTY_LOG: "1" } },
      { name: "dst" },
    ]);
    console.log(`migration without logging: ${describe(infos)}; ${results.verify_errors} errors`);
    assert.match(guest, /VERIFY-ERROR/, "the guest read data the migration left stale");
    assert.ok(Number(results.verify_errors) > 0);
  },
});
