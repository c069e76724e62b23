/** Unit tests: header sizing, checksum completion, MAC learning and ageing. */

import assert from "node:assert/strict";
import {
  completeChecksum,
  featureBit,
  formatMac,
  headerSize,
  isGroupMac,
  macAt,
  NEEDS_CSUM,
  NET_HDR_SIZE,
  NetFeature,
  onesComplementSum,
  setLe16,
} from "./header.ts";
import { MacTable } from "./mac_table.ts";

Deno.test("header size: 12 bytes with VERSION_1 or MRG_RXBUF, 10 for a legacy driver", () => {
  assert.equal(headerSize(1n << 32n), 12);
  assert.equal(headerSize(featureBit(NetFeature.MRG_RXBUF)), 12);
  assert.equal(headerSize(featureBit(NetFeature.CSUM)), 10);
});

Deno.test("ones' complement sum matches RFC 1071's worked example", () => {
  // RFC 1071 §3: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2.
  const b = new Uint8Array([0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]);
  assert.equal(onesComplementSum(b, 0, b.length), 0xddf2);
  assert.equal(onesComplementSum(b, 0, 3), (0x0001 + 0xf200) & 0xffff);
});

/** A staged UDP/IPv4 frame with a partial checksum, as Linux hands it to a NIC. */
function partialUdpFrame(payload: number[]): { buf: Uint8Array; len: number; full: number } {
  const udpLen = 8 + payload.length;
  const len = 14 + 20 + udpLen;
  const buf = new Uint8Array(NET_HDR_SIZE + len);
  const f = NET_HDR_SIZE;
  buf.set([0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00], f);
  const ip = f + 14;
  buf.set([0x45, 0, 0, 20 + udpLen, 0, 0, 0, 0, 64, 17, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2], ip);
  const udp = ip + 20;
  buf.set([0x13, 0x88, 0x13, 0x89, 0, udpLen], udp);
  buf.set(payload, udp + 8);
  // Pseudo-header sum (src, dst, proto, length) goes in the checksum field, not complemented.
  const pseudo = new Uint8Array([198, 18, 0, 1, 198, 18, 0, 2, 0, 17, 0, udpLen]);
  const seed = onesComplementSum(pseudo, 0, pseudo.length);
  buf[udp + 6] = seed >> 8;
  buf[udp + 7] = seed & 0xff;
  buf[0] = NEEDS_CSUM;
  setLe16(buf, 6, 14 + 20);
  setLe16(buf, 8, 6);
  // The full checksum computed independently: pseudo-header + UDP header (csum 0) + payload.
  const whole = new Uint8Array(pseudo.length + udpLen + 1);
  whole.set(pseudo, 0);
  whole.set(buf.subarray(udp, udp + udpLen), pseudo.length);
  whole[pseudo.length + 6] = 0;
  whole[pseudo.length + 7] = 0;
  const full = ~onesComplementSum(whole, 0, pseudo.length + udpLen) & 0xffff;
  return { buf, len, full };
}

Deno.test("completeChecksum fills in the UDP checksum and clears NEEDS_CSUM", () => {
  for (const payload of [[1, 2, 3, 4], [0xff, 0xfe, 0x10], [], [7]]) {
    const { buf, len, full } = partialUdpFrame(payload);
    assert.ok(completeChecksum(buf, 0, len));
    const udp = NET_HDR_SIZE + 34;
    assert.equal((buf[udp + 6] << 8) | buf[udp + 7], full === 0 ? 0xffff : full);
    assert.equal(buf[0] & NEEDS_CSUM, 0);
  }
});

Deno.test("completeChecksum refuses offsets outside the frame and changes nothing", () => {
  const { buf, len } = partialUdpFrame([1, 2]);
  setLe16(buf, 8, 200);
  const before = buf.slice();
  assert.equal(completeChecksum(buf, 0, len), false);
  assert.deepEqual(buf, before);
  setLe16(buf, 6, len);
  setLe16(buf, 8, 0);
  assert.equal(completeChecksum(buf, 0, len), false);
});

Deno.test("MAC helpers: 48-bit value, group bit, formatting", () => {
  const b = new Uint8Array([
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0x52,
    0x54,
    0x00,
    0x12,
    0x34,
    0x56,
  ]);
  assert.equal(macAt(b, 0), 0xffffffffffff);
  assert.ok(isGroupMac(b, 0));
  assert.ok(!isGroupMac(b, 6));
  assert.equal(formatMac(macAt(b, 6)), "52:54:00:12:34:56");
});

Deno.test("MacTable learns, moves and ages addresses out", () => {
  const t = new MacTable(1000);
  t.learn(0x525400000001, 0, 0);
  t.learn(0x525400000002, 1, 0);
  assert.equal(t.lookup(0x525400000001, 10), 0);
  assert.equal(t.lookup(0x525400000002, 10), 1);
  assert.equal(t.lookup(0x525400000003, 10), -1);
  t.learn(0x525400000001, 2, 500); // the guest moved to port 2
  assert.equal(t.lookup(0x525400000001, 600), 2);
  assert.equal(t.lookup(0x525400000002, 1001), -1, "not seen for longer than the ageing time");
  assert.equal(t.lookup(0x525400000001, 1400), 2, "refreshed at 500, still fresh");
  t.expire(2000);
  assert.equal(t.size, 0);
});

Deno.test("MacTable forgets a port's addresses and respects its capacity", () => {
  const t = new MacTable(60_000, 2);
  t.learn(1, 0, 0);
  t.learn(2, 1, 0);
  t.learn(3, 1, 0); // full: not learned
  assert.equal(t.lookup(3, 1), -1);
  t.forgetPort(1);
  assert.equal(t.lookup(2, 1), -1);
  assert.equal(t.lookup(1, 1), 0);
  t.learn(3, 1, 2);
  assert.equal(t.lookup(3, 3), 1);
});
