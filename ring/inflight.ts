/**
 * Inflight I/O tracking (vhost-user INFLIGHT_SHMFD), split-ring layout.
 *
 * QEMU keeps a shared buffer for the whole life of the VM and hands it to every back-end that
 * connects. The back-end marks each chain it pops and clears the mark once the chain is on the
 * used ring, so that a back-end restarted after a crash knows exactly which requests it had taken
 * and never completed, and resubmits them in the order it first saw them.
 *
 * Per queue: `{u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
 * DescState desc[desc_num]}` with `DescState = {u8 inflight; u8 pad[5]; u16 next; u64 counter}`.
 *
 * @module
 */

const HEADER = 16;
const DESC_STATE = 16;
const VERSION = 1;

/** Bytes one queue's region takes (rounded to 64 so every queue starts on a cache line). */
export function inflightQueueSize(queueSize: number): number {
  return Math.ceil((HEADER + DESC_STATE * queueSize) / 64) * 64;
}

/** One queue's slice of the shared inflight buffer. */
export class InflightRegion {
  readonly #view: DataView;
  readonly #base: number;
  readonly #descNum: number;
  #counter = 0;

  /** Wraps `descNum` entries at byte `base` of `view`. */
  constructor(view: DataView, base: number, descNum: number) {
    this.#view = view;
    this.#base = base;
    this.#descNum = descNum;
  }

  /** Entries per queue (the queue size QEMU gave GET/SET_INFLIGHT_FD). */
  get size(): number {
    return this.#descNum;
  }

  #desc(head: number): number {
    return this.#base + HEADER + head * DESC_STATE;
  }

  /** Marks a popped chain as taken. Heads past the region are ignored (see the back-end). */
  markTaken(head: number): void {
    if (head >= this.#descNum) return;
    const d = this.#desc(head);
    this.#view.setBigUint64(d + 8, BigInt(++this.#counter), true);
    this.#view.setUint8(d, 1);
  }

  /** Before publishing a used element: remember which head the batch ends with. */
  beforeComplete(head: number): void {
    this.#view.setUint16(this.#base + 12, head, true);
  }

  /** After publishing the used index: the chain is done. */
  afterComplete(head: number, usedIdx: number): void {
    if (head < this.#descNum) this.#view.setUint8(this.#desc(head), 0);
    this.#view.setUint16(this.#base + 14, usedIdx, true);
  }

  /**
   * Called when the ring starts. A fresh buffer is initialised and nothing is pending. Otherwise
   * returns the heads taken but never completed by an earlier back-end, oldest first, having
   * repaired the one case where it died between publishing the used index and clearing the mark.
   */
  recover(guestUsedIdx: number): number[] {
    const v = this.#view;
    if (v.getUint16(this.#base + 8, true) === 0) {
      v.setUint16(this.#base + 8, VERSION, true);
      v.setUint16(this.#base + 10, this.#descNum, true);
      v.setUint16(this.#base + 14, guestUsedIdx, true);
      this.#counter = 0;
      return [];
    }
    if (v.getUint16(this.#base + 14, true) !== guestUsedIdx) {
      const last = v.getUint16(this.#base + 12, true);
      if (last < this.#descNum) v.setUint8(this.#desc(last), 0);
      v.setUint16(this.#base + 14, guestUsedIdx, true);
    }
    const pending: [number, bigint][] = [];
    for (let head = 0; head < this.#descNum; head++) {
      const d = this.#desc(head);
      if (v.getUint8(d) === 1) pending.push([head, v.getBigUint64(d + 8, true)]);
    }
    pending.sort((a, b) => (a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0));
    this.#counter = pending.length ? Number(pending[pending.length - 1][1]) : 0;
    return pending.map(([head]) => head);
  }
}
