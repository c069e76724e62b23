/**
 * Soak: mixed block load against a real daemon for a set time, sampling the daemon's RSS and open
 * fds. `deno task soak [--minutes M] [--json]`. Each round drives one device with the load
 * generator (random reads, random writes or a mix, alternating queue counts) while a reconnecting
 * front-end churns on the other device, so both steady I/O and session set-up and tear-down run
 * for the whole time.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { DaemonProcess, sparseFile } from "../helpers/daemon.ts";
import { BlkFrontend } from "../../vhost-user/frontend/mod.ts";

const TARGET = new URL("../fuzz/two_blk.ts", import.meta.url).pathname;
const MAIN = new URL("../../daemon/main.ts", import.meta.url).pathname;

/** One sample of the daemon's footprint. */
export interface SoakSample {
  /** Seconds since the start. */
  t: number;
  /** Resident set size, KiB. */
  rssKiB: number;
  /** Open fds. */
  fds: number;
}

/** What a soak run saw. */
export interface SoakResult {
  seconds: number;
  rounds: number;
  ios: number;
  ioErrors: number;
  sessions: number;
  sessionErrors: number;
  samples: SoakSample[];
  /** RSS: median of the samples in the first and in the last quarter of the run. */
  rssStartKiB: number;
  rssEndKiB: number;
  /** Open fds while idle: before the first front-end, and after the last one hung up. */
  fdsStart: number;
  fdsEnd: number;
}

function sample(pid: number, t0: number): SoakSample {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  return {
    t: Math.round((performance.now() - t0) / 1000),
    rssKiB: Number(/VmRSS:\s+(\d+)/.exec(status)![1]),
    fds: [...Deno.readDirSync(`/proc/${pid}/fd`)].length,
  };
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

/**
 * Runs the soak for `seconds`; load rounds last `roundSeconds`, with `pauseSeconds` of only
 * session churn between them (to share a small machine).
 */
export async function soak(
  seconds: number,
  roundSeconds = 10,
  pauseSeconds = 0,
): Promise<SoakResult> {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-soak-" });
  sparseFile(`${dir}/a.img`, 256 << 20);
  sparseFile(`${dir}/b.img`, 64 << 20);
  const d = await DaemonProcess.start(
    [`${dir}/a.sock`, `${dir}/a.img`, `${dir}/b.sock`, `${dir}/b.img`],
    undefined,
    false,
    TARGET,
  );
  const pid = d.child.pid;
  const t0 = performance.now();
  const samples: SoakSample[] = [sample(pid, t0)];
  const r = { rounds: 0, ios: 0, ioErrors: 0, sessions: 0, sessionErrors: 0 };
  const end = t0 + seconds * 1000;
  const patterns = ["randread", "randwrite", "rw"];
  let stop = false;
  const sampler = setInterval(() => samples.push(sample(pid, t0)), 2000);
  // Session churn on the second device: connect, start, one write+read, stop, hang up.
  const churn = (async () => {
    const data = new Uint8Array(4096).fill(0x5a);
    while (!stop) {
      try {
        const s = await BlkFrontend.open({ socket: `${dir}/b.sock`, queues: 2 });
        try {
          s.blk.write(8, data);
          const back = s.blk.read(8, 4096);
          if (back.status !== 0 || back.data[100] !== 0x5a) r.sessionErrors++;
        } finally {
          s.close();
        }
        r.sessions++;
      } catch {
        r.sessionErrors++;
      }
      await new Promise((res) => setTimeout(res, 200));
    }
  })();
  try {
    while (performance.now() < end) {
      const secs = Math.max(
        1,
        Math.min(roundSeconds, Math.round((end - performance.now()) / 1000)),
      );
      const out = await new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "-A",
          MAIN,
          "load",
          "--socket",
          `${dir}/a.sock`,
          "--rw",
          patterns[r.rounds % 3],
          "--queues",
          String(1 + (r.rounds % 2)),
          "--depth",
          "16",
          "--seconds",
          String(secs),
          "--json",
        ],
        stdout: "piped",
        stderr: "piped",
      }).output();
      r.rounds++;
      if (out.code !== 0) {
        r.ioErrors++;
        continue;
      }
      const j = JSON.parse(new TextDecoder().decode(out.stdout));
      r.ios += j.ios;
      r.ioErrors += j.errors;
      if (pauseSeconds > 0) await new Promise((res) => setTimeout(res, pauseSeconds * 1000));
    }
  } finally {
    stop = true;
    await churn;
    clearInterval(sampler);
    // Idle again: let the daemon see the last hang-ups before the closing sample.
    await new Promise((res) => setTimeout(res, 500));
    samples.push(sample(pid, t0));
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
  const q = Math.max(1, Math.floor(samples.length / 4));
  return {
    seconds,
    ...r,
    samples,
    rssStartKiB: median(samples.slice(0, q).map((s) => s.rssKiB)),
    rssEndKiB: median(samples.slice(-q).map((s) => s.rssKiB)),
    fdsStart: samples[0].fds,
    fdsEnd: samples[samples.length - 1].fds,
  };
}

if (import.meta.main) {
  const { values } = parseArgs({
    options: {
      minutes: { type: "string" },
      "pause-seconds": { type: "string" },
      json: { type: "boolean" },
    },
  });
  const minutes = Number(values.minutes ?? 30);
  const res = await soak(minutes * 60, 10, Number(values["pause-seconds"] ?? 0));
  if (values.json) console.log(JSON.stringify(res, null, 2));
  else {
    console.log(
      `soak ${minutes} min: ${res.rounds} load rounds, ${res.ios} I/Os, ${res.ioErrors} I/O errors; ` +
        `${res.sessions} front-end sessions, ${res.sessionErrors} session errors`,
    );
    console.log(
      `RSS ${res.rssStartKiB} KiB -> ${res.rssEndKiB} KiB; open fds ${res.fdsStart} -> ${res.fdsEnd}`,
    );
  }
}
