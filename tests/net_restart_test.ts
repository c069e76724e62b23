/**
 * A net back-end restart: QEMU 7.2 guests keep pinging while vhostd is killed with SIGKILL twice
 * and restarted on the same socket. QEMU redials (`reconnect=1`), the link goes down and comes
 * back, and traffic must flow again after every restart.
 *
 * - `vhostd net --tap`: the guest pings a network namespace the test creates. The TAP is the
 *   daemon's (not persistent), so it dies with each killed daemon; the restarted daemon creates
 *   it afresh and the test moves it into the namespace and addresses it again, as an operator's
 *   hook would.
 * - `vhostd switch`: two guests ping each other across the switch, which is restarted. Its
 *   uplink TAP sits in a test namespace too, only so that the test can tell the guests to stop.
 *
 * Under TCG QEMU 7.2 needs `vectors=0` on virtio-net-pci. Test addresses are in 198.18.0.0/15;
 * traffic stays between the guests and the test's own namespace.
 */

import assert from "node:assert/strict";
import { linkExists, netDeviceArgs, placeTap, run } from "./helpers/net.ts";
import { DaemonProcess } from "./helpers/daemon.ts";
import {
  assertGuestSuccess,
  describeGuestRun,
  type GuestResult,
  parseResults,
  runGuest,
} from "./guest/qemu.ts";

/** Daemon restarts per test. */
const KILLS = 2;
/** Replies required in each phase (before the first kill, and after each restart). */
const REPLIES_PER_PHASE = 3;
/** How long one phase may take to show its replies (a restart, QEMU's redial, ARP). */
const PHASE_TIMEOUT_MS = 120_000;

/**
 * Guest script: address eth0, wait for the peer, then ping it once a second, one line per ping
 * (`PING <n> ok|lost`) and a line per carrier change (`CARRIER 0|1`), until a TCP connection
 * arrives on `stopPort` or 120 pings have gone by.
 */
function pingLoopScript(addr: string, peer: string, stopPort: number): string {
  return `
ip link set eth0 up || exit 10
ip addr add ${addr}/24 dev eth0 || exit 11
i=0
until ping -c 1 -W 1 ${peer} >/dev/null 2>&1; do
  i=$((i+1)); [ $i -lt 120 ] || { echo "never reached ${peer}"; exit 12; }
done
(nc -l -p ${stopPort} >/dev/null; touch /tmp/stop) &
echo LOOP-START
n=0; ok=0; carrier=1
while [ ! -e /tmp/stop ] && [ $n -lt 120 ]; do
  n=$((n+1))
  c=$(cat /sys/class/net/eth0/carrier 2>/dev/null)
  [ "$c" = "$carrier" ] || { carrier=$c; echo "CARRIER $c"; }
  if ping -c 1 -W 1 ${peer} >/dev/null 2>&1; then
    ok=$((ok+1)); echo "PING $n ok"; sleep 1
  else
    echo "PING $n lost"
  fi
done
echo "RESULT pings=$n"
echo "RESULT replies=$ok"
[ -e /tmp/stop ] || { echo "never told to stop"; exit 13; }
exit 0
`;
}

/** Sorts a guest's `PING n ok|lost` lines into the phase the test was in when it saw them. */
class PingLog {
  /** Current phase: 0 before the first kill, k after the k-th restart, -1 during an outage. */
  phase = -1;
  /** Replies seen per phase (index = phase). */
  readonly replies: number[] = new Array(KILLS + 1).fill(0);
  started = false;
  /** Set when the guest has exited: nothing more will come. */
  ended = false;
  /** The console so far, for failure messages while the guest still runs. */
  console = "";
  #partial = "";

  /** Feeds console text as it arrives. */
  feed(chunk: string): void {
    this.console += chunk;
    const lines = (this.#partial + chunk).replaceAll("\r", "").split("\n");
    this.#partial = lines.pop() ?? "";
    for (const line of lines) {
      if (line === "LOOP-START") {
        this.started = true;
        this.phase = 0;
      }
      // Replies seen while the daemon is down or restarting count for no phase.
      if (this.phase >= 0 && /^PING \d+ ok$/.test(line)) this.replies[this.phase]++;
    }
  }

  /** Waits until the current phase has seen {@link REPLIES_PER_PHASE} replies. */
  async awaitReplies(what: string, describe: () => string): Promise<void> {
    const end = Date.now() + PHASE_TIMEOUT_MS;
    const phase = this.phase;
    while (this.replies[phase] < REPLIES_PER_PHASE) {
      if (Date.now() > end || this.ended) {
        const why = this.ended ? "the guest has exited" : `not within ${PHASE_TIMEOUT_MS} ms`;
        throw new Error(
          `${what}: ${this.replies[phase]} of ${REPLIES_PER_PHASE} ping replies, ${why}\n` +
            describe(),
        );
      }
      await sleep(200);
    }
  }

  /** Waits for the guest's ping loop to start. */
  async awaitStart(describe: () => string): Promise<void> {
    const end = Date.now() + 300_000;
    while (!this.started) {
      if (Date.now() > end || this.ended) {
        throw new Error(`the guest never started pinging\n${describe()}`);
      }
      await sleep(200);
    }
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Runs `cmd` until it succeeds, up to `tries` times a second apart; returns its output. */
async function retry(tries: number, cmd: string, ...args: string[]): Promise<string> {
  for (let i = 1;; i++) {
    try {
      return await run(cmd, ...args);
    } catch (e) {
      if (i >= tries) throw e;
      await sleep(1000);
    }
  }
}

/** Kills `daemon` with SIGKILL and starts a new one with `args`; returns the new one. */
async function killAndRestart(daemon: DaemonProcess, args: string[]): Promise<DaemonProcess> {
  await daemon.stop("SIGKILL");
  // QEMU redials once a second; the new daemon takes over the stale socket.
  return await DaemonProcess.start(args);
}

Deno.test({
  name: "guest: vhostd net --tap is SIGKILLed and restarted twice; pings resume each time",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const tag = Math.random().toString(36).slice(2, 8);
    const ns = `vhostd-${tag}`;
    const tap = `vhr${tag}`;
    const dir = await Deno.makeTempDir({ prefix: "vhostd-net-restart-" });
    const sock = `${dir}/net.sock`;
    const hostAddr = "198.18.2.1";
    const guestAddr = "198.18.2.2";
    const args = ["net", "--socket", sock, "--tap", tap];
    const logs: string[] = [];
    const hostPings: string[] = [];
    const pings = new PingLog();
    await run("ip", "netns", "add", ns);
    let daemon: DaemonProcess | undefined;
    try {
      await run("ip", "-n", ns, "link", "set", "lo", "up");
      daemon = await DaemonProcess.start(args);
      await placeTap(tap, ns, hostAddr);
      let r: GuestResult | undefined;
      const describe = () =>
        `${r ? describeGuestRun(r) : `guest still running; console:\n${pings.console}`}\n` +
        `daemon logs:\n${[...logs, daemon?.stderr ?? ""].join("\n---\n")}`;
      const guest = runGuest({
        script: pingLoopScript(guestAddr, hostAddr, 5003),
        extraArgs: netDeviceArgs("n0", sock, "52:54:00:18:02:02", { reconnect: true }),
        timeoutMs: 600_000,
        onConsole: (text) => pings.feed(text),
      }).then((res) => (r = res)).finally(() => (pings.ended = true));
      let killerError: unknown;
      const killer = (async () => {
        await pings.awaitStart(describe);
        await pings.awaitReplies("before the first kill", describe);
        for (let k = 1; k <= KILLS; k++) {
          pings.phase = -1;
          const old = daemon!;
          daemon = await killAndRestart(old, args);
          logs.push(old.stderr);
          await placeTap(tap, ns, hostAddr);
          pings.phase = k;
          await pings.awaitReplies(`after restart ${k}`, describe);
          // And the other way: the namespace reaches the guest through the new daemon.
          hostPings.push(
            await retry(5, "ip", "netns", "exec", ns, "busybox", "ping", "-c", "2", guestAddr),
          );
        }
        // Release the guest's loop: a TCP connection from the namespace, through the last daemon.
        await retry(30, "ip", "netns", "exec", ns, "busybox", "nc", guestAddr, "5003");
      })().catch((e) => {
        killerError = e;
      });
      // Both settle before the clean-up below (the killer may be starting a daemon).
      for (const s of await Promise.allSettled([guest, killer])) {
        if (s.status === "rejected") throw s.reason;
      }
      if (killerError) throw killerError;
      assertGuestSuccess(r!);
      const res = parseResults(r!.console, "RESULT ");
      const all = `${describe()}\nhost pings:\n${hostPings.join("\n")}`;
      pings.replies.forEach((n, phase) =>
        assert.ok(n >= REPLIES_PER_PHASE, `phase ${phase}: ${n} replies\n${all}`)
      );
      for (const p of hostPings) assert.match(p, /\d+ packets received/, all);
      assert.ok(hostPings.every((p) => !/ 0 packets received/.test(p)), all);
      const carrier = [...r!.console.matchAll(/^CARRIER (\d)$/gm)].map((m) => m[1]);
      console.log(
        `net --tap: ${KILLS} restarts; replies per phase ${pings.replies.join("/")}; ` +
          `replies/pings in all ${res.replies}/${res.pings}; carrier changes seen by the guest: ` +
          `${carrier.join(",") || "none"}; ${Math.round(r!.durationMs / 1000)} s`,
      );
      // Every restarted daemon was dialled by QEMU.
      const allLogs = [...logs, daemon.stderr].join("\n");
      assert.ok((allLogs.match(/front-end connected/g) ?? []).length >= KILLS + 1, allLogs);
    } finally {
      const code = daemon ? await daemon.stop() : 0;
      await run("ip", "netns", "del", ns).catch(() => {});
      await Deno.remove(dir, { recursive: true }).catch(() => {});
      assert.equal(code, 0, `the last daemon stops cleanly\n${daemon?.stderr}`);
      assert.ok(!(await linkExists(tap)), `TAP ${tap} removed`);
    }
  },
});

Deno.test({
  name: "guest: vhostd switch is SIGKILLed and restarted twice; two guests' pings resume",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const tag = Math.random().toString(36).slice(2, 8);
    const ns = `vhostd-${tag}`;
    const tap = `vhu${tag}`;
    const dir = await Deno.makeTempDir({ prefix: "vhostd-switch-restart-" });
    const socks = [`${dir}/a.sock`, `${dir}/b.sock`];
    const addrs = ["198.18.3.1", "198.18.3.2"];
    const hostAddr = "198.18.3.254";
    const args = ["switch", "--socket", socks[0], "--socket", socks[1], "--uplink-tap", tap];
    const logs: string[] = [];
    const pings = [new PingLog(), new PingLog()];
    await run("ip", "netns", "add", ns);
    let daemon: DaemonProcess | undefined;
    try {
      await run("ip", "-n", ns, "link", "set", "lo", "up");
      daemon = await DaemonProcess.start(args);
      await placeTap(tap, ns, hostAddr);
      const results: (GuestResult | undefined)[] = [undefined, undefined];
      const describe = () =>
        results.map((r, i) =>
          `guest ${"AB"[i]}: ${r ? describeGuestRun(r) : `running; console:\n${pings[i].console}`}`
        )
          .join("\n\n") +
        `\ndaemon logs:\n${[...logs, daemon?.stderr ?? ""].join("\n---\n")}`;
      // A pings B and B pings A, each until the namespace connects to its port 5003.
      const guests = [0, 1].map((i) =>
        runGuest({
          script: pingLoopScript(addrs[i], addrs[1 - i], 5003),
          extraArgs: netDeviceArgs("n0", socks[i], `52:54:00:18:03:0${i + 1}`, { reconnect: true }),
          timeoutMs: 600_000,
          onConsole: (text) => pings[i].feed(text),
        }).then((res) => (results[i] = res)).finally(() => (pings[i].ended = true))
      );
      let killerError: unknown;
      const killer = (async () => {
        for (const p of pings) await p.awaitStart(describe);
        for (const p of pings) await p.awaitReplies("before the first kill", describe);
        for (let k = 1; k <= KILLS; k++) {
          for (const p of pings) p.phase = -1;
          const old = daemon!;
          daemon = await killAndRestart(old, args);
          logs.push(old.stderr);
          // The uplink TAP died with the old switch: place the new one (only for the stop).
          await placeTap(tap, ns, hostAddr);
          for (const p of pings) p.phase = k;
          for (const p of pings) await p.awaitReplies(`after restart ${k}`, describe);
        }
        for (const a of addrs) {
          await retry(30, "ip", "netns", "exec", ns, "busybox", "nc", a, "5003");
        }
      })().catch((e) => {
        killerError = e;
      });
      for (const s of await Promise.allSettled([...guests, killer])) {
        if (s.status === "rejected") throw s.reason;
      }
      if (killerError) throw killerError;
      const all = describe();
      const summary: string[] = [];
      results.forEach((r, i) => {
        assertGuestSuccess(r!);
        pings[i].replies.forEach((n, phase) =>
          assert.ok(
            n >= REPLIES_PER_PHASE,
            `guest ${"AB"[i]}, phase ${phase}: ${n} replies\n${all}`,
          )
        );
        const res = parseResults(r!.console, "RESULT ");
        summary.push(
          `${"AB"[i]}: replies per phase ${pings[i].replies.join("/")}, replies/pings in all ` +
            `${res.replies}/${res.pings}`,
        );
      });
      console.log(
        `switch: ${KILLS} restarts; ${summary.join("; ")}; ` +
          `${Math.round(Math.max(...results.map((r) => r!.durationMs)) / 1000)} s`,
      );
      const allLogs = [...logs, daemon.stderr].join("\n");
      assert.ok((allLogs.match(/front-end connected/g) ?? []).length >= 2 * (KILLS + 1), allLogs);
    } finally {
      const code = daemon ? await daemon.stop() : 0;
      await run("ip", "netns", "del", ns).catch(() => {});
      await Deno.remove(dir, { recursive: true }).catch(() => {});
      assert.equal(code, 0, `the last switch stops cleanly\n${daemon?.stderr}`);
      assert.ok(!(await linkExists(tap)), `TAP ${tap} removed`);
    }
  },
});
