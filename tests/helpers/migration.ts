/**
 * What the live-migration tests run in the guest, and how the host steers it.
 *
 * Two things run at once. fio writes random 4 KiB blocks and verifies them as it goes (the
 * "random-write workload that verifies what it wrote"). And a check built to catch a back-end
 * that does not log the guest pages it writes: when the host says so (during a migration, after
 * QEMU's first pass over guest RAM), the guest drops its page cache and reads a 32 MiB region of
 * the disk through it, so that the device fills thousands of fresh cache pages; from then on
 * every round checks each MiB of the region again, from the page cache, against checksums taken
 * at boot. A page the device filled after QEMU copied it, and that the back-end did not log, is
 * never copied again: on the destination the check reads what the page held before.
 *
 * And after each migration, before the destination runs, its guest RAM is compared with the
 * source's page by page (the destination starts paused, with -S): a page that differs is one
 * somebody wrote without telling QEMU. QEMU 7.2 under TCG fails that on its own, without any
 * vhost-user device: some migrations leave a few pages of the guest CPU's own writes stale, and
 * the destination's kernel or fio may then crash (shown with QEMU's own virtio-blk, 2026-12-07).
 * On QEMU 11.1, which loses none, every page must match; on QEMU 7.2 a run whose pages differ is
 * ended before the destination runs and done again ({@link MigrationRunOptions.redoWhenPagesDiffer}).
 *
 * The host steers the guest by typing commands into its serial console, one a line (the guest
 * waits for one for a second each round): `READ<n>` asks for read number n, `STOP` ends the
 * workload. After a migration the host types into the destination QEMU's console.
 *
 * @module
 */

import assert from "node:assert/strict";
import { DaemonProcess, sparseFile, withDir } from "./daemon.ts";
import { parseResults } from "../guest/qemu.ts";
import { type MigrationInfo, Vm } from "../guest/vm.ts";

/** MiB of the region read through the page cache. */
const REGION_MIB = 32;
/** Where fio works (after the region), and how much. */
const FIO_OFFSET_MIB = 40;
const FIO_SIZE_MIB = 8;
/** The smallest disk the workload fits on. */
export const WORKLOAD_DISK_BYTES = 64 * 1024 * 1024;

/**
 * The guest script. It prints `ROUND <n> checked=<k> errors=<e>` after each round,
 * `READ <n> DONE` after each read the host asked for, `VERIFY-ERROR ...` for every MiB that read
 * back wrong, `FIO-FAILED` if fio found an error, and `RESULT key=value` lines at the end; it exits
 * non-zero if anything was wrong. `dev` is the disk (`/dev/vda`).
 */
export function migrationWorkload(dev = "/dev/vda"): string {
  return `
set -u
dev=${dev}
N=${REGION_MIB}
errors=0; checked=0; round=0; reads=0
# Held open for the whole run: Linux drops a block device's page cache when its last opener
# closes it, and the check needs that cache to last.
exec 3<$dev
# Checksums of the region, read past the page cache.
i=0; : > /tmp/sums
while [ $i -lt $N ]; do
  dd if=$dev bs=1M skip=$i count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1 >> /tmp/sums
  i=$((i + 1))
done
(
  while [ ! -f /tmp/stop ]; do
    # invalidate=0: by default fio drops the whole disk's page cache (BLKFLSBUF) as it starts.
    fio --name=rw --filename=$dev --offset=${FIO_OFFSET_MIB}M --size=${FIO_SIZE_MIB}M \
      --rw=randwrite --bs=4k --direct=1 --ioengine=psync --verify=crc32c --verify_backlog=64 \
      --invalidate=0 --output=/tmp/fio.out </dev/null >/tmp/fio.err 2>&1 ||
      { echo "FIO-FAILED $?"; tail -n 3 /tmp/fio.err; grep -i -m3 'verify\|err' /tmp/fio.out; }
  done
  touch /tmp/fio.done
) &
echo WORKLOAD-STARTED
while :; do
  m=""
  read -t 1 -r m
  case "$m" in
    STOP*) break ;;
    READ*)
      n=\${m#READ}
      if [ "$n" != "$reads" ]; then
        echo 3 > /proc/sys/vm/drop_caches
        dd if=$dev of=/dev/null bs=1M count=$N 2>/dev/null
        reads=$n
        echo "READ $n DONE"
      fi ;;
  esac
  round=$((round + 1))
  if [ "$reads" != 0 ]; then
    i=0
    while [ $i -lt $N ]; do
      got=$(dd if=$dev bs=1M skip=$i count=1 2>/dev/null | md5sum | cut -d' ' -f1)
      want=$(sed -n "$((i + 1))p" /tmp/sums)
      checked=$((checked + 1))
      [ "$got" = "$want" ] || { errors=$((errors + 1)); echo "VERIFY-ERROR round=$round mib=$i"; }
      i=$((i + 1))
    done
  fi
  echo "ROUND $round checked=$checked errors=$errors"
done
touch /tmp/stop
while [ ! -f /tmp/fio.done ]; do sleep 1; done
echo "RESULT rounds=$round"
echo "RESULT checked=$checked"
echo "RESULT verify_errors=$errors"
[ $errors -eq 0 ]
`;
}

/** The round numbers the console reports (`ROUND <n> ...`), in order. */
export function rounds(console: string): number[] {
  return [...console.matchAll(/^ROUND (\d+) /gm)].map((m) => Number(m[1]));
}

// ---- running migrations ---------------------------------------------------------------------

/** Bandwidth while QEMU makes its first passes (bytes/s), then the cap it finishes with. */
const SLOW = 16 * 1024 * 1024;
const FAST = 1024 * 1024 * 1024;

/** A `vhostd blk` daemon of a migration test: its name (and socket), environment, namespace. */
export interface BlkDaemonSpec {
  /** Names the socket, `<dir>/<name>.sock`. */
  name: string;
  /** Environment (fault injection). */
  env?: Record<string, string>;
  /** Runs it under this command, e.g. `ip netns exec HOST` (another "host"). */
  wrap?: string[];
}

/** A running daemon of a migration test. */
export interface BlkHost {
  /** How it was started (a restart starts it the same way). */
  spec: BlkDaemonSpec;
  /** The process (replaced by a restart). */
  daemon: DaemonProcess;
  /** Its vhost-user socket. */
  socket: string;
}

/**
 * Starts `vhostd blk` on `image`, with the command line every daemon of the test shares (a
 * destination is started exactly as its source was, bar the socket).
 */
export async function startBlkDaemon(
  dir: string,
  spec: BlkDaemonSpec,
  image: string,
): Promise<BlkHost> {
  const socket = `${dir}/${spec.name}.sock`;
  const args = ["blk", "--socket", socket, "--image", image, "--queues", "1"];
  args.push("--log-level", "debug");
  const daemon = await DaemonProcess.startUnder(spec.wrap ?? [], args, spec.env);
  return { spec, daemon, socket };
}

/** Where and how a VM of a migration test runs, beyond its vhostd disk. */
export interface VmPlacement {
  /** QEMU binary (default QEMU 7.2). */
  qemuBinary?: string;
  /** Its major version (default 7). */
  qemuMajor?: number;
  /** Machine type (default `q35`: the QEMU's own newest). */
  machine?: string;
  /** More QEMU arguments, e.g. a NIC. */
  extraArgs?: string[];
  /** Runs QEMU under this command, e.g. `ip netns exec HOST`. */
  commandPrefix?: string[];
  /** The URI a destination listens on (default `unix:<dir>/<name>.mig`). */
  incoming?: string;
}

/** One migration of a {@link migrationRun}. */
export interface MigrationHop {
  /** The destination daemon: a new one, or the name of one started earlier (A → B → A). */
  daemon: BlkDaemonSpec | string;
  /** The destination VM. */
  vm?: VmPlacement;
  /** SIGKILL the source daemon and restart it just before migrating. */
  restartBefore?: boolean;
  /** SIGKILL the source daemon and restart it while QEMU migrates (QEMU reconnects). */
  restartDuring?: boolean;
}

/** What a {@link migrationRun} saw. */
export interface MigrationRunResult {
  /** Every VM's console, then every daemon's log. */
  console: string;
  /** The guest's `RESULT key=value` lines. */
  results: Record<string, string>;
  /** Each migration's final state. */
  infos: MigrationInfo[];
  /** Per migration, the guest pages that reached the destination stale (none, if all went well). */
  stale: StalePages[];
}

/** Options of a {@link migrationRun}. */
export interface MigrationRunOptions {
  /** The first daemon. */
  first: BlkDaemonSpec;
  /** The first VM. */
  vm?: VmPlacement;
  /** The migrations, in turn. */
  hops: MigrationHop[];
  /** Called once each destination has run a few rounds (e.g. to ping it). */
  afterHop?: (vm: Vm, index: number) => Promise<void>;
  /** Shell commands the guest runs before the workload (e.g. to address a NIC). */
  guestSetup?: string;
  /**
   * QEMU 7.2: when guest RAM differs after a migration, end the run (the destination never runs
   * on the stale pages) and run the test again, up to 3 runs in all. QEMU 7.2 under TCG loses
   * some of the guest CPU's own writes by itself (see the module doc); a back-end that leaves
   * pages stale every time still fails.
   */
  redoWhenPagesDiffer?: boolean;
}

function vmOptions(
  dir: string,
  name: string,
  socket: string,
  place: VmPlacement = {},
  setup = "",
) {
  return {
    dir,
    name,
    qemuBinary: place.qemuBinary,
    qemuMajor: place.qemuMajor,
    machine: place.machine,
    extraArgs: place.extraArgs,
    commandPrefix: place.commandPrefix,
    script: setup + migrationWorkload(),
    vhostUserBlk: [{ socket, numQueues: 1 }],
    chardevReconnect: 1,
    memoryMiB: 384,
    // Debian's kernel zeroes every page it allocates (init_on_alloc), and QEMU sees those CPU
    // writes: they would hide most pages a back-end fails to log. Off, the device alone fills
    // the page cache.
    kernelArgs: ["init_on_alloc=0"],
  };
}

/** Kills a daemon with SIGKILL and starts it again with the same command line. */
async function restart(host: BlkHost, dir: string, image: string): Promise<void> {
  await host.daemon.stop("SIGKILL");
  host.daemon = (await startBlkDaemon(dir, host.spec, image)).daemon;
}

/**
 * Migrates `src` to a new QEMU (`name`) on `dst`'s socket, added to `vms`. QEMU first passes over
 * guest RAM slowly, aiming at a downtime it cannot reach; after its first pass the guest reads
 * its region through the page cache (read number `read`), and after one more pass the limits are
 * lifted so that the migration converges.
 */
async function migrate(
  ctx: { dir: string; image: string; vms: Vm[] },
  src: { vm: Vm; host: BlkHost },
  dst: { name: string; host: BlkHost; place?: VmPlacement },
  hop: number,
  restartDuring: boolean,
): Promise<Moved> {
  // QEMU switches over as soon as what is left fits its downtime limit, which a guest that is
  // quiet for a moment (its disk gone during a restart, say) can reach even at a 1 ms limit. The
  // test needs the switch-over after its steps: QEMU pauses before it (pause-before-switchover),
  // and an attempt that got there early is cancelled (the source runs on) and made again.
  await src.vm.qmp.execute("migrate-set-capabilities", {
    capabilities: [{ capability: "pause-before-switchover", state: true }],
  });
  for (let attempt = 1;; attempt++) {
    const moved = await migrateOnce(ctx, src, dst, hop * 10 + attempt, restartDuring);
    if (moved !== null) return moved;
    if (attempt === 3) throw new Error("QEMU switched over early three times running");
  }
}

/** A finished migration: the destination, QEMU's account, the stale pages it found. */
interface Moved {
  dst: Vm;
  info: MigrationInfo;
  /** The pages the destination got stale (see staleGuestPages). */
  stale: StalePages;
}

/** Thrown inside {@link migrateOnce} when QEMU reached the switch-over before the test's steps. */
class EarlySwitchover extends Error {}

async function migrateOnce(
  ctx: { dir: string; image: string; vms: Vm[] },
  src: { vm: Vm; host: BlkHost },
  dst: { name: string; host: BlkHost; place?: VmPlacement },
  read: number,
  restartDuring: boolean,
): Promise<Moved | null> {
  const uri = dst.place?.incoming ?? `unix:${ctx.dir}/${dst.name}.mig`;
  const options = vmOptions(ctx.dir, dst.name, dst.host.socket, dst.place);
  const vm = await Vm.start({
    ...options,
    // Held after the migration until its RAM is compared with the source's.
    extraArgs: [...(options.extraArgs ?? []), "-S"],
    incoming: uri,
    initrdPath: src.vm.initrd,
  });
  ctx.vms.push(vm);
  const early = (i: MigrationInfo) => i.status === "pre-switchover";
  /** Waits for the source's console, giving up if QEMU paused for the switch-over meanwhile. */
  const waitSource = async (ok: (c: string) => boolean, what: string) => {
    const deadline = Date.now() + 120_000;
    while (!ok(src.vm.console())) {
      if (early(await src.vm.migrationInfo())) throw new EarlySwitchover();
      if (Date.now() > deadline) throw new Error(`the console did not show ${what} in 120 s`);
      await new Promise((r) => setTimeout(r, 200));
    }
  };
  try {
    await src.vm.startMigration(uri, SLOW, 1);
    if (early(await src.vm.waitMigration((i) => (i.dirtySyncCount ?? 0) >= 2 || early(i)))) {
      throw new EarlySwitchover();
    }
    await src.vm.type(`READ${read}\n`);
    const done = new RegExp(`^READ ${read} DONE`, "m");
    await waitSource((c) => done.test(c), done.source);
    if (restartDuring) {
      // QEMU redials and starts the device again mid-migration: logging must come back with it.
      const seen = rounds(src.vm.console()).length;
      await restart(src.host, ctx.dir, ctx.image);
      await waitSource((c) => rounds(c).length >= seen + 2, "two more rounds");
    }
    const after = (await src.vm.migrationInfo()).dirtySyncCount ?? 0;
    if (early(await src.vm.waitMigration((i) => (i.dirtySyncCount ?? 0) > after || early(i)))) {
      throw new EarlySwitchover();
    }
  } catch (e) {
    if (!(e instanceof EarlySwitchover)) throw e;
    console.log(`migration ${read}: QEMU reached the switch-over early; cancelled, trying again`);
    await src.vm.qmp.execute("migrate_cancel");
    await src.vm.waitMigration((i) => i.status === "cancelled");
    await vm.kill();
    ctx.vms.splice(ctx.vms.indexOf(vm), 1);
    return null;
  }
  await src.vm.setMigrationLimits(FAST, 2000);
  const paused = await src.vm.waitMigration(early);
  if (early(paused)) await src.vm.qmp.execute("migrate-continue", { state: "pre-switchover" });
  const info = await src.vm.waitMigration();
  let stale: StalePages = { pages: [], report: "" };
  if (info.status === "completed") {
    assert.ok((info.dirtySyncCount ?? 0) >= 3, "QEMU passed over guest RAM several times");
    stale = await staleGuestPages(src.vm, vm);
    await vm.qmp.execute("cont");
  }
  return { dst: vm, info, stale };
}

/** Guest pages a migration's destination got stale. */
export interface StalePages {
  /** Their guest-physical addresses (at most 64), `0x...`. */
  pages: string[];
  /** What differs in the first few, and where the source's rings are ("" if none differ). */
  report: string;
}

/**
 * Compares guest RAM of a migration's source (stopped for good) and destination (started with
 * -S, so that nothing has run there yet), page by page, and returns the pages that differ. Each
 * reached the destination stale: something wrote it on the source and nobody told QEMU. This
 * catches a missed dirty-log mark whatever the page held, not only when the guest happens to
 * look at it. (An offset in the memfd is the guest-physical address: these guests' RAM all lies
 * below the PCI hole.)
 */
async function staleGuestPages(src: Vm, dst: Vm): Promise<StalePages> {
  // The destination has loaded everything once it leaves the "inmigrate" state.
  const deadline = Date.now() + 60_000;
  for (;;) {
    const s = await dst.qmp.execute("query-status") as { status: string };
    if (s.status !== "inmigrate") break;
    if (Date.now() > deadline) throw new Error("the destination stayed in inmigrate for 60 s");
    await new Promise((r) => setTimeout(r, 100));
  }
  const [a, b] = [await src.guestRamPath(), await dst.guestRamPath()];
  const pages = await differingPages(a, b);
  const addresses = pages.map((p) => `0x${(p * PAGE).toString(16)}`);
  if (pages.length === 0) return { pages: addresses, report: "" };
  // The first few with the bytes that differ: which structure a page held says who wrote it;
  // and where the rings are, to tell a ring page from a buffer.
  const lines: string[] = [];
  for (const [i, p] of pages.slice(0, 8).entries()) {
    lines.push(`${addresses[i]}: ${await describePageDiff(a, b, p)}`);
  }
  if (pages.length > 8) lines.push(`and ${addresses.slice(8).join(" ")}`);
  lines.push(`source QEMU:\n${await src.diagnose()}`);
  return { pages: addresses, report: lines.join("\n") };
}

/** The byte runs in which page `page` of two guest RAM files differs, source then destination. */
async function describePageDiff(a: string, b: string, page: number): Promise<string> {
  const read = async (path: string) => {
    const f = await Deno.open(path);
    try {
      await f.seek(page * PAGE, Deno.SeekMode.Start);
      const buf = new Uint8Array(PAGE);
      await readFull(f, buf);
      return buf;
    } finally {
      f.close();
    }
  };
  const [x, y] = [await read(a), await read(b)];
  const hex = (v: Uint8Array) => [...v].map((c) => c.toString(16).padStart(2, "0")).join("");
  const runs: string[] = [];
  for (let i = 0; i < PAGE && runs.length < 6;) {
    if (x[i] === y[i]) {
      i++;
      continue;
    }
    let end = i;
    while (end < PAGE && end - i < 16 && x[end] !== y[end]) end++;
    runs.push(`+0x${i.toString(16)} src ${hex(x.subarray(i, end))} dst ${hex(y.subarray(i, end))}`);
    i = end;
  }
  let count = 0;
  for (let i = 0; i < PAGE; i++) if (x[i] !== y[i]) count++;
  return `${count} bytes differ: ${runs.join(", ")}`;
}

const PAGE = 4096;

/** The 4 KiB pages (numbers) at which two files of guest RAM differ, at most 64 of them. */
async function differingPages(a: string, b: string): Promise<number[]> {
  const chunk = 4 << 20;
  const fa = await Deno.open(a);
  const fb = await Deno.open(b);
  const found: number[] = [];
  try {
    const ba = new Uint8Array(chunk);
    const bb = new Uint8Array(chunk);
    const wa = new Int32Array(ba.buffer);
    const wb = new Int32Array(bb.buffer);
    for (let base = 0;; base += chunk) {
      const na = await readFull(fa, ba);
      const nb = await readFull(fb, bb);
      if (na !== nb) throw new Error(`guest RAM sizes differ near ${base + Math.min(na, nb)}`);
      if (na === 0) return found;
      const words = na >> 2;
      for (let w = 0; w < words; w++) {
        if (wa[w] !== wb[w]) {
          found.push((base >> 12) + (w >> 10));
          if (found.length === 64) return found;
          w = (((w >> 10) + 1) << 10) - 1; // on to the next page
        }
      }
      if (na < chunk) return found;
    }
  } finally {
    fa.close();
    fb.close();
  }
}

async function readFull(f: Deno.FsFile, buf: Uint8Array): Promise<number> {
  let n = 0;
  while (n < buf.length) {
    const r = await f.read(buf.subarray(n));
    if (r === null) break;
    n += r;
  }
  return n;
}

/** Fills the first MiBs of `image` (the region the guest checks) with random data. */
function fillRegion(image: string): void {
  const f = Deno.openSync(image, { write: true });
  try {
    const random = new Uint8Array(1 << 20);
    for (let mib = 0; mib < REGION_MIB; mib++) {
      for (let o = 0; o < random.length; o += 65536) {
        crypto.getRandomValues(random.subarray(o, o + 65536));
      }
      f.writeSync(random);
    }
  } finally {
    f.close();
  }
}

/**
 * Boots {@link migrationWorkload} on a vhostd disk served by `first` and migrates it along the
 * hops (each destination daemon starts while its source runs, as it would on another host);
 * after each migration its guest RAM is compared with the source's, then it runs a few rounds,
 * checking what came over. Throws with every console and log if a migration fails or the guest
 * does not finish.
 */
export async function migrationRun(opts: MigrationRunOptions): Promise<MigrationRunResult> {
  for (let run = 1;; run++) {
    try {
      return await migrationRunOnce(opts);
    } catch (e) {
      if (!(e instanceof QemuLostPages) || run === REDO_RUNS) throw e;
      console.log(
        `migration ${e.hop}: QEMU left ${e.stale.pages.length} guest page(s) stale by itself; ` +
          `running the test again:\n${e.stale.report}`,
      );
    }
  }
}

/** Runs a test whose QEMU lost pages by itself at most this many times in all. */
const REDO_RUNS = 3;

/** Thrown when a run's comparison found stale pages and the test redoes such runs. */
class QemuLostPages extends Error {
  constructor(readonly hop: number, readonly stale: StalePages) {
    super(
      `migration ${hop}: ${stale.pages.length} guest page(s) stale in every run:\n${stale.report}`,
    );
  }
}

async function migrationRunOnce(opts: MigrationRunOptions): Promise<MigrationRunResult> {
  let text = "";
  const infos: MigrationInfo[] = [];
  const stale: StalePages[] = [];
  await withDir("vhostd-mig-", async (dir) => {
    // World-readable: daemons and QEMUs in other namespaces open files here too.
    await Deno.chmod(dir, 0o755);
    const image = `${dir}/disk.img`;
    sparseFile(image, WORKLOAD_DISK_BYTES);
    fillRegion(image);
    const hosts = new Map<string, BlkHost>();
    const vms: Vm[] = [];
    const ctx = { dir, image, vms };
    try {
      let host = await startBlkDaemon(dir, opts.first, image);
      hosts.set(opts.first.name, host);
      let vm = await Vm.start(vmOptions(dir, "vm0", host.socket, opts.vm, opts.guestSetup));
      vms.push(vm);
      await vm.waitConsole(/^ROUND 1 /m, 240_000);
      for (const [i, hop] of opts.hops.entries()) {
        if (hop.restartBefore) {
          const seen = rounds(vm.console()).length;
          await restart(host, dir, image);
          await vm.waitConsole((c) => rounds(c).length >= seen + 2, 120_000);
        }
        const spec = typeof hop.daemon === "string" ? { name: hop.daemon } : hop.daemon;
        let next = hosts.get(spec.name);
        if (next === undefined) {
          next = await startBlkDaemon(dir, spec, image);
          hosts.set(spec.name, next);
        }
        const moved = await migrate(
          ctx,
          { vm, host },
          { name: `vm${i + 1}`, host: next, place: hop.vm },
          i + 1,
          hop.restartDuring ?? false,
        );
        infos.push(moved.info);
        stale.push(moved.stale);
        if (opts.redoWhenPagesDiffer && moved.stale.pages.length > 0) {
          throw new QemuLostPages(i + 1, moved.stale);
        }
        assert.equal(
          moved.info.status,
          "completed",
          `migration ${i + 1}: ${JSON.stringify(moved.info)}`,
        );
        await vm.quit();
        text += `\n--- ${vm.options.name} ---\n${vm.console()}`;
        vm = moved.dst;
        host = next;
        // The destination checks what came over, a few rounds.
        await vm.waitConsole((c) => rounds(c).length >= 3, 240_000);
        await opts.afterHop?.(vm, i);
      }
      await vm.type("STOP\n");
      const exit = await Promise.race([
        vm.exited,
        new Promise<never>((_, reject) =>
          setTimeout(() => reject(new Error("the guest did not finish")), 240_000)
        ),
      ]);
      text += `\n--- ${vm.options.name} ---\n${vm.console()}`;
      assert.equal(exit.code, 0, `QEMU: ${exit.stderr}`);
    } catch (e) {
      for (const v of vms) {
        text += `\n--- ${v.options.name} ---\n${v.console()}`;
        text += `\n--- ${v.options.name}, as QEMU sees it ---\n${await v.diagnose()}`;
      }
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
  return { console: text, results: parseResults(text, "RESULT "), infos, stale };
}

/** One line per migration: status, total time, downtime, passes. */
export function describeMigrations(infos: MigrationInfo[]): string {
  return infos.map((i) =>
    `${i.status}: ${i.totalTimeMs} ms in all, ${i.downtimeMs} ms down, ${i.dirtySyncCount} passes`
  ).join("; ");
}

/** The checks every run that must lose nothing passes. */
export function assertNothingLost(run: MigrationRunResult): void {
  const { console: guest, results } = run;
  // First the page-exact check: a stale page shows there whether or not the guest looked at it.
  run.stale.forEach((s, i) =>
    assert.equal(
      s.pages.length,
      0,
      `migration ${i + 1}: ${s.pages.length} guest page(s) the destination got stale:\n${s.report}`,
    )
  );
  assert.doesNotMatch(guest, /VERIFY-ERROR|FIO-FAILED/);
  assert.equal(results.verify_errors, "0");
  assert.ok(Number(results.checked) > 0);
  assert.match(guest, /VHOSTD-GUEST-EXIT 0/);
}
