/**
 * DPDK's testpmd as a third-party vhost-user net front-end: two `net_virtio_user` ports on
 * `vhostd switch`; one sends (txonly), the other receives (rxonly), and testpmd's own counters
 * say the frames crossed the switch. Needs `dpdk-dev` (dpdk-testpmd) and `librte-net-virtio23`.
 */

import assert from "node:assert/strict";
import { DaemonProcess } from "./helpers/daemon.ts";

/** Starts testpmd on `socket` in `mode`; it runs until SIGINT and then prints its totals. */
function testpmd(socket: string, mode: "txonly" | "rxonly", prefix: string, mac: string) {
  try {
    return new Deno.Command("dpdk-testpmd", {
      args: [
        "-l",
        "0-1",
        "--no-huge",
        "-m",
        "512",
        "--no-pci",
        `--file-prefix=${prefix}`,
        "--vdev",
        `net_virtio_user0,path=${socket},queues=1,mac=${mac}`,
        "--",
        "--total-num-mbufs=8192",
        `--forward-mode=${mode}`,
        "--stats-period",
        "1",
      ],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
  } catch (e) {
    throw new Error(`cannot run dpdk-testpmd (Debian: apt-get install dpdk-dev): ${e}`);
  }
}

/** The last value of `label` in testpmd's output. */
function lastCounter(text: string, label: string): number {
  const all = [...text.matchAll(new RegExp(`${label}:\\s+(\\d+)`, "g"))];
  return all.length ? Number(all[all.length - 1][1]) : -1;
}

async function finish(p: Deno.ChildProcess): Promise<string> {
  try {
    p.kill("SIGINT");
  } catch {
    // already gone
  }
  const out = await p.output();
  return new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
}

Deno.test({
  name: "testpmd: txonly on one switch port reaches rxonly on the other",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vhostd-testpmd-" });
    const a = `${dir}/a.sock`;
    const b = `${dir}/b.sock`;
    const tag = Math.random().toString(36).slice(2, 8);
    // rxonly never sends, so its address is never learned and every frame is flooded: the
    // switch's flood limit would hold the stream to its default rate.
    const d = await DaemonProcess.start([
      "switch",
      "--socket",
      a,
      "--socket",
      b,
      "--flood-rate",
      "0",
    ]);
    let rx: Deno.ChildProcess | undefined;
    let tx: Deno.ChildProcess | undefined;
    let rxOut = "";
    let txOut = "";
    try {
      rx = testpmd(b, "rxonly", `vhrx${tag}`, "02:00:00:18:00:02");
      await d.waitFor(() => d.stderr.includes("port1: front-end connected"), 30_000, "rx port");
      await new Promise((r) => setTimeout(r, 3000));
      tx = testpmd(a, "txonly", `vhtx${tag}`, "02:00:00:18:00:01");
      await d.waitFor(() => d.stderr.includes("port0: front-end connected"), 30_000, "tx port");
      const started = performance.now();
      await new Promise((r) => setTimeout(r, 8000));
      txOut = await finish(tx);
      const seconds = (performance.now() - started) / 1000;
      await new Promise((r) => setTimeout(r, 1000));
      rxOut = await finish(rx);
      const sent = lastCounter(txOut, "TX-packets");
      const received = lastCounter(rxOut, "RX-packets");
      const report = `tx:\n${txOut.slice(-1500)}\nrx:\n${rxOut.slice(-1500)}\ndaemon:\n${d.stderr}`;
      assert.ok(sent > 1000, `txonly sent ${sent} packets\n${report}`);
      assert.ok(received > 1000, `rxonly received ${received} packets\n${report}`);
      assert.ok(received <= sent, `no more received (${received}) than sent (${sent})`);
      console.log(
        `testpmd: ${sent} sent, ${received} received through the switch in ~${
          seconds.toFixed(1)
        } s (${(received / seconds / 1e6).toFixed(3)} Mpps delivered)`,
      );
    } finally {
      if (tx) await finish(tx).catch(() => "");
      if (rx) await finish(rx).catch(() => "");
      const code = await d.stop();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
      for (const p of [`vhrx${tag}`, `vhtx${tag}`]) {
        await Deno.remove(`/var/run/dpdk/${p}`, { recursive: true }).catch(() => {});
      }
      assert.equal(code, 0, `the switch stops cleanly\n${d.stderr}`);
    }
  },
});
