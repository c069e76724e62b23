/**
 * virtio-console constants and layouts (virtio 1.x §5.3, Linux `virtio_console.h`).
 *
 * @module
 */

/** virtio device id of a console. */
export const VIRTIO_ID_CONSOLE = 3;

/** Device feature bits. */
export const ConsoleFeature = {
  /** cols/rows in the config space are valid. */
  SIZE: 0,
  /** Several ports and the control queues. */
  MULTIPORT: 1,
  /** The driver may write single characters to `emerg_wr` before the queues work. */
  EMERG_WRITE: 2,
} as const;

/** Control message events (`struct virtio_console_control.event`). */
export const ControlEvent = {
  DEVICE_READY: 0,
  PORT_ADD: 1,
  PORT_REMOVE: 2,
  PORT_READY: 3,
  CONSOLE_PORT: 4,
  RESIZE: 5,
  PORT_OPEN: 6,
  PORT_NAME: 7,
} as const;

/** Size of `struct virtio_console_control` (le32 id, le16 event, le16 value). */
export const CONTROL_HEADER_SIZE = 8;

/** Config space: le16 cols, le16 rows, le32 max_nr_ports, le32 emerg_wr. */
export const CONFIG_SIZE = 12;
/** Offset of `cols` in the config space. */
export const CONFIG_COLS = 0;
/** Offset of `rows`. */
export const CONFIG_ROWS = 2;
/** Offset of `max_nr_ports`. */
export const CONFIG_MAX_NR_PORTS = 4;
/** Offset of `emerg_wr`. */
export const CONFIG_EMERG_WR = 8;

/** Control receiveq (device to driver) index when MULTIPORT is negotiated. */
export const CONTROL_RX_QUEUE = 2;
/** Control transmitq (driver to device) index. */
export const CONTROL_TX_QUEUE = 3;

/**
 * Receiveq index (device to driver) of `port`: 0 for port 0, then 4, 6, ... because queues 2 and 3
 * are the control queues.
 */
export function rxQueueOf(port: number): number {
  return port === 0 ? 0 : 2 * (port + 1);
}

/** Transmitq index (driver to device) of `port`. */
export function txQueueOf(port: number): number {
  return rxQueueOf(port) + 1;
}

/** Number of queues for `ports` ports with MULTIPORT: a data pair per port plus the control pair. */
export function queueCount(ports: number): number {
  return 2 * (ports + 1);
}

/** The port a data queue belongs to, and its direction; null for the control queues. */
export function portOfQueue(index: number): { port: number; tx: boolean } | null {
  if (index === CONTROL_RX_QUEUE || index === CONTROL_TX_QUEUE) return null;
  const port = index < 2 ? 0 : (index >> 1) - 1;
  return { port, tx: (index & 1) === 1 };
}

/**
 * Encodes a control message. RESIZE carries `rows` then `cols` after the header: that is the
 * order the Linux driver reads (`struct { u16 rows; u16 cols; }` in virtio_console.c), which is
 * what every guest in practice runs.
 */
export function encodeControl(
  id: number,
  event: number,
  value: number,
  extra?: Uint8Array,
): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(CONTROL_HEADER_SIZE + (extra?.length ?? 0));
  const dv = new DataView(out.buffer);
  dv.setUint32(0, id, true);
  dv.setUint16(4, event, true);
  dv.setUint16(6, value, true);
  if (extra) out.set(extra, CONTROL_HEADER_SIZE);
  return out;
}

/** A decoded control message header. */
export interface ControlMessage {
  /** Port id. */
  id: number;
  /** One of {@link ControlEvent}. */
  event: number;
  /** Event-specific value (1 = ready/open, 0 = failed/closed). */
  value: number;
}

/** Decodes the header of a control message; null if it is too short. */
export function decodeControl(bytes: Uint8Array): ControlMessage | null {
  if (bytes.length < CONTROL_HEADER_SIZE) return null;
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return { id: dv.getUint32(0, true), event: dv.getUint16(4, true), value: dv.getUint16(6, true) };
}

/** The RESIZE payload as Linux reads it: rows, then cols. */
export function resizePayload(cols: number, rows: number): Uint8Array {
  const out = new Uint8Array(4);
  const dv = new DataView(out.buffer);
  dv.setUint16(0, rows, true);
  dv.setUint16(2, cols, true);
  return out;
}
