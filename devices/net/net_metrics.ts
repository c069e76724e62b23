/**
 * The counters of the net devices (a TAP device's queue pairs, a switch's ports and uplink) and
 * the metric series they are exported as: frames passed, frames dropped and why.
 *
 * @module
 */

import { type CounterBlock, defineCounters } from "../counter_block.ts";
import type { MetricSeries } from "../device.ts";

const TAP_PAIR_COUNTERS = ["txFrames", "txDropped", "rxFrames", "rxDropped", "rxStalls"] as const;

/**
 * Counters of a TAP device's queue pair: `txFrames` (frames the guest sent), `txDropped` (guest
 * frames that could not be passed on: malformed, or refused by the TAP), `rxFrames` (frames
 * given to the guest), `rxDropped` (frames dropped on the way to the guest: no guest, or a frame
 * that cannot fit), `rxStalls` (times receive stopped because the guest had posted no buffers).
 */
export type NetCounters = CounterBlock<typeof TAP_PAIR_COUNTERS[number]>;

/** New (zeroed) {@link NetCounters}. */
export const newNetCounters: () => NetCounters = defineCounters(TAP_PAIR_COUNTERS);

const SWITCH_PORT_COUNTERS = [
  "txFrames",
  "txDropped",
  "rxFrames",
  "rxDropped",
  "csumCompleted",
  "spoofDropped",
  "limitDropped",
  "floodDropped",
  "announces",
] as const;

/**
 * Counters of a switch port (the uplink's: tx = from the TAP, rx = to the TAP): `txFrames`
 * (frames the port's guest sent), `txDropped` (its frames dropped as malformed, or with an
 * offload it did not negotiate), `rxFrames` (frames delivered to it), `rxDropped` (frames for it
 * dropped: no buffers, or no driver), `csumCompleted` (partial checksums completed for it),
 * `spoofDropped` (frames dropped for their source address: another port holds it, it is
 * configured for another port, it is not one of the port's configured addresses, or it is a group
 * address), `limitDropped` (frames from a new source beyond the port's learning limit),
 * `floodDropped` (broadcast, multicast and unknown-unicast frames over the flood rate limit),
 * `announces` (SEND_RARP announcements sent on its behalf).
 */
export type PortCounters = CounterBlock<typeof SWITCH_PORT_COUNTERS[number]>;

/** New (zeroed) {@link PortCounters}. */
export const newPortCounters: () => PortCounters = defineCounters(SWITCH_PORT_COUNTERS);

const FRAMES = {
  name: "net_frames_total",
  help: "Frames the guest sent (direction tx) or was given (rx).",
  type: "counter",
} as const;
const DROPPED = {
  name: "net_dropped_total",
  help: "Frames dropped, by direction (tx: sent by the guest, rx: for the guest) and reason.",
  type: "counter",
} as const;

/** The series of a TAP device's pair `pair`, in the order of {@link NetCounters}' slots. */
export function tapPairSeries(pair: number): MetricSeries[] {
  const labels = (more: Record<string, string>) => ({ queue_pair: String(pair), ...more });
  return [
    { ...FRAMES, labels: labels({ direction: "tx" }) },
    { ...DROPPED, labels: labels({ direction: "tx", reason: "unsent" }) },
    { ...FRAMES, labels: labels({ direction: "rx" }) },
    { ...DROPPED, labels: labels({ direction: "rx", reason: "undeliverable" }) },
    {
      name: "net_rx_stalls_total",
      help: "Times receiving stopped because the guest had posted no buffers.",
      type: "counter",
      labels: labels({}),
    },
  ];
}

/**
 * The series of a switch port, in the order of {@link PortCounters}' slots; `part` names the
 * uplink (whose series are labelled `<switch>.uplink`), undefined for a guest port.
 */
export function switchPortSeries(part?: string): MetricSeries[] {
  const tx = (reason: string) => ({ ...DROPPED, part, labels: { direction: "tx", reason } });
  return [
    { ...FRAMES, part, labels: { direction: "tx" } },
    tx("invalid"),
    { ...FRAMES, part, labels: { direction: "rx" } },
    { ...DROPPED, part, labels: { direction: "rx", reason: "undeliverable" } },
    {
      name: "net_checksums_completed_total",
      help: "Partial checksums the switch completed for a receiver that does not take them.",
      type: "counter",
      part,
    },
    tx("spoofed"),
    tx("mac_limit"),
    tx("flood_limit"),
    {
      name: "net_announces_total",
      help: "Announcements (RARP) sent on the guest's behalf after a migration (SEND_RARP).",
      type: "counter",
      part,
    },
  ];
}
