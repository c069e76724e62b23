/**
 * A virtio-blk request decoded from its descriptor chain (virtio 1.x §5.2.6): the header read once,
 * then handed to whichever engine executes it (synchronous preadv/pwritev or io_uring).
 *
 * The objects are preallocated (one for the synchronous engine, one per io_uring slot) and
 * refilled by each {@link BlkRequest.parse}: decoding allocates nothing.
 *
 * @module
 */

import type { ByteRef, DescriptorChain } from "../../ring/descriptor_chain.ts";

/** Request types. */
export const BlkRequestType = {
  IN: 0,
  OUT: 1,
  FLUSH: 4,
  GET_ID: 8,
  DISCARD: 11,
  WRITE_ZEROES: 13,
} as const;

/** Status byte values. */
export const BlkStatus = { OK: 0, IOERR: 1, UNSUPP: 2 } as const;

/** Size of `struct virtio_blk_outhdr`: type (le32), reserved (le32), sector (le64). */
export const BLK_HEADER_BYTES = 16;

/** One decoded request. */
export class BlkRequest {
  /** Head of its chain, reported in the used ring. */
  head = 0;
  /** Whether the chain has a writable byte for the status (its last writable byte). */
  hasStatus = false;
  /** Whether the whole header could be read; a request without one fails with an I/O error. */
  hasHeader = false;
  /** Request type (`BlkRequestType`); meaningful with {@link hasHeader}. */
  type = 0;
  /** First 512-byte sector. */
  sector = 0;
  /** Offset of the status byte among the chain's writable bytes. */
  statusAt = 0;
  /**
   * Data bytes the driver offered: the writable bytes before the status for a read (and GET_ID),
   * the readable bytes after the header for every other type.
   */
  dataBytes = 0;
  /**
   * Bytes to report written into the chain when the request succeeds: the status byte alone
   * unless the engine that executes it wrote data too (a read, GET_ID).
   */
  writtenOnSuccess = 1;
  /** Where the status byte is in guest memory (valid with {@link hasStatus}). */
  readonly status: ByteRef = { u8: new Uint8Array(0), offset: 0 };
  readonly #header = new Uint8Array(BLK_HEADER_BYTES);
  readonly #headerView = new DataView(this.#header.buffer);

  /** Decodes `chain`'s header and locates its status byte. */
  parse(chain: DescriptorChain): void {
    this.head = chain.head;
    this.writtenOnSuccess = 1;
    this.hasStatus = chain.writableBytes > 0 &&
      chain.writableByte(chain.writableBytes - 1, this.status);
    this.statusAt = this.hasStatus ? chain.writableBytes - 1 : 0;
    this.hasHeader = chain.read(this.#header) === BLK_HEADER_BYTES;
    if (!this.hasHeader) {
      this.type = this.sector = this.dataBytes = 0;
      return;
    }
    const hv = this.#headerView;
    this.type = hv.getUint32(0, true);
    this.sector = hv.getUint32(8, true) + hv.getUint32(12, true) * 4294967296;
    this.dataBytes = this.type === BlkRequestType.IN || this.type === BlkRequestType.GET_ID
      ? this.statusAt
      : chain.readableBytes - BLK_HEADER_BYTES;
  }
}
