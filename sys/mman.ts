/**
 * Shared memory mappings of file descriptors (guest RAM handed over by QEMU as memfds).
 *
 * One `ArrayBuffer` is made per mapping, once: creating views over foreign memory is expensive and
 * drives V8 garbage collections. Before `munmap` the buffer is detached, so that a stale view reads
 * as empty instead of touching unmapped memory (which would be SIGSEGV, not an exception).
 *
 * @module
 */

import { check, cstring, errno, libc, SysError } from "./libc.ts";

const PROT_READ = 1;
const PROT_WRITE = 2;
const MAP_SHARED = 1;
const MAP_FAILED = 0xffffffffffffffffn;
const MFD_CLOEXEC = 1;

/** A `MAP_SHARED` mapping of an fd, with one zero-copy ArrayBuffer over it. */
export class Mapping {
  /** Length of the mapping in bytes. */
  readonly length: number;
  /** Host virtual address of the first byte (exact: user addresses are below 2^47). */
  readonly address: number;
  #pointer: Deno.PointerObject | null;
  #buffer: ArrayBuffer;

  private constructor(pointer: Deno.PointerObject, length: number) {
    this.#pointer = pointer;
    this.length = length;
    this.address = Number(Deno.UnsafePointer.value(pointer));
    this.#buffer = Deno.UnsafePointerView.getArrayBuffer(pointer, length);
  }

  /** Maps `length` bytes of `fd` from file offset `offset`, readable and writable, shared. */
  static map(fd: number, length: number, offset = 0): Mapping {
    if (!Number.isSafeInteger(length) || length <= 0) {
      throw new RangeError(`cannot map ${length} bytes`);
    }
    const p = libc.mmap(
      null,
      BigInt(length),
      PROT_READ | PROT_WRITE,
      MAP_SHARED,
      fd,
      BigInt(offset),
    );
    if (p === null || Deno.UnsafePointer.value(p) === MAP_FAILED) {
      throw new SysError("mmap", errno(), `(${length} bytes of fd ${fd})`);
    }
    return new Mapping(p, length);
  }

  /** The ArrayBuffer over the whole mapping (detached once {@link unmap} has run). */
  get buffer(): ArrayBuffer {
    return this.#buffer;
  }

  /** Whether the mapping is still in place. */
  get mapped(): boolean {
    return this.#pointer !== null;
  }

  /** Detaches the ArrayBuffer, then unmaps. Idempotent. */
  unmap(): void {
    if (this.#pointer === null) return;
    // transfer(0) detaches the old buffer: every view over it now has length 0.
    this.#buffer = this.#buffer.transfer(0);
    const p = this.#pointer;
    this.#pointer = null;
    check(libc.munmap(p, BigInt(this.length)), "munmap");
  }
}

/** Creates an anonymous memfd of `size` bytes (the front-end side of guest RAM, and tests). */
export function createMemfd(name: string, size: number): number {
  const fd = check(libc.memfd_create(cstring(name), MFD_CLOEXEC), "memfd_create");
  check(libc.ftruncate(fd, BigInt(size)), "ftruncate");
  return fd;
}
