/**
 * Unit tests: header sizing, checksum completion and sanitizing, MAC learning (held and floating
 * addresses, per-port limits, configured addresses), rate limits, the RARP announcement.
 */

import assert from "node:assert/strict";
import { configureLogging, getLogger, type LogRecord, renderMessage } from "../../log/mod.ts";
import {
  completeChecksum,
  DATA_VALID,
  featureBit,
  formatMac,
  headerSize,
  isGroupMac,
  macAt,
  NEEDS_CSUM,
  NET_HDR_SIZE,
  NetFeature,
  onesComplementSum,
  parseMac,
  sanitizeHeader,
  setLe16,
} from "./header.ts";
import { Learned, MacTable } from "./mac_table.ts";
import { PortMacs } from "./port_macs.ts";
import { ETHERTYPE_RARP, RARP_FRAME_LEN, writeRarpAnnouncement } from "./rarp.ts";
import { SWITCH_PORT_FEATURES } from "./switch.ts";
import { ThrottledLog } from "./throttled_log.ts";
import { TokenBucket } from "./token_bucket.ts";

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

Deno.test("MacTable: floating addresses move to whoever sends from them and age out", () => {
  const t = new MacTable(1000, [4, 4, 4]);
  assert.equal(t.learn(0x525400000001, 0, 0, false), Learned.OK);
  assert.equal(t.learn(0x525400000002, 1, 0, false), Learned.OK);
  assert.equal(t.lookup(0x525400000001, 10), 0);
  assert.equal(t.lookup(0x525400000002, 10), 1);
  assert.equal(t.lookup(0x525400000003, 10), -1);
  assert.equal(t.learn(0x525400000001, 2, 500, false), Learned.OK, "the host moved to port 2");
  assert.equal(t.lookup(0x525400000001, 600), 2);
  assert.equal(t.countOf(0), 0);
  assert.equal(t.lookup(0x525400000002, 1001), -1, "not seen for longer than the ageing time");
  assert.equal(t.lookup(0x525400000001, 1400), 2, "refreshed at 500, still fresh");
  t.expire(2000);
  assert.equal(t.size, 0);
});

Deno.test("MacTable: a held address stays with its port until the port is released", () => {
  const t = new MacTable(1000, [4, 4, 4]);
  const mac = 0x525400000001;
  assert.equal(t.learn(mac, 0, 0, true), Learned.OK);
  assert.equal(t.learn(mac, 1, 10, true), Learned.HELD, "another guest port cannot take it");
  assert.equal(t.learn(mac, 2, 10, false), Learned.HELD, "nor can the uplink");
  assert.equal(t.holderOf(mac), 0);
  assert.equal(t.lookup(mac, 1_000_000), 0, "held addresses do not age out");
  t.expire(1_000_000);
  assert.equal(t.lookup(mac, 1_000_000), 0);
  assert.equal(t.countOf(1), 0, "the refused port learned nothing");
  t.forgetPort(0);
  assert.equal(t.lookup(mac, 1_000_001), -1);
  assert.equal(t.learn(mac, 1, 1_000_002, true), Learned.OK, "released: the next port takes it");
  assert.equal(t.lookup(mac, 1_000_003), 1);
  assert.equal(t.holderOf(mac), 1);
});

Deno.test("MacTable: a guest port claims an address floating on the uplink", () => {
  const t = new MacTable(1000, [4, 4]);
  const mac = 0x525400000009;
  t.learn(mac, 1, 0, false); // seen on the uplink (port 1): a VM on another host
  assert.equal(t.learn(mac, 0, 5, true), Learned.OK, "the VM migrated in on port 0");
  assert.equal(t.lookup(mac, 6), 0);
  assert.equal(t.countOf(1), 0);
  assert.equal(t.learn(mac, 1, 7, false), Learned.HELD);
});

Deno.test("MacTable: per-port limits; a full port never evicts another port's addresses", () => {
  const t = new MacTable(60_000, [3, 3, 2]);
  for (let i = 0; i < 3; i++) assert.equal(t.learn(0x100 + i, 1, 0, true), Learned.OK);
  for (let i = 0; i < 5000; i++) {
    assert.equal(t.learn(0x10000 + i, 0, i, true), i < 3 ? Learned.OK : Learned.LIMIT);
  }
  assert.equal(t.countOf(0), 3);
  assert.equal(t.size, 6);
  for (let i = 0; i < 3; i++) assert.equal(t.lookup(0x100 + i, 6000), 1, "port 1 keeps its own");
  assert.equal(t.learn(0x200, 2, 6000, false), Learned.OK, "the uplink still learns");
  assert.equal(t.learn(0x103, 1, 6000, true), Learned.LIMIT, "port 1 is at its own limit");
});

Deno.test("MacTable: a port at its limit replaces its own address idle for the ageing time", () => {
  const t = new MacTable(1000, [2, 2]);
  t.learn(0xa1, 0, 0, true);
  t.learn(0xa2, 0, 500, true);
  assert.equal(t.learn(0xa3, 0, 900, true), Learned.LIMIT, "nothing idle long enough");
  assert.equal(t.learn(0xa3, 0, 1000, true), Learned.LIMIT, "idle exactly the ageing time");
  t.learn(0xa2, 0, 1001, true); // still in use
  assert.equal(t.learn(0xa3, 0, 1001, true), Learned.OK, "0xa1 idle for 1001 ms: replaced");
  assert.equal(t.lookup(0xa1, 1002), -1);
  assert.equal(t.lookup(0xa2, 1002), 0);
  assert.equal(t.lookup(0xa3, 1002), 0);
  assert.equal(t.countOf(0), 2);
});

Deno.test("MacTable: idle addresses of a full port make room all at once, fresh ones stay", () => {
  const t = new MacTable(1000, [4]);
  for (const [mac, at] of [[1, 0], [2, 10], [3, 20], [4, 900]]) t.learn(mac, 0, at, true);
  assert.equal(t.learn(5, 0, 1021, true), Learned.OK);
  assert.deepEqual([1, 2, 3, 4, 5].map((m) => t.lookup(m, 1021)), [-1, -1, -1, 0, 0]);
  assert.equal(t.learn(6, 0, 1022, true), Learned.OK, "room left by the same scan");
  assert.equal(t.learn(7, 0, 1023, true), Learned.OK);
  assert.equal(t.learn(8, 0, 1024, true), Learned.LIMIT, "4, 5, 6, 7 are fresh");
  assert.equal(t.learn(8, 0, 1901, true), Learned.OK, "4 has been idle since 900");
  assert.equal(t.lookup(4, 1901), -1);
});

Deno.test("PortMacs: configured ports send from their own addresses only; others never", () => {
  const m = new PortMacs([[0x525400000001], [], [0x525400000001, 0x525400000002]]);
  assert.ok(m.allows(0, 0x525400000001));
  assert.ok(!m.allows(0, 0x525400000002), "port 0 has one address");
  assert.ok(m.allows(2, 0x525400000002));
  assert.ok(!m.allows(1, 0x525400000001), "configured for ports 0 and 2: reserved");
  assert.ok(m.allows(1, 0x525400000003), "an unconfigured port learns anything else");
  assert.ok(!m.allows(3, 0x525400000002), "a port past the list is unconfigured");
  assert.match(m.refusal(1, 0x525400000001), /port 0, 2/);
  assert.match(m.refusal(0, 0x525400000002), /52:54:00:00:00:01/);
});

Deno.test("TokenBucket: a burst, then the rate, measured on the caller's clock", () => {
  const b = new TokenBucket(10, 3);
  let taken = 0;
  for (let i = 0; i < 10; i++) if (b.take(1000)) taken++;
  assert.equal(taken, 3, "the burst");
  assert.equal(b.take(1050), false, "half a token after 50 ms");
  assert.equal(b.take(1100), true, "one token after 100 ms at 10/s");
  assert.equal(b.take(1100), false);
  assert.equal(b.available(100_000), 3, "never more than the burst");
  assert.throws(() => new TokenBucket(0), RangeError);
});

Deno.test("ThrottledLog: a burst of lines, then one per interval, counting those held back", () => {
  const records: LogRecord[] = [];
  configureLogging({ lowestLevel: "info", write: (r) => records.push(r) });
  try {
    const log = new ThrottledLog(getLogger(["vhostd", "test"]), 2, 6); // 2, then one per 10 s
    for (let i = 0; i < 100; i++) log.warn(0, "spoof from {port}", { port: 1 });
    assert.equal(records.length, 2);
    assert.equal(log.held, 98);
    log.info(5000, "session of {port} ended", { port: 1 });
    assert.equal(records.length, 2, "not yet, and info lines share the budget");
    log.warn(10_000, "spoof from {port}", { port: 1 });
    assert.equal(records.length, 3);
    assert.equal(records[2].level, "warning");
    assert.equal(
      renderMessage(records[2]),
      "spoof from 1 (99 more such lines were not logged)",
    );
    assert.equal(log.held, 0);
  } finally {
    configureLogging(null);
  }
});

Deno.test("sanitizeHeader keeps NEEDS_CSUM and its offsets, and nothing else the sender wrote", () => {
  const { buf, len } = partialUdpFrame([1, 2, 3]);
  buf[0] |= DATA_VALID | 4;
  setLe16(buf, 2, 999); // hdr_len
  setLe16(buf, 4, 1400); // gso_size
  setLe16(buf, 10, 7); // num_buffers
  assert.ok(sanitizeHeader(buf, 0, len, true));
  assert.deepEqual([...buf.subarray(0, 12)], [NEEDS_CSUM, 0, 0, 0, 0, 0, 34, 0, 6, 0, 0, 0]);

  const plain = partialUdpFrame([1]);
  plain.buf[0] = DATA_VALID;
  setLe16(plain.buf, 6, 34);
  assert.ok(sanitizeHeader(plain.buf, 0, plain.len, true));
  assert.deepEqual([...plain.buf.subarray(0, 12)], new Array(12).fill(0), "no checksum: all zero");
});

Deno.test("sanitizeHeader refuses GSO, undeclared partial checksums and offsets outside the frame", () => {
  const gso = partialUdpFrame([1]);
  gso.buf[1] = 1; // GSO_TCPV4
  assert.equal(sanitizeHeader(gso.buf, 0, gso.len, true), false);
  const ecn = partialUdpFrame([1]);
  ecn.buf[0] = 0;
  ecn.buf[1] = 0x80; // the ECN bit alone
  assert.equal(sanitizeHeader(ecn.buf, 0, ecn.len, true), false);
  const undeclared = partialUdpFrame([1]);
  assert.equal(sanitizeHeader(undeclared.buf, 0, undeclared.len, false), false, "no CSUM acked");
  const outside = partialUdpFrame([1]);
  setLe16(outside.buf, 8, outside.len);
  assert.equal(sanitizeHeader(outside.buf, 0, outside.len, true), false);
});

Deno.test("the RARP announcement is what QEMU's self-announce sends", () => {
  const mac = new Uint8Array([0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
  const buf = new Uint8Array(80).fill(0xee);
  assert.equal(writeRarpAnnouncement(buf, 4, mac), RARP_FRAME_LEN);
  const f = buf.subarray(4, 4 + RARP_FRAME_LEN);
  assert.deepEqual([...f.subarray(0, 6)], [0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
  assert.deepEqual(f.subarray(6, 12), mac);
  assert.equal((f[12] << 8) | f[13], ETHERTYPE_RARP);
  // htype 1, ptype IPv4, hlen 6, plen 4, opcode 3 (request reverse)
  assert.deepEqual([...f.subarray(14, 22)], [0, 1, 0x08, 0x00, 6, 4, 0, 3]);
  assert.deepEqual(f.subarray(22, 28), mac, "sender hardware address");
  assert.deepEqual([...f.subarray(28, 32)], [0, 0, 0, 0]);
  assert.deepEqual(f.subarray(32, 38), mac, "target hardware address");
  assert.deepEqual([...f.subarray(38, 60)], new Array(22).fill(0), "addresses 0, then padding");
  assert.equal(buf[3], 0xee, "nothing written before");
  assert.equal(buf[4 + RARP_FRAME_LEN], 0xee, "nor after");
});

Deno.test("parseMac reads what formatMac writes, and nothing else", () => {
  assert.equal(parseMac("52:54:00:AB:cd:ef"), 0x525400abcdef);
  assert.equal(formatMac(parseMac("02:00:00:00:00:01")!), "02:00:00:00:00:01");
  for (const bad of ["52:54:00:ab:cd", "52-54-00-ab-cd-ef", "52:54:00:ab:cd:eg", ""]) {
    assert.equal(parseMac(bad), null, bad);
  }
});

Deno.test("switch ports offer GUEST_ANNOUNCE (bit 21), and still no segmentation offload", () => {
  assert.equal(NetFeature.GUEST_ANNOUNCE, 21);
  assert.notEqual(SWITCH_PORT_FEATURES & featureBit(NetFeature.GUEST_ANNOUNCE), 0n);
  for (const tso of [NetFeature.HOST_TSO4, NetFeature.HOST_TSO6, NetFeature.GUEST_TSO4]) {
    assert.equal(SWITCH_PORT_FEATURES & featureBit(tso), 0n);
  }
});
