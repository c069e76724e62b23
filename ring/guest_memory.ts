/**
 * Guest RAM as QEMU hands it over: regions of shared memory, each known by its guest-physical
 * address and by its address in the front-end's (QEMU's) own address space.
 *
 * Every translation is bounds-checked against one region: an address range that is not wholly
 * inside a region the front-end gave us translates to nothing, so a hostile guest cannot make the
 * daemon touch memory outside guest RAM.
 *
 * @module
 */

import { closeQuietly } from "../sys/libc.ts";
import { fdStat } from "../sys/fd_kind.ts";
import { Mapping } from "../sys/mman.ts";

/** mmap offsets must be multiples of the page size. */
const HOST_PAGE = 4096;

/** A region as described by SET_MEM_TABLE or ADD_MEM_REG. */
export interface MemoryRegionInfo {
  /** Guest-physical address of the region's first byte. */
  guestPhysAddr: number;
  /** Size in bytes. */
  memorySize: number;
  /** The front-end's virtual address of the first byte (ring addresses use these). */
  userspaceAddr: number;
  /** Offset of the region's first byte in the fd. */
  mmapOffset: number;
}

/** One mapped region with views over it, created once. */
export class MemoryRegion implements MemoryRegionInfo {
  /** Guest-physical address of the first byte. */
  readonly guestPhysAddr: number;
  /** Size in bytes. */
  readonly memorySize: number;
  /** Front-end virtual address of the first byte. */
  readonly userspaceAddr: number;
  /** Offset of the first byte in the fd. */
  readonly mmapOffset: number;
  /**
   * Index of the region's first byte in the views: only the pages holding the region are
   * mapped (from the page holding `mmapOffset`), so this is less than a page.
   */
  readonly base: number;
  /** Host virtual address of the region's first byte. */
  readonly hostAddress: number;
  /** The mapping as bytes (region data starts at {@link base}). */
  readonly u8: Uint8Array;
  /** The whole mapping as 16-bit words, for atomic ring index access. */
  readonly u16: Uint16Array;
  /** The whole mapping as 32-bit words. */
  readonly u32: Uint32Array;
  /** The whole mapping as a DataView (little-endian accessors). */
  readonly view: DataView;
  readonly #mapping: Mapping;

  /** Maps the region from `fd` (the fd itself stays owned by the caller). */
  constructor(info: MemoryRegionInfo, fd: number) {
    this.guestPhysAddr = info.guestPhysAddr;
    this.memorySize = info.memorySize;
    this.userspaceAddr = info.userspaceAddr;
    this.mmapOffset = info.mmapOffset;
    // Map only the region's own pages: mapping [0, offset + size) would reserve address space
    // for everything before it, and a front-end choosing a huge offset could exhaust it.
    this.base = info.mmapOffset % HOST_PAGE;
    this.#mapping = Mapping.map(fd, info.memorySize + this.base, info.mmapOffset - this.base);
    this.hostAddress = this.#mapping.address + this.base;
    const buf = this.#mapping.buffer;
    this.u8 = new Uint8Array(buf);
    this.u16 = new Uint16Array(buf, 0, Math.floor(buf.byteLength / 2));
    this.u32 = new Uint32Array(buf, 0, Math.floor(buf.byteLength / 4));
    this.view = new DataView(buf);
  }

  /**
   * Whether [gpa, gpa+length) lies wholly inside this region. Written with differences only,
   * which stay exact for any addresses below 2^53 (a sum near 2^53 would round).
   */
  containsGpa(gpa: number, length: number): boolean {
    return gpa >= this.guestPhysAddr && length >= 0 && length <= this.memorySize &&
      gpa - this.guestPhysAddr <= this.memorySize - length;
  }

  /** Whether [uva, uva+length) lies wholly inside this region (exact, as {@link containsGpa}). */
  containsUva(uva: number, length: number): boolean {
    return uva >= this.userspaceAddr && length >= 0 && length <= this.memorySize &&
      uva - this.userspaceAddr <= this.memorySize - length;
  }

  /** Index in the views of guest-physical address `gpa` (which must be inside the region). */
  offsetOfGpa(gpa: number): number {
    return gpa - this.guestPhysAddr + this.base;
  }

  /** Index in the views of front-end address `uva` (which must be inside the region). */
  offsetOfUva(uva: number): number {
    return uva - this.userspaceAddr + this.base;
  }

  /** Guest-physical address of index `offset` in the views. */
  gpaOfOffset(offset: number): number {
    return offset - this.base + this.guestPhysAddr;
  }

  /** Unmaps the region; the views become empty. */
  unmap(): void {
    this.#mapping.unmap();
  }
}

/** Thrown when the front-end describes memory that cannot be accepted. */
export class MemoryError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "MemoryError";
  }
}

const MAX_ADDRESS = 2 ** 53;

/** The set of guest RAM regions, with bounds-checked translation. */
export class GuestMemory {
  /** How many regions may be mapped at once. */
  readonly maxRegions: number;
  #regions: MemoryRegion[] = [];
  #lastHit: MemoryRegion | null = null;
  /** Bumped on every change, so holders of translated addresses know to translate again. */
  generation = 0;

  /** Creates an empty table admitting at most `maxRegions` regions. */
  constructor(maxRegions = 256) {
    this.maxRegions = maxRegions;
  }

  /** The mapped regions, ordered by guest-physical address. */
  get regions(): readonly MemoryRegion[] {
    return this.#regions;
  }

  /** Maps and adds one region. The fd is always closed (the mapping keeps what it needs). */
  add(info: MemoryRegionInfo, fd: number): MemoryRegion {
    try {
      validate(info);
      if (this.#regions.length >= this.maxRegions) {
        throw new MemoryError(`too many memory regions (at most ${this.maxRegions})`);
      }
      for (const r of this.#regions) {
        if (overlaps(r.guestPhysAddr, r.memorySize, info.guestPhysAddr, info.memorySize)) {
          throw new MemoryError(
            `memory region at guest address 0x${info.guestPhysAddr.toString(16)} overlaps another`,
          );
        }
      }
      // Guest RAM is a memfd, a hugetlbfs or tmpfs file: anything else (a pipe, a socket, a
      // device) is not memory the front-end may hand over.
      const { kind, size } = fdStat(fd);
      if (kind !== "file") {
        throw new MemoryError(`memory region fd is a ${kind}, not a memory file`);
      }
      // mmap would accept a region larger than its file, and touching the part past the end is
      // SIGBUS, which no JavaScript handler can catch: refuse it here instead.
      if (info.mmapOffset + info.memorySize > size) {
        throw new MemoryError(
          `memory region of ${info.memorySize} bytes at offset ${info.mmapOffset} is larger than ` +
            `its fd (${size} bytes)`,
        );
      }
      const region = new MemoryRegion(info, fd);
      this.#regions.push(region);
      this.#regions.sort((a, b) => a.guestPhysAddr - b.guestPhysAddr);
      this.generation++;
      return region;
    } finally {
      closeQuietly(fd);
    }
  }

  /** Removes the region matching (guest address, front-end address, size); false if none does. */
  remove(info: MemoryRegionInfo): boolean {
    const i = this.#regions.findIndex((r) =>
      r.guestPhysAddr === info.guestPhysAddr && r.userspaceAddr === info.userspaceAddr &&
      r.memorySize === info.memorySize
    );
    if (i < 0) return false;
    const [region] = this.#regions.splice(i, 1);
    this.#lastHit = null;
    this.generation++;
    region.unmap();
    return true;
  }

  /** Unmaps every region. */
  clear(): void {
    for (const r of this.#regions) r.unmap();
    this.#regions = [];
    this.#lastHit = null;
    this.generation++;
  }

  /** The region wholly containing guest-physical [gpa, gpa+length), or null. */
  findGpa(gpa: number, length: number): MemoryRegion | null {
    const hit = this.#lastHit;
    if (hit !== null && hit.containsGpa(gpa, length)) return hit;
    for (const r of this.#regions) {
      if (r.containsGpa(gpa, length)) {
        this.#lastHit = r;
        return r;
      }
    }
    return null;
  }

  /** The region wholly containing front-end virtual [uva, uva+length), or null. */
  findUva(uva: number, length: number): MemoryRegion | null {
    for (const r of this.#regions) if (r.containsUva(uva, length)) return r;
    return null;
  }
}

function overlaps(a: number, alen: number, b: number, blen: number): boolean {
  return a < b + blen && b < a + alen;
}

function validate(info: MemoryRegionInfo): void {
  const { guestPhysAddr, memorySize, userspaceAddr, mmapOffset } = info;
  for (const v of [guestPhysAddr, memorySize, userspaceAddr, mmapOffset]) {
    if (!Number.isSafeInteger(v) || v < 0 || v >= MAX_ADDRESS) {
      throw new MemoryError(`memory region field out of range: ${v}`);
    }
  }
  if (memorySize === 0) throw new MemoryError("memory region of size 0");
  if (guestPhysAddr + memorySize > MAX_ADDRESS || userspaceAddr + memorySize > MAX_ADDRESS) {
    throw new MemoryError("memory region wraps the address space");
  }
  if (mmapOffset % 8 !== 0) throw new MemoryError(`unaligned mmap offset ${mmapOffset}`);
}
