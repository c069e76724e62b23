/**
 * Runs the fuzzer against a real daemon process (tests/fuzz/target.ts) and checks, throughout,
 * that the daemon is alive, still accepts front-ends, leaks no fds, and that the devices nobody
 * attacks keep serving: a second block device and the two switch ports, all on the one data-plane
 * worker the attacked devices use (the default shape of a VM's devices, daemon/worker_pool.ts).
 *
 * @module
 */

import { daemonFile, DaemonProcess, openFdCount, sparseFile } from "../helpers/daemon.ts";
import { readUntil, tagged } from "../helpers/switch.ts";
import { BlkFrontend } from "../../vhost-user/frontend/mod.ts";
import { NetDriver } from "../../vhost-user/frontend/net_driver.ts";
import { CASE_CLASSES, type CaseOutcome, type FuzzContext, runCase } from "./fuzzer.ts";
import { targetSockets } from "./target.ts";

const TARGET = daemonFile("tests/fuzz/target.ts");

/** Cases and outcomes of one case class. */
export interface ClassCount {
  /** Cases run. */
  cases: number;
  /** Connections the daemon dropped. */
  dropped: number;
  /** Cases that ended with a queue stopped. */
  broken: number;
}

/** The outcome of a run. */
export interface FuzzResult {
  /** Cases run. */
  cases: number;
  /** Connections the daemon dropped. */
  dropped: number;
  /** Cases in which the daemon stopped a queue the guest had broken. */
  broken: number;
  /** Cases served to the end. */
  survived: number;
  /** The same, per case class. */
  byClass: Record<string, ClassCount>;
  /** Verified write/read rounds on the bystander block device. */
  bystanderChecks: number;
  /** Frames verified between the bystander switch ports. */
  switchChecks: number;
  /** The daemon's open fds after the first check and at the end. */
  fdsBefore: number;
  /** See {@link fdsBefore}. */
  fdsAfter: number;
  /** The daemon's exit code when SIGTERM stopped it after the run. */
  exitCode: number;
  /** Everything the daemon logged. */
  daemonLog: string;
}

/** A MAC address of the bystander ports' guests (52:54:00:00:fe:nn). */
function mac(n: number): Uint8Array {
  return new Uint8Array([0x52, 0x54, 0x00, 0x00, 0xfe, n]);
}

/** Runs `cases` cases from `seed`; throws with the failing seed on the first problem. */
export async function fuzzRun(
  cases: number,
  seed: number,
  progress?: (done: number) => void,
): Promise<FuzzResult> {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-fuzz-" });
  sparseFile(`${dir}/blk.img`, 16 << 20);
  sparseFile(`${dir}/bystander.img`, 16 << 20);
  const sockets = targetSockets(dir);
  const d = await DaemonProcess.start([dir], undefined, false, TARGET);
  const pid = d.child.pid;
  const bystander = await BlkFrontend.open({ socket: sockets.bystander, queues: 2 });
  const ports: NetDriver[] = [];
  let stopped = false;
  const pattern = new Uint8Array(4096);
  let checks = 0, frames = 0;
  const check = () => {
    crypto.getRandomValues(pattern);
    const sector = 8 * (checks % 1000);
    bystander.blk.write(sector, pattern, checks % 2);
    const r = bystander.blk.read(sector, 4096, (checks + 1) % 2);
    if (r.status !== 0 || !r.data || r.data.some((b, i) => b !== pattern[i])) {
      throw new Error(`bystander I/O failed after ${checks} checks`);
    }
    checks++;
  };
  // A frame from one bystander port must reach the other (frames port 0 sent are skipped; a
  // receive ring left full of them is emptied first, or the marker would find no buffer).
  const exchange = (from: number) => {
    const [a, b] = from === 1 ? [ports[0], ports[1]] : [ports[1], ports[0]];
    b.receiveAll(0);
    const tag = `fuzz ${frames++}`;
    a.send(tagged(mac(3 - from), mac(from), tag));
    readUntil(b, tag, 10_000);
  };
  const ctx: FuzzContext = {
    sockets: { blk: sockets.blk, net: sockets.net[0], console: sockets.console },
    poke: () => exchange(1 + (frames % 2)),
  };
  try {
    ports.push(await NetDriver.connect(sockets.net[1]), await NetDriver.connect(sockets.net[2]));
    check();
    exchange(1);
    const fdsBefore = openFdCount(pid);
    const byClass: Record<string, ClassCount> = {};
    for (const c of CASE_CLASSES) byClass[c.name] = { cases: 0, dropped: 0, broken: 0 };
    const tally: Record<CaseOutcome, number> = { dropped: 0, broken: 0, survived: 0 };
    for (let i = 0; i < cases; i++) {
      const caseSeed = (seed + i) >>> 0;
      let result;
      try {
        result = await runCase(ctx, caseSeed);
      } catch (e) {
        throw new Error(
          `case seed ${caseSeed}: ${(e as Error).stack ?? e}\n${d.stderr.slice(-3000)}`,
        );
      }
      tally[result.outcome]++;
      const c = byClass[result.name];
      c.cases++;
      if (result.outcome === "dropped") c.dropped++;
      if (result.outcome === "broken") c.broken++;
      if (!d.alive) {
        throw new Error(`daemon died at case seed ${caseSeed}\n${d.stderr.slice(-4000)}`);
      }
      if (i % 25 === 24) {
        check();
        exchange(1 + (i % 2));
      }
      progress?.(i + 1);
      // The cases are synchronous FFI calls: let the event loop drain the daemon's stderr pipe,
      // or its log writes block once the pipe is full.
      await new Promise((r) => setTimeout(r, 0));
    }
    check();
    exchange(1);
    exchange(2);
    // Let the daemon notice the last hang-up before counting its fds.
    await new Promise((r) => setTimeout(r, 300));
    const fdsAfter = openFdCount(pid);
    bystander.close();
    for (const p of ports) p.close();
    stopped = true;
    const exitCode = await d.stopWithin(30_000);
    return {
      cases,
      ...tally,
      byClass,
      bystanderChecks: checks,
      switchChecks: frames,
      fdsBefore,
      fdsAfter,
      exitCode,
      daemonLog: d.stderr,
    };
  } finally {
    bystander.close();
    for (const p of ports) p.close();
    if (!stopped) await d.stopWithin(30_000).catch(() => {});
    await Deno.remove(dir, { recursive: true });
  }
}
