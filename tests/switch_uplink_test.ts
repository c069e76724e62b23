/**
 * The switch's uplink port, from the wire's side: headers are rebuilt between the uplink and
 * the guests both ways (nothing but a partial checksum passes), and an address a guest port holds
 * cannot be taken back by the uplink.
 *
 * The switch runs in this process's worker, as `vhostd switch` runs it, with guests played by the
 * project's front-end. The uplink fd is one end of a SOCK_SEQPACKET socket pair standing in for
 * the TAP (the switch reads and writes it exactly as a TAP fd: one frame, 12-byte header first,
 * per read or write): the kernel cannot be made to hand a TAP reader a header with DATA_VALID or
 * stray fields on demand, and what the switch writes to a TAP is consumed by the kernel unseen.
 */

import assert from "node:assert/strict";
import { withDir } from "./helpers/daemon.ts";
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
import { DeviceService } from "../daemon/service.ts";
import type { NetSwitchOptions } from "../devices/net/switch.ts";
import { DATA_VALID, NEEDS_CSUM, NET_HDR_SIZE } from "../devices/net/header.ts";
import { Epoll } from "../sys/event.ts";
import { closeQuietly } from "../sys/libc.ts";
import { SOCK_NONBLOCK, SOCK_SEQPACKET } from "../sys/socket.ts";
import { createSocketPair } from "./helpers/fds.ts";
import { readFrame, writeFrame } from "../sys/tap.ts";
import {
  decodeNetHeader,
  encodeNetHeader,
  NetDriver,
  type NetHeader,
} from "../vhost-user/frontend/net_driver.ts";

/** The wire end of the uplink: frames in and out with their 12-byte headers. */
class Wire {
  readonly fd: number;
  readonly #epoll = new Epoll(1);
  readonly #buf = new Uint8Array(NET_HDR_SIZE + 65536);

  constructor(fd: number) {
    this.fd = fd;
    this.#epoll.add(fd, 0);
  }

  send(frame: Uint8Array, header: Partial<NetHeader> = {}): void {
    const b = new Uint8Array(NET_HDR_SIZE + frame.length);
    encodeNetHeader(header, b);
    b.set(frame, NET_HDR_SIZE);
    assert.equal(writeFrame(this.fd, b, b.length), 0);
  }

  /** Frames the switch wrote before the one tagged `marker`, with their raw headers. */
  readUntil(marker: string, timeoutMs = 10_000): { header: Uint8Array; frame: Uint8Array }[] {
    const out: { header: Uint8Array; frame: Uint8Array }[] = [];
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const n = readFrame(this.fd, this.#buf);
      if (n > 0) {
        const f = {
          header: this.#buf.slice(0, NET_HDR_SIZE),
          frame: this.#buf.slice(NET_HDR_SIZE, n),
        };
        if (tagOf(f.frame) === marker) return out;
        out.push(f);
        continue;
      }
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no "${marker}" on the wire within ${timeoutMs} ms`);
      this.#epoll.wait(Math.min(left, 100));
    }
  }

  close(): void {
    this.#epoll.close();
    closeQuietly(this.fd);
  }
}

/** A switch with two guest ports and the wire as its uplink, served from a worker of ours. */
async function withUplinkSwitch(
  fn: (a: NetDriver, b: NetDriver, wire: Wire) => void,
): Promise<void> {
  await withDir("vhostd-uplink-", async (dir) => {
    const fds = createSocketPair(SOCK_SEQPACKET | SOCK_NONBLOCK);
    const wire = new Wire(fds[0]);
    const options: NetSwitchOptions = {
      kind: "switch",
      ports: 2,
      uplinkFd: fds[1], // the worker closes it when it stops
      uplinkName: "wire",
      macAgeMs: 300_000,
    };
    const service = await DeviceService.start({
      socket: [`${dir}/a.sock`, `${dir}/b.sock`],
      module: new URL("../devices/net/mod.ts", import.meta.url),
      options,
      name: "switch",
      log: { level: "error", format: "text" },
    });
    let a: NetDriver | null = null;
    let b: NetDriver | null = null;
    try {
      a = await NetDriver.connect(`${dir}/a.sock`); // takes partial checksums
      b = await NetDriver.connect(`${dir}/b.sock`, { csum: false, guestCsum: false });
      fn(a, b, wire);
    } finally {
      a?.close();
      b?.close();
      await service.stop();
      wire.close();
    }
  });
}

const JUNK: Partial<NetHeader> = {
  hdrLen: 54,
  gsoSize: 1400,
  csumStart: 34,
  csumOffset: 6,
  numBuffers: 3,
};
const CLEAN: NetHeader = {
  flags: 0,
  gsoType: 0,
  hdrLen: 0,
  gsoSize: 0,
  csumStart: 0,
  csumOffset: 0,
  numBuffers: 1,
};

Deno.test({
  name:
    "switch uplink: frames from the wire reach guests with only the header the switch vouches for",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    await withUplinkSwitch((a, b, wire) => {
      const U = mac(0x50);
      wire.send(tagged(BROADCAST, U, "wire-1"), { ...JUNK, flags: DATA_VALID | 4 });
      wire.send(tagged(BROADCAST, U, "end-1"));
      for (const port of [a, b]) {
        const [f, ...more] = readUntil(port, "end-1");
        assert.equal(more.length, 0);
        assert.equal(tagOf(f.frame), "wire-1");
        assert.deepEqual(f.header, CLEAN, "no DATA_VALID, flag or GSO field from the wire");
      }
      const udp = partialUdp(BROADCAST, U, new TextEncoder().encode("from the host stack"));
      wire.send(udp, { ...JUNK, flags: NEEDS_CSUM | DATA_VALID });
      wire.send(tagged(BROADCAST, U, "end-2"));
      const [toA] = readUntil(a, "end-2");
      assert.deepEqual(toA.header, { ...CLEAN, flags: NEEDS_CSUM, csumStart: 34, csumOffset: 6 });
      assert.deepEqual(toA.frame, udp);
      const [toB] = readUntil(b, "end-2");
      assert.deepEqual(toB.header, CLEAN);
      assert.ok(udpChecksumValid(toB.frame), "completed for the guest without GUEST_CSUM");
    });
  },
});

Deno.test({
  name: "switch uplink: frames to the wire carry only NEEDS_CSUM and its offsets",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    await withUplinkSwitch((a, _b, wire) => {
      a.send(tagged(BROADCAST, mac(1), "a-1"), { ...JUNK, flags: DATA_VALID | 4 });
      const udp = partialUdp(BROADCAST, mac(1), new TextEncoder().encode("to the host stack"));
      a.send(udp, { ...JUNK, flags: NEEDS_CSUM | DATA_VALID | 4 });
      a.send(tagged(BROADCAST, mac(1), "end"));
      const [plain, partial, ...more] = wire.readUntil("end");
      assert.equal(more.length, 0);
      assert.equal(tagOf(plain.frame), "a-1");
      assert.deepEqual([...plain.header], new Array(12).fill(0));
      assert.deepEqual(partial.frame, udp, "the TAP completes the checksum itself");
      assert.deepEqual(decodeNetHeader(partial.header), {
        ...CLEAN,
        flags: NEEDS_CSUM,
        csumStart: 34,
        csumOffset: 6,
        numBuffers: 0,
      });
    });
  },
});

Deno.test({
  name:
    "switch uplink: a guest takes an address seen on the wire (migrated in); the wire cannot take it back",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    await withUplinkSwitch((a, b, wire) => {
      const U = mac(0x51);
      wire.send(tagged(BROADCAST, U, "u-on-wire"));
      readUntil(b, "u-on-wire");
      b.send(tagged(U, mac(2), "to-u-1"));
      b.send(tagged(BROADCAST, mac(2), "barrier-1"));
      assert.deepEqual(wire.readUntil("barrier-1").map((f) => tagOf(f.frame)), ["to-u-1"]);
      assert.deepEqual(tags(readUntil(a, "barrier-1")), ["u-on-wire"]);
      // The VM with address U migrated in from another host: port 0 now sends from U.
      a.send(tagged(BROADCAST, U, "u-on-a"));
      wire.send(tagged(BROADCAST, U, "u-on-wire-again"));
      b.send(tagged(U, mac(2), "to-u-2"));
      b.send(tagged(BROADCAST, mac(2), "barrier-2"));
      assert.deepEqual(tags(readUntil(a, "barrier-2")), ["to-u-2"]);
      assert.deepEqual(wire.readUntil("barrier-2").map((f) => tagOf(f.frame)), ["u-on-a"]);
      wire.send(tagged(BROADCAST, mac(0x52), "wire-end"));
      assert.deepEqual(
        tags(readUntil(b, "wire-end")),
        ["u-on-a"],
        "the wire's frame from U was dropped",
      );
    });
  },
});
