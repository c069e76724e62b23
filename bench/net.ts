/**
 * Comparison 3, net: NOT MEASURED YET. vhostd has no finished net device in the committed tree,
 * so this reports an explicit "not measured" entry instead of any number. When the net device
 * lands, replace {@link net} with: DPDK testpmd `net_virtio_user` txonly → vhostd → testpmd
 * rxonly (64 and 1500-byte frames, Mpps) vs the same testpmd pair joined by DPDK's `net_vhost`;
 * and guest iperf3 through vhostd's TAP back-end vs in-QEMU virtio-net-pci with `-netdev tap`.
 *
 * @module
 */

/** The net comparison's entry in the results. */
export interface NetResult {
  /** Always `not-measured` until the net benchmark exists. */
  status: "not-measured";
  /** Why, in one sentence. */
  reason: string;
  /** What will be measured once it exists. */
  planned: string[];
}

/** Reports that net was not measured (no numbers are made up). */
export function net(): NetResult {
  return {
    status: "not-measured",
    reason: "not measured: no vhostd net device yet",
    planned: [
      "DPDK testpmd net_virtio_user txonly -> vhostd -> testpmd rxonly, 64 B and 1500 B frames " +
      "(Mpps), vs the same testpmd pair joined by DPDK net_vhost (target: vhostd >= 0.5x DPDK)",
      "guest iperf3 TCP through vhostd's TAP back-end vs in-QEMU virtio-net-pci -netdev tap " +
      "(target: >= 1.0x)",
    ],
  };
}
