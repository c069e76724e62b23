/**
 * The switch's forwarding table: which port each source MAC address was last seen on, forgotten
 * after an ageing time so that a guest that moved (or went away) is flooded to again.
 *
 * @module
 */

/** One learned address. */
interface MacEntry {
  /** Port the address was last seen on. */
  port: number;
  /** When, in milliseconds of the caller's clock. */
  seen: number;
}

/** A learning table with ageing. Updating a known address allocates nothing. */
export class MacTable {
  /** How long an address is remembered after it was last seen, in ms. */
  readonly ageMs: number;
  /** Most addresses kept; a full table learns nothing new until entries age out. */
  readonly capacity: number;
  readonly #entries = new Map<number, MacEntry>();
  #lastSweep = 0;

  /** Creates a table remembering addresses for `ageMs` ms, at most `capacity` of them. */
  constructor(ageMs = 300_000, capacity = 4096) {
    this.ageMs = ageMs;
    this.capacity = capacity;
  }

  /** Number of addresses held (aged ones included until the next sweep). */
  get size(): number {
    return this.#entries.size;
  }

  /** Records that `mac` was seen on `port` at time `now`. */
  learn(mac: number, port: number, now: number): void {
    if (now - this.#lastSweep >= this.ageMs / 2) this.expire(now);
    const e = this.#entries.get(mac);
    if (e !== undefined) {
      e.port = port;
      e.seen = now;
    } else if (this.#entries.size < this.capacity) {
      this.#entries.set(mac, { port, seen: now });
    }
  }

  /** The port `mac` was last seen on, or -1 if it is unknown or aged out. */
  lookup(mac: number, now: number): number {
    const e = this.#entries.get(mac);
    if (e === undefined || now - e.seen > this.ageMs) return -1;
    return e.port;
  }

  /** Drops every address older than the ageing time. */
  expire(now: number): void {
    this.#lastSweep = now;
    for (const [mac, e] of this.#entries) {
      if (now - e.seen > this.ageMs) this.#entries.delete(mac);
    }
  }

  /** Forgets every address learned on `port` (its guest disconnected). */
  forgetPort(port: number): void {
    for (const [mac, e] of this.#entries) if (e.port === port) this.#entries.delete(mac);
  }
}
