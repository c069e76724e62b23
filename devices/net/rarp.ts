/**
 * The announcement a migrated VM's network card makes when its guest cannot (vhost-user
 * SEND_RARP): a broadcast RARP frame from the card's address. Its content means nothing; its
 * source address tells every switch on the way where the address lives now. QEMU sends the same
 * frame for emulated cards (`-netdev ...` self-announce).
 *
 * @module
 */

/** EtherType of RARP (RFC 903). */
export const ETHERTYPE_RARP = 0x8035;
/** Length of the announcement: the Ethernet minimum (60 bytes without the FCS). */
export const RARP_FRAME_LEN = 60;
/** RARP opcode "request reverse" (RFC 903). */
const RARP_REQUEST_REVERSE = 3;

/**
 * Writes the announcement of `mac` (6 bytes) at `buf[at]` and returns its length: broadcast
 * destination, source `mac`, EtherType RARP; an Ethernet/IPv4 RARP "request reverse" whose
 * sender and target hardware addresses are `mac` and whose protocol addresses are 0.0.0.0;
 * zero padding up to {@link RARP_FRAME_LEN}.
 */
export function writeRarpAnnouncement(buf: Uint8Array, at: number, mac: Uint8Array): number {
  if (mac.length !== 6) throw new RangeError(`a MAC address has 6 bytes, not ${mac.length}`);
  buf.fill(0, at, at + RARP_FRAME_LEN);
  buf.fill(0xff, at, at + 6);
  buf.set(mac, at + 6);
  const v = new DataView(buf.buffer, buf.byteOffset + at, RARP_FRAME_LEN);
  v.setUint16(12, ETHERTYPE_RARP);
  v.setUint16(14, 1); // hardware type: Ethernet
  v.setUint16(16, 0x0800); // protocol type: IPv4
  v.setUint8(18, 6); // hardware address length
  v.setUint8(19, 4); // protocol address length
  v.setUint16(20, RARP_REQUEST_REVERSE);
  buf.set(mac, at + 22); // sender hardware address; sender protocol address 0.0.0.0
  buf.set(mac, at + 32); // target hardware address; target protocol address 0.0.0.0
  return RARP_FRAME_LEN;
}
