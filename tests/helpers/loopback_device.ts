/**
 * A receive-style device written only against vhostd's public API (`mod.ts`), for
 * tests/rx_device_test.ts: what the driver sends on queue 1 comes back on queue 0, one message per
 * receive buffer. The device holds the messages until the driver posts buffers, and the driver's
 * buffers until messages come, the way a network device holds both ends of a link.
 *
 *   deno run -A tests/helpers/loopback_device.ts --socket PATH
 *
 * What it exercises of the {@link Virtqueue} contract: completing a round of receive buffers as
 * one batch ({@link Virtqueue.pushHead} without publishing, then {@link Virtqueue.publishUsed}),
 * giving back a buffer too small for the next message ({@link Virtqueue.unpop}, the message is
 * dropped), waiting for buffers with the kick re-armed and the race with the driver handled
 * ({@link Virtqueue.enableNotification}), and yielding after a budget ({@link Virtqueue.kickSelf}).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { type DeviceEventLoop, serveDevice, type VirtioDevice, type Virtqueue } from "../../mod.ts";

/** A device id no driver claims: only the test's own front-end drives this device. */
const LOOPBACK_DEVICE_ID = 0xfff0;
/** The queue the device fills. */
export const RX_QUEUE = 0;
/** The queue the driver sends on. */
export const TX_QUEUE = 1;
/** Transmit chains taken per call before yielding to the loop's other work. */
export const TX_BUDGET = 4;
/** Messages held while the driver posts no buffers; beyond it, transmit chains wait on the ring. */
const MAX_HELD = 64;

/** The loopback device; see the module documentation. */
export class LoopbackDevice implements VirtioDevice {
  /** {@inheritDoc VirtioDevice.deviceId} */
  readonly deviceId = LOOPBACK_DEVICE_ID;
  /** {@inheritDoc VirtioDevice.name} */
  readonly name = "loopback";
  /** {@inheritDoc VirtioDevice.numQueues} */
  readonly numQueues = 2;
  /** {@inheritDoc VirtioDevice.features} */
  readonly features = 0n;
  #loop: DeviceEventLoop | null = null;
  /** Messages sent and not yet delivered, oldest first. */
  #held: Uint8Array[] = [];
  /** Whether the last transmit call stopped at its budget (see {@link processQueue}). */
  #yielded = false;

  /** Keeps the loop, to reach the receive queue when a message comes on the other one. */
  start(loop: DeviceEventLoop): void {
    this.#loop = loop;
  }

  /** Receive kick: buffers were posted. Transmit kick: messages to loop back. */
  processQueue(q: Virtqueue): void {
    if (q.index === RX_QUEUE) {
      this.#deliver(q);
      return;
    }
    if (this.#yielded) {
      // The call right after a yield: take nothing, so that the loop serves other fds first.
      this.#yielded = false;
      return;
    }
    for (let n = 0; n < TX_BUDGET && this.#held.length < MAX_HELD; n++) {
      const chain = q.pop();
      if (chain === null) break;
      const message = new Uint8Array(chain.readableBytes);
      chain.read(message);
      this.#held.push(message);
      q.push(chain, 0);
    }
    if (q.hasAvailable() && this.#held.length < MAX_HELD && q.kickSelf()) this.#yielded = true;
    const rx = this.#loop?.queue(RX_QUEUE) ?? null;
    if (rx !== null && this.#deliver(rx) > 0) this.#loop!.notify(RX_QUEUE);
  }

  /**
   * Puts held messages into the driver's receive buffers, one each, and shows the driver the
   * whole round at once. Returns how many buffers were completed.
   */
  #deliver(rx: Virtqueue): number {
    let filled = 0;
    while (this.#held.length > 0) {
      const chain = rx.pop();
      if (chain === null) {
        if (rx.broken) break;
        // Out of buffers with messages waiting: ask for a kick when more are posted, unless some
        // already were (that kick would never come).
        if (rx.enableNotification()) continue;
        break;
      }
      const message = this.#held[0];
      if (chain.writableBytes < message.length) {
        // Too small for this message: the buffer goes back for a later, smaller one, and the
        // message is dropped (a datagram larger than the driver's buffers).
        rx.unpop(1);
        this.#held.shift();
        continue;
      }
      const written = chain.write(message);
      rx.pushHead(chain.head, written, false);
      this.#held.shift();
      filled++;
    }
    if (filled > 0) rx.publishUsed();
    return filled;
  }

  /** Forgets held messages (the driver reset the device). */
  reset(): void {
    this.#held = [];
    this.#yielded = false;
  }
}

/** Builds the device; vhostd calls this inside its data-plane worker. */
export function createDevice(): VirtioDevice {
  return new LoopbackDevice();
}

if (import.meta.main) {
  const { values } = parseArgs({ options: { socket: { type: "string" } } });
  if (!values.socket) {
    console.error("usage: deno run -A tests/helpers/loopback_device.ts --socket PATH");
    Deno.exit(2);
  }
  Deno.exit(
    await serveDevice({ socket: values.socket, module: import.meta.url, name: "loopback" }),
  );
}
