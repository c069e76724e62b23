/**
 * Guest memory and the split virtqueue, device side.
 *
 * @module
 */

export * from "./guest_memory.ts";
export * from "./descriptor_chain.ts";
export * from "./split_queue.ts";
export * from "./inflight.ts";
