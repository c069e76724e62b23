/**
 * Moving frames between guest buffers and a staging buffer: gathering a transmit chain, and
 * scattering a frame over one or more receive chains (MRG_RXBUF), publishing them together.
 *
 * The staging layout is the 12-byte header then the frame; a guest with the 10-byte legacy
 * header gets the first 10 bytes of it. Copies use the chains' own region views; each segment
 * copy of more than 64 bytes makes one short-lived subarray view (V8 has no offset `set` between
 * two buffers), small ones are byte loops.
 *
 * @module
 */

import type { DescriptorChain, Virtqueue } from "../device.ts";
import { HDR_NUM_BUFFERS, NET_HDR_SIZE } from "./header.ts";

/** Copies `n` bytes of `src` from `srcOff` into guest segment memory `dst` at `dstOff`. */
function copyBytes(dst: Uint8Array, dstOff: number, src: Uint8Array, srcOff: number, n: number) {
  if (n <= 64) { for (let k = 0; k < n; k++) dst[dstOff + k] = src[srcOff + k]; }
  else dst.set(src.subarray(srcOff, srcOff + n), dstOff);
}

/**
 * Copies a transmit chain (header of `hdrLen` bytes, then the frame) into `staging` in the
 * 12-byte-header layout. Returns the frame length (without header), or -1 if the chain is shorter
 * than a header or longer than `staging` allows.
 */
export function gatherTx(chain: DescriptorChain, hdrLen: number, staging: Uint8Array): number {
  const total = chain.readableBytes;
  if (total < hdrLen || total - hdrLen + NET_HDR_SIZE > staging.length) return -1;
  if (hdrLen < NET_HDR_SIZE) staging.fill(0, hdrLen, NET_HDR_SIZE);
  let pos = 0; // position in the chain's readable bytes
  for (let i = 0; i < chain.readableCount; i++) {
    const len = chain.length[i];
    const u8 = chain.region[i]!.u8;
    const off = chain.offset[i];
    let done = 0;
    while (done < len) {
      // Bytes before hdrLen go to the header; the rest to the frame after the 12-byte header.
      const inHdr = pos < hdrLen;
      const n = inHdr ? Math.min(len - done, hdrLen - pos) : len - done;
      const dst = inHdr ? pos : pos - hdrLen + NET_HDR_SIZE;
      if (n <= 64) { for (let k = 0; k < n; k++) staging[dst + k] = u8[off + done + k]; }
      else staging.set(u8.subarray(off + done, off + done + n), dst);
      done += n;
      pos += n;
    }
  }
  return total - hdrLen;
}

/** Outcome of {@link RxWriter.deliver}. */
export const enum Delivery {
  /** The frame is on the receive ring. */
  DELIVERED = 0,
  /** The ring has too few buffers now; nothing was consumed. */
  NO_BUFFERS = 1,
  /** The frame can never fit (no MRG_RXBUF and a buffer smaller than the frame). */
  TOO_BIG = 2,
}

/**
 * Scatters staged frames over receive chains. Preallocated; holds the state of one frame that is
 * part-way onto the ring (see {@link RxWriter.deliver}'s `hold`), so use one per receive queue
 * that may hold frames.
 */
export class RxWriter {
  readonly #heads: Uint16Array;
  readonly #lens: Uint32Array;
  // A frame part-way onto the ring: chains taken so far, bytes written, where num_buffers goes.
  #count = 0;
  #pos = 0;
  #numBufU8: Uint8Array | null = null;
  #numBufAt = 0;

  /** Creates a writer for queues of up to `maxQueueSize` entries. */
  constructor(maxQueueSize: number) {
    this.#heads = new Uint16Array(maxQueueSize);
    this.#lens = new Uint32Array(maxQueueSize);
  }

  /** Whether a frame is part-way onto the ring (chains taken, nothing published yet). */
  get holding(): boolean {
    return this.#count > 0;
  }

  /** Forgets a held frame (the ring was reset; its chains went with it). */
  clear(): void {
    this.#count = 0;
    this.#pos = 0;
    this.#numBufU8 = null;
  }

  /**
   * Puts the staged frame (`frameLen` bytes after the 12-byte header in `staging`) on receive
   * queue `q` for a driver using `hdrLen`-byte headers. With `mergeable`, it may span several
   * chains and num_buffers says how many; every chain's used element is published at once, so
   * the driver never sees part of a packet.
   *
   * When the ring runs dry mid-packet: without `hold`, the chains taken are given back untouched
   * (as far as the driver can tell); with `hold`, they are kept and filled, and the next call
   * with the same frame carries on where this one stopped (the driver then needs only to post
   * the rest, which matters because a kick comes only for buffers posted after the device last
   * looked). Either way NO_BUFFERS is returned.
   */
  deliver(
    q: Virtqueue,
    staging: Uint8Array,
    frameLen: number,
    hdrLen: number,
    mergeable: boolean,
    hold = false,
  ): Delivery {
    const total = hdrLen + frameLen;
    if (this.#count === 0) {
      // One buffer unless the count is patched in below (it always is for an unsplit header).
      staging[HDR_NUM_BUFFERS] = 1;
      staging[HDR_NUM_BUFFERS + 1] = 0;
      this.#pos = 0;
      this.#numBufU8 = null;
    }
    let pos = this.#pos; // bytes of header+frame written so far
    let count = this.#count;
    while (pos < total) {
      const chain = count === this.#heads.length ? null : q.pop();
      if (chain === null) {
        if (hold && count > 0) {
          this.#count = count;
          this.#pos = pos;
        } else {
          if (count > 0) q.unpop(count);
          this.clear();
        }
        return Delivery.NO_BUFFERS;
      }
      if (count === 0 && chain.writableBytes < hdrLen) {
        // A buffer too small for a header is a driver bug; give it back empty.
        q.pushHead(chain.head, 0);
        continue;
      }
      if (!mergeable && chain.writableBytes < total) {
        q.unpop(1);
        return Delivery.TOO_BIG;
      }
      let written = 0;
      for (let i = chain.readableCount; i < chain.segmentCount && pos < total; i++) {
        const u8 = chain.region[i]!.u8;
        const off = chain.offset[i];
        const len = chain.length[i];
        let done = 0;
        while (done < len && pos < total) {
          const inHdr = pos < hdrLen;
          const n = Math.min(len - done, inHdr ? hdrLen - pos : total - pos);
          const src = inHdr ? pos : pos - hdrLen + NET_HDR_SIZE;
          if (
            count === 0 && inHdr && hdrLen === NET_HDR_SIZE && pos <= HDR_NUM_BUFFERS &&
            HDR_NUM_BUFFERS + 1 < pos + n
          ) {
            // Remember where num_buffers lands in guest memory (the header may be split).
            this.#numBufU8 = u8;
            this.#numBufAt = off + done + HDR_NUM_BUFFERS - pos;
          }
          copyBytes(u8, off + done, staging, src, n);
          done += n;
          pos += n;
          written += n;
        }
      }
      this.#heads[count] = chain.head;
      this.#lens[count] = written;
      count++;
    }
    const nb = this.#numBufU8;
    if (nb !== null) {
      nb[this.#numBufAt] = count & 0xff;
      nb[this.#numBufAt + 1] = count >> 8;
    }
    for (let i = 0; i < count; i++) q.pushHead(this.#heads[i], this.#lens[i], false);
    q.publishUsed();
    this.clear();
    return Delivery.DELIVERED;
  }
}
