import assert from "node:assert/strict";
import {
  configPayload,
  decodeConfig,
  decodeInflight,
  decodeMemTable,
  decodeVringAddr,
  encodeMessage,
  featureNames,
  Flags,
  inflightPayload,
  memTablePayload,
  ProtocolFeature,
  Request,
  requestName,
  VirtioFeature,
  vringAddrPayload,
} from "./message.ts";

const dv = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset, b.byteLength);

Deno.test("the header is request, flags, size, little-endian", () => {
  const m = encodeMessage(
    Request.SET_FEATURES,
    Flags.VERSION | Flags.NEED_REPLY,
    new Uint8Array(8),
  );
  assert.deepEqual([...m.subarray(0, 12)], [2, 0, 0, 0, 9, 0, 0, 0, 8, 0, 0, 0]);
  assert.equal(m.length, 20);
});

Deno.test("every id QEMU 7.2 can send (1-40) has its spec name", () => {
  for (let id = 1; id <= 40; id++) assert.doesNotMatch(requestName(id), /UNKNOWN/);
  assert.equal(requestName(24), "GET_CONFIG");
  assert.equal(requestName(99), "UNKNOWN(99)");
});

Deno.test("vring addresses round-trip", () => {
  const a = {
    index: 3,
    flags: 1,
    desc: 0x7fa843fdb000,
    used: 0x7fa843fdc000,
    avail: 0x7fa843fdb800,
    log: 0xffdd000,
  };
  assert.deepEqual(decodeVringAddr(dv(vringAddrPayload(a))), a);
});

Deno.test("a memory table round-trips and more than 8 regions is refused", () => {
  const regions = [
    { guestPhysAddr: 0, memorySize: 0x10000000, userspaceAddr: 0x7fa833fff000, mmapOffset: 0 },
    {
      guestPhysAddr: 0x100000000,
      memorySize: 0x4000000,
      userspaceAddr: 0x7fb000000000,
      mmapOffset: 0x10000000,
    },
  ];
  assert.deepEqual(decodeMemTable(dv(memTablePayload(regions))), regions);
  const nine = new Uint8Array(8 + 32 * 9);
  new DataView(nine.buffer).setUint32(0, 9, true);
  assert.throws(() => decodeMemTable(dv(nine)), /9 regions/);
  const short = memTablePayload(regions).subarray(0, 50);
  assert.throws(() => decodeMemTable(dv(short)), /too short/);
});

Deno.test("config accesses are bounded to 256 bytes and to the payload", () => {
  const c = { offset: 0, size: 57, flags: 0, data: new Uint8Array(57).fill(1) };
  assert.deepEqual(decodeConfig(dv(configPayload(c))), c);
  const huge = configPayload({ offset: 0, size: 300, flags: 0, data: new Uint8Array(0) });
  assert.throws(() => decodeConfig(dv(huge)), /out of range/);
  const lying = configPayload({ offset: 0, size: 60, flags: 0, data: new Uint8Array(10) });
  assert.throws(() => decodeConfig(dv(lying)), /shorter than its size/);
});

Deno.test("inflight descriptions round-trip", () => {
  const i = { mmapSize: 0x100000, mmapOffset: 0, numQueues: 2, queueSize: 128 };
  assert.deepEqual(decodeInflight(dv(inflightPayload(i))), i);
});

Deno.test("feature masks print by name", () => {
  const mask = (1n << 32n) | (1n << 30n) | (1n << 6n);
  assert.deepEqual(featureNames(mask, VirtioFeature, { BLK_SIZE: 6 }), [
    "BLK_SIZE",
    "PROTOCOL_FEATURES",
    "VERSION_1",
  ]);
  assert.deepEqual(featureNames(0x11209n, ProtocolFeature), [
    "MQ",
    "REPLY_ACK",
    "CONFIG",
    "INFLIGHT_SHMFD",
    "STATUS",
  ]);
});
