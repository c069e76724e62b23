/**
 * A virtio-blk driver (virtio 1.x §5.2) on top of {@link DriverQueue}s: requests are built in
 * guest memory exactly as a guest builds them (16-byte header, data buffers, one status byte at
 * the end), and every completion is checked: the used element names an outstanding head, the
 * status byte was written and is a defined value, and the used length is recorded against the
 * length a correct device reports.
 *
 * @module
 */

import { BLK_ID_BYTES, BlkRequestType, BlkStatus } from "../../devices/blk/device.ts";
import type { DriverQueue, Segment } from "./driver_queue.ts";
import type { GuestBuffer, GuestRam } from "./memory.ts";

/** Written into the status byte before submission: a device that never writes it is caught. */
const STATUS_SENTINEL = 0xa5;

/** A device completed a request in a way no correct device can. */
export class BlkCompletionError extends Error {
  /** Builds the error. */
  constructor(message: string) {
    super(message);
    this.name = "BlkCompletionError";
  }
}

/** One request as the driver asks for it. */
export interface BlkRequest {
  /** Request type (`BlkRequestType`). */
  type: number;
  /** Sector (512-byte units); 0 for FLUSH and GET_ID. */
  sector?: number;
  /** Data the device reads (OUT data, or DISCARD/WRITE_ZEROES segments). */
  out?: Uint8Array;
  /** Bytes the device writes (IN data, or 20 for GET_ID). */
  inBytes?: number;
  /** Split the data over this many descriptors (default 1). */
  dataSegments?: number;
  /** Put the whole chain in an indirect table. */
  indirect?: boolean;
  /** Queue index (default 0). */
  queue?: number;
}

/** How the device completed a request. */
export interface BlkCompletion {
  /** The status byte (`BlkStatus`). */
  status: number;
  /** The used element's length. */
  usedLen: number;
  /** What a device that wrote every writable byte reports: IN data + 1, GET_ID 21, else 1. */
  expectedUsedLen: number;
  /** The bytes the device wrote (IN data or GET_ID), copied out of guest memory. */
  data: Uint8Array;
  /** Head descriptor of the chain. */
  head: number;
  /** Guest-physical address of the data buffer (IN data lands here). */
  dataGpa: number;
  /** Guest-physical address of the status byte. */
  statusGpa: number;
}

/** A submitted request. */
export interface PendingRequest {
  /** Queue it went to. */
  queue: number;
  /** Head descriptor. */
  head: number;
  /** The request slot in guest memory. */
  slot: number;
  /** Device-writable data bytes. */
  inBytes: number;
}

interface Slot {
  header: GuestBuffer;
  status: GuestBuffer;
  data: GuestBuffer;
  busy: boolean;
}

/** Options of {@link BlkDriver}. */
export interface BlkDriverOptions {
  /** Requests that may be in flight per queue (default 16). */
  slotsPerQueue?: number;
  /** Largest data buffer of one request (default 128 KiB). */
  maxDataBytes?: number;
}

/** A virtio-blk driver over some set of queues. */
export class BlkDriver {
  /** The queues, by index. */
  readonly queues: readonly DriverQueue[];
  /** Largest data buffer of one request. */
  readonly maxDataBytes: number;
  readonly #ram: GuestRam;
  readonly #slots: Slot[][];
  readonly #byHead: Map<number, number>[];
  readonly #done: Map<number, number>[];

  /** Preallocates request slots in `ram` for each queue. */
  constructor(ram: GuestRam, queues: readonly DriverQueue[], options: BlkDriverOptions = {}) {
    this.#ram = ram;
    this.queues = queues;
    this.maxDataBytes = options.maxDataBytes ?? 128 * 1024;
    const n = options.slotsPerQueue ?? 16;
    this.#slots = queues.map(() =>
      Array.from({ length: n }, () => ({
        header: ram.alloc(16, 16),
        status: ram.alloc(1, 1),
        data: ram.alloc(this.maxDataBytes, 4096),
        busy: false,
      }))
    );
    this.#byHead = queues.map(() => new Map());
    this.#done = queues.map(() => new Map());
  }

  /** Builds the request in guest memory, makes it available and kicks. */
  submit(req: BlkRequest): PendingRequest {
    const qi = req.queue ?? 0;
    const q = this.queues[qi];
    if (q === undefined) throw new RangeError(`no queue ${qi}`);
    const slots = this.#slots[qi];
    const slot = slots.findIndex((s) => !s.busy);
    if (slot < 0) throw new Error(`queue ${qi}: all ${slots.length} request slots are busy`);
    const s = slots[slot];
    const out = req.out ?? new Uint8Array(0);
    const inBytes = req.inBytes ?? 0;
    const dataBytes = out.length + inBytes;
    if (dataBytes > this.maxDataBytes) throw new RangeError(`request of ${dataBytes} bytes`);
    if (out.length > 0 && inBytes > 0) throw new RangeError("a request reads or writes, not both");
    const hv = this.#ram.view;
    hv.setUint32(s.header.offset, req.type, true);
    hv.setUint32(s.header.offset + 4, 0, true);
    hv.setBigUint64(s.header.offset + 8, BigInt(req.sector ?? 0), true);
    this.#ram.u8[s.status.offset] = STATUS_SENTINEL;
    if (out.length > 0) this.#ram.u8.set(out, s.data.offset);
    if (inBytes > 0) this.#ram.u8.fill(0x5a, s.data.offset, s.data.offset + inBytes);
    const segments: Segment[] = [{ gpa: s.header.gpa, length: 16, writable: false }];
    if (dataBytes > 0) {
      const pieces = Math.max(1, Math.min(req.dataSegments ?? 1, dataBytes));
      const piece = Math.ceil(dataBytes / pieces);
      for (let off = 0; off < dataBytes; off += piece) {
        const length = Math.min(piece, dataBytes - off);
        segments.push({ gpa: s.data.gpa + off, length, writable: inBytes > 0 });
      }
    }
    segments.push({ gpa: s.status.gpa, length: 1, writable: true });
    const head = q.add(segments, req.indirect ?? false);
    if (head < 0) throw new Error(`queue ${qi}: no free descriptors`);
    s.busy = true;
    this.#byHead[qi].set(head, slot);
    q.publish();
    q.kick();
    return { queue: qi, head, slot, inBytes };
  }

  /**
   * Waits for `p` to complete (reclaiming other completions of its queue on the way, kept for
   * their own wait) and checks the completion.
   */
  wait(p: PendingRequest, timeoutMs = 5000): BlkCompletion {
    const q = this.queues[p.queue];
    const done = this.#done[p.queue];
    while (!done.has(p.head)) {
      const head = q.waitUsed(timeoutMs);
      done.set(head, q.lastLen);
    }
    const usedLen = done.get(p.head)!;
    done.delete(p.head);
    this.#byHead[p.queue].delete(p.head);
    const s = this.#slots[p.queue][p.slot];
    s.busy = false;
    const status = this.#ram.u8[s.status.offset];
    if (status === STATUS_SENTINEL) {
      throw new BlkCompletionError(`queue ${p.queue}: request completed without a status byte`);
    }
    if (status !== BlkStatus.OK && status !== BlkStatus.IOERR && status !== BlkStatus.UNSUPP) {
      throw new BlkCompletionError(`queue ${p.queue}: undefined status byte ${status}`);
    }
    return {
      status,
      usedLen,
      expectedUsedLen: p.inBytes + 1,
      data: this.#ram.u8.slice(s.data.offset, s.data.offset + p.inBytes),
      head: p.head,
      dataGpa: s.data.gpa,
      statusGpa: s.status.gpa,
    };
  }

  /** Submits and waits. */
  run(req: BlkRequest): BlkCompletion {
    return this.wait(this.submit(req));
  }

  /** Reads `bytes` at `sector`. */
  read(sector: number, bytes: number, queue = 0): BlkCompletion {
    return this.run({ type: BlkRequestType.IN, sector, inBytes: bytes, queue });
  }

  /** Writes `data` at `sector`. */
  write(sector: number, data: Uint8Array, queue = 0): BlkCompletion {
    return this.run({ type: BlkRequestType.OUT, sector, out: data, queue });
  }

  /** FLUSH. */
  flush(queue = 0): BlkCompletion {
    return this.run({ type: BlkRequestType.FLUSH, queue });
  }

  /** GET_ID: the 20-byte serial. */
  getId(queue = 0): BlkCompletion {
    return this.run({ type: BlkRequestType.GET_ID, inBytes: BLK_ID_BYTES, queue });
  }

  /** DISCARD of the given ranges. */
  discard(ranges: readonly BlkRange[], queue = 0): BlkCompletion {
    return this.run({ type: BlkRequestType.DISCARD, out: rangesPayload(ranges, false), queue });
  }

  /** WRITE_ZEROES of the given ranges (`unmap` sets the UNMAP flag). */
  writeZeroes(ranges: readonly BlkRange[], unmap = false, queue = 0): BlkCompletion {
    return this.run({
      type: BlkRequestType.WRITE_ZEROES,
      out: rangesPayload(ranges, unmap),
      queue,
    });
  }
}

/** A sector range for DISCARD and WRITE_ZEROES. */
export interface BlkRange {
  /** First sector. */
  sector: number;
  /** Number of sectors. */
  sectors: number;
}

/** Encodes `struct virtio_blk_discard_write_zeroes` segments. */
export function rangesPayload(ranges: readonly BlkRange[], unmap: boolean): Uint8Array {
  const out = new Uint8Array(16 * ranges.length);
  const dv = new DataView(out.buffer);
  ranges.forEach((r, i) => {
    dv.setBigUint64(16 * i, BigInt(r.sector), true);
    dv.setUint32(16 * i + 8, r.sectors, true);
    dv.setUint32(16 * i + 12, unmap ? 1 : 0, true);
  });
  return out;
}
