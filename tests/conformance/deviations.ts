/**
 * Where a back-end under test departs from what the specification asks. Each entry names the
 * behaviour the spec (virtio 1.x, or QEMU's vhost-user.rst) requires and what the back-end does
 * instead. The conformance tests assert the *observed* behaviour for the back-ends listed here,
 * so a test fails the day the peer changes (and the entry must then be removed); every other
 * back-end is held to the spec.
 *
 * @module
 */

import type { BackendKind } from "./backends.ts";

/** A known departure from the spec. */
export interface Deviation {
  /** The back-ends that show it. */
  backends: readonly BackendKind[];
  /** What the specification asks. */
  spec: string;
  /** What those back-ends do. */
  observed: string;
}

/** The known deviations, by name. */
export const DEVIATIONS = {
  GET_ID_PARTIAL_WRITE: {
    backends: ["qsd"],
    spec: "virtio 1.x §2.7.8.2: the device MUST write at least `len` bytes (the used length) " +
      "before updating used->idx; GET_ID's reply is a 20-byte field (NUL-padded if shorter).",
    observed: "qemu-storage-daemon 7.2 writes strlen(serial)+1 bytes of the 20-byte ID " +
      '("vhost_user_blk\\0"), leaves bytes 15-19 untouched, and still reports used length 21.',
  },
  SIZE_MAX_ZERO: {
    backends: ["qsd"],
    spec: "virtio 1.x §5.2.4: with VIRTIO_BLK_F_SIZE_MAX offered, size_max is the largest " +
      "segment the device accepts; 0 is not a usable limit.",
    observed: "qemu-storage-daemon 7.2 offers VIRTIO_BLK_F_SIZE_MAX but reports size_max = 0.",
  },
  GET_CONFIG_IGNORES_OFFSET: {
    backends: ["qsd"],
    spec: "vhost-user.rst GET_CONFIG: the payload's `offset` is the offset into the device's " +
      "config space; the reply carries `size` bytes from there.",
    observed: "qemu-storage-daemon 7.2 (libvhost-user) ignores `offset` and always returns the " +
      "config space from offset 0 (QEMU itself only ever reads from 0, so it goes unnoticed).",
  },
  UNCHECKED_QUEUE_INDEX: {
    backends: ["qsd"],
    spec: "vhost-user.rst: queue indices name one of the GET_QUEUE_NUM queues; with REPLY_ACK " +
      "a request that cannot be honoured gets a non-zero reply (or the connection is dropped).",
    observed: "qemu-storage-daemon 7.2 (libvhost-user vu_set_vring_num_exec) acknowledges " +
      "SET_VRING_NUM for queue 7 of 2 with 0 (success): the index is not range-checked, so the " +
      "write lands past the end of its queue array.",
  },
} as const satisfies Record<string, Deviation>;

/** Whether `kind` shows deviation `name`. */
export function deviates(kind: BackendKind, name: keyof typeof DEVIATIONS): boolean {
  return (DEVIATIONS[name].backends as readonly BackendKind[]).includes(kind);
}
