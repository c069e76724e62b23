/**
 * A receive-style device written only against the public API (tests/helpers/loopback_device.ts,
 * which imports nothing but mod.ts), served by vhostd in its own process and driven by the
 * project's front-end library, also reached only through mod.ts. The device holds messages until
 * the driver posts receive buffers and buffers until messages come; these tests show each of the
 * Virtqueue operations such a device needs doing what the driver can observe.
 */

import assert from "node:assert/strict";
import { frontend } from "../mod.ts";

const DEVICE = new URL("./helpers/loopback_device.ts", import.meta.url).pathname;
const RX = 0;
const TX = 1;
const QUEUE_SIZE = 16;
const enc = new TextEncoder();
const dec = new TextDecoder();

/** The driver side of the loopback device: its two queues in one guest RAM. */
interface Driver {
  ram: frontend.GuestRam;
  rx: frontend.DriverQueue;
  tx: frontend.DriverQueue;
}

/** Serves the loopback device on a fresh socket and sets up both queues with EVENT_IDX. */
async function withDevice(fn: (d: Driver) => void): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-rxdev-" });
  const sock = `${dir}/loopback.sock`;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", DEVICE, "--socket", sock],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const output = child.output();
  let conn: frontend.FrontendConnection | null = null;
  let ram: frontend.GuestRam | null = null;
  try {
    conn = await frontend.FrontendConnection.connect(sock, { retryMs: 30_000 });
    ram = frontend.GuestRam.create();
    const { bit, ProtocolFeature, VirtioFeature } = frontend;
    const offered = conn.getFeatures();
    assert.notEqual(offered & bit(VirtioFeature.RING_EVENT_IDX), 0n, "EVENT_IDX offered");
    conn.setProtocolFeatures(conn.getProtocolFeatures() & bit(ProtocolFeature.REPLY_ACK));
    conn.setOwner();
    conn.setFeatures(
      offered & (bit(VirtioFeature.VERSION_1) | bit(VirtioFeature.PROTOCOL_FEATURES) |
        bit(VirtioFeature.RING_EVENT_IDX)),
    );
    conn.setMemTable([...ram.regions], ram.fds);
    const queues = [RX, TX].map((i) => {
      const q = frontend.DriverQueue.create(ram!, i, QUEUE_SIZE);
      q.eventIdx = true;
      conn!.setVringNum(i, QUEUE_SIZE);
      conn!.setVringBase(i, 0);
      conn!.setVringAddr(q.vringAddr());
      conn!.setVringCall(i, q.layout.callFd);
      conn!.setVringKick(i, q.layout.kickFd);
      conn!.setVringEnable(i, true);
      return q;
    });
    conn.sync();
    // SET_VRING_CALL fires the call fd once (an interrupt lost while no back-end was there would
    // hang a driver): clear it, so that a call means the device completed something.
    for (const q of queues) q.waitCall(0);
    fn({ ram, rx: queues[0], tx: queues[1] });
  } finally {
    conn?.close();
    ram?.close();
    child.kill("SIGTERM");
    const out = await output;
    const stderr = dec.decode(out.stderr);
    await Deno.remove(dir, { recursive: true });
    assert.equal(out.code, 0, stderr);
    assert.doesNotMatch(stderr, /TypeError|RangeError|uncaught/i);
  }
}

/** Sends `messages` on the transmit queue in one publish and waits until the device took all. */
function send(d: Driver, ...messages: string[]): void {
  for (const m of messages) {
    const bytes = enc.encode(m);
    const b = d.ram.alloc(bytes.length, 16);
    d.ram.u8.set(bytes, b.offset);
    assert.ok(d.tx.add([{ gpa: b.gpa, length: bytes.length, writable: false }]) >= 0);
  }
  d.tx.publish();
  d.tx.kick();
  for (let i = 0; i < messages.length; i++) d.tx.waitUsed(10_000);
}

/** Posts receive buffers of the given sizes in one publish; returns them by head. */
function post(d: Driver, ...sizes: number[]): Map<number, frontend.GuestBuffer> {
  const byHead = new Map<number, frontend.GuestBuffer>();
  for (const size of sizes) {
    const b = d.ram.alloc(size, 16);
    const head = d.rx.add([{ gpa: b.gpa, length: size, writable: true }]);
    assert.ok(head >= 0);
    byHead.set(head, b);
  }
  d.rx.publish();
  d.rx.kick();
  return byHead;
}

/** Reclaims the next filled receive buffer: its head and text. */
function receive(d: Driver, buffers: Map<number, frontend.GuestBuffer>): [number, string] {
  const head = d.rx.waitUsed(10_000);
  const b = buffers.get(head)!;
  return [head, dec.decode(d.ram.u8.subarray(b.offset, b.offset + d.rx.lastLen))];
}

Deno.test("a device written against mod.ts alone holds messages until buffers come, then completes them as one batch", async () => {
  await withDevice((d) => {
    // Ten messages and no buffers: the device takes them four at a time (yielding in between
    // through kickSelf) and holds them.
    const messages = Array.from({ length: 10 }, (_, i) => `message ${i}`);
    send(d, ...messages);
    assert.equal(d.rx.waitCall(300), false, "nothing to fill yet");
    assert.equal(d.rx.usedIdx, 0);
    // Ten buffers in one kick: all ten become visible to the driver at once.
    const buffers = post(d, ...messages.map(() => 64));
    assert.equal(d.rx.waitCall(10_000), true, "interrupted once the buffers are filled");
    assert.equal(d.rx.usedIdx, 10, "the used index moved once, by the whole round");
    for (const m of messages) assert.equal(receive(d, buffers)[1], m);
  });
});

Deno.test("a device written against mod.ts waits for buffers with the kick re-armed, and gives back one too small", async () => {
  await withDevice((d) => {
    // With EVENT_IDX the driver kicks only past the index the device last asked for: the device
    // re-armed at the right place, or these buffers would never be filled.
    send(d, "first");
    const early = post(d, 64);
    assert.deepEqual(receive(d, early)[1], "first");
    send(d, "second", "third");
    const later = post(d, 64);
    assert.equal(receive(d, later)[1], "second");
    const last = post(d, 64);
    assert.equal(receive(d, last)[1], "third");

    // A buffer too small for the next message goes back to the ring untouched (the message is
    // dropped); the next message that fits lands in that same buffer.
    const small = post(d, 4);
    const [smallHead] = small.keys();
    const before = d.rx.usedIdx;
    send(d, "much too long for four bytes");
    // Time for the device to (wrongly) complete it. Not "no interrupt": a late interrupt for an
    // earlier buffer may still arrive.
    d.rx.waitCall(300);
    assert.equal(d.rx.usedIdx, before, "the small buffer was not completed");
    send(d, "fit");
    assert.deepEqual(receive(d, small), [smallHead, "fit"]);
    assert.equal(d.rx.usedIdx, (before + 1) & 0xffff);
  });
});
