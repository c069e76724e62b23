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
import { migrationWorkload, rounds, WORKLOAD_DISK_BYTES } from "./helpers/migration.ts";
import { ensureQemu11, parseResults } from "./guest/qemu.ts";
import { type MigrationInfo, Vm } from "./guest/vm.ts";

/** Bandwidth while QEMU makes its first passes (bytes/s), then the cap it finishes with. */
const SLOW = 16 * 1024 * 1024;
const FAST = 1024 * 1024 * 1024;

interface Host {
  daemon: DaemonProcess;
  socket: string;
  env: Record<string, string>;
  restarts: number;
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
    ["blk", "--socket", socket, "--image", image, "--queues", "1", "--log-level", "debug"],
    env,
  );
  return { daemon, socket, env, restarts: 0 };
}

function vmOptions(dir: string, name: string, socket: string, qemuBinary?: string) {
  return {
    dir,
    name,
    qemuBinary,
    qemuMajor: qemuBinary === undefined ? 7 : 11,
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

/** One migration of a {@link migrationRun}: the daemon the guest moves to, and what happens. */
interface Hop {
  /** The destination daemon: a new one, or one named by an earlier hop (A → B → A). */
  daemon: string;
  /** Environment of a new daemon. */
  env?: Record<string, string>;
  /** SIGKILL the source daemon and restart it just before migrating. */
  restartBefore?: boolean;
  /** SIGKILL the source daemon and restart it while QEMU migrates (QEMU reconnects). */
  restartDuring?: boolean;
}

/** Kills a daemon with SIGKILL and starts it again with the same command line. */
async function restart(host: Host, image: string): Promise<void> {
  await host.daemon.stop("SIGKILL");
  const name = host.socket.replace(/^.*\//, "").replace(/\.sock$/, "");
  const dir = host.socket.replace(/\/[^/]*$/, "");
  const again = await startDaemon(dir, name, image, host.env);
  host.daemon = again.daemon;
  host.restarts++;
}

/**
 * Migrates `src` to a new QEMU (`name`) on `dst`'s socket, added to `vms`. QEMU first passes over
 * guest RAM slowly, aiming at a downtime it cannot reach; after its first pass the guest reads
 * its region through the page cache (read number `read`), and after one more pass the limits are
 * lifted so that the migration converges.
 */
async function migrate(
  ctx: { dir: string; image: string; vms: Vm[]; qemu?: string },
  src: { vm: Vm; host: Host },
  dst: { name: string; host: Host },
  read: number,
  restartDuring: boolean,
): Promise<{ dst: Vm; info: MigrationInfo }> {
  const uri = `unix:${ctx.dir}/${dst.name}.mig`;
  const vm = await Vm.start({
    ...vmOptions(ctx.dir, dst.name, dst.host.socket, ctx.qemu),
    incoming: uri,
    initrdPath: src.vm.initrd,
  });
  ctx.vms.push(vm);
  await src.vm.startMigration(uri, SLOW, 1);
  await src.vm.waitMigration((i) => (i.dirtySyncCount ?? 0) >= 2);
  await src.vm.type(`READ${read}\n`);
  await src.vm.waitConsole(new RegExp(`^READ ${read} DONE`, "m"), 120_000);
  if (restartDuring) {
    // QEMU redials and starts the device again mid-migration: logging must come back with it.
    const seen = rounds(src.vm.console()).length;
    await restart(src.host, ctx.image);
    await src.vm.waitConsole((c) => rounds(c).length >= seen + 2, 120_000);
  }
  const after = (await src.vm.migrationInfo()).dirtySyncCount ?? 0;
  await src.vm.waitMigration((i) => (i.dirtySyncCount ?? 0) > after);
  await src.vm.setMigrationLimits(FAST, 2000);
  const info = await src.vm.waitMigration();
  if (info.status === "completed") {
    assert.ok((info.dirtySyncCount ?? 0) >= 3, "QEMU passed over guest RAM several times");
  }
  return { dst: vm, info };
}

/**
 * Boots the workload on daemon `first` and migrates it along `hops`; after each migration the
 * destination runs a few rounds, checking what came over. Returns the consoles and daemon logs.
 */
async function migrationRun(
  first: { daemon: string; env?: Record<string, string> },
  hops: Hop[],
  qemu?: string,
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
    const hosts = new Map<string, Host>();
    const vms: Vm[] = [];
    const ctx = { dir, image, vms, qemu };
    try {
      let host = await startDaemon(dir, first.daemon, image, first.env);
      hosts.set(first.daemon, host);
      let vm = await Vm.start(vmOptions(dir, "vm0", host.socket, qemu));
      vms.push(vm);
      await vm.waitConsole(/^ROUND 1 /m, 240_000);
      for (const [i, hop] of hops.entries()) {
        if (hop.restartBefore) {
          const seen = rounds(vm.console()).length;
          await restart(host, image);
          await vm.waitConsole((c) => rounds(c).length >= seen + 2, 120_000);
        }
        // A new destination daemon starts while the source runs, as it would on another host.
        let next = hosts.get(hop.daemon);
        if (next === undefined) {
          next = await startDaemon(dir, hop.daemon, image, hop.env);
          hosts.set(hop.daemon, next);
        }
        const moved = await migrate(
          ctx,
          { vm, host },
          { name: `vm${i + 1}`, host: next },
          i + 1,
          hop.restartDuring ?? false,
        );
        infos.push(moved.info);
        assert.equal(
          moved.info.status,
          "completed",
          `migration ${i + 1}: ${JSON.stringify(moved.info)}`,
        );
        await vm.quit();
        text += vm.console();
        vm = moved.dst;
        host = next;
        // The destination checks what came over, a few rounds.
        await vm.waitConsole((c) => rounds(c).length >= 3, 240_000);
      }
      await vm.type("STOP\n");
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
      for (const h of hosts.values()) text += `\n--- daemon ${h.socket} ---\n${h.daemon.stderr}`;
      (e as Error).message += `\n${text}`;
      throw e;
    } finally {
      for (const v of vms) await v.kill();
      for (const h of hosts.values()) {
        await h.daemon.stop();
        text += `\n--- daemon ${h.socket} ---\n${h.daemon.stderr}`;
      }
    }
  });
  return { console: text, results: parseResults(text, "RESULT "), infos };
}

function describe(infos: MigrationInfo[]): string {
  return infos.map((i) =>
    `${i.status}: ${i.totalTimeMs} ms in all, ${i.downtimeMs} ms down, ${i.dirtySyncCount} passes`
  ).join("; ");
}

/** The checks every successful run passes. */
function assertNothingLost(guest: string, results: Record<string, string>): void {
  assert.doesNotMatch(guest, /VERIFY-ERROR|FIO-FAILED/);
  assert.equal(results.verify_errors, "0");
  assert.ok(Number(results.checked) > 0);
  assert.match(guest, /VHOSTD-GUEST-EXIT 0/);
}

const slow = { sanitizeResources: false, sanitizeOps: false };

Deno.test({
  name: "migration: a guest writing and checking its vhostd disk migrates with nothing lost",
  ...slow,
  async fn() {
    const { console: guest, results, infos } = await migrationRun({ daemon: "a" }, [
      { daemon: "b" },
    ]);
    console.log(`migration: ${describe(infos)}; ${results.checked} MiB checked`);
    assertNothingLost(guest, results);
    // Image locking stayed on: the destination found the image locked by the running source,
    // and took it over at the switch without a single refused request.
    assert.match(guest, /is in use[^\n]*will use the image only once it is released/);
    assert.doesNotMatch(guest, /requests fail until it is released/);
  },
});

Deno.test({
  name: "migration: without dirty logging in the source daemon the same test sees stale data",
  ...slow,
  async fn() {
    const { console: guest, results, infos } = await migrationRun(
      { daemon: "a", env: { VHOSTD_FAULT_SKIP_DIRTY_LOG: "1" } },
      [{ daemon: "b" }],
    );
    console.log(`migration without logging: ${describe(infos)}; ${results.verify_errors} errors`);
    assert.match(guest, /VERIFY-ERROR/, "the guest read data the migration left stale");
    assert.ok(Number(results.verify_errors) > 0);
  },
});

Deno.test({
  // QEMU 11.1: under TCG, QEMU 7.2 stops tracking the guest CPU's own writes in a VM's second
  // outgoing migration (a VM that came in by migration sends no dirty page again): it would
  // corrupt the guest whatever the back-end did.
  name: "migration: there and back (A to B to A, QEMU 11.1); logging works the second time too",
  ...slow,
  async fn() {
    const { console: guest, results, infos } = await migrationRun(
      { daemon: "a" },
      [{ daemon: "b" }, { daemon: "a" }],
      await ensureQemu11(),
    );
    console.log(`migrations: ${describe(infos)}; ${results.checked} MiB checked`);
    assert.equal(infos.length, 2);
    assertNothingLost(guest, results);
  },
});

Deno.test({
  name: "migration: right after the source daemon was SIGKILLed and restarted",
  ...slow,
  async fn() {
    const { console: guest, results, infos } = await migrationRun({ daemon: "a" }, [
      { daemon: "b", restartBefore: true },
    ]);
    console.log(`migration after a restart: ${describe(infos)}; ${results.checked} MiB checked`);
    assertNothingLost(guest, results);
  },
});

Deno.test({
  name: "migration: the source daemon is SIGKILLed and restarted mid-migration; logging resumes",
  ...slow,
  async fn() {
    const { console: guest, results, infos } = await migrationRun({ daemon: "a" }, [
      { daemon: "b", restartDuring: true },
    ]);
    console.log(`migration through a restart: ${describe(infos)}; ${results.checked} MiB checked`);
    assertNothingLost(guest, results);
    assert.match(guest, /joined a migration under way: all of guest memory marked dirty/);
  },
});
