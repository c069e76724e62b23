/**
 * The switch's forwarding table: which port each source MAC address belongs to.
 *
 * Two kinds of entries, because two kinds of ports send:
 *
 * - **Held** addresses (learned on a guest port): the port keeps them while it is live, so that
 *   no other guest can take them over by sending from them, and they do not age out. They are
 *   let go only when the port is released ({@link MacTable.forgetPort}: its device was suspended
 *   or its front-end left), or when the port, at its limit, replaces one it has not used for the
 *   ageing time with a new one.
 * - **Floating** addresses (learned on the uplink): hosts outside move freely and a VM migrating
 *   in from another host must be able to claim its address, so these age out and move to
 *   whichever port sends from them next.
 *
 * Every port has its own limit: a port at its limit learns nothing new (unless some of its own
 * addresses have been idle for the ageing time: those make room), and never evicts another
 * port's entries. The table therefore holds at most the sum of the limits.
 *
 * @module
 */

/** One learned address. */
interface MacEntry {
  /** The address. */
  mac: number;
  /** Port it belongs to. */
  port: number;
  /** When it was last seen, in milliseconds of the caller's clock. */
  seen: number;
  /** Held by its port until released (see the module doc); otherwise floating. */
  held: boolean;
}

/** What {@link MacTable.learn} made of a source address. */
export const enum Learned {
  /** The address is this port's (known already, newly learned, or moved here). */
  OK = 0,
  /** Another port holds the address: a frame from it must be dropped. */
  HELD = 1,
  /** The port is at its limit, and none of its own addresses was idle long enough to drop. */
  LIMIT = 2,
}

/** A learning table with per-port limits, held and floating addresses, and ageing. */
export class MacTable {
  /** How long a floating address is remembered, and how long a held one must be idle before
   * its port may replace it, in ms. */
  readonly ageMs: number;
  readonly #entries = new Map<number, MacEntry>();
  readonly #byPort: Map<number, MacEntry>[];
  readonly #limits: readonly number[];
  /** Per port: until then, none of its entries can have been idle for the ageing time. */
  readonly #replaceableAt: Float64Array;
  #lastSweep = 0;

  /**
   * A table remembering floating addresses for `ageMs` ms, where port `p` holds at most
   * `limits[p]` addresses (ports are numbered from 0 to `limits.length - 1`).
   */
  constructor(ageMs = 300_000, limits: readonly number[] = [4096]) {
    this.ageMs = ageMs;
    this.#limits = [...limits];
    this.#byPort = limits.map(() => new Map());
    this.#replaceableAt = new Float64Array(limits.length);
  }

  /** Number of addresses held (aged floating ones included until the next sweep). */
  get size(): number {
    return this.#entries.size;
  }

  /** Number of addresses port `port` has now. */
  countOf(port: number): number {
    return this.#byPort[port].size;
  }

  /** Most addresses port `port` may have. */
  limitOf(port: number): number {
    return this.#limits[port];
  }

  /** The port that holds `mac` (as a held address), or -1. */
  holderOf(mac: number): number {
    const e = this.#entries.get(mac);
    return e !== undefined && e.held ? e.port : -1;
  }

  /**
   * Records that `mac` was the source of a frame from `port` at time `now`; with `hold`, the
   * address becomes the port's held address (a guest port), otherwise a floating one (the
   * uplink). Says whether the frame may go on.
   */
  learn(mac: number, port: number, now: number, hold: boolean): Learned {
    if (now - this.#lastSweep >= this.ageMs / 2) this.expire(now);
    const e = this.#entries.get(mac);
    if (e !== undefined) {
      if (e.port === port) {
        e.seen = now;
        e.held = hold;
        return Learned.OK;
      }
      if (e.held) return Learned.HELD;
    }
    // New here: make room first, so that a refused move leaves the floating entry where it was.
    if (!this.#roomOn(port, now)) return Learned.LIMIT;
    if (e !== undefined) this.#byPort[e.port].delete(mac);
    const entry: MacEntry = e ?? { mac, port, seen: now, held: hold };
    entry.port = port;
    entry.seen = now;
    entry.held = hold;
    this.#entries.set(mac, entry);
    this.#byPort[port].set(mac, entry);
    return Learned.OK;
  }

  /**
   * Whether `port` can take one more address at `now`: it is under its limit, or some of its
   * addresses have been idle for longer than the ageing time, and are dropped for it.
   */
  #roomOn(port: number, now: number): boolean {
    const own = this.#byPort[port];
    const limit = this.#limits[port];
    if (own.size < limit) return true;
    // Every idle address goes in one scan, and the next scan waits until the oldest address
    // kept could be idle: however a guest times its addresses, a port costs at most one scan
    // of its own entries per address it learned.
    if (now < this.#replaceableAt[port]) return false;
    let oldestKept = Infinity;
    for (const e of own.values()) {
      if (now - e.seen > this.ageMs) {
        own.delete(e.mac);
        this.#entries.delete(e.mac);
      } else if (e.seen < oldestKept) oldestKept = e.seen;
    }
    this.#replaceableAt[port] = oldestKept + this.ageMs;
    return own.size < limit;
  }

  /** The port `mac` belongs to, or -1 if it is unknown (or a floating address that aged out). */
  lookup(mac: number, now: number): number {
    const e = this.#entries.get(mac);
    if (e === undefined || (!e.held && now - e.seen > this.ageMs)) return -1;
    return e.port;
  }

  /** Drops every floating address older than the ageing time. */
  expire(now: number): void {
    this.#lastSweep = now;
    for (const [mac, e] of this.#entries) {
      if (!e.held && now - e.seen > this.ageMs) {
        this.#entries.delete(mac);
        this.#byPort[e.port].delete(mac);
      }
    }
  }

  /** Releases every address of `port` (its device was suspended or its front-end left). */
  forgetPort(port: number): void {
    const own = this.#byPort[port];
    for (const mac of own.keys()) this.#entries.delete(mac);
    own.clear();
    this.#replaceableAt[port] = 0;
  }
}
