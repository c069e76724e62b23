/**
 * virtio-net against real QEMU 7.2 guests: two guests joined by `vhostd switch` (MTU 1500 and
 * 9000), and one guest on `vhostd net --tap` talking to a network namespace the test creates.
 *
 * QEMU 7.2 under TCG crashes when a guest starts a vhost-user net device with MSI-X, so the
 * device gets `vectors=0` (legacy interrupts). Test addresses are in 198.18.0.0/15 and the
 * traffic stays inside the guests and the test's own namespace.
 */

import assert from "node:assert/strict";
import { DaemonProcess } from "./helpers/daemon.ts";
import {
  assertGuestSuccess,
  describeGuestRun,
  type GuestResult,
  parseResults,
  runGuest,
} from "./guest/qemu.ts";
import { netDeviceArgs, placeTap, run } from "./helpers/net.ts";

/** Shell helpers shared by the guest scripts (busybox sh). */
const SH_HELPERS = `
setup() { # ADDR MTU
  ip link set eth0 mtu "$2" up || exit 10
  ip addr add "$1/24" dev eth0 || exit 11
}
wait_for() { # ADDR
  i=0
  until ping -c 1 -W 1 "$1" >/dev/null 2>&1; do
    i=$((i+1)); [ $i -lt 120 ] || { echo "never reached $1"; exit 12; }
  done
}
rtt() { # ADDR SIZE -> average RTT in ms
  ping -c 5 -s "$2" "$1" | sed -n 's|.*min/avg/max = [^/]*/\\([^/]*\\)/.*|\\1|p'
}
iperf() { # iperf3 args -> receiver Mbit/s
  iperf3 -f m "$@" 2>&1 | awk '/receiver/ { for (i = 1; i <= NF; i++) if ($i == "Mbits/sec") print $(i-1) }'
}
`;

/**
 * Guest B: makes 64 MiB, serves it once, pings A, runs iperf3 both ways, then tells A (retrying
 * until A listens).
 */
function senderScript(mtu: number): string {
  return `${SH_HELPERS}
setup 198.18.0.2 ${mtu}
dd if=/dev/urandom of=/tmp/data bs=1M count=64 2>/dev/null
echo "RESULT sent_sha=$(sha256sum /tmp/data | cut -d' ' -f1)"
nc -l -p 5000 -e cat /tmp/data
echo "RESULT rtt_b_to_a=$(rtt 198.18.0.1 ${mtu - 28})"
echo "RESULT iperf_b_to_a=$(iperf -c 198.18.0.1 -t 3)"
echo "RESULT iperf_a_to_b=$(iperf -c 198.18.0.1 -t 3 -R)"
# A listens for this only once it has checksummed the 64 MiB, which can take a TCG guest longer
# than the iperf3 runs: retry until it does.
i=0
until echo done | nc 198.18.0.1 5001; do
  i=$((i+1)); [ $i -lt 120 ] || { echo "A never listened for done"; exit 14; }; sleep 1
done
exit 0
`;
}

/** Guest A: waits for B, pings it, fetches the 64 MiB, serves iperf3 until B is done. */
function receiverScript(mtu: number): string {
  return `${SH_HELPERS}
setup 198.18.0.1 ${mtu}
iperf3 -s -D
wait_for 198.18.0.2
echo "RESULT rtt_a_to_b=$(rtt 198.18.0.2 ${mtu - 28})"
i=0
until nc 198.18.0.2 5000 </dev/null >/tmp/recv && [ -s /tmp/recv ]; do
  i=$((i+1)); [ $i -lt 60 ] || { echo "no transfer"; exit 13; }; sleep 1
done
echo "RESULT recv_sha=$(sha256sum /tmp/recv | cut -d' ' -f1)"
echo "RESULT recv_bytes=$(wc -c < /tmp/recv)"
nc -l -p 5001 >/dev/null
exit 0
`;
}

async function twoGuestsOnSwitch(mtu: number): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-switch-" });
  const a = `${dir}/a.sock`;
  const b = `${dir}/b.sock`;
  const d = await DaemonProcess.start(["switch", "--socket", a, "--socket", b]);
  try {
    const started = performance.now();
    // Wait for both even when one fails: the other's console usually says why.
    const settled = await Promise.allSettled([
      runGuest({
        script: receiverScript(mtu),
        extraArgs: netDeviceArgs("n0", a, "52:54:00:18:00:01"),
        timeoutMs: 420_000,
      }),
      runGuest({
        script: senderScript(mtu),
        extraArgs: netDeviceArgs("n0", b, "52:54:00:18:00:02"),
        timeoutMs: 420_000,
      }),
    ]);
    if (settled.some((x) => x.status === "rejected")) {
      const say = (x: PromiseSettledResult<GuestResult>, who: string) =>
        x.status === "fulfilled"
          ? `${who}:\n${describeGuestRun(x.value)}`
          : `${who}: ${(x.reason as Error).message}`;
      assert.fail(
        `${say(settled[0], "guest A")}\n\n${say(settled[1], "guest B")}\n\ndaemon:\n${d.stderr}`,
      );
    }
    const [ra, rb] = settled.map((x) => (x as PromiseFulfilledResult<GuestResult>).value);
    const both = `${describeGuestRun(ra)}\n\n${describeGuestRun(rb)}\n\ndaemon:\n${d.stderr}`;
    assertGuestSuccess(ra);
    assertGuestSuccess(rb);
    const resA = parseResults(ra.console, "RESULT ");
    const resB = parseResults(rb.console, "RESULT ");
    assert.match(resB.sent_sha ?? "", /^[0-9a-f]{64}$/, both);
    assert.equal(resA.recv_sha, resB.sent_sha, `64 MiB arrived intact\n${both}`);
    assert.equal(resA.recv_bytes, String(64 << 20), both);
    for (const [k, v] of Object.entries({ ...resA, ...resB })) {
      if (k.startsWith("rtt_") || k.startsWith("iperf_")) {
        assert.ok(Number(v) > 0, `${k}=${v} must be a positive number\n${both}`);
      }
    }
    console.log(
      `switch MTU ${mtu}: rtt A->B ${resA.rtt_a_to_b} ms, B->A ${resB.rtt_b_to_a} ms; ` +
        `iperf3 B->A ${resB.iperf_b_to_a} Mbit/s, A->B ${resB.iperf_a_to_b} Mbit/s; ` +
        `${((performance.now() - started) / 1000).toFixed(1)} s`,
    );
  } finally {
    const code = await d.stop();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
    assert.equal(code, 0, `the switch stops cleanly\n${d.stderr}`);
  }
}

Deno.test({
  name: "guest: two guests on vhostd switch, MTU 1500: ping, 64 MiB, iperf3 both ways",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: () => twoGuestsOnSwitch(1500),
});

Deno.test({
  name: "guest: two guests on vhostd switch, MTU 9000: ping, 64 MiB, iperf3 both ways",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: () => twoGuestsOnSwitch(9000),
});

Deno.test({
  name: "guest: vhostd net --tap, TAP in a test namespace: ping both ways and iperf3",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const tag = Math.random().toString(36).slice(2, 8);
    const ns = `vhostd-${tag}`;
    const tap = `vht${tag}`;
    const dir = await Deno.makeTempDir({ prefix: "vhostd-tap-" });
    const sock = `${dir}/net.sock`;
    await run("ip", "netns", "add", ns);
    let d: DaemonProcess | undefined;
    let iperfServer: Deno.ChildProcess | undefined;
    try {
      d = await DaemonProcess.start(["net", "--socket", sock, "--tap", tap]);
      assert.match(d.stdout, /-netdev vhost-user,id=net0,chardev=net0c/);
      // The daemon created the TAP in our namespace; the host side lives in the test's one.
      await placeTap(tap, ns, "198.18.1.1");
      await run("ip", "-n", ns, "link", "set", "lo", "up");
      iperfServer = new Deno.Command("ip", {
        args: ["netns", "exec", ns, "iperf3", "-s", "-B", "198.18.1.1"],
        stdout: "null",
        stderr: "null",
      }).spawn();
      let hostPing = "";
      let pinged = false;
      const r = await runGuest({
        script: `${SH_HELPERS}
setup 198.18.1.2 1500
wait_for 198.18.1.1
echo "RESULT rtt_guest_to_host=$(rtt 198.18.1.1 56)"
echo "RESULT iperf_guest_to_host=$(iperf -c 198.18.1.1 -t 3)"
echo "RESULT iperf_host_to_guest=$(iperf -c 198.18.1.1 -t 3 -R)"
echo PING-ME
nc -l -p 5002 >/dev/null
exit 0
`,
        extraArgs: netDeviceArgs("n0", sock, "52:54:00:18:01:02"),
        timeoutMs: 300_000,
        onConsole: (chunk) => {
          if (pinged || !chunk.includes("PING-ME")) return;
          pinged = true;
          // From the namespace to the guest, then release the guest's script.
          (async () => {
            try {
              hostPing = await run(
                "ip",
                "netns",
                "exec",
                ns,
                "busybox",
                "ping",
                "-c",
                "3",
                "198.18.1.2",
              );
            } catch (e) {
              hostPing = String(e);
            }
            await run("ip", "netns", "exec", ns, "busybox", "nc", "198.18.1.2", "5002")
              .catch(() => {});
          })();
        },
      });
      const all = `${describeGuestRun(r)}\nhost ping:\n${hostPing}\ndaemon:\n${d.stderr}`;
      assertGuestSuccess(r);
      const res = parseResults(r.console, "RESULT ");
      for (const k of ["rtt_guest_to_host", "iperf_guest_to_host", "iperf_host_to_guest"]) {
        assert.ok(Number(res[k]) > 0, `${k}=${res[k]}\n${all}`);
      }
      assert.match(hostPing, / 0% packet loss/, all);
      console.log(
        `tap: rtt guest->host ${res.rtt_guest_to_host} ms; iperf3 guest->host ` +
          `${res.iperf_guest_to_host} Mbit/s, host->guest ${res.iperf_host_to_guest} Mbit/s`,
      );
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
      // The TAP was the daemon's: it is gone with it.
      const links = await run("ip", "link", "show");
      assert.ok(!links.includes(tap), `TAP ${tap} removed`);
    }
  },
});
