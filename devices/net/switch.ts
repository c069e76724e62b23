/**
 * A learning L2 switch inside one worker: every vhost-user socket of the service is a port (a
 * {@link SwitchPort} device, one queue pair), plus an optional uplink TAP. All ports share one
 * event loop and thread, so a frame goes from one guest's transmit buffers to a staging buffer and
 * from there into the other guest's receive buffers, with no locks and no hand-off.
 *
 * Forwarding: source addresses are learned per port; frames to a known unicast address go to its
 * port, everything else (broadcast, multicast, unknown) is flooded to every other port.
 *
 * Guests are not trusted (a multi-tenant host):
 *
 * - An address a guest port sends from is that port's until the port is released (its device is
 *   suspended, or its front-end leaves): a frame from another port with that source is dropped
 *   and counted, never learned (see {@link MacTable}). Ports may instead be configured with their
 *   addresses (see {@link PortMacs}). Moving an address is releasing it: a VM migrating between
 *   two ports stops on one (which releases its addresses) and starts on the other, whose first
 *   frame or announcement ({@link SwitchPort.announce}) takes the address.
 * - Each port learns at most a limited number of addresses, so that no port can fill the table.
 * - Each port floods (broadcast, multicast, unknown unicast) at a limited rate.
 * - Headers are rebuilt between ports: a receiver gets a partial checksum (NEEDS_CSUM with its
 *   offsets) when it takes them, a completed checksum otherwise, and nothing else the sender
 *   wrote (see {@link sanitizeHeader}). The uplink TAP is a port like the others.
 * - Whatever a guest can make happen is logged through a rate limit ({@link ThrottledLog}).
 *
 * Offloads: switch ports do NOT offer HOST_TSO4/6 or GUEST_TSO4/6, and the uplink TAP is not
 * given TSO: no port ever sends a segmentation-offload frame, so none has to be segmented in
 * software for a guest that cannot take it. Guests still get large frames from a large MTU (9000
 * works).
 *
 * A guest with no receive buffers posted loses the frame (counted in rxDropped); the sender and
 * the other ports carry on.
 *
 * @module
 */

import { getLogger } from "../../log/mod.ts";
import type { DeviceEventLoop, DeviceMetrics, VirtioDevice, Virtqueue } from "../device.ts";
import { closeQuietly } from "../../sys/libc.ts";
import { readFrame, writeFrame } from "../../sys/tap.ts";
import { Delivery, gatherTx, RxWriter } from "./frame_io.ts";
import {
  completeChecksum,
  featureBit,
  formatMac,
  HDR_CSUM_START,
  HDR_FLAGS,
  HDR_NUM_BUFFERS,
  headerSize,
  isGroupMac,
  macAt,
  NEEDS_CSUM,
  NET_HDR_SIZE,
  NetFeature,
  sanitizeHeader,
  STAGING_SIZE,
} from "./header.ts";
import { Learned, MacTable } from "./mac_table.ts";
import { PortMacs } from "./port_macs.ts";
import { writeRarpAnnouncement } from "./rarp.ts";
import { TX_BUDGET } from "./tap_device.ts";
import { ThrottledLog } from "./throttled_log.ts";
import { TokenBucket } from "./token_bucket.ts";
import { newPortCounters, type PortCounters, switchPortSeries } from "./net_metrics.ts";
import { blockMetrics } from "../counter_block.ts";

/** Default ageing time of addresses learned on the uplink, in seconds (`--mac-age`). */
export const DEFAULT_MAC_AGE_S = 300;
/** Default number of addresses a guest port may learn (`--max-macs`). */
export const DEFAULT_MAX_MACS = 64;
/** Default number of addresses the uplink may learn (`--uplink-max-macs`). */
export const DEFAULT_UPLINK_MAX_MACS = 4096;
/**
 * Default flood rate limit per port, in frames per second with a burst of as many
 * (`--flood-rate`): far above what ARP, neighbour discovery and DHCP need, far below what would
 * keep every other guest busy.
 */
export const DEFAULT_FLOOD_RATE = 1000;

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
  /**
   * How long an address learned on the uplink is remembered, and how long a guest port's
   * address must go unused before the port, at its limit, may replace it; in ms.
   */
  macAgeMs: number;
  /** Addresses each guest port is configured with, by port (missing or empty: it learns). */
  portMacs?: number[][];
  /** Most addresses a guest port learns (default {@link DEFAULT_MAX_MACS}). */
  maxMacs?: number;
  /** Most addresses learned on the uplink (default {@link DEFAULT_UPLINK_MAX_MACS}). */
  uplinkMaxMacs?: number;
  /** Frames per second each port may flood, in bursts of as many; 0: no limit. */
  floodRate?: number;
}

/**
 * Features of a switch port: checksum offload both ways, merged receive buffers, and guest
 * announcements after a migration.
 */
export const SWITCH_PORT_FEATURES = [
  NetFeature.CSUM,
  NetFeature.GUEST_CSUM,
  NetFeature.MTU,
  NetFeature.MRG_RXBUF,
  NetFeature.GUEST_ANNOUNCE,
].reduce((acc, b) => acc | featureBit(b), 0n);

/** Frames read from the uplink per wake-up before other fds get a turn. */
const UPLINK_BUDGET = 64;
/** Largest queue size a port accepts. */
const MAX_QUEUE_SIZE = 1024;

export type { PortCounters };

/** The switch: forwarding table, ports, uplink, and the one staging buffer they share. */
export class L2Switch {
  /** Guest ports by number; unfilled slots are null until createDevice makes them. */
  readonly ports: (SwitchPort | null)[];
  /** Port number of the uplink TAP (after the guest ports). */
  readonly uplinkPort: number;
  /** The forwarding table. */
  readonly macs: MacTable;
  /** The addresses guest ports are configured with. */
  readonly portMacs: PortMacs;
  /** Uplink counters (tx = from the TAP, rx = to the TAP). */
  readonly uplinkCounters: PortCounters = newPortCounters();
  readonly #uplinkFd: number;
  readonly #uplinkName: string;
  readonly #staging = new Uint8Array(STAGING_SIZE);
  readonly #rx = new RxWriter(MAX_QUEUE_SIZE);
  readonly #log = getLogger(["vhostd", "switch"]);
  /** Per port (the uplink last): its flood budget, or null without a limit. */
  readonly #flood: (TokenBucket | null)[];
  /** Per port (the uplink last): the rate limit on log lines it can cause. */
  readonly #events: ThrottledLog[];
  #uplinkWatched = false;

  /** Builds a switch with `options.ports` guest ports. */
  constructor(options: NetSwitchOptions) {
    const ports = options.ports;
    this.ports = new Array(ports).fill(null);
    this.uplinkPort = ports;
    this.#uplinkFd = options.uplinkFd;
    this.#uplinkName = options.uplinkName ?? "uplink";
    this.portMacs = new PortMacs(options.portMacs ?? []);
    // A configured port sends from its own addresses only, so that is its limit too.
    const limits = Array.from({ length: ports + 1 }, (_, p) => {
      if (p === ports) return options.uplinkMaxMacs ?? DEFAULT_UPLINK_MAX_MACS;
      const configured = this.portMacs.of(p).length;
      return configured > 0 ? configured : options.maxMacs ?? DEFAULT_MAX_MACS;
    });
    this.macs = new MacTable(options.macAgeMs, limits);
    const rate = options.floodRate ?? DEFAULT_FLOOD_RATE;
    this.#flood = limits.map(() => rate > 0 ? new TokenBucket(rate) : null);
    this.#events = limits.map(() => new ThrottledLog(this.#log));
  }

  /** The shared staging buffer (12-byte header, then the frame). */
  get staging(): Uint8Array {
    return this.#staging;
  }

  /** The writer ports use to fill receive queues. */
  get rxWriter(): RxWriter {
    return this.#rx;
  }

  /** Whether the switch has an uplink TAP. */
  get hasUplink(): boolean {
    return this.#uplinkFd >= 0;
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
   * on port `from`: rebuild its header, check and learn its source, then send it to the
   * destination's port or flood it (within the port's flood budget).
   */
  forward(from: number, frameLen: number, now: number): void {
    const s = this.#staging;
    const counters = this.#countersOf(from);
    if (!sanitizeHeader(s, 0, frameLen, this.#sendsPartial(from))) {
      counters.txDropped++;
      return;
    }
    if (!this.#admitSource(from, now)) return;
    const dst = NET_HDR_SIZE;
    if (!isGroupMac(s, dst)) {
      const port = this.macs.lookup(macAt(s, dst), now);
      if (port === from) return; // both ends on one port: not ours to deliver
      if (port >= 0) {
        this.#sendTo(port, frameLen, false);
        return;
      }
    }
    const budget = this.#flood[from];
    if (budget !== null && !budget.take(now)) {
      counters.floodDropped++;
      return;
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
        if (!this.#complete(frameLen)) {
          counters.txDropped++;
          return;
        }
        completed = true;
      }
      this.#sendTo(p, frameLen, true);
      this.#countersOf(p).csumCompleted++;
    }
  }

  /**
   * Checks the staged frame's source address against the port it came from, and learns it.
   * Returns false (the frame is dropped, counted and, within the port's log budget, logged) for
   * a group address, an address this guest port may not use, one another port holds, or a new
   * one beyond the port's limit. The uplink's frames from new addresses beyond its limit still
   * pass, unlearned: the uplink is the way to the rest of the network, not a tenant.
   */
  #admitSource(from: number, now: number): boolean {
    const s = this.#staging;
    const at = NET_HDR_SIZE + 6;
    const counters = this.#countersOf(from);
    const guest = from !== this.uplinkPort;
    const mac = macAt(s, at);
    if (isGroupMac(s, at)) {
      counters.spoofDropped++;
      this.#event(from, now, "{port} sent a frame from group address {mac}: dropped", mac);
      return false;
    }
    if (guest && !this.portMacs.allows(from, mac)) {
      counters.spoofDropped++;
      this.#event(
        from,
        now,
        "{port} sent a frame from {mac}, which is not its address ({why})",
        mac,
        {
          why: this.portMacs.refusal(from, mac),
        },
      );
      return false;
    }
    const learned = this.macs.learn(mac, from, now, guest);
    if (learned === Learned.OK) return true;
    if (learned === Learned.HELD) {
      counters.spoofDropped++;
      this.#event(from, now, "{port} sent a frame from {mac}, which {holder} holds: dropped", mac, {
        holder: this.#portName(this.macs.holderOf(mac)),
      });
      return false;
    }
    if (!guest) return true;
    counters.limitDropped++;
    this.#event(
      from,
      now,
      "{port} sent a frame from {mac}, a new address beyond its limit of {limit}: dropped",
      mac,
      { limit: this.macs.limitOf(from) },
    );
    return false;
  }

  /** Warns of an event port `p` caused about address `mac`, within the port's log budget. */
  #event(p: number, now: number, message: string, mac: number, more: Record<string, unknown> = {}) {
    this.portEvent(p, now, message, { mac: formatMac(mac), ...more });
  }

  #portName(p: number): string {
    return p === this.uplinkPort ? `uplink ${this.#uplinkName}` : `port ${p}`;
  }

  /**
   * Port `port` went live: it takes the addresses it is configured with, unless a live port
   * holds one (two ports configured alike for a migration); it gets that one once the other
   * port is released, on its first frame or announcement.
   */
  claimConfigured(port: number, now: number): void {
    for (const mac of this.portMacs.of(port)) {
      if (this.macs.learn(mac, port, now, true) === Learned.HELD) {
        this.#event(port, now, "{port} went live, but {holder} still holds {mac}", mac, {
          holder: this.#portName(this.macs.holderOf(mac)),
        });
      }
    }
  }

  /** Port `port` stopped (suspended or disconnected): its addresses are free for other ports. */
  release(port: number): void {
    this.macs.forgetPort(port);
  }

  /**
   * Announces `mac` on behalf of port `port` (vhost-user SEND_RARP): a RARP broadcast from
   * `mac`, forwarded as if the port's guest had sent it, so the address moves to this port (when
   * no other port holds it) and every other port and the uplink learn where it is.
   */
  announce(port: number, mac: Uint8Array, now: number): void {
    const len = writeRarpAnnouncement(this.#staging, NET_HDR_SIZE, mac);
    this.#staging.fill(0, 0, NET_HDR_SIZE);
    const counters = this.#countersOf(port);
    counters.announces++;
    counters.txFrames++;
    this.forward(port, len, now);
    this.flushNotifications();
  }

  /**
   * Logs an event port `port` caused (a warning, or with `info` an ordinary event), within the
   * port's log budget: the port's guest must not be able to flood the log.
   */
  portEvent(
    port: number,
    now: number,
    message: string,
    properties: Record<string, unknown>,
    info = false,
  ): void {
    const props = { port: this.#portName(port), ...properties };
    if (info) this.#events[port].info(now, message, props);
    else this.#events[port].warn(now, message, props);
  }

  #present(p: number): boolean {
    return p === this.uplinkPort ? this.#uplinkFd >= 0 : this.ports[p] !== null;
  }

  /** Whether port `p` may send partial checksums (the TAP does, as we asked it to). */
  #sendsPartial(p: number): boolean {
    return p === this.uplinkPort ? true : this.ports[p]?.hostCsum === true;
  }

  #acceptsPartial(p: number): boolean {
    return p === this.uplinkPort ? true : this.ports[p]?.guestCsum === true;
  }

  #countersOf(p: number): PortCounters {
    return p === this.uplinkPort ? this.uplinkCounters : this.ports[p]!.counters;
  }

  /** Completes the staged partial checksum; the header then says nothing about checksums. */
  #complete(frameLen: number): boolean {
    if (!completeChecksum(this.#staging, 0, frameLen)) return false;
    this.#staging.fill(0, HDR_CSUM_START, HDR_NUM_BUFFERS);
    return true;
  }

  #sendTo(p: number, frameLen: number, flooding: boolean): void {
    const s = this.#staging;
    if (p === this.uplinkPort) {
      if (this.#uplinkFd < 0) return;
      // num_buffers is a receiving guest's; the TAP reads none (a guest port may have set it).
      s[HDR_NUM_BUFFERS] = s[HDR_NUM_BUFFERS + 1] = 0;
      // The TAP takes partial checksums itself (it has a virtio-net header too).
      if (writeFrame(this.#uplinkFd, s, NET_HDR_SIZE + frameLen) < 0) {
        this.uplinkCounters.rxDropped++;
      } else this.uplinkCounters.rxFrames++;
      return;
    }
    const port = this.ports[p];
    if (port === null) return;
    if (!flooding && (s[HDR_FLAGS] & NEEDS_CSUM) && !port.guestCsum) {
      if (!this.#complete(frameLen)) {
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

  /**
   * Logs the counters: at shutdown, or at the end of port `port`'s session (which its guest can
   * cause at will, so within that port's log budget).
   */
  logCounters(why: string, port = -1): void {
    const message = "{why}: ports {ports}; uplink {uplink}; {macs} addresses learned";
    const properties = {
      why,
      ports: JSON.stringify(this.ports.map((p) => p?.counters ?? null)),
      uplink: JSON.stringify(this.uplinkCounters),
      macs: this.macs.size,
    };
    if (port < 0) this.#log.info(message, properties);
    else this.portEvent(port, performance.now(), message, properties, true);
  }

  /** Closes the uplink TAP. */
  close(): void {
    closeQuietly(this.#uplinkFd);
  }
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
  readonly counters: PortCounters = newPortCounters();
  /** Whether the guest acked GUEST_CSUM (takes partial checksums). */
  guestCsum = false;
  /** Whether the guest acked CSUM (may send partial checksums). */
  hostCsum = false;
  readonly #switch: L2Switch;
  #loop: DeviceEventLoop | null = null;
  #hdrLen = NET_HDR_SIZE;
  #mergeable = false;
  #yielded = false;
  #dirty = false;
  #live = false;

  /** Port `port` of `sw`. */
  constructor(sw: L2Switch, port: number) {
    this.#switch = sw;
    this.port = port;
    this.name = `switch.port${port}`;
  }

  /** The port's counters as metrics; port 0's also carry the uplink's (as `<switch>.uplink`). */
  get metrics(): DeviceMetrics {
    const blocks = [{ block: this.counters, series: switchPortSeries() }];
    if (this.port === 0 && this.#switch.hasUplink) {
      blocks.push({ block: this.#switch.uplinkCounters, series: switchPortSeries("uplink") });
    }
    return blockMetrics(blocks);
  }

  /** Whether the front-end has rings running (between {@link resumed} and {@link suspended}). */
  get live(): boolean {
    return this.#live;
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
    this.hostCsum = (acked & featureBit(NetFeature.CSUM)) !== 0n;
  }

  /** TX: forward what the guest sent. RX kicks need nothing: frames are pushed when they come. */
  processQueue(q: Virtqueue): void {
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
    // Budget spent: let the loop serve other ports, then come back as if kicked.
    if (q.hasAvailable() && q.kickSelf()) this.#yielded = true;
  }

  /** Puts a staged frame on this guest's receive queue, or drops and counts it. */
  receive(staging: Uint8Array, frameLen: number, rx: RxWriter): void {
    const q = this.#loop?.queue(0);
    if (!q) {
      this.counters.rxDropped++;
      return;
    }
    if (rx.deliver(q, staging, frameLen, this.#hdrLen, this.#mergeable) === Delivery.DELIVERED) {
      this.counters.rxFrames++;
      this.#dirty = true;
    } else {
      this.counters.rxDropped++;
      // A ring the guest broke is stopped (and reported) now, not when it next kicks.
      if (q.broken) this.#loop?.notify(0);
    }
  }

  /** Interrupts the guest if frames were delivered since the last call. */
  flushNotification(): void {
    if (!this.#dirty) return;
    this.#dirty = false;
    this.#loop?.notify(0);
  }

  /**
   * The front-end started a ring while none ran (the VM started, resumed, or arrived by
   * migration): the port takes its configured addresses, if it has any and no live port holds
   * them.
   */
  resumed(): void {
    this.#live = true;
    this.#switch.claimConfigured(this.port, performance.now());
  }

  /**
   * Every ring stopped (the VM paused, migrated away, or its driver is going): the port lets go
   * of its addresses, so that another port (the same VM after a migration) can take them.
   */
  suspended(): void {
    this.#live = false;
    this.#switch.release(this.port);
  }

  /**
   * QEMU's SEND_RARP after a migration, for a guest that cannot announce itself: a RARP
   * broadcast from `mac` goes out as if the guest had sent it. Ignored (and logged) while the
   * port is not live: a stopped port must not take an address from the one that runs.
   */
  announce(mac: Uint8Array): void {
    const now = performance.now();
    if (!this.#live) {
      this.#switch.portEvent(this.port, now, "{port} is not running: announcement ignored", {});
      return;
    }
    this.#switch.announce(this.port, mac, now);
  }

  /** The guest went away: forget where its addresses were. */
  reset(): void {
    this.#live = false;
    this.#switch.release(this.port);
    this.#yielded = false;
    this.#dirty = false;
    this.guestCsum = false;
    this.hostCsum = false;
    this.#switch.logCounters(`port ${this.port} session ended`, this.port);
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
