/**
 * virtio-net backed by a TAP interface: queue pair k (RX 2k, TX 2k+1) is bound to the TAP's
 * queue k. The virtio-net header passes through unchanged, so checksum and segmentation offloads
 * reach the host stack; the TAP is told (TUNSETOFFLOAD) which offloads the guest acked, so the
 * kernel never hands it a frame it cannot take.
 *
 * Transmit writes straight from guest memory (writev over the chain's buffers). Receive reads a
 * frame into a staging buffer and scatters it over the guest's receive buffers; when the guest
 * has none, the TAP is left unread (the kernel queues, then drops and counts) until the guest
 * posts more, so one stalled guest costs the other fds of the loop nothing.
 *
 * Migration: the TAP is multi-queue, and its queues are attached only while the guest runs
 * (between resumed and suspended). A destination daemon on the same host opens the same TAP
 * with queues of its own, detached until its guest starts, so the kernel hands every frame to
 * whichever side runs the guest. A guest that acks GUEST_ANNOUNCE announces itself after the
 * move; for one that cannot, QEMU's SEND_RARP makes the device send a RARP from its address.
 *
 * @module
 */

import { getLogger, type Logger } from "../../log/mod.ts";
import type { DeviceEventLoop, DeviceMetrics, VirtioDevice, Virtqueue } from "../device.ts";
import { IoVec } from "../../sys/io.ts";
import { closeQuietly, Errno, errno, libc } from "../../sys/libc.ts";
import {
  readFrame,
  setOffload,
  setVnetHeaderSize,
  TUN_F_CSUM,
  TUN_F_TSO4,
  TUN_F_TSO6,
  TUN_F_TSO_ECN,
} from "../../sys/tap.ts";
import { Delivery, RxWriter } from "./frame_io.ts";
import { RARP_FRAME_LEN, writeRarpAnnouncement } from "./rarp.ts";
import { setQueueAttached, writeFrame } from "../../sys/tap.ts";
import { featureBit, headerSize, NET_HDR_SIZE, NetFeature, STAGING_SIZE } from "./header.ts";
import { type NetCounters, newNetCounters, tapPairSeries } from "./net_metrics.ts";
import { blockMetrics } from "../counter_block.ts";

/** Options of a TAP-backed net device (structured-clonable: the fds were opened by the CLI). */
export interface NetTapOptions {
  /** Always "tap". */
  kind: "tap";
  /** Interface name, for logs. */
  tap: string;
  /** One nonblocking TAP fd per queue pair. */
  fds: number[];
  /** Whether the TAP is multi-queue (its queues can be detached while the guest is stopped). */
  multiQueue?: boolean;
  /** Device name in logs (the config's id); default `net`. */
  name?: string;
}

/** Chains taken from a transmit queue before other fds get a turn. */
export const TX_BUDGET = 256;
/** Frames moved from the TAP per wake-up before other fds get a turn. */
const RX_BUDGET = 64;
/** Largest queue size offered. */
const MAX_QUEUE_SIZE = 1024;

/** Offloads a TAP-backed device offers (the host stack does checksums and segmentation). */
export const TAP_FEATURES = [
  NetFeature.CSUM,
  NetFeature.GUEST_CSUM,
  NetFeature.MTU,
  NetFeature.GUEST_TSO4,
  NetFeature.GUEST_TSO6,
  NetFeature.GUEST_ECN,
  NetFeature.HOST_TSO4,
  NetFeature.HOST_TSO6,
  NetFeature.HOST_ECN,
  NetFeature.MRG_RXBUF,
  NetFeature.GUEST_ANNOUNCE,
].reduce((acc, b) => acc | featureBit(b), 0n);

export type { NetCounters };

/** One queue pair and its TAP queue. */
class QueuePair {
  readonly fd: number;
  /** Index of the pair's receive queue (2k). */
  readonly rxIndex: number;
  readonly staging = new Uint8Array(STAGING_SIZE);
  /** Fills the pair's receive queue; may hold a frame part-way on while the guest refills. */
  readonly rx = new RxWriter(MAX_QUEUE_SIZE);
  /** Length of a frame read from the TAP but not yet delivered (0: none). */
  pending = 0;
  /** Whether the TAP fd is in the event loop (it is left out while the guest has no buffers). */
  watching = false;
  readonly counters: NetCounters = newNetCounters();

  constructor(fd: number, pair: number) {
    this.fd = fd;
    this.rxIndex = 2 * pair;
  }
}

/** virtio-net over a (possibly multi-queue) TAP. */
export class NetTapDevice implements VirtioDevice {
  /** virtio device id of a network card. */
  readonly deviceId = 1;
  /** Name in logs (the config's id, or `net`). */
  readonly name: string;
  /** Two queues per pair. */
  readonly numQueues: number;
  /** Largest queue size accepted. */
  readonly maxQueueSize = MAX_QUEUE_SIZE;
  /** Offloads, MRG_RXBUF, and MQ with more than one pair. */
  readonly features: bigint;
  /** The interface name. */
  readonly tap: string;
  /** Transmit queues (odd) may be busy-polled; receive queues hold buffers until frames come. */
  readonly pollQueues = (index: number): boolean => (index & 1) === 1;
  readonly #pairs: QueuePair[];
  readonly #iov = new IoVec(1024);
  readonly #yielded: boolean[];
  readonly #log: Logger;
  #loop: DeviceEventLoop | null = null;
  #hdrLen = NET_HDR_SIZE;
  #mergeable = false;
  readonly #multiQueue: boolean;

  /** Serves the TAP queues `options.fds` (closed by {@link close}). */
  constructor(options: NetTapOptions) {
    this.name = options.name ?? "net";
    this.#log = getLogger(["vhostd", this.name]);
    this.tap = options.tap;
    this.#multiQueue = options.multiQueue ?? false;
    this.#pairs = options.fds.map((fd, i) => new QueuePair(fd, i));
    this.numQueues = 2 * this.#pairs.length;
    this.#yielded = new Array(this.numQueues).fill(false);
    this.features = TAP_FEATURES | (this.#pairs.length > 1 ? featureBit(NetFeature.MQ) : 0n);
  }

  /** Counters of every pair. */
  get counters(): NetCounters[] {
    return this.#pairs.map((p) => p.counters);
  }

  /** Every pair's counters, as metrics (frames and drops by direction). */
  get metrics(): DeviceMetrics {
    return blockMetrics(
      this.#pairs.map((p, i) => ({ block: p.counters, series: tapPairSeries(i) })),
    );
  }

  /** Starts reading the TAP queues; they stay detached until a guest runs. */
  start(loop: DeviceEventLoop): void {
    this.#loop = loop;
    this.#attach(false);
    for (const p of this.#pairs) this.#watch(p);
  }

  /** The guest runs: the kernel may send this device's queues frames. */
  resumed(): void {
    this.#attach(true);
  }

  /**
   * The guest stopped (paused, or migrating away): frames go to whoever else has the TAP open
   * (the destination's daemon), or are dropped by the kernel, not queued for a stopped guest.
   */
  suspended(): void {
    this.#attach(false);
  }

  /** SEND_RARP: sends a RARP from `mac` out of the TAP, as the guest would have announced. */
  announce(mac: Uint8Array): void {
    const frame = new Uint8Array(NET_HDR_SIZE + RARP_FRAME_LEN);
    writeRarpAnnouncement(frame, NET_HDR_SIZE, mac);
    const rc = writeFrame(this.#pairs[0].fd, frame, frame.length);
    this.#log.info("{tap}: announced {mac} after a migration{failed}", {
      tap: this.tap,
      mac: [...mac].map((b) => b.toString(16).padStart(2, "0")).join(":"),
      failed: rc < 0 ? ` (write failed: errno ${-rc})` : "",
    });
  }

  #attach(attached: boolean): void {
    if (!this.#multiQueue) return;
    try {
      for (const p of this.#pairs) setQueueAttached(p.fd, attached);
    } catch (e) {
      this.#log.warn("{tap}: cannot {what} its queues: {error}", {
        tap: this.tap,
        what: attached ? "attach" : "detach",
        error: (e as Error).message,
      });
    }
  }

  /** Sizes the header and tells the kernel which offloads the guest accepts. */
  setFeatures(acked: bigint): void {
    this.#hdrLen = headerSize(acked);
    this.#mergeable = (acked & featureBit(NetFeature.MRG_RXBUF)) !== 0n;
    const has = (b: number) => (acked & featureBit(b)) !== 0n;
    let offload = 0;
    if (has(NetFeature.GUEST_CSUM)) {
      offload |= TUN_F_CSUM;
      // The kernel refuses TSO without checksum offload, and so does the virtio spec.
      if (has(NetFeature.GUEST_TSO4)) offload |= TUN_F_TSO4;
      if (has(NetFeature.GUEST_TSO6)) offload |= TUN_F_TSO6;
      if (has(NetFeature.GUEST_ECN)) offload |= TUN_F_TSO_ECN;
    }
    for (const p of this.#pairs) {
      setVnetHeaderSize(p.fd, this.#hdrLen);
      setOffload(p.fd, offload);
    }
    this.#log.info("{tap}: guest acked 0x{acked}; header {hdr} bytes, TAP offloads 0x{offload}", {
      tap: this.tap,
      acked: acked.toString(16),
      hdr: this.#hdrLen,
      offload: offload.toString(16),
    });
  }

  /** RX queue kicked: the guest posted buffers. TX queue kicked: frames to send. */
  processQueue(q: Virtqueue): void {
    const pair = this.#pairs[q.index >> 1];
    if (pair === undefined) return;
    if ((q.index & 1) === 0) {
      this.#receive(pair, q);
      return;
    }
    if (this.#yielded[q.index]) {
      // The call straight after a yield: take nothing, so the loop serves other fds first.
      this.#yielded[q.index] = false;
      return;
    }
    this.#transmit(pair, q);
  }

  #transmit(pair: QueuePair, q: Virtqueue): void {
    const iov = this.#iov;
    for (let n = 0; n < TX_BUDGET; n++) {
      const chain = q.pop();
      if (chain === null) return;
      iov.clear();
      if (
        chain.readableBytes <= this.#hdrLen || !chain.readableIoVec(iov, 0, chain.readableBytes)
      ) {
        pair.counters.txDropped++;
      } else {
        // tun takes one frame per write, whole or not at all: no short-write loop.
        const r = Number(libc.writev(pair.fd, iov.bytes, iov.count));
        if (r < 0 && errno() !== Errno.EINTR) pair.counters.txDropped++;
        else pair.counters.txFrames++;
      }
      q.push(chain, 0);
    }
    // Budget spent with chains left: come back, as if kicked, after the other ready fds.
    if (q.hasAvailable() && q.kickSelf()) this.#yielded[q.index] = true;
  }

  /** Moves frames from the TAP to the guest until either runs out or the budget is spent. */
  #receive(pair: QueuePair, q: Virtqueue | null): void {
    const loop = this.#loop!;
    const rxIndex = pair.rxIndex;
    q ??= loop.queue(rxIndex);
    let delivered = 0;
    for (let n = 0; n < RX_BUDGET; n++) {
      if (pair.pending === 0) {
        const len = readFrame(pair.fd, pair.staging);
        if (len <= 0) break; // nothing waiting (or a transient error: epoll tells us again)
        if (len < NET_HDR_SIZE + 14) continue;
        if (q === null) {
          // No driver (not started, or disconnected): a NIC with its link down drops.
          pair.counters.rxDropped++;
          continue;
        }
        pair.pending = len - NET_HDR_SIZE;
      }
      if (q === null) {
        pair.pending = 0;
        pair.counters.rxDropped++;
        continue;
      }
      const r = pair.rx.deliver(
        q,
        pair.staging,
        pair.pending,
        this.#hdrLen,
        this.#mergeable,
        true,
      );
      if (r === Delivery.NO_BUFFERS) {
        if (q.broken) {
          // The guest broke its ring: drop, let the TAP drain, and have the queue stopped.
          pair.pending = 0;
          pair.rx.clear();
          pair.counters.rxDropped++;
          q = null;
          loop.notify(rxIndex);
          continue;
        }
        // Ask for a kick when the guest posts more (the used event is then where we stopped);
        // if it already did meanwhile, carry on at once: that kick would never come. (A ring
        // that claims more chains than it has is broken by now, caught above: no spinning.)
        if (q.enableNotification()) {
          n--;
          continue;
        }
        // Keep the frame; stop reading the TAP until the guest posts buffers (its RX kick).
        pair.counters.rxStalls++;
        this.#unwatch(pair);
        break;
      }
      if (r === Delivery.DELIVERED) {
        pair.counters.rxFrames++;
        delivered++;
      } else pair.counters.rxDropped++;
      pair.pending = 0;
    }
    if (pair.pending === 0) this.#watch(pair);
    if (delivered > 0) loop.notify(rxIndex);
  }

  #watch(p: QueuePair): void {
    if (p.watching || this.#loop === null) return;
    p.watching = true;
    this.#loop.watch(p.fd, () => this.#receive(p, null));
  }

  #unwatch(p: QueuePair): void {
    if (!p.watching || this.#loop === null) return;
    p.watching = false;
    this.#loop.unwatch(p.fd);
  }

  /** The driver went away: drop any half-delivered frame, read the TAP again (to drop). */
  reset(): void {
    for (const p of this.#pairs) {
      p.pending = 0;
      p.rx.clear();
      this.#watch(p);
    }
    this.#yielded.fill(false);
    this.#log.info("{tap}: session ended; counters {counters}", {
      tap: this.tap,
      counters: JSON.stringify(this.counters),
    });
  }

  /** Closes the TAP queues. */
  close(): void {
    for (const p of this.#pairs) {
      this.#unwatch(p);
      closeQuietly(p.fd);
    }
  }
}
