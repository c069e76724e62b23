/**
 * Live migration of a guest with a vhostd NIC: a peer in a network namespace pings the guest ten
 * times a second while it migrates between two QEMU 7.2 processes, and the test counts the pings
 * lost across the move.
 *
 * - `switch`: the destination QEMU is on another port of the same switch; the peer sits behind
 *   the switch's uplink TAP. The source port lets go of the guest's address when its guest stops,
 *   and the destination takes it with the guest's announcement: its own gratuitous ARP when it
 *   acks VIRTIO_NET_F_GUEST_ANNOUNCE, or the RARP vhostd sends on QEMU's SEND_RARP when it
 *   does not (`guest_announce=off`).
 * - `net --tap`: source and destination daemons run the same command line on the same host and
 *   TAP; each attaches its TAP queues only while its guest runs, so the kernel hands frames to
 *   whichever side has the guest.
 *
 * Under TCG, QEMU 7.2 needs `vectors=0` on virtio-net-pci. Addresses are in 198.18.0.0/15 and
 * traffic stays in the test's namespace.
 *
 * @module
 */

import assert from "node:assert/strict";
import { DaemonProcess, withDir } from "./helpers/daemon.ts";
import {
  awaitReachable,
  netDeviceArgs,
  Pinger,
  run,
  stopGuest,
  withNamespace,
} from "./helpers/net.ts";
import { Vm } from "./guest/vm.ts";

/** Pings lost across a migration, at most (ten a second: two seconds' worth). */
const MAX_LOST = 20;

/** The guest: address eth0, show the acked features, answer pings until told to stop. */
function guestScript(addr: string): string {
  return `
ip link set eth0 up || exit 10
ip addr add ${addr}/24 dev eth0 || exit 11
echo "FEATURES $(cat /sys/class/net/eth0/device/features)"
(nc -l -p 7000 >/dev/null; touch /tmp/stop) &
echo NET-READY
while [ ! -f /tmp/stop ]; do sleep 1; done
echo "RESULT stopped=1"
`;
}

interface NetRun {
  /** Pings sent and answered while the guest migrated. */
  sent: number;
  received: number;
  /** The guest's acked features (a string of 0/1 by bit). */
  features: string;
  /** Every daemon's log. */
  logs: string;
}

/**
 * Boots a guest on `srcArgs`' NIC, starts pinging it from `ns`, migrates it to a QEMU on
 * `dstArgs`' NIC, and stops the guest a few seconds after.
 */
async function pingThroughMigration(
  dir: string,
  ns: string,
  guestAddr: string,
  srcNic: string[],
  dstNic: () => Promise<string[]>,
  logs: () => string,
): Promise<NetRun> {
  const vms: Vm[] = [];
  const base = { dir, script: guestScript(guestAddr), memoryMiB: 384 };
  try {
    const src = await Vm.start({ ...base, name: "src", extraArgs: srcNic });
    vms.push(src);
    await src.waitConsole(/^NET-READY/m, 240_000);
    await awaitReachable(ns, guestAddr);
    const features = src.console().match(/^FEATURES (\d+)/m)?.[1] ?? "";
    const pinger = new Pinger(ns, guestAddr);
    await new Promise((r) => setTimeout(r, 2000));
    const uri = `unix:${dir}/mig`;
    const dst = await Vm.start({
      ...base,
      name: "dst",
      extraArgs: await dstNic(),
      incoming: uri,
      initrdPath: src.initrd,
    });
    vms.push(dst);
    await src.startMigration(uri, 256 * 1024 * 1024, 300);
    const info = await src.waitMigration();
    assert.equal(info.status, "completed", JSON.stringify(info));
    await src.quit();
    await new Promise((r) => setTimeout(r, 5000));
    const pings = await pinger.stop();
    await stopGuest(ns, guestAddr);
    const exit = await dst.exited;
    assert.equal(exit.code, 0, exit.stderr);
    assert.match(dst.console(), /RESULT stopped=1/);
    return { sent: pings.sent, received: pings.received, features, logs: logs() };
  } catch (e) {
    for (const v of vms) (e as Error).message += `\n--- ${v.options.name} ---\n${v.console()}`;
    (e as Error).message += `\n--- daemons ---\n${logs()}`;
    throw e;
  } finally {
    for (const v of vms) await v.kill();
  }
}

function assertFewLost(r: NetRun, what: string): void {
  const lost = r.sent - r.received;
  console.log(`${what}: ${r.sent} pings, ${lost} lost across the migration`);
  assert.ok(r.sent >= 50, `the peer pinged throughout (${r.sent} sent)`);
  assert.ok(lost <= MAX_LOST, `${lost} pings lost (at most ${MAX_LOST})\n${r.logs}`);
}

/** Bit `n` of the guest's feature string (sysfs writes bit 0 first). */
function acked(features: string, n: number): boolean {
  return features[n] === "1";
}

const GUEST_ANNOUNCE = 21;

for (const announce of [true, false]) {
  Deno.test({
    name: `migration over vhostd switch (${
      announce ? "the guest announces itself" : "guest_announce=off: SEND_RARP"
    }): the peer reaches the guest again at once`,
    sanitizeResources: false,
    sanitizeOps: false,
    async fn() {
      await withDir("vhostd-migsw-", async (dir) => {
        await withNamespace("vmsw", async (ns) => {
          const uplink = `vmup${Deno.pid % 10000}`;
          const sw = await DaemonProcess.start([
            "switch",
            "--socket",
            `${dir}/p0.sock`,
            "--socket",
            `${dir}/p1.sock`,
            "--uplink-tap",
            uplink,
          ]);
          try {
            await run("ip", "link", "set", uplink, "netns", ns);
            await run("ip", "-n", ns, "addr", "add", "198.18.70.1/24", "dev", uplink);
            await run("ip", "-n", ns, "link", "set", uplink, "up");
            const mac = "52:54:00:70:00:02";
            const nic = (sock: string) => {
              const args = netDeviceArgs("n0", sock, mac);
              if (!announce) args[args.length - 1] += ",guest_announce=off";
              return args;
            };
            const r = await pingThroughMigration(
              dir,
              ns,
              "198.18.70.2",
              nic(`${dir}/p0.sock`),
              () => Promise.resolve(nic(`${dir}/p1.sock`)),
              () => sw.stderr,
            );
            assert.equal(acked(r.features, GUEST_ANNOUNCE), announce, `features ${r.features}`);
            assertFewLost(r, `switch, announce ${announce ? "by the guest" : "by SEND_RARP"}`);
            if (!announce) assert.match(r.logs, /announce/i, "SEND_RARP reached the switch");
          } finally {
            await sw.stop();
          }
        });
      });
    },
  });
}

Deno.test({
  name:
    "migration over vhostd net --tap: a second daemon on the same TAP takes the guest's traffic",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    await withDir("vhostd-migtap-", async (dir) => {
      await withNamespace("vmtap", async (ns) => {
        const tap = `vmtp${Deno.pid % 10000}`;
        const inNs = ["ip", "netns", "exec", ns];
        const daemons: DaemonProcess[] = [];
        const logs = () => daemons.map((d) => d.stderr).join("\n---\n");
        try {
          // Both daemons run the same command line in the peer's namespace, where the TAP is.
          daemons.push(
            await DaemonProcess.startUnder(inNs, [
              "net",
              "--socket",
              `${dir}/a.sock`,
              "--tap",
              tap,
            ]),
          );
          await run("ip", "-n", ns, "addr", "add", "198.18.71.1/24", "dev", tap);
          await run("ip", "-n", ns, "link", "set", tap, "up");
          const mac = "52:54:00:71:00:02";
          const r = await pingThroughMigration(
            dir,
            ns,
            "198.18.71.2",
            netDeviceArgs("n0", `${dir}/a.sock`, mac),
            async () => {
              daemons.push(
                await DaemonProcess.startUnder(inNs, [
                  "net",
                  "--socket",
                  `${dir}/b.sock`,
                  "--tap",
                  tap,
                ]),
              );
              return netDeviceArgs("n0", `${dir}/b.sock`, mac);
            },
            logs,
          );
          assertFewLost(r, "net --tap");
        } finally {
          for (const d of daemons) await d.stop();
        }
      });
    });
  },
});
