/**
 * A guest driver for any of the fuzz target's devices, done by hand: it negotiates a session,
 * sets up every queue, and then lets a fuzz case write whatever it likes into the rings (any
 * descriptor, any available index) besides the requests a correct driver would make.
 *
 * @module
 */

import { FrontendConnection } from "../../vhost-user/frontend/connection.ts";
import { DriverQueue } from "../../vhost-user/frontend/driver_queue.ts";
import { type GuestBuffer, GuestRam } from "../../vhost-user/frontend/memory.ts";
import { bit, ProtocolFeature, VirtioFeature } from "../../vhost-user/message.ts";
import type { Rng } from "./rng.ts";
import { FuzzFinding } from "./case.ts";

/** The kinds of device the target serves to the fuzzer. */
export type DeviceKind = "blk" | "net" | "console";

/** Descriptor flags. */
export const DescFlag = { NEXT: 1, WRITE: 2, INDIRECT: 4 } as const;

/** Protocol features a raw guest may ask for (a random subset of them). */
const PROTOCOL_FEATURES = [
  ProtocolFeature.MQ,
  ProtocolFeature.LOG_SHMFD,
  ProtocolFeature.RARP,
  ProtocolFeature.CONFIG,
  ProtocolFeature.RESET_DEVICE,
  ProtocolFeature.STATUS,
  ProtocolFeature.INFLIGHT_SHMFD,
  ProtocolFeature.CONFIGURE_MEM_SLOTS,
];

/** Options of {@link RawGuest.open}. */
export interface RawGuestOptions {
  /** Queue sizes to pick from (default: small ones, 1 to 256). */
  sizes?: readonly number[];
  /** Protocol features that must be negotiated when offered (besides MQ and REPLY_ACK). */
  protocolFeatures?: readonly number[];
  /** Leave the rings unstarted (the case sets them up itself). */
  noStart?: boolean;
  /** Where guest RAM starts in its memfd (see {@link GuestRam.create}); default 0. */
  ramFileOffset?: number;
}

/** Connects to `socket`, retrying while the back-end is still busy with the previous case. */
export async function fuzzConnect(socket: string): Promise<FrontendConnection> {
  for (let attempt = 0;; attempt++) {
    try {
      return await FrontendConnection.connect(socket, { timeoutMs: 2000 });
    } catch (e) {
      if (attempt > 50) throw e;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

/** One device session with rings the case may corrupt. */
export class RawGuest {
  /** The connection. */
  readonly conn: FrontendConnection;
  /** Guest RAM (the default layout: 16 MiB at 0, 48 MiB at 4 GiB). */
  readonly ram: GuestRam;
  /** Which device this is. */
  readonly kind: DeviceKind;
  /** Features acknowledged. */
  readonly features: bigint;
  /** Every queue of the device. */
  readonly queues: DriverQueue[];
  /** 64 KiB of scratch buffers for chains. */
  readonly data: GuestBuffer;

  private constructor(
    conn: FrontendConnection,
    ram: GuestRam,
    kind: DeviceKind,
    features: bigint,
    queues: DriverQueue[],
  ) {
    this.conn = conn;
    this.ram = ram;
    this.kind = kind;
    this.features = features;
    this.queues = queues;
    this.data = ram.alloc(64 * 1024, 4096);
  }

  /** Negotiates a session as QEMU would, with random choices, and starts every queue. */
  static async open(
    socket: string,
    kind: DeviceKind,
    rng: Rng,
    options: RawGuestOptions = {},
  ): Promise<RawGuest> {
    const conn = await fuzzConnect(socket);
    let ram: GuestRam | null = null;
    const queues: DriverQueue[] = [];
    try {
      const offered = conn.getFeatures();
      const pf = conn.getProtocolFeatures();
      let want = bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK);
      for (const f of PROTOCOL_FEATURES) if (rng.chance(0.5)) want |= bit(f);
      for (const f of options.protocolFeatures ?? []) want |= bit(f);
      conn.setProtocolFeatures(pf & want);
      conn.setOwner();
      const n = conn.getQueueNum();
      let features = bit(VirtioFeature.VERSION_1) | bit(VirtioFeature.PROTOCOL_FEATURES);
      if (rng.chance(0.7)) features |= bit(VirtioFeature.RING_INDIRECT_DESC);
      if (rng.chance(0.5)) features |= bit(VirtioFeature.RING_EVENT_IDX);
      for (let b = 0; b < 24; b++) if (rng.chance(0.5)) features |= 1n << BigInt(b);
      features &= offered;
      conn.setFeatures(features);
      ram = GuestRam.create(undefined, options.ramFileOffset);
      if (pf & want & bit(ProtocolFeature.CONFIGURE_MEM_SLOTS) && rng.chance(0.5)) {
        for (const r of ram.regions) conn.addMemReg(r, ram.fd);
      } else {
        conn.setMemTable([...ram.regions], ram.fds);
      }
      const sizes = options.sizes ?? [1, 2, 4, 8, 16, 64, 128, 256];
      const eventIdx = (features & bit(VirtioFeature.RING_EVENT_IDX)) !== 0n;
      for (let i = 0; i < n; i++) {
        const q = DriverQueue.create(ram, i, rng.pick(sizes), { indirectEntries: 8 });
        q.eventIdx = eventIdx;
        queues.push(q);
      }
      const g = new RawGuest(conn, ram, kind, features, queues);
      if (!options.noStart) { for (const q of queues) g.startQueue(q); }
      return g;
    } catch (e) {
      conn.close();
      for (const q of queues) q.close();
      ram?.close();
      // Nothing hostile was sent yet: a session QEMU could have opened was refused.
      throw new FuzzFinding(`${kind}: a valid session set-up failed: ${(e as Error).message}`);
    }
  }

  /** Sets queue `q` up and running (NUM, BASE, ADDR, CALL, ERR, KICK, ENABLE). */
  startQueue(q: DriverQueue): void {
    const c = this.conn;
    c.setVringNum(q.index, q.size);
    c.setVringBase(q.index, q.availIdx);
    c.setVringAddr(q.vringAddr());
    c.setVringCall(q.index, q.layout.callFd);
    c.setVringErr(q.index, q.layout.errFd);
    c.setVringKick(q.index, q.layout.kickFd);
    c.setVringEnable(q.index, true);
  }

  /** Writes descriptor `i` of `q` (`gpa` may be a bigint, for addresses past 2^53). */
  desc(q: DriverQueue, i: number, gpa: number | bigint, len: number, flags: number, next: number) {
    this.entry(q.layout.desc.offset + 16 * (i & (q.size - 1)), gpa, len, flags, next);
  }

  /** Writes a 16-byte descriptor at byte `at` of guest RAM (in a descriptor or indirect table). */
  entry(at: number, gpa: number | bigint, len: number, flags: number, next: number): void {
    const v = this.ram.view;
    v.setBigUint64(at, BigInt.asUintN(64, BigInt(gpa)), true);
    v.setUint32(at + 8, len >>> 0, true);
    v.setUint16(at + 12, flags & 0xffff, true);
    v.setUint16(at + 14, next & 0xffff, true);
  }

  /** Puts `head` (any 16-bit value) in `q`'s next available slot; {@link DriverQueue.publish} shows it. */
  offer(q: DriverQueue, head: number): void {
    const slot = q.availIdx & (q.size - 1);
    this.ram.u16[(q.layout.avail.offset + 4 + 2 * slot) >> 1] = head & 0xffff;
    q.availIdx = (q.availIdx + 1) & 0xffff;
  }

  /** Whether `q` is one the driver sends on (its chains are taken without any input). */
  sends(q: DriverQueue): boolean {
    return this.kind === "blk" || q.index % 2 === 1;
  }

  /**
   * Adds a request a correct driver would make on `q` (not yet published): a block read of
   * sector 0, a frame to send or a buffer to receive into, console output or an input buffer.
   * Returns its head, or -1 when the queue has no free descriptors.
   */
  validRequest(q: DriverQueue): number {
    const d = this.data;
    const at = (off: number) => d.gpa + off;
    if (this.kind === "blk") {
      // struct virtio_blk_outhdr { le32 type (IN = 0); le32 reserved; le64 sector } at offset 0.
      this.ram.u8.fill(0, d.offset, d.offset + 16);
      return q.add([
        { gpa: at(0), length: 16, writable: false },
        { gpa: at(4096), length: 512, writable: true },
        { gpa: at(8192), length: 1, writable: true },
      ]);
    }
    if (!this.sends(q)) return q.add([{ gpa: at(16384), length: 2048, writable: true }]);
    if (this.kind === "console" && q.index === 3) {
      // The control transmitq: DEVICE_READY (struct virtio_console_control: id, event 0, value 1).
      this.ram.view.setUint32(d.offset + 12288, 0, true);
      this.ram.view.setUint32(d.offset + 12292, 1 << 16, true);
      return q.add([{ gpa: at(12288), length: 8, writable: false }]);
    }
    // A 12-byte virtio-net header and a 60-byte broadcast frame, or 72 bytes of console output.
    this.ram.u8.fill(0xff, d.offset + 12288, d.offset + 12288 + 72);
    this.ram.u8.fill(0, d.offset + 12288, d.offset + 12288 + 12);
    return q.add([{ gpa: at(12288), length: 72, writable: false }]);
  }

  /**
   * Makes one {@link validRequest} on `q` and waits for the device to complete it; false if it
   * does not within `timeoutMs`, null if the queue is too small for the request. A block read
   * must also report success in its status byte.
   */
  serve(q: DriverQueue, timeoutMs = 5000): boolean | null {
    const status = this.data.offset + 8192;
    this.ram.u8[status] = 0xa5;
    const head = this.validRequest(q);
    if (head < 0) return null;
    q.publish();
    q.kickNow();
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const done = q.poll();
      if (done === head) return this.kind !== "blk" || this.ram.u8[status] === 0;
      const left = deadline - Date.now();
      if (left <= 0) return false;
      if (done < 0) q.waitCall(Math.min(left, 100));
    }
  }

  /** Closes the connection and frees guest RAM. */
  close(): void {
    this.conn.close();
    for (const q of this.queues) q.close();
    this.ram.close();
  }
}
