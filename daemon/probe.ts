/**
 * `vhostd probe`: connects to any vhost-user back-end as a front-end would and prints what it
 * offers: virtio features and protocol features by name, the queue count, memory slots, and the
 * decoded config space (virtio-blk). It only negotiates; it never starts a ring, so probing a
 * back-end leaves it as it found it.
 *
 * @module
 */

import { parseArgs } from "./args.ts";
import { usage } from "./cli.ts";
import { BlkFeature } from "../devices/blk/device.ts";
import { UsageError } from "../sys/errors.ts";
import { SysError } from "../sys/libc.ts";
import { FrontendConnection } from "../vhost-user/frontend/connection.ts";
import { type BlkConfigInfo, decodeBlkConfig } from "../vhost-user/frontend/blk_config.ts";
import { bit, featureNames, ProtocolFeature, VirtioFeature } from "../vhost-user/message.ts";

const HELP = `Usage: vhostd probe --socket PATH [--json]

Connects to the vhost-user back-end listening on PATH and prints its virtio features,
protocol features, queue count and (for a block device) its decoded config space.

Options:
  --socket PATH   back-end socket (required)
  --json          print JSON instead of text
  -h, --help      show this text
`;

/** Transport bits that are not in {@link VirtioFeature}. */
const TRANSPORT_EXTRA = { LOG_ALL: 26 } as const;

/** What `probe` found. */
export interface ProbeReport {
  /** The socket probed. */
  socket: string;
  /** GET_FEATURES, as hex. */
  features: string;
  /** The feature bits by name (virtio-blk names for bits below 24). */
  featureNames: string[];
  /** GET_PROTOCOL_FEATURES, as hex (null without bit 30). */
  protocolFeatures: string | null;
  /** The protocol feature bits by name. */
  protocolFeatureNames: string[];
  /** GET_QUEUE_NUM (null without MQ). */
  queues: number | null;
  /** GET_MAX_MEM_SLOTS (null without CONFIGURE_MEM_SLOTS). */
  maxMemSlots: number | null;
  /** The decoded virtio-blk config (null without CONFIG or on a failed read). */
  blk: (BlkConfigInfo & { readOnly: boolean }) | null;
}

/** Probes the back-end at `socket`. */
export async function probe(socket: string): Promise<ProbeReport> {
  let conn: FrontendConnection;
  try {
    conn = await FrontendConnection.connect(socket);
  } catch (e) {
    if (e instanceof SysError) throw new UsageError(`cannot connect to ${socket}: ${e.message}`);
    throw e;
  }
  try {
    const features = conn.getFeatures();
    const report: ProbeReport = {
      socket,
      features: `0x${features.toString(16)}`,
      featureNames: featureNames(features, VirtioFeature, TRANSPORT_EXTRA, BlkFeature),
      protocolFeatures: null,
      protocolFeatureNames: [],
      queues: null,
      maxMemSlots: null,
      blk: null,
    };
    if (!(features & bit(VirtioFeature.PROTOCOL_FEATURES))) return report;
    const pf = conn.getProtocolFeatures();
    report.protocolFeatures = `0x${pf.toString(16)}`;
    report.protocolFeatureNames = featureNames(pf, ProtocolFeature);
    // Acknowledge only what a read-only look needs, so nothing else changes in the back-end.
    const has = (f: number) => (pf & bit(f)) !== 0n;
    conn.setProtocolFeatures(
      pf & (bit(ProtocolFeature.MQ) | bit(ProtocolFeature.CONFIG) |
        bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)),
    );
    if (has(ProtocolFeature.MQ)) report.queues = conn.getQueueNum();
    if (has(ProtocolFeature.CONFIGURE_MEM_SLOTS)) report.maxMemSlots = conn.getMaxMemSlots();
    if (has(ProtocolFeature.CONFIG)) {
      // The whole struct virtio_blk_config (60 bytes); QEMU asks 57, which leaves out padding.
      const c = conn.getConfig(0, 60);
      if (c.length > 0) {
        report.blk = {
          ...decodeBlkConfig(c),
          readOnly: (features & bit(BlkFeature.RO)) !== 0n,
        };
      }
    }
    return report;
  } finally {
    conn.close();
  }
}

function text(r: ProbeReport): string {
  const lines = [
    `back-end at ${r.socket}`,
    `  features           ${r.features}: ${r.featureNames.join(" ")}`,
    `  protocol features  ${r.protocolFeatures ?? "(none: bit 30 not offered)"}` +
    (r.protocolFeatureNames.length ? `: ${r.protocolFeatureNames.join(" ")}` : ""),
    `  queues             ${r.queues ?? "(no MQ: 1)"}`,
    `  memory slots       ${r.maxMemSlots ?? "(no CONFIGURE_MEM_SLOTS: 8)"}`,
  ];
  const b = r.blk;
  if (b === null) {
    lines.push("  config             (not readable)");
  } else {
    const mib = b.capacityBytes / 1048576;
    lines.push(
      "  virtio-blk config",
      `    capacity         ${b.capacitySectors} sectors (${b.capacityBytes} bytes, ` +
        `${Number.isInteger(mib) ? mib : mib.toFixed(1)} MiB)`,
      `    blk_size         ${b.blkSize}`,
      `    seg_max          ${b.segMax}`,
      `    size_max         ${b.sizeMax}`,
      `    discard          max ${b.maxDiscardSectors} sectors, ${b.maxDiscardSeg} segments, ` +
        `alignment ${b.discardSectorAlignment}`,
      `    write zeroes     max ${b.maxWriteZeroesSectors} sectors, ${b.maxWriteZeroesSeg} ` +
        `segments, may unmap ${b.writeZeroesMayUnmap}`,
      `    read-only        ${b.readOnly ? "yes" : "no"}`,
      `    write cache      ${b.wce ? "on (writeback)" : "off (writethrough)"}`,
      `    num_queues       ${b.numQueues}`,
    );
  }
  return lines.join("\n");
}

/** `vhostd probe --socket PATH [--json]`. */
export async function cmdProbe(args: string[]): Promise<number> {
  const { values } = usage(() =>
    parseArgs({
      args,
      strict: true,
      options: {
        socket: { type: "string" },
        json: { type: "boolean" },
        help: { type: "boolean", short: "h" },
      },
    })
  );
  if (values.help) {
    console.log(HELP);
    return 0;
  }
  if (!values.socket) throw new UsageError("probe needs --socket PATH");
  const r = await probe(values.socket);
  console.log(values.json ? JSON.stringify(r, null, 2) : text(r));
  return 0;
}
