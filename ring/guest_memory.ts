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

import { closeQuietly, fdSize } from "../sys/libc.ts";
import { Mapping } from "../sys/mman.ts";

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
  /** Offset of the first byte in the fd, and so in {@link u8}. */
  readonly mmapOffset: number;
  /** Host virtual address of the region's first byte. */
  readonly hostAddress: number;
  /** The whole mapping as bytes (region data starts at {@link mmapOffset}). */
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
    this.#mapping = Mapping.map(fd, info.memorySize + info.mmapOffset);
    this.hostAddress = this.#mapping.address + info.mmapOffset;
    const buf = this.#mapping.buffer;
    this.u8 = new Uint8Array(buf);
    this.u16 = new Uint16Array(buf, 0, Math.floor(buf.byteLength / 2));
    this.u32 = new Uint32Array(buf, 0, Math.floor(buf.byteLength / 4));
    this.view = new DataView(buf);
  }

  /** Whether [gpa, gpa+length) lies wholly inside this region. */
  containsGpa(gpa: number, length: number): boolean {
    return gpa >= this.guestPhysAddr && length >= 0 &&
      gpa + length <= this.guestPhysAddr + this.memorySize;
  }

  /** Whether [uva, uva+length) lies wholly inside this region. */
  containsUva(uva: number, length: number): boolean {
    return uva >= this.userspaceAddr && length >= 0 &&
      uva + length <= this.userspaceAddr + this.memorySize;
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
      // mmap would accept a region larger than its file, and touching the part past the end is
      // SIGBUS, which no JavaScript handler can catch: refuse it here instead.
      let size: number;
      try {
        size = fdSize(fd);
      } catch (e) {
        throw new MemoryError(`memory region fd cannot be sized: ${(e as Error).message}`);
      }
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
