/**
 * The virtio-net header (`struct virtio_net_hdr_v1`, 12 bytes) and what the daemon does with it:
 * read its fields, and complete a partial checksum for a receiver that cannot.
 *
 * Frames move through vhostd in a staging buffer laid out as the 12-byte header followed by the
 * Ethernet frame, whatever header size the guest uses (10 bytes for a legacy driver that acked
 * neither VERSION_1 nor MRG_RXBUF).
 *
 * @module
 */

/** virtio-net feature bits (virtio 1.x §5.1.3). */
export const NetFeature = {
  /** The device accepts frames with a partial checksum (guest → device). */
  CSUM: 0,
  /** The driver accepts frames with a partial checksum (device → guest). */
  GUEST_CSUM: 1,
  /** The config space has an MTU. */
  MTU: 3,
  /** The driver accepts TCPv4 segmentation offload frames. */
  GUEST_TSO4: 7,
  /** The driver accepts TCPv6 segmentation offload frames. */
  GUEST_TSO6: 8,
  /** The driver accepts TSO frames with ECN. */
  GUEST_ECN: 9,
  /** The device accepts TCPv4 segmentation offload frames. */
  HOST_TSO4: 11,
  /** The device accepts TCPv6 segmentation offload frames. */
  HOST_TSO6: 12,
  /** The device accepts TSO frames with ECN. */
  HOST_ECN: 13,
  /** The driver can merge receive buffers (one packet over several chains). */
  MRG_RXBUF: 15,
  /**
   * The driver can announce itself (a gratuitous ARP through its own transmit queue) when the
   * device asks, after a migration. Needs the control queue, which QEMU emulates for a
   * vhost-user device: the back-end only offers the bit, and then sees the guest's
   * announcement as an ordinary frame.
   */
  GUEST_ANNOUNCE: 21,
  /** Several queue pairs. */
  MQ: 22,
} as const;

/** Size of `virtio_net_hdr_v1` (and of the legacy header with MRG_RXBUF). */
export const NET_HDR_SIZE = 12;
/** Size of the legacy header without MRG_RXBUF. */
export const NET_HDR_LEGACY_SIZE = 10;

/** Header offsets. */
export const HDR_FLAGS = 0;
/** gso_type offset. */
export const HDR_GSO_TYPE = 1;
/** hdr_len offset (le16). */
export const HDR_HDR_LEN = 2;
/** gso_size offset (le16). */
export const HDR_GSO_SIZE = 4;
/** csum_start offset (le16). */
export const HDR_CSUM_START = 6;
/** csum_offset offset (le16). */
export const HDR_CSUM_OFFSET = 8;
/** num_buffers offset (le16). */
export const HDR_NUM_BUFFERS = 10;

/** flags: the checksum from csum_start on must still be computed. */
export const NEEDS_CSUM = 1;
/** flags: the checksum was already checked. */
export const DATA_VALID = 2;
/** gso_type: not a segmentation offload frame. */
export const GSO_NONE = 0;

/** Largest Ethernet frame vhostd handles: 64 KiB of IP plus an Ethernet and a VLAN header. */
export const MAX_FRAME = 65535 + 14 + 4;
/** Staging buffer size: a header and the largest frame. */
export const STAGING_SIZE = NET_HDR_SIZE + MAX_FRAME;

/** 1n << BigInt(bit) for a feature bit. */
export function featureBit(bit: number): bigint {
  return 1n << BigInt(bit);
}

/** Header size a driver uses given the features it acked. */
export function headerSize(acked: bigint): number {
  const v1 = (acked & (1n << 32n)) !== 0n;
  const mrg = (acked & featureBit(NetFeature.MRG_RXBUF)) !== 0n;
  return v1 || mrg ? NET_HDR_SIZE : NET_HDR_LEGACY_SIZE;
}

/** Reads a little-endian u16 from `buf` at `at`. */
export function le16(buf: Uint8Array, at: number): number {
  return buf[at] | (buf[at + 1] << 8);
}

/** Writes a little-endian u16 into `buf` at `at`. */
export function setLe16(buf: Uint8Array, at: number, value: number): void {
  buf[at] = value & 0xff;
  buf[at + 1] = (value >> 8) & 0xff;
}

/**
 * Completes the partial checksum of a staged frame (header at `hdr`, frame right after it) and
 * clears NEEDS_CSUM, as a NIC does for a driver that did not ack GUEST_CSUM. The checksum field
 * already holds the pseudo-header sum (Linux's CHECKSUM_PARTIAL convention), so it is summed with
 * the rest. Returns false, changing nothing, if csum_start/csum_offset point outside the frame.
 */
export function completeChecksum(buf: Uint8Array, hdr: number, frameLen: number): boolean {
  if (!partialChecksumFits(buf, hdr, frameLen)) return false;
  const start = le16(buf, hdr + HDR_CSUM_START);
  const offset = le16(buf, hdr + HDR_CSUM_OFFSET);
  const frame = hdr + NET_HDR_SIZE;
  const folded = onesComplementSum(buf, frame + start, frame + frameLen);
  let csum = ~folded & 0xffff;
  // A computed zero goes out as 0xffff: the same value in ones' complement, and UDP reserves 0
  // for "no checksum".
  if (csum === 0) csum = 0xffff;
  buf[frame + start + offset] = csum >> 8;
  buf[frame + start + offset + 1] = csum & 0xff;
  buf[hdr + HDR_FLAGS] &= ~NEEDS_CSUM;
  return true;
}

/**
 * Whether the checksum field a header names (csum_offset bytes after csum_start) lies inside a
 * frame of `frameLen` bytes.
 */
export function partialChecksumFits(buf: Uint8Array, hdr: number, frameLen: number): boolean {
  const start = le16(buf, hdr + HDR_CSUM_START);
  const offset = le16(buf, hdr + HDR_CSUM_OFFSET);
  return start < frameLen && offset + 2 <= frameLen - start;
}

/**
 * Rewrites the header of a staged frame (at `hdr`) to what a switch can vouch for, whatever the
 * sender put there: flags NEEDS_CSUM with csum_start/csum_offset for a partial checksum, all
 * zero otherwise. Never DATA_VALID (nobody checked the sender's checksum) nor any other flag,
 * no segmentation fields, and num_buffers zero (each writer sets its own). Returns false, for a
 * frame to drop, when the header claims segmentation offload (no port negotiated it), or a
 * partial checksum the sender may not send (`partialAllowed` false: it did not negotiate CSUM) or
 * whose field lies outside the frame.
 */
export function sanitizeHeader(
  buf: Uint8Array,
  hdr: number,
  frameLen: number,
  partialAllowed: boolean,
): boolean {
  if (buf[hdr + HDR_GSO_TYPE] !== GSO_NONE) return false;
  const partial = (buf[hdr + HDR_FLAGS] & NEEDS_CSUM) !== 0;
  if (partial && (!partialAllowed || !partialChecksumFits(buf, hdr, frameLen))) return false;
  buf[hdr + HDR_FLAGS] = partial ? NEEDS_CSUM : 0;
  buf.fill(0, hdr + HDR_HDR_LEN, hdr + HDR_CSUM_START);
  if (!partial) buf.fill(0, hdr + HDR_CSUM_START, hdr + HDR_NUM_BUFFERS);
  buf.fill(0, hdr + HDR_NUM_BUFFERS, hdr + NET_HDR_SIZE);
  return true;
}

/** The folded 16-bit ones' complement sum of `buf[from..to)` (the Internet checksum, RFC 1071). */
export function onesComplementSum(buf: Uint8Array, from: number, to: number): number {
  // At most 32 K words of 16 bits: the plain sum stays far below 2^53, so fold once at the end.
  let sum = 0;
  let i = from;
  for (; i + 1 < to; i += 2) sum += (buf[i] << 8) | buf[i + 1];
  if (i < to) sum += buf[i] << 8;
  while (sum > 0xffff) sum = (sum & 0xffff) + Math.floor(sum / 65536);
  return sum;
}

/** A 48-bit MAC address read from `buf` at `at`, as a number (exact below 2^53). */
export function macAt(buf: Uint8Array, at: number): number {
  return buf[at] * 0x10000000000 + buf[at + 1] * 0x100000000 +
    ((buf[at + 2] << 24) >>> 0) + (buf[at + 3] << 16) + (buf[at + 4] << 8) + buf[at + 5];
}

/** Whether the MAC at `buf[at]` is a group (broadcast or multicast) address. */
export function isGroupMac(buf: Uint8Array, at: number): boolean {
  return (buf[at] & 1) !== 0;
}

/** Parses `aa:bb:cc:dd:ee:ff` (hex digits, either case) into a MAC number; null if malformed. */
export function parseMac(text: string): number | null {
  if (!/^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$/.test(text)) return null;
  return parseInt(text.replaceAll(":", ""), 16);
}

/** Formats a MAC number as `aa:bb:cc:dd:ee:ff` (for logs and tests). */
export function formatMac(mac: number): string {
  return mac.toString(16).padStart(12, "0").match(/../g)!.join(":");
}
