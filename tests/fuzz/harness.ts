/**
 * Runs the fuzzer against a real two-device daemon process and checks, throughout, that the
 * daemon is alive, still accepts front-ends, leaks no fds, and that the other device keeps
 * serving I/O.
 *
 * @module
 */

import { DaemonProcess, openFdCount, sparseFile } from "../helpers/daemon.ts";
import { BlkFrontend } from "../../vhost-user/frontend/mod.ts";
import { runCase } from "./fuzzer.ts";

const TARGET = new URL("./two_blk.ts", import.meta.url).pathname;

/** The outcome of a run. */
export interface FuzzResult {
  cases: number;
  dropped: number;
  survived: number;
  bystanderChecks: number;
  fdsBefore: number;
  fdsAfter: number;
  daemonLog: string;
}

/** Runs `cases` cases from `seed`; throws with the failing seed on the first problem. */
export async function fuzzRun(
  cases: number,
  seed: number,
  progress?: (done: number) => void,
): Promise<FuzzResult> {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-fuzz-" });
  sparseFile(`${dir}/a.img`, 16 << 20);
  sparseFile(`${dir}/b.img`, 16 << 20);
  const victim = `${dir}/a.sock`;
  const d = await DaemonProcess.start(
    [victim, `${dir}/a.img`, `${dir}/b.sock`, `${dir}/b.img`],
    undefined,
    false,
    TARGET,
  );
  const pid = d.child.pid;
  const bystander = await BlkFrontend.open({ socket: `${dir}/b.sock`, queues: 2 });
  const pattern = new Uint8Array(4096);
  let checks = 0;
  const check = () => {
    crypto.getRandomValues(pattern);
    const sector = 8 * (checks % 1000);
    bystander.blk.write(sector, pattern);
    const r = bystander.blk.read(sector, 4096);
    if (r.status !== 0 || !r.data || r.data.some((b, i) => b !== pattern[i])) {
      throw new Error(`bystander I/O failed after ${checks} checks`);
    }
    checks++;
  };
  try {
    check();
    const fdsBefore = openFdCount(pid);
    let dropped = 0;
    for (let i = 0; i < cases; i++) {
      const caseSeed = (seed + i) >>> 0;
      let outcome;
      try {
        outcome = await runCase(victim, caseSeed);
      } catch (e) {
        throw new Error(`case seed ${caseSeed}: ${(e as Error).message}\n${d.stderr.slice(-2000)}`);
      }
      if (outcome === "dropped") dropped++;
      try {
        Deno.statSync(`/proc/${pid}/fd`);
      } catch {
        throw new Error(`daemon died at case seed ${caseSeed}\n${d.stderr.slice(-4000)}`);
      }
      if (i % 25 === 24) check();
      progress?.(i + 1);
      // The cases are synchronous FFI calls: let the event loop drain the daemon's stderr pipe,
      // or its log writes block once the pipe is full.
      await new Promise((r) => setTimeout(r, 0));
    }
    check();
    // Let the daemon notice the last hang-up before counting its fds.
    await new Promise((r) => setTimeout(r, 300));
    const fdsAfter = openFdCount(pid);
    return {
      cases,
      dropped,
      survived: cases - dropped,
      bystanderChecks: checks,
      fdsBefore,
      fdsAfter,
      daemonLog: d.stderr,
    };
  } finally {
    bystander.close();
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
}
