/**
 * Live migration of a guest with a vhostd disk between two QEMU processes, each with its own
 * vhostd started with the same command line on the same image (as on two hosts sharing storage).
 * The guest runs {@link migrationWorkload} throughout: it reads a region through the page cache
 * and checks it again later, while fio writes and verifies elsewhere. The migration is throttled
 * so that QEMU makes several passes over guest RAM while the device keeps writing it. After each
 * migration the destination's guest RAM must equal the source's, page for page.
 *
 * Every run must lose nothing. On QEMU 7.2 (this host's QEMU, whose message sequence vhostd must
 * meet) a run whose guest RAM differs is done again, up to three runs: QEMU 7.2 under TCG loses
 * some of the guest CPU's own writes in a migration whatever serves the disk (see
 * tests/helpers/migration.ts). QEMU 11.1 loses none, and its runs are never redone.
 *
 * The same test with dirty logging switched off in the source daemon (a fault-injection switch)
 * must see stale pages and the guest read stale data: that shows the test can catch a back-end
 * that does not log.
 *
 * @module
 */

import assert from "node:assert/strict";
import { sparseFile, withDir } from "./helpers/daemon.ts";
import {
  assertNothingLost,
  describeMigrations,
  migrationRun,
  type MigrationRunOptions,
  type MigrationRunResult,
  startBlkDaemon,
  WORKLOAD_DISK_BYTES,
} from "./helpers/migration.ts";
import { ensureQemu11 } from "./guest/qemu.ts";
import { Vm } from "./guest/vm.ts";

const slow = { sanitizeResources: false, sanitizeOps: false };

/** QEMU 11.1 (from the chroot). */
async function qemu11() {
  return { qemuBinary: await ensureQemu11(), qemuMajor: 11 };
}

/**
 * Runs the workload on QEMU 11.1 (every VM of the run), or on this host's QEMU 7.2 with the runs
 * its TCG spoils done again.
 */
async function runOn(
  qemu: "11.1" | "7.2",
  opts: Omit<MigrationRunOptions, "vm" | "redoWhenPagesDiffer">,
): Promise<MigrationRunResult> {
  if (qemu === "7.2") return await migrationRun({ ...opts, redoWhenPagesDiffer: true });
  const vm = await qemu11();
  return await migrationRun({ ...opts, vm, hops: opts.hops.map((h) => ({ ...h, vm })) });
}

for (const qemu of ["11.1", "7.2"] as const) {
  Deno.test({
    name: `migration (QEMU ${qemu}): a guest writing and checking its vhostd disk migrates ` +
      "with nothing lost, guest RAM equal page for page",
    ...slow,
    async fn() {
      const run = await runOn(qemu, { first: { name: "a" }, hops: [{ daemon: { name: "b" } }] });
      console.log(
        `migration: ${describeMigrations(run.infos)}; ${run.results.checked} MiB checked`,
      );
      assertNothingLost(run);
      // Image locking stayed on: the destination found the image locked by the running source,
      // and took it over at the switch without a single refused request.
      assert.match(run.console, /is in use[^\n]*will use the image only once it is released/);
      assert.doesNotMatch(run.console, /requests fail until it is released/);
    },
  });

  Deno.test({
    // On QEMU 7.2 (this host's) it matters most: it stops syncing a vhost log once the back-end
    // is gone, so the restarted daemon must mark everything, or the pages the old one filled
    // stay stale.
    name: `migration (QEMU ${qemu}): the source daemon is SIGKILLed and restarted ` +
      "mid-migration; logging resumes",
    ...slow,
    async fn() {
      const run = await runOn(qemu, {
        first: { name: "a" },
        hops: [{ daemon: { name: "b" }, restartDuring: true }],
      });
      console.log(
        `migration through a restart: ${describeMigrations(run.infos)}; ` +
          `${run.results.checked} MiB checked`,
      );
      assertNothingLost(run);
      assert.match(run.console, /joined a migration under way: all of guest memory marked dirty/);
    },
  });
}

Deno.test({
  name: "migration: without dirty logging in the source daemon the same test sees stale data",
  ...slow,
  async fn() {
    const run = await migrationRun({
      first: { name: "a", env: { VHOSTD_FAULT_SKIP_DIRTY_LOG: "1" } },
      hops: [{ daemon: { name: "b" } }],
    });
    console.log(
      `migration without logging: ${describeMigrations(run.infos)}; ` +
        `${run.results.verify_errors} errors, ${
          run.stale[0].pages.length
        } stale pages (64 at most)`,
    );
    assert.match(run.console, /VERIFY-ERROR/, "the guest read data the migration left stale");
    assert.ok(Number(run.results.verify_errors) > 0);
    assert.ok(run.stale[0].pages.length > 0, "the page-by-page comparison found stale pages too");
  },
});

Deno.test({
  // QEMU 11.1: under TCG, QEMU 7.2 stops tracking the guest CPU's own writes in a VM's second
  // outgoing migration (a VM that came in by migration sends no dirty page again): it would
  // corrupt the guest whatever the back-end did.
  name: "migration: there and back (A to B to A, QEMU 11.1); logging works the second time too",
  ...slow,
  async fn() {
    const run = await runOn("11.1", {
      first: { name: "a" },
      hops: [{ daemon: { name: "b" } }, { daemon: "a" }],
    });
    console.log(`migrations: ${describeMigrations(run.infos)}; ${run.results.checked} MiB checked`);
    assert.equal(run.infos.length, 2);
    assertNothingLost(run);
  },
});

Deno.test({
  name: "migration (QEMU 11.1): right after the source daemon was SIGKILLed and restarted",
  ...slow,
  async fn() {
    const run = await runOn("11.1", {
      first: { name: "a" },
      hops: [{ daemon: { name: "b" }, restartBefore: true }],
    });
    console.log(
      `migration after a restart: ${describeMigrations(run.infos)}; ` +
        `${run.results.checked} MiB checked`,
    );
    assertNothingLost(run);
  },
});

Deno.test({
  name: "migration: postcopy is refused by the destination; a source that tries keeps running",
  ...slow,
  async fn() {
    await withDir("vhostd-migpc-", async (dir) => {
      const image = `${dir}/disk.img`;
      sparseFile(image, WORKLOAD_DISK_BYTES);
      const a = await startBlkDaemon(dir, { name: "a" }, image);
      const b = await startBlkDaemon(dir, { name: "b" }, image);
      const vms: Vm[] = [];
      try {
        const script = "while :; do echo tick; sleep 1; done";
        const base = { dir, script, memoryMiB: 384 };
        const src = await Vm.start({
          ...base,
          name: "src",
          vhostUserBlk: [{ socket: a.socket, numQueues: 1 }],
        });
        vms.push(src);
        await src.waitConsole(/tick/, 120_000);
        const dst = await Vm.start({
          ...base,
          name: "dst",
          vhostUserBlk: [{ socket: b.socket, numQueues: 1 }],
          incoming: "defer",
          initrdPath: src.initrd,
        });
        vms.push(dst);
        const postcopy = { capabilities: [{ capability: "postcopy-ram", state: true }] };
        // vhostd does not offer the PAGEFAULT protocol feature postcopy needs.
        await assert.rejects(
          () => dst.qmp.execute("migrate-set-capabilities", postcopy),
          /Postcopy is not supported/,
        );
        await dst.qmp.execute("migrate-incoming", { uri: `unix:${dir}/mig` });
        await src.qmp.execute("migrate-set-capabilities", postcopy);
        await src.startMigration(`unix:${dir}/mig`, 8 * 1024 * 1024, 1);
        const info = await src.waitMigration();
        assert.equal(info.status, "failed", JSON.stringify(info));
        // The VM goes on where it was, and its daemon stopped logging.
        const ticks = (src.console().match(/tick/g) ?? []).length;
        await src.waitConsole((c) => (c.match(/tick/g) ?? []).length >= ticks + 2, 60_000);
        assert.match(a.daemon.stderr, /dirty logging off/);
      } finally {
        for (const v of vms) await v.kill();
        await a.daemon.stop();
        await b.daemon.stop();
      }
    });
  },
});
