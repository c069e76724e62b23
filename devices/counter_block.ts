/**
 * Named counters kept in a `Float64Array`, for a device's {@link DeviceMetrics}: code counts with
 * `counters.txDropped++` as on a plain object, while the numbers live in an array that vhostd
 * moves to shared memory, where the main thread reads them for `/metrics` without asking the
 * worker. A count is then a plain store into a typed array: no allocation, no atomics (one
 * writer, and aligned 8-byte stores are never torn).
 *
 * @module
 */

import type { DeviceMetrics } from "./device.ts";

/** The storage side of a {@link CounterBlock}. */
export interface CounterStorage<K extends string> {
  /** The array the counters live in, in the order of their names. */
  readonly slots: Float64Array;
  /** Moves the counters into `target` (at least as many slots), carrying their values over. */
  moveTo(target: Float64Array): void;
  /** The counters as a plain object (what `JSON.stringify` writes, e.g. in logs). */
  toJSON(): Record<K, number>;
}

/** Counters named `K`, each a number property backed by a slot of {@link CounterStorage.slots}. */
export type CounterBlock<K extends string> = Record<K, number> & CounterStorage<K>;

/**
 * Makes a factory of counter blocks with the given names (all 0 at first). The accessors are
 * defined once, on one prototype, so every block has the same shape and stays fast to count in.
 */
export function defineCounters<K extends string>(names: readonly K[]): () => CounterBlock<K> {
  class Block {
    slots: Float64Array = new Float64Array(names.length);
    moveTo(target: Float64Array): void {
      target.set(this.slots);
      this.slots = target;
    }
    toJSON(): Record<string, number> {
      const out: Record<string, number> = {};
      names.forEach((name, i) => out[name] = this.slots[i]);
      return out;
    }
  }
  names.forEach((name, i) => {
    Object.defineProperty(Block.prototype, name, {
      get(this: Block) {
        return this.slots[i];
      },
      set(this: Block, v: number) {
        this.slots[i] = v;
      },
      enumerable: true,
    });
  });
  return () => new Block() as unknown as CounterBlock<K>;
}

/**
 * The {@link DeviceMetrics} of counter blocks: `blocks[i]`'s counters take the series `series[i]`
 * describes (one per counter name, in order), one block after the other in the shared array.
 */
export function blockMetrics(
  blocks: readonly { block: CounterStorage<string>; series: DeviceMetrics["series"] }[],
): DeviceMetrics {
  return {
    series: blocks.flatMap((b) => b.series),
    bind(slots: Float64Array): void {
      let at = 0;
      for (const { block, series } of blocks) {
        block.moveTo(slots.subarray(at, at + series.length));
        at += series.length;
      }
    },
  };
}
