/**
 * `vhostd switch` against hostile guests and through migrations, with the project's front-end
 * playing two or three guests' virtio-net drivers over the real vhost-user protocol: frames go
 * into their transmit rings and come out of the others' receive rings.
 *
 * - A guest cannot take over another guest's address; spoofed frames are dropped, counted and
 *   logged within a rate limit.
 * - A guest sending from thousands of addresses fills only its own quota: a guest that arrives
 *   later is learned, and unicast to it is not flooded.
 * - Headers are rebuilt between ports (no DATA_VALID, GSO fields or stray flags pass).
 * - Flooding is rate-limited per port; unicast is not.
 * - Migration between two ports of one switch: the source port's stop releases its address, the
 *   destination takes it with SEND_RARP (the RARP reaches the other ports) or its first frame;
 *   with configured addresses only the live port may use one.
 */

import assert from "node:assert/strict";
import { DaemonProcess, runVhostd, withDir } from "./helpers/daemon.ts";
import {
  BROADCAST,
  mac,
  partialUdp,
  readUntil,
  tagged,
  tagOf,
  tags,
  udpChecksumValid,
} from "./helpers/switch.ts";
import { NetDriver, type NetDriverOptions } from "../vhost-user/frontend/net_driver.ts";
import { DATA_VALID, NEEDS_CSUM, NetFeature } from "../devices/net/header.ts";
import { ETHERTYPE_RARP } from "../devices/net/rarp.ts";
import { LOG_BURST } from "../devices/net/throttled_log.ts";
import type { PortCounters } from "../devices/net/switch.ts";

/** A running switch with its sockets. */
interface SwitchCtx {
  d: DaemonProcess;
  socks: string[];
  /** Connects a guest driver to port `p`. */
  connect(p: number, options?: NetDriverOptions): Promise<NetDriver>;
}

/**
 * Starts `vhostd switch` with `ports` ports and `args`, runs `fn`, closes every driver it
 * connected, stops the daemon (which must exit 0) and returns the port counters it logged at
 * shutdown.
 */
async function withSwitch(
  ports: number,
  args: string[],
  fn: (ctx: SwitchCtx) => Promise<void>,
): Promise<{ ports: (PortCounters | null)[]; stderr: string }> {
  let result: { ports: (PortCounters | null)[]; stderr: string } | null = null;
  await withDir("vhostd-switchguard-", async (dir) => {
    const socks = Array.from({ length: ports }, (_, i) => `${dir}/p${i}.sock`);
    const d = await DaemonProcess.start([
      "switch",
      ...socks.flatMap((s) => ["--socket", s]),
      ...args,
    ]);
    const drivers: NetDriver[] = [];
    try {
      await fn({
        d,
        socks,
        async connect(p, options) {
          const drv = await NetDriver.connect(socks[p], options);
          drivers.push(drv);
          return drv;
        },
      });
    } finally {
      for (const drv of drivers) drv.close();
      assert.equal(await d.stop(), 0, d.stderr);
    }
    const m = /shutting down: ports (\[.*\]); uplink/.exec(d.stderr);
    assert.ok(m, `the shutdown counters in\n${d.stderr}`);
    result = { ports: JSON.parse(m[1]), stderr: d.stderr };
  });
  return result!;
}

/**
 * The ports of a migration: the source VM (port 0) has sent from `m` (and every port has seen
 * it), the destination (port 1) runs the same guest's copy, and a peer (port 2) talks to it.
 */
async function migrationPorts(
  connect: SwitchCtx["connect"],
  m: Uint8Array,
): Promise<{ src: NetDriver; dst: NetDriver; peer: NetDriver }> {
  const src = await connect(0);
  const dst = await connect(1);
  const peer = await connect(2);
  src.send(tagged(BROADCAST, m, "src-hello"));
  readUntil(peer, "src-hello");
  readUntil(dst, "src-hello");
  return { src, dst, peer };
}

/** Lines of `text` matching `re`. */
function count(text: string, re: RegExp): number {
  return text.split("\n").filter((l) => re.test(l)).length;
}

Deno.test({
  name:
    "switch: a guest sending from another guest's address neither steals its traffic nor is forwarded",
  sanitizeResources: false,
  async fn() {
    const out = await withSwitch(3, [], async ({ connect }) => {
      const [a, b, c] = [await connect(0), await connect(1), await connect(2)];
      a.send(tagged(BROADCAST, mac(1), "hello-a"));
      assert.deepEqual(tags(readUntil(b, "hello-a")), []);
      assert.deepEqual(tags(readUntil(c, "hello-a")), []);
      // Port 2 poses as port 0's guest: to everyone, and straight to port 1.
      c.send(tagged(BROADCAST, mac(1), "spoof-bcast"));
      for (let i = 0; i < 50; i++) c.send(tagged(mac(2), mac(1), `spoof-${i}`));
      b.send(tagged(mac(1), mac(2), "for-a"));
      b.send(tagged(BROADCAST, mac(2), "barrier"));
      assert.deepEqual(tags(readUntil(a, "barrier")), ["for-a"], "port 0 keeps its traffic");
      assert.deepEqual(tags(readUntil(c, "barrier")), [], "the spoofer gets none of it");
      c.send(tagged(BROADCAST, mac(3), "c-own"));
      assert.deepEqual(tags(readUntil(b, "c-own")), [], "no spoofed frame reached port 1");
    });
    assert.equal(out.ports[2]!.spoofDropped, 51);
    assert.equal(out.ports[0]!.spoofDropped, 0);
    const warned = count(
      out.stderr,
      /port 2 sent a frame from 52:54:00:00:00:01, which port 0 holds/,
    );
    assert.ok(warned >= 1 && warned <= LOG_BURST, `${warned} warnings for 51 spoofed frames`);
    assert.match(out.stderr, /more such lines were not logged|port 2 sent a frame/);
  },
});

Deno.test({
  name:
    "switch: 5,000 random source addresses fill only the sender's quota; a later guest is learned",
  sanitizeResources: false,
  async fn() {
    const out = await withSwitch(3, [], async ({ connect }) => {
      const a = await connect(0);
      const c = await connect(2);
      c.send(tagged(BROADCAST, mac(3), "hello-c"));
      assert.deepEqual(tags(readUntil(a, "hello-c")), []);
      // Each to port 2's own address: nothing leaves port 2, only the table sees them.
      const spray: Uint8Array[] = [];
      for (let i = 0; i < 5000; i++) {
        const src = new Uint8Array([0x02, 0xee, (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff, 7]);
        spray.push(tagged(mac(3), src, `spray-${i}`));
      }
      c.send(spray);
      // A guest arriving now is learned, and unicast to it reaches it alone.
      const b = await connect(1);
      b.send(tagged(BROADCAST, mac(2), "hello-b"));
      assert.deepEqual(tags(readUntil(a, "hello-b")), []);
      assert.deepEqual(tags(readUntil(c, "hello-b")), []);
      a.send(tagged(mac(2), mac(1), "for-b"));
      a.send(tagged(BROADCAST, mac(1), "barrier"));
      assert.deepEqual(tags(readUntil(b, "barrier")), ["for-b"]);
      assert.deepEqual(tags(readUntil(c, "barrier")), [], "unicast to port 1 was not flooded");
      // Port 2's own first address still works.
      b.send(tagged(mac(3), mac(2), "for-c"));
      b.send(tagged(BROADCAST, mac(2), "barrier-2"));
      assert.deepEqual(tags(readUntil(c, "barrier-2")), ["for-c"]);
      assert.deepEqual(tags(readUntil(a, "barrier-2")), []);
    });
    assert.equal(out.ports[2]!.limitDropped, 5000 - 63, "64 addresses: hello-c's and 63 more");
    const warned = count(out.stderr, /port 2 sent a frame from .*beyond its limit of 64/);
    assert.ok(warned >= 1 && warned <= LOG_BURST, `${warned} warnings for 4937 frames`);
  },
});

Deno.test({
  name: "switch: receivers get only the header the switch vouches for",
  sanitizeResources: false,
  async fn() {
    const out = await withSwitch(3, [], async ({ connect }) => {
      const a = await connect(0); // CSUM and GUEST_CSUM
      const b = await connect(1); // GUEST_CSUM
      const c = await connect(2, { csum: false, guestCsum: false });
      assert.ok(a.has(NetFeature.CSUM) && b.has(NetFeature.GUEST_CSUM));
      assert.ok(!c.has(NetFeature.CSUM) && !c.has(NetFeature.GUEST_CSUM));
      b.send(tagged(BROADCAST, mac(2), "hello-b"));
      readUntil(a, "hello-b");
      readUntil(c, "hello-b");

      // No checksum claimed: whatever else the sender wrote goes nowhere.
      const junk = {
        flags: DATA_VALID | 4,
        hdrLen: 54,
        gsoSize: 1400,
        csumStart: 34,
        csumOffset: 6,
      };
      a.send(tagged(mac(2), mac(1), "junk"), { ...junk, numBuffers: 9 });
      a.send(tagged(BROADCAST, mac(1), "junk-end"));
      const [plain] = readUntil(b, "junk-end");
      assert.deepEqual(tags(readUntil(c, "junk-end")), []);
      assert.equal(tagOf(plain.frame), "junk");
      assert.deepEqual(plain.header, {
        flags: 0,
        gsoType: 0,
        hdrLen: 0,
        gsoSize: 0,
        csumStart: 0,
        csumOffset: 0,
        numBuffers: 1,
      });

      // A partial checksum: passed on to a guest that takes one, completed for one that does not.
      const udp = partialUdp(BROADCAST, mac(1), new TextEncoder().encode("partial checksum"));
      a.send(udp, { ...junk, flags: NEEDS_CSUM | DATA_VALID | 4 });
      a.send(tagged(BROADCAST, mac(1), "udp-end"));
      const [toB, ...moreB] = readUntil(b, "udp-end");
      assert.equal(moreB.length, 0);
      assert.deepEqual(toB.header, {
        flags: NEEDS_CSUM,
        gsoType: 0,
        hdrLen: 0,
        gsoSize: 0,
        csumStart: 34,
        csumOffset: 6,
        numBuffers: 1,
      });
      assert.deepEqual(toB.frame, udp, "the frame itself is untouched");
      const [toC, ...moreC] = readUntil(c, "udp-end");
      assert.equal(moreC.length, 0);
      assert.equal(toC.header.flags, 0);
      assert.equal(toC.header.csumStart + toC.header.csumOffset + toC.header.hdrLen, 0);
      assert.ok(udpChecksumValid(toC.frame), "the switch completed the checksum for port 2");

      // A partial checksum from a guest that did not negotiate CSUM, or claiming GSO: dropped.
      c.send(partialUdp(BROADCAST, mac(3), new Uint8Array(4)), {
        flags: NEEDS_CSUM,
        csumStart: 34,
        csumOffset: 6,
      });
      a.send(tagged(BROADCAST, mac(1), "gso"), { gsoType: 1, gsoSize: 1400, hdrLen: 54 });
      c.send(tagged(BROADCAST, mac(3), "end"));
      assert.deepEqual(tags(readUntil(b, "end")), []);
    });
    assert.equal(out.ports[2]!.txDropped, 1, "port 2's undeclared partial checksum");
    assert.equal(out.ports[0]!.txDropped, 1, "port 0's GSO frame");
    assert.equal(out.ports[2]!.csumCompleted, 1);
  },
});

Deno.test({
  name: "switch: --flood-rate limits a port's broadcasts; unicast and other ports are not held up",
  sanitizeResources: false,
  async fn() {
    const RATE = 20;
    const SENT = 200;
    let delivered = 0;
    const out = await withSwitch(3, ["--flood-rate", String(RATE)], async ({ connect }) => {
      const [a, b, c] = [await connect(0), await connect(1), await connect(2)];
      b.send(tagged(BROADCAST, mac(2), "hello-b"));
      readUntil(a, "hello-b");
      readUntil(c, "hello-b");
      const storm = Array.from({ length: SENT }, (_, i) => tagged(BROADCAST, mac(1), `storm-${i}`));
      const t0 = performance.now();
      a.send(storm);
      const elapsedS = (performance.now() - t0) / 1000;
      // Unicast to a known address is not flooding: all of it goes through at once.
      for (let i = 0; i < 50; i++) a.send(tagged(mac(2), mac(1), `uni-${i}`));
      a.send(tagged(mac(2), mac(1), "barrier"));
      const got = tags(readUntil(b, "barrier"));
      const storms = got.filter((t) => t.startsWith("storm-"));
      delivered = storms.length;
      assert.equal(got.filter((t) => t.startsWith("uni-")).length, 50);
      // The burst, plus what the rate refilled while the storm was sent (the bound grows with
      // a slow machine, never shrinks).
      assert.ok(delivered >= RATE, `at least the burst: ${delivered}`);
      assert.ok(
        delivered <= RATE + Math.ceil(RATE * (elapsedS + 0.5)),
        `${delivered} of ${SENT} broadcasts in ${elapsedS.toFixed(2)} s at ${RATE}/s`,
      );
      // Another port's budget is its own.
      c.send(tagged(BROADCAST, mac(3), "c-bcast"));
      assert.ok(tags(readUntil(b, "c-bcast")).length === 0);
    });
    assert.equal(out.ports[0]!.floodDropped, SENT - delivered);
    assert.equal(out.ports[2]!.floodDropped, 0);
  },
});

Deno.test({
  name:
    "switch: migration between ports: the destination cannot use the address until the source stops",
  sanitizeResources: false,
  async fn() {
    const M = mac(0x10);
    const out = await withSwitch(3, [], async ({ connect }) => {
      const { src, dst, peer } = await migrationPorts(connect, M);
      // The destination's guest runs too early (or is hostile): it cannot use the address yet.
      dst.send(tagged(BROADCAST, M, "dst-too-early"));
      peer.send(tagged(M, mac(3), "to-m-1"));
      peer.send(tagged(BROADCAST, mac(3), "barrier-1"));
      assert.deepEqual(tags(readUntil(src, "barrier-1")), ["to-m-1"]);
      assert.deepEqual(tags(readUntil(dst, "barrier-1")), []);
      // The source's rings stop (QEMU, at the end of the migration): its first frame moves it.
      src.stop();
      dst.send(tagged(BROADCAST, M, "dst-first"));
      peer.send(tagged(M, mac(3), "to-m-2"));
      peer.send(tagged(BROADCAST, mac(3), "barrier-2"));
      assert.deepEqual(tags(readUntil(dst, "barrier-2")), ["to-m-2"]);
      assert.deepEqual(tags(readUntil(peer, "dst-first")), [], "dst-first itself went out");
    });
    assert.equal(out.ports[1]!.spoofDropped, 1, "dst-too-early");
  },
});

Deno.test({
  name: "switch: SEND_RARP after a migration announces the address everywhere and moves it",
  sanitizeResources: false,
  async fn() {
    const M = mac(0x10);
    const out = await withSwitch(3, [], async ({ connect }) => {
      const { src, dst, peer } = await migrationPorts(connect, M);
      // Migration: the source's rings stop, then QEMU announces on the destination.
      src.stop();
      dst.announce(M);
      peer.send(tagged(BROADCAST, mac(3), "barrier-1"));
      assert.deepEqual(tags(readUntil(dst, "barrier-1")), [], "not its own announcement");
      dst.send(tagged(BROADCAST, mac(0x12), "after-rarp"));
      const got = readUntil(peer, "after-rarp");
      assert.equal(got.length, 1, "the announcement reached port 2");
      const f = got[0].frame;
      assert.deepEqual(f.subarray(0, 6), BROADCAST);
      assert.deepEqual(f.subarray(6, 12), M);
      assert.equal((f[12] << 8) | f[13], ETHERTYPE_RARP);
      assert.equal(f.length, 60);
      peer.send(tagged(M, mac(3), "to-m"));
      peer.send(tagged(BROADCAST, mac(3), "barrier-2"));
      assert.deepEqual(tags(readUntil(dst, "barrier-2")), ["to-m"], "unicast to M follows it");

      // The source resumes (a failed migration): the destination, live, keeps the address.
      src.start();
      src.send(tagged(BROADCAST, M, "src-again"));
      peer.send(tagged(M, mac(3), "to-m-again"));
      peer.send(tagged(BROADCAST, mac(3), "barrier-3"));
      assert.deepEqual(tags(readUntil(dst, "barrier-3")), ["to-m-again"]);
      assert.deepEqual(tags(readUntil(src, "barrier-3")), []);

      // A stopped port's announcement is ignored: it must not take an address from a live one.
      src.stop();
      src.announce(mac(0x11));
      dst.send(tagged(BROADCAST, M, "barrier-4"));
      assert.deepEqual(tags(readUntil(peer, "barrier-4")), [], "no RARP from the stopped port");
      // Guests that can announce themselves are offered VIRTIO_NET_F_GUEST_ANNOUNCE (bit 21).
      assert.notEqual(peer.conn.getFeatures() & (1n << 21n), 0n, "GUEST_ANNOUNCE offered");
    });
    assert.equal(out.ports[1]!.announces, 1);
    assert.equal(out.ports[0]!.spoofDropped, 1, "src-again");
    assert.match(out.stderr, /port 0 is not running: announcement ignored/);
  },
});

Deno.test({
  name:
    "switch: --port-mac: a configured address is only ever used by a live port configured with it",
  sanitizeResources: false,
  async fn() {
    const M = "52:54:00:00:00:20";
    const m = mac(0x20);
    const out = await withSwitch(
      3,
      ["--port-mac", `0=${M}`, "--port-mac", `1=${M}`],
      async ({ connect }) => {
        const src = await connect(0);
        const dst = await connect(1); // goes live while port 0 holds the address
        const peer = await connect(2);
        // Port 0 took its address when it went live: unicast reaches it before it sent anything.
        peer.send(tagged(m, mac(3), "to-m-1"));
        dst.send(tagged(BROADCAST, m, "dst-early"));
        peer.send(tagged(BROADCAST, m, "peer-poses"));
        src.send(tagged(BROADCAST, mac(0x21), "src-other-address"));
        peer.send(tagged(BROADCAST, mac(3), "barrier-1"));
        assert.deepEqual(tags(readUntil(src, "barrier-1")), ["to-m-1"]);
        assert.deepEqual(tags(readUntil(dst, "barrier-1")), []);

        src.stop();
        // No live port holds the address now; still, an unconfigured port may not use it.
        peer.send(tagged(BROADCAST, m, "peer-poses-again"));
        dst.send(tagged(BROADCAST, m, "dst-first"));
        peer.send(tagged(m, mac(3), "to-m-2"));
        peer.send(tagged(BROADCAST, mac(3), "barrier-2"));
        assert.deepEqual(tags(readUntil(dst, "barrier-2")), ["to-m-2"]);
      },
    );
    assert.equal(out.ports[1]!.spoofDropped, 1, "dst-early");
    assert.equal(out.ports[2]!.spoofDropped, 2, "peer-poses, peer-poses-again");
    assert.equal(out.ports[0]!.spoofDropped, 1, "src-other-address");
    assert.match(out.stderr, /port 1 went live, but port 0 still holds 52:54:00:00:00:20/);
    assert.match(
      out.stderr,
      /port 2 sent a frame from 52:54:00:00:00:20, which is not its address \(the address is configured for port 0, 1\)/,
    );
  },
});

Deno.test("switch: bad --port-mac, --max-macs and --flood-rate values are one line and exit 2", async () => {
  const cases: [string[], RegExp][] = [
    [["--port-mac", "2=52:54:00:00:00:01"], /--port-mac 2=52:54:00:00:00:01: there is no port 2/],
    [["--port-mac", "0=01:00:5e:00:00:01"], /01:00:5e:00:00:01 is not a unicast address/],
    [["--port-mac", "0=52:54:00:00:01"], /"52:54:00:00:01" is not a MAC address/],
    [["--port-mac", "52:54:00:00:00:01"], /--port-mac takes PORT=MAC/],
    [["--max-macs", "0"], /--max-macs must be a whole number from 1 to 4096, not "0"/],
    [["--flood-rate", "2000000"], /--flood-rate must be a whole number from 0 to 1000000/],
  ];
  for (const [args, re] of cases) {
    const r = await runVhostd([
      "switch",
      "--socket",
      "/tmp/x0.sock",
      "--socket",
      "/tmp/x1.sock",
      ...args,
    ]);
    assert.equal(r.code, 2, r.stderr);
    assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
    assert.match(r.stderr, re);
  }
});
