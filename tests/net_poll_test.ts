/**
 * Busy-polling a TAP-backed net device (`vhostd net --poll-us`): a QEMU 7.2 guest sends a file
 * and an iperf3 stream into a network namespace the test creates. With `--poll-us 1000` the
 * worker polls the transmit queue with the guest's kicks switched off, so the guest kicks for
 * a fraction of its frames; with the default (0) it kicks for nearly every frame. Either way
 * every byte arrives intact, and the receive queue (never polled) keeps working.
 */

import assert from "node:assert/strict";
import { DaemonProcess, runVhostd, sha256 } from "./helpers/daemon.ts";
import { assertGuestSuccess, describeGuestRun, parseResults, runGuest } from "./guest/qemu.ts";
import { linkExists, netDeviceArgs, placeTap, run } from "./helpers/net.ts";

/** One counter of the metrics text, for queue `queue` of the device. */
function counter(metrics: string, name: string, queue: number): number {
  const m = new RegExp(`^vhostd_queue_${name}_total\\{[^}]*queue="${queue}"[^}]*\\} (\\d+)$`, "m")
    .exec(metrics);
  assert.ok(m, `${name} of queue ${queue} in\n${metrics}`);
  return Number(m[1]);
}

Deno.test("net: --poll-us out of range is one line and exit 2, before any TAP is made", async () => {
  const tap = `vhq${Math.random().toString(36).slice(2, 8)}`;
  const r = await runVhostd([
    "net",
    "--socket",
    "/tmp/never.sock",
    "--tap",
    tap,
    "--poll-us",
    "5000",
  ]);
  assert.equal(r.code, 2, r.stderr);
  assert.match(
    r.stderr.trim(),
    /^vhostd net: --poll-us must be a whole number from 0 to 1000, not "5000"$/,
  );
  assert.equal(await linkExists(tap), false, "no TAP left behind");
});

for (const pollUs of [0, 1000]) {
  Deno.test({
    name: `guest: vhostd net --tap --poll-us ${pollUs}: a file arrives intact, transmit kicks ${
      pollUs ? "suppressed while polling" : "per frame"
    }`,
    sanitizeResources: false,
    sanitizeOps: false,
    async fn() {
      const tag = Math.random().toString(36).slice(2, 8);
      const ns = `vhostd-${tag}`;
      const tap = `vhp${tag}`;
      const dir = await Deno.makeTempDir({ prefix: "vhostd-netpoll-" });
      const sock = `${dir}/net.sock`;
      await run("ip", "netns", "add", ns);
      let d: DaemonProcess | undefined;
      let iperfServer: Deno.ChildProcess | undefined;
      try {
        const args = ["net", "--socket", sock, "--tap", tap, "--metrics", "127.0.0.1:0"];
        d = await DaemonProcess.start(pollUs ? [...args, "--poll-us", String(pollUs)] : args);
        await d.waitFor(
          () => /metrics on http:\/\/127\.0\.0\.1:\d+/.test(d!.stdout + d!.stderr),
          5000,
          "metrics",
        );
        const port = /metrics on http:\/\/127\.0\.0\.1:(\d+)/.exec(d.stdout + d.stderr)![1];
        await placeTap(tap, ns, "198.18.1.1");
        await run("ip", "-n", ns, "link", "set", "lo", "up");
        const received = `${dir}/received`;
        iperfServer = new Deno.Command("ip", {
          args: ["netns", "exec", ns, "iperf3", "-s", "-B", "198.18.1.1"],
          stdout: "null",
          stderr: "null",
        }).spawn();
        let fetched: Promise<string> | undefined;
        const r = await runGuest({
          script: `ip link set eth0 up || exit 10
ip addr add 198.18.1.2/24 dev eth0 || exit 11
i=0
until ping -c 1 -W 1 198.18.1.1 >/dev/null 2>&1; do
  i=$((i+1)); [ $i -lt 120 ] || { echo "never reached 198.18.1.1"; exit 12; }
done
dd if=/dev/urandom of=/tmp/file bs=1M count=16 2>/dev/null || exit 13
echo "RESULT sha=$(sha256sum /tmp/file | cut -d' ' -f1)"
echo SERVE-READY
nc -l -p 5003 -e cat /tmp/file || exit 14
echo "RESULT mbps=$(iperf3 -f m -c 198.18.1.1 -t 3 2>&1 | awk '/receiver/ { for (i = 1; i <= NF; i++) if ($i == "Mbits/sec") print $(i-1) }')"
exit 0
`,
          extraArgs: netDeviceArgs("n0", sock, "52:54:00:18:01:02"),
          timeoutMs: 300_000,
          onConsole: (chunk) => {
            if (fetched || !chunk.includes("SERVE-READY")) return;
            // The guest sends the file to whoever connects: the namespace, here.
            fetched = (async () => {
              for (let i = 0; i < 60; i++) {
                const o = await new Deno.Command("ip", {
                  args: [
                    "netns",
                    "exec",
                    ns,
                    "sh",
                    "-c",
                    `busybox nc 198.18.1.2 5003 > ${received}`,
                  ],
                  stdin: "null",
                  stderr: "piped",
                }).output();
                if (o.success && (await Deno.stat(received)).size > 0) return "";
                await new Promise((ok) => setTimeout(ok, 1000));
              }
              return "never fetched the file";
            })();
          },
        });
        const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
        const all = `${describeGuestRun(r)}\ndaemon:\n${d.stderr}`;
        assertGuestSuccess(r);
        const res = parseResults(r.console, "RESULT ");
        assert.ok(Number(res.mbps) > 0, `iperf3: ${res.mbps}\n${all}`);
        assert.equal(await fetched, "", all);
        const data = await Deno.readFile(received);
        assert.equal(data.length, 16 << 20, `bytes received\n${all}`);
        assert.equal(await sha256(data), res.sha, "the file arrived intact");
        const frames = counter(metrics, "requests", 1);
        const kicks = counter(metrics, "kicks", 1);
        console.log(`--poll-us ${pollUs}: ${kicks} transmit kicks for ${frames} frames`);
        assert.ok(frames > 1000, `${frames} frames sent`);
        if (pollUs === 0) assert.ok(kicks > frames / 2, `${kicks} kicks for ${frames} frames`);
        else assert.ok(kicks < frames / 2, `${kicks} kicks for ${frames} frames`);
        assert.ok(counter(metrics, "requests", 0) > 0, "the receive queue carried frames");
      } finally {
        try {
          iperfServer?.kill("SIGKILL");
          await iperfServer?.status;
        } catch {
          // already gone
        }
        const code = d ? await d.stop() : 0;
        await run("ip", "netns", "del", ns).catch(() => {});
        await Deno.remove(dir, { recursive: true }).catch(() => {});
        assert.equal(code, 0, `the daemon stops cleanly\n${d?.stderr}`);
      }
    },
  });
}
