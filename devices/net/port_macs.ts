/**
 * The MAC addresses guest ports are configured with (`vhostd switch --port-mac`).
 *
 * A port with configured addresses sends from those alone. An address configured on any port is
 * reserved: ports not configured with it never send from it, even while no port holds it (a VM
 * that is paused, or not started yet, keeps its address). Several ports may be configured with
 * the same address, for a VM migrating between two ports of one switch: the forwarding table
 * gives it to whichever of them is live (see `MacTable`).
 *
 * @module
 */

import { formatMac } from "./header.ts";

/** Configured addresses per guest port. */
export class PortMacs {
  readonly #ofPort: readonly (readonly number[])[];
  readonly #reserved = new Set<number>();

  /** `perPort[p]` lists port `p`'s addresses (empty or missing: the port learns its own). */
  constructor(perPort: readonly (readonly number[])[] = []) {
    this.#ofPort = perPort.map((macs) => [...macs]);
    for (const macs of perPort) for (const mac of macs) this.#reserved.add(mac);
  }

  /** The addresses port `port` is configured with (empty when it learns its own). */
  of(port: number): readonly number[] {
    return this.#ofPort[port] ?? [];
  }

  /** Whether guest port `port` may send from `mac`. */
  allows(port: number, mac: number): boolean {
    const own = this.of(port);
    return own.length > 0 ? own.includes(mac) : !this.#reserved.has(mac);
  }

  /** Why port `port` may not send from `mac`, for a log line. */
  refusal(port: number, mac: number): string {
    const own = this.of(port);
    if (own.length > 0) return `its addresses are ${own.map(formatMac).join(", ")}`;
    const owners = this.#ofPort.flatMap((macs, p) => macs.includes(mac) ? [p] : []);
    return `the address is configured for port ${owners.join(", ")}`;
  }
}
