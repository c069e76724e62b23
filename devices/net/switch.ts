/**
 * A learning L2 switch inside one worker: every vhost-user socket of the service is a port (a
 * {@link SwitchPort} device, one queue pair), plus an optional uplink TAP. All ports share one
 * event loop and thread, so a frame goes from one guest's transmit buffers to a staging buffer and
 * from there into the other guest's receive buffers, with no locks and no hand-off.
 *
 * Forwarding: source addresses are learned per port; frames to a known unicast address go to its
 * port, everything else (broadcast, multicast, unknown) is flooded to every other port. Learned
 * addresses age out after `macAgeMs`, and a port's addresses are forgotten when its guest goes.
 *
 * Offloads: a frame with a partial checksum (NEEDS_CSUM) reaches a guest that acked GUEST_CSUM
 * (and the uplink TAP) unchanged; for any other guest the daemon completes the checksum first.
 * Switch ports do NOT offer HOST_TSO4/6 or GUEST_TSO4/6, and the uplink TAP is not given TSO:
 * no port ever sends a segmentation-offload frame, so none has to be segmented in software for a
 * guest that cannot take it. Guests still get large frames from a large MTU (9000 works).
 *
 * A guest with no receive buffers posted loses the frame (counted in rxDropped); the sender and
 * the other ports carry on.
 *
 * @module
 */

import { getLogger } from "../../log/mod.ts";
import type { DeviceEventLoop, VirtioDevice, Virtqueue } from "../device.ts";
import type { SplitQueue } from "../../ring/split_queue.ts";
import { signalEventFd } from "../../sys/event.ts";
import { closeQuietly } from "../../sys/libc.ts";
import { readFrame, writeFrame } from "../../sys/tap.ts";
import { Delivery, gatherTx, RxWriter } from "./frame_io.ts";
import {
  completeChecksum,
  featureBit,
  GSO_NONE,
  HDR_FLAGS,
  HDR_GSO_TYPE,
  headerSize,
  isGroupMac,
  macAt,
  NEEDS_CSUM,
  NET_HDR_SIZE,
  NetFeature,
  STAGING_SIZE,
} from "./header.ts";
import { MacTable } from "./mac_table.ts";
import { TX_BUDGET } from "./tap_device.ts";

/** Options of a switch service (structured-clonable). */
export interface NetSwitchOptions {
  /** Always "switch". */
  kind: "switch";
  /** Number of vhost-user ports (sockets). */
  ports: number;
  /** Nonblocking fd of the uplink TAP (opened by the CLI with a 12-byte header), or -1. */
  uplinkFd: number;
  /** The uplink's interface name, for logs. */
  uplinkName?: string;
  /** How long a learned address is remembered, in ms. */
  macAgeMs: number;
}

/** Features of a switch port: checksum offload both ways and merged receive buffers. */
export const SWITCH_PORT_FEATURES = [
  NetFeature.CSUM,
  NetFeature.GUEST_CSUM,
  NetFeature.MTU,
  NetFeature.MRG_RXBUF,
].reduce((acc, b) => acc | featureBit(b), 0n);

/** Frames read from the uplink per wake-up before other fds get a turn. */
const UPLINK_BUDGET = 64;
/** Largest queue size a port accepts. */
const MAX_QUEUE_SIZE = 1024;

/** Per-port counters. */
export interface PortCounters {
  /** Frames the port's guest sent. */
  txFrames: number;
  /** Frames from the guest that were dropped (malformed, or an offload it did not negotiate). */
  txDropped: number;
  /** Frames delivered to the guest. */
  rxFrames: number;
  /** Frames for the guest dropped because it had no buffers (or no driver). */
  rxDropped: number;
  /** Partial checksums the daemon completed for this guest. */
  csumCompleted: number;
}

/** The switch: forwarding table, ports, uplink, and the one staging buffer they share. */
export class L2Switch {
  /** Guest ports by number; unfilled slots are null until createDevice makes them. */
  readonly ports: (SwitchPort | null)[];
  /** Port number of the uplink TAP (after the guest ports). */
  readonly uplinkPort: number;
  /** The forwarding table. */
  readonly macs: MacTable;
  /** Uplink counters (tx = from the TAP, rx = to the TAP). */
  readonly uplinkCounters: PortCounters = newCounters();
  readonly #uplinkFd: number;
  readonly #staging = new Uint8Array(STAGING_SIZE);
  readonly #rx = new RxWriter(MAX_QUEUE_SIZE);
  readonly #log = getLogger(["vhostd", "switch"]);
  #uplinkWatched = false;

  /** Builds a switch with `options.ports` guest ports. */
  constructor(options: NetSwitchOptions) {
    this.ports = new Array(options.ports).fill(null);
    this.uplinkPort = options.ports;
    this.#uplinkFd = options.uplinkFd;
    this.macs = new MacTable(options.macAgeMs);
  }

  /** The shared staging buffer (12-byte header, then the frame). */
  get staging(): Uint8Array {
    return this.#staging;
  }

  /** The writer ports use to fill receive queues. */
  get rxWriter(): RxWriter {
    return this.#rx;
  }

  /** Starts reading the uplink TAP, once, in the loop the ports share. */
  watchUplink(loop: DeviceEventLoop): void {
    if (this.#uplinkFd < 0 || this.#uplinkWatched) return;
    this.#uplinkWatched = true;
    loop.watch(this.#uplinkFd, () => this.#fromUplink());
  }

  #fromUplink(): void {
    const staging = this.#staging;
    const now = performance.now();
    for (let n = 0; n < UPLINK_BUDGET; n++) {
      const len = readFrame(this.#uplinkFd, staging);
      if (len <= 0) break;
      if (len < NET_HDR_SIZE + 14) continue;
      this.uplinkCounters.txFrames++;
      this.forward(this.uplinkPort, len - NET_HDR_SIZE, now);
    }
    this.flushNotifications();
  }

  /**
   * Forwards the frame staged in {@link staging} (`frameLen` bytes after the header) that came in
   * on port `from`: learn its source, then send it to the destination's port or flood it.
   */
  forward(from: number, frameLen: number, now: number): void {
    const s = this.#staging;
    const dst = NET_HDR_SIZE;
    const src = NET_HDR_SIZE + 6;
    if (s[HDR_GSO_TYPE] !== GSO_NONE) {
      // Nobody was offered segmentation offload; a frame that claims it is malformed.
      this.#countersOf(from).txDropped++;
      return;
    }
    if (!isGroupMac(s, src)) this.macs.learn(macAt(s, src), from, now);
    if (!isGroupMac(s, dst)) {
      const port = this.macs.lookup(macAt(s, dst), now);
      if (port === from) return; // both ends on one port: not ours to deliver
      if (port >= 0) {
        this.#sendTo(port, frameLen, false);
        return;
      }
    }
    // Flood. Ports that take partial checksums go first, so the frame is still as sent.
    const partial = (s[HDR_FLAGS] & NEEDS_CSUM) !== 0;
    for (let p = 0; p <= this.uplinkPort; p++) {
      if (p !== from && (!partial || this.#acceptsPartial(p))) this.#sendTo(p, frameLen, true);
    }
    if (!partial) return;
    let completed = false;
    for (let p = 0; p <= this.uplinkPort; p++) {
      if (p === from || this.#acceptsPartial(p) || !this.#present(p)) continue;
      if (!completed) {
        if (!completeChecksum(s, 0, frameLen)) {
          this.#countersOf(from).txDropped++;
          return;
        }
        completed = true;
      }
      this.#sendTo(p, frameLen, true);
      this.#countersOf(p).csumCompleted++;
    }
  }

  #present(p: number): boolean {
    return p === this.uplinkPort ? this.#uplinkFd >= 0 : this.ports[p] !== null;
  }

  #acceptsPartial(p: number): boolean {
    return p === this.uplinkPort ? true : this.ports[p]?.guestCsum === true;
  }

  #countersOf(p: number): PortCounters {
    return p === this.uplinkPort ? this.uplinkCounters : this.ports[p]!.counters;
  }

  #sendTo(p: number, frameLen: number, flooding: boolean): void {
    const s = this.#staging;
    if (p === this.uplinkPort) {
      if (this.#uplinkFd < 0) return;
      // The TAP takes partial checksums itself (it has a virtio-net header too).
      if (writeFrame(this.#uplinkFd, s, NET_HDR_SIZE + frameLen) < 0) {
        this.uplinkCounters.rxDropped++;
      } else this.uplinkCounters.rxFrames++;
      return;
    }
    const port = this.ports[p];
    if (port === null) return;
    if (!flooding && (s[HDR_FLAGS] & NEEDS_CSUM) && !port.guestCsum) {
      if (!completeChecksum(s, 0, frameLen)) {
        port.counters.rxDropped++;
        return;
      }
      port.counters.csumCompleted++;
    }
    port.receive(s, frameLen, this.#rx);
  }

  /** Interrupts every guest that was given frames since the last call. */
  flushNotifications(): void {
    for (const p of this.ports) p?.flushNotification();
  }

  /** Logs the counters (at session end and shutdown). */
  logCounters(why: string): void {
    this.#log.info("{why}: ports {ports}; uplink {uplink}; {macs} addresses learned", {
      why,
      ports: JSON.stringify(this.ports.map((p) => p?.counters ?? null)),
      uplink: JSON.stringify(this.uplinkCounters),
      macs: this.macs.size,
    });
  }

  /** Closes the uplink TAP. */
  close(): void {
    closeQuietly(this.#uplinkFd);
  }
}

function newCounters(): PortCounters {
  return { txFrames: 0, txDropped: 0, rxFrames: 0, rxDropped: 0, csumCompleted: 0 };
}

/** One guest port of an {@link L2Switch}: a single-pair virtio-net device. */
export class SwitchPort implements VirtioDevice {
  /** virtio device id of a network card. */
  readonly deviceId = 1;
  /** Name in logs. */
  readonly name: string;
  /** One queue pair: RX 0, TX 1. */
  readonly numQueues = 2;
  /** Largest queue size accepted. */
  readonly maxQueueSize = MAX_QUEUE_SIZE;
  /** See {@link SWITCH_PORT_FEATURES}. */
  readonly features = SWITCH_PORT_FEATURES;
  /** This port's number. */
  readonly port: number;
  /** Counters. */
  readonly counters: PortCounters = newCounters();
  /** Whether the guest acked GUEST_CSUM (takes partial checksums). */
  guestCsum = false;
  readonly #switch: L2Switch;
  #loop: DeviceEventLoop | null = null;
  #hdrLen = NET_HDR_SIZE;
  #mergeable = false;
  #yielded = false;
  #dirty = false;

  /** Port `port` of `sw`. */
  constructor(sw: L2Switch, port: number) {
    this.#switch = sw;
    this.port = port;
    this.name = `switch.port${port}`;
  }

  /** Keeps the loop for deliveries outside kicks; the first port also watches the uplink. */
  start(loop: DeviceEventLoop): void {
    this.#loop = loop;
    this.#switch.watchUplink(loop);
  }

  /** Header size, merged buffers and checksum offload as the guest acked them. */
  setFeatures(acked: bigint): void {
    this.#hdrLen = headerSize(acked);
    this.#mergeable = (acked & featureBit(NetFeature.MRG_RXBUF)) !== 0n;
    this.guestCsum = (acked & featureBit(NetFeature.GUEST_CSUM)) !== 0n;
  }

  /** TX: forward what the guest sent. RX kicks need nothing: frames are pushed when they come. */
  processQueue(queue: Virtqueue): void {
    const q = queue as SplitQueue;
    if (q.index !== 1) return;
    if (this.#yielded) {
      this.#yielded = false;
      return;
    }
    const sw = this.#switch;
    const staging = sw.staging;
    const now = performance.now();
    for (let n = 0; n < TX_BUDGET; n++) {
      const chain = q.pop();
      if (chain === null) break;
      const frameLen = gatherTx(chain, this.#hdrLen, staging);
      q.push(chain, 0);
      if (frameLen < 14) {
        this.counters.txDropped++;
        continue;
      }
      this.counters.txFrames++;
      sw.forward(this.port, frameLen, now);
    }
    sw.flushNotifications();
    if (q.hasAvailable() && q.kickFd >= 0) {
      // Budget spent: let the loop serve other ports, then come back through our kick fd.
      this.#yielded = true;
      signalEventFd(q.kickFd);
    }
  }

  /** Puts a staged frame on this guest's receive queue, or drops and counts it. */
  receive(staging: Uint8Array, frameLen: number, rx: RxWriter): void {
    const q = this.#loop?.queue(0) as SplitQueue | null | undefined;
    if (!q) {
      this.counters.rxDropped++;
      return;
    }
    if (rx.deliver(q, staging, frameLen, this.#hdrLen, this.#mergeable) === Delivery.DELIVERED) {
      this.counters.rxFrames++;
      this.#dirty = true;
    } else this.counters.rxDropped++;
  }

  /** Interrupts the guest if frames were delivered since the last call. */
  flushNotification(): void {
    if (!this.#dirty) return;
    this.#dirty = false;
    this.#loop?.notify(0);
  }

  /** The guest went away: forget where its addresses were. */
  reset(): void {
    this.#switch.macs.forgetPort(this.port);
    this.#yielded = false;
    this.#dirty = false;
    this.guestCsum = false;
    this.#switch.logCounters(`port ${this.port} session ended`);
  }

  /** Shutdown: the last port closes the uplink. */
  close(): void {
    if (this.port === this.#switch.ports.length - 1) {
      this.#switch.logCounters("shutting down");
      this.#switch.close();
    }
  }
}

let shared: L2Switch | null = null;

/**
 * The worker's switch (one per worker: every port of the service is created in the same one),
 * with port `port` added.
 */
export function createSwitchPort(options: NetSwitchOptions, port: number): SwitchPort {
  shared ??= new L2Switch(options);
  const p = new SwitchPort(shared, port);
  shared.ports[port] = p;
  return p;
}
