/**
 * Comparison 5: live migration of a guest with a busy disk. The same guest (fio doing 4 KiB
 * random reads and writes on its disk all along) migrates between two QEMUs on this host with
 * the same bandwidth cap, its disk served by vhostd, by qemu-storage-daemon, or by QEMU's own
 * virtio-blk; QEMU's `query-migrate` gives the total time and the downtime.
 *
 * Each vhost-user variant runs two daemons on the one image, as a source host and a destination
 * host sharing storage would: vhostd with its image locking on (the destination takes the image
 * when its guest starts), qemu-storage-daemon with `locking=off` (it has no handover). QEMU's own
 * disk is opened by both QEMUs, which hand it over themselves.
 *
 * @module
 */

import { type MigrationInfo, Vm } from "../tests/guest/vm.ts";
import { type BackendLevers, startBackend } from "./backends.ts";
import { median, progress, type RunningBackend, runOrder, StepError } from "./lib.ts";

/** What serves the guest's disk. */
export type MigrationVariant = "vhostd" | "qsd" | "in-qemu";

/** Settings of the comparison. */
export interface MigrationConfig {
  /** Variants, in the order of the first run (later runs rotate it). */
  variants: MigrationVariant[];
  /** Migrations per variant. */
  runs: number;
  /** The disk image (on a real disk: QEMU's own disk uses O_DIRECT). */
  diskImage: string;
  /** Where sockets and guest files go. */
  socketDir: string;
  /** Guest RAM in MiB. */
  memoryMiB: number;
  /** Migration bandwidth cap, bytes per second (the same for every variant). */
  bandwidthBytes: number;
  /** QEMU's downtime limit in ms (its default is 300). */
  downtimeLimitMs: number;
  /** Seconds the workload runs before the migration starts. */
  warmupSeconds: number;
  /** Back-end levers (vhostd's O_DIRECT, qsd's aio). */
  levers: BackendLevers;
}

/** One migration. */
export interface MigrationCase {
  /** What served the disk. */
  variant: MigrationVariant;
  /** Run number (0-based). */
  run: number;
  /** QEMU's total time, ms. */
  totalTimeMs: number;
  /** QEMU's downtime, ms. */
  downtimeMs: number;
  /** Passes over guest RAM (dirty-sync-count). */
  passes: number;
  /** RAM transferred, MiB. */
  transferredMiB: number;
}

/** Medians per variant. */
export interface MigrationSummary {
  /** The variant. */
  variant: MigrationVariant;
  /** Median total time, ms. */
  totalTimeMs: number;
  /** Median downtime, ms. */
  downtimeMs: number;
}

/** The comparison's results. */
export interface MigrationResult {
  /** The settings. */
  config: Omit<MigrationConfig, "levers">;
  /** Every migration. */
  cases: MigrationCase[];
  /** Medians per variant. */
  summary: MigrationSummary[];
  /** The commands of the last run, per variant (back-ends and QEMU). */
  commands: Record<string, string[]>;
}

/** The guest: fio keeps its disk busy (4 KiB random reads and writes, O_DIRECT) until it dies. */
const BUSY_GUEST = `
fio --name=busy --filename=/dev/vda --rw=randrw --bs=4k --iodepth=16 --ioengine=libaio \\
  --direct=1 --size=256M --time_based --runtime=3600 --output=/tmp/fio.out </dev/null &
sleep 1
echo BUSY
sleep 3600
`;

/** Runs the comparison. */
export async function migrationBench(cfg: MigrationConfig): Promise<MigrationResult> {
  const cases: MigrationCase[] = [];
  const commands: Record<string, string[]> = {};
  for (let run = 0; run < cfg.runs; run++) {
    for (const variant of runOrder(cfg.variants, run)) {
      progress(`migration: ${variant}, run ${run + 1} of ${cfg.runs}`);
      const { info, command } = await migrateOnce(cfg, variant, run);
      commands[variant] = command;
      cases.push({
        variant,
        run,
        totalTimeMs: info.totalTimeMs ?? NaN,
        downtimeMs: info.downtimeMs ?? NaN,
        passes: info.dirtySyncCount ?? 0,
        transferredMiB: Math.round((info.transferredBytes ?? 0) / 2 ** 20),
      });
    }
  }
  const summary = cfg.variants.map((variant) => {
    const mine = cases.filter((c) => c.variant === variant);
    return {
      variant,
      totalTimeMs: median(mine.map((c) => c.totalTimeMs)),
      downtimeMs: median(mine.map((c) => c.downtimeMs)),
    };
  });
  const { levers: _, ...config } = cfg;
  return { config, cases, summary, commands };
}

async function migrateOnce(
  cfg: MigrationConfig,
  variant: MigrationVariant,
  run: number,
): Promise<{ info: MigrationInfo; command: string[] }> {
  const step = `migration ${variant} run ${run + 1}`;
  const backends: RunningBackend[] = [];
  const vms: Vm[] = [];
  const tag = `mig-${variant}-${run}`;
  try {
    const disk = async (side: "src" | "dst") => {
      if (variant === "in-qemu") {
        return { virtioBlkImages: [{ path: cfg.diskImage, shared: true }] };
      }
      const socket = `${cfg.socketDir}/${tag}-${side}.sock`;
      backends.push(
        await startBackend(variant, {
          image: cfg.diskImage,
          storage: "disk",
          nullSizeBytes: 0,
          queues: 1,
          socket,
          // qsd has no handover, so it must not lock; vhostd keeps its lock and hands it over.
          shared: variant === "qsd",
        }, cfg.levers),
      );
      return { vhostUserBlk: [{ socket, numQueues: 1 }] };
    };
    const base = {
      dir: cfg.socketDir,
      script: BUSY_GUEST,
      memoryMiB: cfg.memoryMiB,
      chardevReconnect: 1,
    };
    const src = await Vm.start({ ...base, name: `${tag}-src`, ...(await disk("src")) });
    vms.push(src);
    await src.waitConsole(/^BUSY/m, 240_000);
    await new Promise((r) => setTimeout(r, cfg.warmupSeconds * 1000));
    const uri = `unix:${cfg.socketDir}/${tag}.mig`;
    const dst = await Vm.start({
      ...base,
      name: `${tag}-dst`,
      ...(await disk("dst")),
      incoming: uri,
      initrdPath: src.initrd,
    });
    vms.push(dst);
    await src.startMigration(uri, cfg.bandwidthBytes, cfg.downtimeLimitMs);
    const info = await src.waitMigration(() => false, 600_000);
    if (info.status !== "completed") {
      throw new StepError(step, `migration ${info.status}: ${info.errorDesc ?? ""}`);
    }
    // The guest must still be busy on the destination: the comparison is of working migrations.
    await src.quit();
    const busyAfter = await dst.qmp.hmp("info status");
    if (!/running/.test(busyAfter)) throw new StepError(step, `destination: ${busyAfter}`);
    return {
      info,
      command: [...backends.map((b) => b.command.join(" ")), src.command.join(" ")],
    };
  } finally {
    for (const v of vms) await v.kill();
    for (const b of backends) await b.stop();
  }
}
