/**
 * Helpers for the switch tests: Ethernet frames with a tag to recognise them by, a UDP frame with
 * a partial checksum as Linux hands one to a NIC, and reading a port until a marker frame.
 *
 * @module
 */

import { onesComplementSum } from "../../devices/net/header.ts";
import type { NetDriver, ReceivedFrame } from "../../vhost-user/frontend/net_driver.ts";

/** The broadcast address. */
export const BROADCAST: Uint8Array = new Uint8Array(6).fill(0xff);
/** An EtherType for local experiments (IEEE 802 "local experimental 1"): nobody else's frames. */
export const ETHERTYPE_TEST = 0x88b5;

/** `52:54:00:00:00:nn`, the address QEMU would give a guest's NIC number `n`. */
export function mac(n: number): Uint8Array {
  return new Uint8Array([0x52, 0x54, 0x00, 0x00, (n >> 8) & 0xff, n & 0xff]);
}

/** A frame from `src` to `dst` of EtherType {@link ETHERTYPE_TEST} carrying `tag` (padded to 60). */
export function tagged(dst: Uint8Array, src: Uint8Array, tag: string): Uint8Array {
  const body = new TextEncoder().encode(tag);
  const f = new Uint8Array(Math.max(60, 14 + 1 + body.length));
  f.set(dst, 0);
  f.set(src, 6);
  f[12] = ETHERTYPE_TEST >> 8;
  f[13] = ETHERTYPE_TEST & 0xff;
  f[14] = body.length;
  f.set(body, 15);
  return f;
}

/** The tag of a frame built by {@link tagged}, or "" for any other frame. */
export function tagOf(frame: Uint8Array): string {
  if (frame.length < 15 || ((frame[12] << 8) | frame[13]) !== ETHERTYPE_TEST) return "";
  return new TextDecoder().decode(frame.subarray(15, 15 + frame[14]));
}

/**
 * Reads `port` until the frame tagged `marker` arrives and returns every frame before it; throws
 * if it does not come within `timeoutMs`. Frames are processed in order by the switch's one
 * thread, so whatever was going to reach the port before the marker has reached it.
 */
export function readUntil(port: NetDriver, marker: string, timeoutMs = 10_000): ReceivedFrame[] {
  const before: ReceivedFrame[] = [];
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const f = port.receive(Math.max(1, deadline - Date.now()));
    if (f === null) {
      throw new Error(
        `no "${marker}" within ${timeoutMs} ms; got ${
          JSON.stringify(before.map((b) => tagOf(b.frame) || b.frame.length))
        }`,
      );
    }
    if (tagOf(f.frame) === marker) return before;
    before.push(f);
  }
}

/** Tags of frames (untagged ones as their EtherType in hex). */
export function tags(frames: readonly ReceivedFrame[]): string[] {
  return frames.map((f) =>
    tagOf(f.frame) || `0x${((f.frame[12] << 8) | f.frame[13]).toString(16)}`
  );
}

/**
 * A UDP/IPv4 frame from `src` to `dst` whose checksum is left partial, as Linux hands it to a NIC
 * that offloads checksums: the checksum field holds the pseudo-header sum, and csum_start /
 * csum_offset (34 and 6) say where to finish it.
 */
export function partialUdp(dst: Uint8Array, src: Uint8Array, payload: Uint8Array): Uint8Array {
  const udpLen = 8 + payload.length;
  const f = new Uint8Array(14 + 20 + udpLen);
  f.set(dst, 0);
  f.set(src, 6);
  f.set([0x08, 0x00], 12);
  const ip = [0x45, 0, 0, 20 + udpLen, 0, 0, 0x40, 0, 64, 17, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2];
  f.set(ip, 14);
  const ipSum = ~onesComplementSum(f, 14, 34) & 0xffff;
  f[24] = ipSum >> 8;
  f[25] = ipSum & 0xff;
  f.set([0x13, 0x88, 0x13, 0x89, udpLen >> 8, udpLen & 0xff], 34);
  f.set(payload, 42);
  const seed = onesComplementSum(pseudoHeader(f), 0, 12);
  f[40] = seed >> 8;
  f[41] = seed & 0xff;
  return f;
}

function pseudoHeader(f: Uint8Array): Uint8Array {
  const udpLen = f.length - 34;
  const p = new Uint8Array(12);
  p.set(f.subarray(26, 34), 0); // source and destination addresses
  p.set([0, 17, udpLen >> 8, udpLen & 0xff], 8);
  return p;
}

/** Whether the UDP checksum of a frame built by {@link partialUdp} is complete and right. */
export function udpChecksumValid(f: Uint8Array): boolean {
  const whole = new Uint8Array(12 + f.length - 34);
  whole.set(pseudoHeader(f), 0);
  whole.set(f.subarray(34), 12);
  return ((f[40] << 8) | f[41]) !== 0 && onesComplementSum(whole, 0, whole.length) === 0xffff;
}
