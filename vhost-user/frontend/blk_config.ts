/**
 * Decoding `struct virtio_blk_config` (virtio 1.x §5.2.4) as a front-end reads it with GET_CONFIG.
 *
 * @module
 */

import { BlkConfig } from "../../devices/blk/device.ts";

/** Size QEMU 7.2's vhost-user-blk asks for: up to `write_zeroes_may_unmap` (discard and
 * write-zeroes are on by default). */
export const QEMU72_BLK_CONFIG_SIZE = 57;

/** The decoded virtio-blk config space. */
export interface BlkConfigInfo {
  /** Capacity in 512-byte sectors. */
  capacitySectors: number;
  /** Capacity in bytes. */
  capacityBytes: number;
  /** Largest segment (SIZE_MAX). */
  sizeMax: number;
  /** Most segments per request (SEG_MAX). */
  segMax: number;
  /** Logical block size (BLK_SIZE). */
  blkSize: number;
  /** Write cache enabled (CONFIG_WCE). */
  wce: number;
  /** Queues the device reports (MQ). */
  numQueues: number;
  /** Largest discard in sectors. */
  maxDiscardSectors: number;
  /** Most discard segments. */
  maxDiscardSeg: number;
  /** Discard alignment in sectors. */
  discardSectorAlignment: number;
  /** Largest write-zeroes in sectors. */
  maxWriteZeroesSectors: number;
  /** Most write-zeroes segments. */
  maxWriteZeroesSeg: number;
  /** Whether write-zeroes may unmap. */
  writeZeroesMayUnmap: number;
}

/** Decodes `bytes` (at least 57 bytes, from offset 0). */
export function decodeBlkConfig(bytes: Uint8Array): BlkConfigInfo {
  if (bytes.length < QEMU72_BLK_CONFIG_SIZE) {
    throw new RangeError(`virtio-blk config of ${bytes.length} bytes is too short`);
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const capacitySectors = Number(dv.getBigUint64(BlkConfig.CAPACITY, true));
  return {
    capacitySectors,
    capacityBytes: capacitySectors * 512,
    sizeMax: dv.getUint32(BlkConfig.SIZE_MAX, true),
    segMax: dv.getUint32(BlkConfig.SEG_MAX, true),
    blkSize: dv.getUint32(BlkConfig.BLK_SIZE, true),
    wce: dv.getUint8(BlkConfig.WCE),
    numQueues: dv.getUint16(BlkConfig.NUM_QUEUES, true),
    maxDiscardSectors: dv.getUint32(BlkConfig.MAX_DISCARD_SECTORS, true),
    maxDiscardSeg: dv.getUint32(BlkConfig.MAX_DISCARD_SEG, true),
    discardSectorAlignment: dv.getUint32(BlkConfig.DISCARD_SECTOR_ALIGNMENT, true),
    maxWriteZeroesSectors: dv.getUint32(BlkConfig.MAX_WRITE_ZEROES_SECTORS, true),
    maxWriteZeroesSeg: dv.getUint32(BlkConfig.MAX_WRITE_ZEROES_SEG, true),
    writeZeroesMayUnmap: dv.getUint8(BlkConfig.WRITE_ZEROES_MAY_UNMAP),
  };
}
