/**
 * Guest RAM as a front-end provides it: one memfd, cut into regions that get a made-up
 * guest-physical layout (with holes between them, so that a back-end mixing up address spaces
 * fails), mapped once into this process. The "front-end virtual address" of each region is the
 * real address of our own mapping, exactly as QEMU passes its own virtual addresses.
 *
 * A bump allocator hands out guest buffers (rings, request headers, data) that never move.
 *
 * @module
 */

import { closeQuietly } from "../../sys/libc.ts";
import { createMemfd, Mapping } from "../../sys/mman.ts";
import type { MemRegion } from "../message.ts";

/** How one region is laid out. */
export interface RegionLayout {
  /** Guest-physical address of its first byte. */
  guestPhysAddr: number;
  /** Size in bytes (a multiple of 4096). */
  size: number;
}

/** A guest buffer: its guest-physical address, and where it is in our mapping. */
export interface GuestBuffer {
  /** Guest-physical address (what descriptors carry). */
  gpa: number;
  /** Front-end virtual address (what SET_VRING_ADDR carries). */
  uva: number;
  /** Offset within {@link GuestRam.u8} (the mapping of every region). */
  offset: number;
  /** Length in bytes. */
  length: number;
}

/** The default layout: 16 MiB at 0, and 48 MiB at 4 GiB (like RAM split around the PCI hole). */
export const DEFAULT_LAYOUT: readonly RegionLayout[] = [
  { guestPhysAddr: 0, size: 16 << 20 },
  { guestPhysAddr: 0x1_0000_0000, size: 48 << 20 },
];

/** What a worker needs to see the same guest RAM (structured-clonable). */
export interface SharedRam {
  /** Address of the mapping in this process. */
  address: number;
  /** Length of the mapping. */
  length: number;
  /** The regions (with their memfd offsets). */
  regions: MemRegion[];
  /** Offset in the memfd where the mapping starts (see {@link GuestRam.fileOffset}); default 0. */
  fileOffset?: number;
}

/** Guest RAM backed by one memfd, mapped once, with a layout of one or more regions. */
export class GuestRam {
  /** The memfd (sent with SET_MEM_TABLE / ADD_MEM_REG). */
  readonly fd: number;
  /** The regions, as SET_MEM_TABLE describes them. */
  readonly regions: readonly MemRegion[];
  /** The mapping of every region as bytes. */
  readonly u8: Uint8Array;
  /** The same as 16-bit words (ring indices). */
  readonly u16: Uint16Array;
  /** The same as 32-bit words. */
  readonly u32: Uint32Array;
  /** The same as a DataView. */
  readonly view: DataView;
  /** Host address of the mapping's first byte. */
  readonly address: number;
  /**
   * Offset in the memfd of the first region (0 unless {@link create} was given one): the regions'
   * `mmapOffset`s start there, and only the part of the memfd from there on is mapped.
   */
  readonly fileOffset: number;
  readonly #mapping: Mapping | null;
  readonly #next: number[];

  private constructor(
    fd: number,
    regions: MemRegion[],
    mapping: Mapping | null,
    buf: ArrayBuffer,
    fileOffset: number,
  ) {
    this.fd = fd;
    this.regions = regions;
    this.fileOffset = fileOffset;
    this.#mapping = mapping;
    this.u8 = new Uint8Array(buf);
    this.u16 = new Uint16Array(buf);
    this.u32 = new Uint32Array(buf);
    this.view = new DataView(buf);
    this.address = mapping?.address ?? 0;
    this.#next = regions.map(() => 0);
  }

  /**
   * Creates the memfd and maps it. With `fileOffset` (a multiple of 4096) the regions start that
   * far into the memfd, which is sparse up to there: a front-end may place guest RAM at any
   * offset of its file, and a back-end must map only the regions' own pages.
   */
  static create(layout: readonly RegionLayout[] = DEFAULT_LAYOUT, fileOffset = 0): GuestRam {
    let total = 0;
    for (const l of layout) {
      if (l.size <= 0 || l.size % 4096 !== 0) throw new RangeError(`bad region size ${l.size}`);
      total += l.size;
    }
    if (fileOffset < 0 || fileOffset % 4096 !== 0) {
      throw new RangeError(`bad file offset ${fileOffset}`);
    }
    const fd = createMemfd("vhostd-frontend-ram", fileOffset + total);
    try {
      const mapping = Mapping.map(fd, total, fileOffset);
      let offset = fileOffset;
      const regions = layout.map((l) => {
        const r: MemRegion = {
          guestPhysAddr: l.guestPhysAddr,
          memorySize: l.size,
          userspaceAddr: mapping.address + offset,
          mmapOffset: offset,
        };
        offset += l.size;
        return r;
      });
      return new GuestRam(fd, regions, mapping, mapping.buffer, fileOffset);
    } catch (e) {
      closeQuietly(fd);
      throw e;
    }
  }

  /**
   * Attaches to RAM another thread of this process created (see {@link shared}). The view does
   * not own the mapping: the creator unmaps it after this thread is done.
   */
  static attach(s: SharedRam): GuestRam {
    const p = Deno.UnsafePointer.create(BigInt(s.address));
    if (p === null) throw new RangeError("null guest RAM address");
    const buf = Deno.UnsafePointerView.getArrayBuffer(p, s.length);
    const ram = new GuestRam(-1, s.regions, null, buf, s.fileOffset ?? 0);
    return ram;
  }

  /** What {@link attach} needs, to post to a worker. */
  get shared(): SharedRam {
    return {
      address: this.address,
      length: this.u8.length,
      regions: this.regions.map((r) => ({ ...r })),
      fileOffset: this.fileOffset,
    };
  }

  /** The descriptions to send, one per region, with the memfd for each. */
  get fds(): number[] {
    return this.regions.map(() => this.fd);
  }

  /**
   * Allocates `length` bytes aligned to `align` in region `region` (default: the last region,
   * which in the default layout lies above 4 GiB, so 64-bit addresses are exercised).
   */
  alloc(length: number, align = 16, region = this.regions.length - 1): GuestBuffer {
    const r = this.regions[region];
    if (r === undefined) throw new RangeError(`no region ${region}`);
    const start = Math.ceil(this.#next[region] / align) * align;
    if (start + length > r.memorySize) {
      throw new RangeError(`guest RAM region ${region} is full (${length} bytes asked)`);
    }
    this.#next[region] = start + length;
    return {
      gpa: r.guestPhysAddr + start,
      uva: r.userspaceAddr + start,
      offset: r.mmapOffset - this.fileOffset + start,
      length,
    };
  }

  /** Offset in {@link u8} of guest-physical `gpa`, checking [gpa, gpa+length) is in one region. */
  offsetOf(gpa: number, length = 1): number {
    for (const r of this.regions) {
      if (gpa >= r.guestPhysAddr && gpa + length <= r.guestPhysAddr + r.memorySize) {
        return r.mmapOffset - this.fileOffset + gpa - r.guestPhysAddr;
      }
    }
    throw new RangeError(`guest address 0x${gpa.toString(16)} (+${length}) is not in guest RAM`);
  }

  /** A view of a buffer's bytes. */
  bytes(b: GuestBuffer): Uint8Array {
    return this.u8.subarray(b.offset, b.offset + b.length);
  }

  /** Unmaps and closes (only for RAM this thread created). Idempotent. */
  close(): void {
    if (this.#mapping === null || !this.#mapping.mapped) return;
    this.#mapping.unmap();
    closeQuietly(this.fd);
  }
}
