/**
 * The byte layout of a split virtqueue (virtio 1.x §2.7), shared by the device side
 * (`ring/split_queue.ts`) and the front-end library's driver side
 * (`vhost-user/frontend/driver_queue.ts`), so that both use the same offsets and neither spells
 * them as bare numbers.
 *
 * All three parts are little-endian. The descriptor table holds `size` entries of
 * {@link DESC_SIZE} bytes; the available ring is `flags`, `idx`, `size` 16-bit heads and then
 * `used_event`; the used ring is `flags`, `idx`, `size` elements of {@link USED_ELEM_SIZE} bytes
 * and then `avail_event`. The two event fields exist only with VIRTIO_F_EVENT_IDX, but their room
 * is always part of the ring.
 *
 * @module
 */

/** Largest queue size the split ring format allows. */
export const MAX_QUEUE_SIZE = 32768;

/** Descriptor flag: the chain goes on at `next`. */
export const VIRTQ_DESC_F_NEXT = 1;
/** Descriptor flag: the buffer is device-writable. */
export const VIRTQ_DESC_F_WRITE = 2;
/** Descriptor flag: the buffer holds a table of indirect descriptors. */
export const VIRTQ_DESC_F_INDIRECT = 4;
/** used->flags: the device asks not to be kicked. */
export const VRING_USED_F_NO_NOTIFY = 1;
/** avail->flags: the driver asks not to be interrupted. */
export const VRING_AVAIL_F_NO_INTERRUPT = 1;

/** Bytes per descriptor: addr (u64), len (u32), flags (u16), next (u16). */
export const DESC_SIZE = 16;
/** Offset of a descriptor's `addr` (low 32 bits; the high 32 follow). */
export const DESC_ADDR = 0;
/** Offset of a descriptor's `len`. */
export const DESC_LEN = 8;
/** Offset of a descriptor's `flags`. */
export const DESC_FLAGS = 12;
/** Offset of a descriptor's `next`. */
export const DESC_NEXT = 14;
/** Alignment of the descriptor table. */
export const DESC_ALIGN = 16;

/** Offset of `flags` in the available and the used ring. */
export const RING_FLAGS = 0;
/** Offset of `idx` in the available and the used ring. */
export const RING_IDX = 2;
/** Offset of the first entry (head or used element) in the available and the used ring. */
export const RING_ENTRIES = 4;

/** Bytes per available-ring entry (a head index). */
export const AVAIL_ELEM_SIZE = 2;
/** Alignment of the available ring. */
export const AVAIL_ALIGN = 2;
/** Bytes per used element: id (u32), len (u32). */
export const USED_ELEM_SIZE = 8;
/** Offset of a used element's `len` (its `id` is at 0). */
export const USED_ELEM_LEN = 4;
/** Alignment of the used ring. */
export const USED_ALIGN = 4;

/** Bytes of the table for `size` descriptors. */
export function descTableSize(size: number): number {
  return DESC_SIZE * size;
}

/** Bytes of an available ring of `size` entries, `used_event` included. */
export function availRingSize(size: number): number {
  return RING_ENTRIES + AVAIL_ELEM_SIZE * size + 2;
}

/** Bytes of a used ring of `size` elements, `avail_event` included. */
export function usedRingSize(size: number): number {
  return RING_ENTRIES + USED_ELEM_SIZE * size + 2;
}

/** Offset of entry `slot` in an available ring. */
export function availEntry(slot: number): number {
  return RING_ENTRIES + AVAIL_ELEM_SIZE * slot;
}

/** Offset of element `slot` in a used ring. */
export function usedElem(slot: number): number {
  return RING_ENTRIES + USED_ELEM_SIZE * slot;
}

/**
 * Offset of `used_event` in an available ring of `size` entries: the driver asks for an
 * interrupt only once the used index passes it (VIRTIO_F_EVENT_IDX).
 */
export function usedEventOffset(size: number): number {
  return availEntry(size);
}

/**
 * Offset of `avail_event` in a used ring of `size` elements: the device asks for a kick only once
 * the available index passes it (VIRTIO_F_EVENT_IDX).
 */
export function availEventOffset(size: number): number {
  return usedElem(size);
}
