/**
 * vhost-user message framing and payloads (QEMU `docs/interop/vhost-user.rst`).
 *
 * A message is a 12-byte header `{u32 request, u32 flags, u32 size}` followed by `size` bytes of
 * payload, in the host's byte order (little-endian here); fds travel as SCM_RIGHTS. Both the
 * back-end and the front-end in this project use these codecs.
 *
 * @module
 */

// Each member of these tables is `as const` besides the table: deno doc types a member by its own
// initializer, and shows `number` instead of the member's value without it.

/** Front-end → back-end request ids, named as in the specification. */
export const Request = {
  GET_FEATURES: 1 as const,
  SET_FEATURES: 2 as const,
  SET_OWNER: 3 as const,
  RESET_OWNER: 4 as const,
  SET_MEM_TABLE: 5 as const,
  SET_LOG_BASE: 6 as const,
  SET_LOG_FD: 7 as const,
  SET_VRING_NUM: 8 as const,
  SET_VRING_ADDR: 9 as const,
  SET_VRING_BASE: 10 as const,
  GET_VRING_BASE: 11 as const,
  SET_VRING_KICK: 12 as const,
  SET_VRING_CALL: 13 as const,
  SET_VRING_ERR: 14 as const,
  GET_PROTOCOL_FEATURES: 15 as const,
  SET_PROTOCOL_FEATURES: 16 as const,
  GET_QUEUE_NUM: 17 as const,
  SET_VRING_ENABLE: 18 as const,
  SEND_RARP: 19 as const,
  NET_SET_MTU: 20 as const,
  SET_BACKEND_REQ_FD: 21 as const,
  IOTLB_MSG: 22 as const,
  SET_VRING_ENDIAN: 23 as const,
  GET_CONFIG: 24 as const,
  SET_CONFIG: 25 as const,
  CREATE_CRYPTO_SESSION: 26 as const,
  CLOSE_CRYPTO_SESSION: 27 as const,
  POSTCOPY_ADVISE: 28 as const,
  POSTCOPY_LISTEN: 29 as const,
  POSTCOPY_END: 30 as const,
  GET_INFLIGHT_FD: 31 as const,
  SET_INFLIGHT_FD: 32 as const,
  GPU_SET_SOCKET: 33 as const,
  RESET_DEVICE: 34 as const,
  VRING_KICK: 35 as const,
  GET_MAX_MEM_SLOTS: 36 as const,
  ADD_MEM_REG: 37 as const,
  REM_MEM_REG: 38 as const,
  SET_STATUS: 39 as const,
  GET_STATUS: 40 as const,
  GET_SHARED_OBJECT: 41 as const,
  SET_DEVICE_STATE_FD: 42 as const,
  CHECK_DEVICE_STATE: 43 as const,
  GET_SHMEM_CONFIG: 44 as const,
} as const;

/**
 * Back-end → front-end request ids, sent on the back-end request channel (BACKEND_REQ,
 * SET_BACKEND_REQ_FD), named as in the specification.
 */
export const BackendRequest = {
  IOTLB_MSG: 1 as const,
  /** The config space changed: the front-end reads it again (GET_CONFIG) and tells the guest. */
  CONFIG_CHANGE_MSG: 2 as const,
  VRING_HOST_NOTIFIER_MSG: 3 as const,
} as const;

const requestNames = new Map<number, string>(Object.entries(Request).map(([k, v]) => [v, k]));

/** The specification's name for a request id, or `UNKNOWN(<id>)`. */
export function requestName(id: number): string {
  return requestNames.get(id) ?? `UNKNOWN(${id})`;
}

/** Header flag bits. */
export const Flags = {
  /** Protocol version 1, in bits 0–1. */
  VERSION: 0x1 as const,
  /** The message is a reply. */
  REPLY: 0x4 as const,
  /** The sender wants an acknowledgement (REPLY_ACK). */
  NEED_REPLY: 0x8 as const,
} as const;

/** `VHOST_USER_PROTOCOL_F_*` bit numbers. */
export const ProtocolFeature = {
  MQ: 0 as const,
  LOG_SHMFD: 1 as const,
  RARP: 2 as const,
  REPLY_ACK: 3 as const,
  NET_MTU: 4 as const,
  BACKEND_REQ: 5 as const,
  CROSS_ENDIAN: 6 as const,
  CRYPTO_SESSION: 7 as const,
  PAGEFAULT: 8 as const,
  CONFIG: 9 as const,
  BACKEND_SEND_FD: 10 as const,
  HOST_NOTIFIER: 11 as const,
  INFLIGHT_SHMFD: 12 as const,
  RESET_DEVICE: 13 as const,
  INBAND_NOTIFICATIONS: 14 as const,
  CONFIGURE_MEM_SLOTS: 15 as const,
  STATUS: 16 as const,
  XEN_MMAP: 17 as const,
  SHARED_OBJECT: 18 as const,
  DEVICE_STATE: 19 as const,
} as const;

/** Transport feature bits shared by every virtio device. */
export const VirtioFeature = {
  NOTIFY_ON_EMPTY: 24 as const,
  /** vhost's VHOST_F_LOG_ALL: while acked, log every write to guest memory (live migration). */
  LOG_ALL: 26 as const,
  ANY_LAYOUT: 27 as const,
  RING_INDIRECT_DESC: 28 as const,
  RING_EVENT_IDX: 29 as const,
  /** vhost-user's reuse of bit 30: the back-end speaks GET/SET_PROTOCOL_FEATURES. */
  PROTOCOL_FEATURES: 30 as const,
  VERSION_1: 32 as const,
  ACCESS_PLATFORM: 33 as const,
  RING_PACKED: 34 as const,
  IN_ORDER: 35 as const,
  RING_RESET: 40 as const,
} as const;

/** `1n << BigInt(bit)` for a feature bit number. */
export const bit = (n: number): bigint => 1n << BigInt(n);

/** Names the set bits of `mask` using a `{NAME: bit}` table; unknown bits print as `bit<n>`. */
export function featureNames(mask: bigint, ...tables: Record<string, number>[]): string[] {
  const names: string[] = [];
  for (let b = 0; b < 64; b++) {
    if (!(mask & bit(b))) continue;
    let name = `bit${b}`;
    for (const t of tables) {
      const hit = Object.entries(t).find(([, v]) => v === b);
      if (hit) {
        name = hit[0];
        break;
      }
    }
    names.push(name);
  }
  return names;
}

/** Size of the message header. */
export const HEADER_SIZE = 12;
/** Largest payload this implementation accepts (the biggest real one is under 300 bytes). */
export const MAX_PAYLOAD = 4096;
/** Largest config space a GET/SET_CONFIG may carry. */
export const MAX_CONFIG_SIZE = 256;
/** Regions SET_MEM_TABLE can carry. */
export const MAX_MEM_TABLE_REGIONS = 8;
/** `SET_VRING_ADDR` flag (VHOST_VRING_F_LOG): log used-ring writes at the given guest address. */
export const VRING_F_LOG = 0x1;
/** `SET_VRING_KICK/CALL/ERR` payload bit: no fd is attached. */
export const VRING_NOFD_MASK = 0x100;
/** `SET_VRING_KICK/CALL/ERR` payload bits holding the queue index. */
export const VRING_IDX_MASK = 0xff;

/** A received message: the header fields, a view of the payload, and the fds that came with it. */
export interface Message {
  /** Request id. */
  request: number;
  /** Header flags. */
  flags: number;
  /** Payload (valid until the next message is received). */
  payload: DataView;
  /** Received fds; whoever handles the message owns them. */
  fds: number[];
}

/** Builds a message (header + payload) ready to send. */
export function encodeMessage(
  request: number,
  flags: number,
  payload: Uint8Array = new Uint8Array(0),
): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(HEADER_SIZE + payload.length);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, request, true);
  dv.setUint32(4, flags, true);
  dv.setUint32(8, payload.length, true);
  out.set(payload, HEADER_SIZE);
  return out;
}

/** Reads a u64 as a number, refusing values above 2^53 (no address or size is that large). */
export function getU64(dv: DataView, offset: number): number {
  const v = dv.getBigUint64(offset, true);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new RangeError(`u64 value too large: ${v}`);
  return Number(v);
}

/** A u64 payload. */
export function u64Payload(value: bigint): Uint8Array {
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, value, true);
  return out;
}

/** `struct vhost_vring_state`: queue index and a number (size, base or enable flag). */
export interface VringState {
  /** Queue index. */
  index: number;
  /** Size, base index, or enable flag. */
  num: number;
}

/** Encodes a `vhost_vring_state`. */
export function vringStatePayload(s: VringState): Uint8Array {
  const out = new Uint8Array(8);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, s.index, true);
  dv.setUint32(4, s.num, true);
  return out;
}

/** `struct vhost_vring_addr` (40 bytes). */
export interface VringAddr {
  /** Queue index. */
  index: number;
  /** Bit 0: VHOST_VRING_F_LOG. */
  flags: number;
  /** Descriptor table, front-end virtual address. */
  desc: number;
  /** Used ring, front-end virtual address. */
  used: number;
  /** Available ring, front-end virtual address. */
  avail: number;
  /** Guest-physical address of the used ring, for dirty logging. */
  log: number;
}

/** Decodes a `vhost_vring_addr`. */
export function decodeVringAddr(dv: DataView): VringAddr {
  return {
    index: dv.getUint32(0, true),
    flags: dv.getUint32(4, true),
    desc: getU64(dv, 8),
    used: getU64(dv, 16),
    avail: getU64(dv, 24),
    log: getU64(dv, 32),
  };
}

/** Encodes a `vhost_vring_addr`. */
export function vringAddrPayload(a: VringAddr): Uint8Array {
  const out = new Uint8Array(40);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, a.index, true);
  dv.setUint32(4, a.flags, true);
  dv.setBigUint64(8, BigInt(a.desc), true);
  dv.setBigUint64(16, BigInt(a.used), true);
  dv.setBigUint64(24, BigInt(a.avail), true);
  dv.setBigUint64(32, BigInt(a.log), true);
  return out;
}

/** One memory region description (32 bytes). */
export interface MemRegion {
  /** Guest-physical address. */
  guestPhysAddr: number;
  /** Size in bytes. */
  memorySize: number;
  /** Front-end virtual address. */
  userspaceAddr: number;
  /** Offset in the fd. */
  mmapOffset: number;
}

/** Decodes one memory region at `offset`. */
export function decodeMemRegion(dv: DataView, offset: number): MemRegion {
  return {
    guestPhysAddr: getU64(dv, offset),
    memorySize: getU64(dv, offset + 8),
    userspaceAddr: getU64(dv, offset + 16),
    mmapOffset: getU64(dv, offset + 24),
  };
}

function putRegion(dv: DataView, offset: number, r: MemRegion): void {
  dv.setBigUint64(offset, BigInt(r.guestPhysAddr), true);
  dv.setBigUint64(offset + 8, BigInt(r.memorySize), true);
  dv.setBigUint64(offset + 16, BigInt(r.userspaceAddr), true);
  dv.setBigUint64(offset + 24, BigInt(r.mmapOffset), true);
}

/** Decodes SET_MEM_TABLE: `{u32 nregions, u32 padding, region[nregions]}`. */
export function decodeMemTable(dv: DataView): MemRegion[] {
  if (dv.byteLength < 8) throw new RangeError("SET_MEM_TABLE payload too short");
  const n = dv.getUint32(0, true);
  if (n > MAX_MEM_TABLE_REGIONS) throw new RangeError(`SET_MEM_TABLE with ${n} regions`);
  if (dv.byteLength < 8 + 32 * n) throw new RangeError("SET_MEM_TABLE payload too short");
  return Array.from({ length: n }, (_, i) => decodeMemRegion(dv, 8 + 32 * i));
}

/** Encodes SET_MEM_TABLE. */
export function memTablePayload(regions: MemRegion[]): Uint8Array {
  const out = new Uint8Array(8 + 32 * regions.length);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, regions.length, true);
  regions.forEach((r, i) => putRegion(dv, 8 + 32 * i, r));
  return out;
}

/** Encodes ADD_MEM_REG / REM_MEM_REG: `{u64 padding, region}`. */
export function singleRegionPayload(r: MemRegion): Uint8Array {
  const out = new Uint8Array(40);
  putRegion(new DataView(out.buffer), 8, r);
  return out;
}

/** GET_CONFIG / SET_CONFIG payload: `{u32 offset, u32 size, u32 flags, u8 data[size]}`. */
export interface ConfigAccess {
  /** Offset into the device config space. */
  offset: number;
  /** Bytes to read or write. */
  size: number;
  /** 0 = guest access, 1 = live migration. */
  flags: number;
  /** The bytes (for a reply or a write). */
  data: Uint8Array;
}

/** Decodes a config access, checking the size against the payload and the 256-byte limit. */
export function decodeConfig(dv: DataView): ConfigAccess {
  if (dv.byteLength < 12) throw new RangeError("config payload too short");
  const offset = dv.getUint32(0, true);
  const size = dv.getUint32(4, true);
  const flags = dv.getUint32(8, true);
  if (size > MAX_CONFIG_SIZE || offset > MAX_CONFIG_SIZE || offset + size > MAX_CONFIG_SIZE) {
    throw new RangeError(`config access out of range (offset ${offset}, size ${size})`);
  }
  if (dv.byteLength < 12 + size) throw new RangeError("config payload shorter than its size");
  const data = new Uint8Array(dv.buffer, dv.byteOffset + 12, size).slice();
  return { offset, size, flags, data };
}

/** Encodes a config access. */
export function configPayload(c: ConfigAccess): Uint8Array {
  const out = new Uint8Array(12 + c.data.length);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, c.offset, true);
  dv.setUint32(4, c.size, true);
  dv.setUint32(8, c.flags, true);
  out.set(c.data, 12);
  return out;
}

/** GET/SET_INFLIGHT_FD payload. */
export interface InflightInfo {
  /** Size of the shared buffer. */
  mmapSize: number;
  /** Offset of the buffer in the fd. */
  mmapOffset: number;
  /** Queues described. */
  numQueues: number;
  /** Size of each queue. */
  queueSize: number;
}

/** Decodes GET/SET_INFLIGHT_FD. */
export function decodeInflight(dv: DataView): InflightInfo {
  if (dv.byteLength < 20) throw new RangeError("inflight payload too short");
  return {
    mmapSize: getU64(dv, 0),
    mmapOffset: getU64(dv, 8),
    numQueues: dv.getUint16(16, true),
    queueSize: dv.getUint16(18, true),
  };
}

/** Encodes GET/SET_INFLIGHT_FD (24 bytes with padding). */
export function inflightPayload(i: InflightInfo): Uint8Array {
  const out = new Uint8Array(24);
  const dv = new DataView(out.buffer);
  dv.setBigUint64(0, BigInt(i.mmapSize), true);
  dv.setBigUint64(8, BigInt(i.mmapOffset), true);
  dv.setUint16(16, i.numQueues, true);
  dv.setUint16(18, i.queueSize, true);
  return out;
}

/** Payload sizes the back-end insists on, per request (a shorter payload is a protocol error). */
export const PAYLOAD_SIZE: Partial<Record<number, number>> = {
  [Request.SET_FEATURES]: 8,
  [Request.SET_VRING_NUM]: 8,
  [Request.SET_VRING_ADDR]: 40,
  [Request.SET_VRING_BASE]: 8,
  [Request.GET_VRING_BASE]: 8,
  [Request.SET_VRING_KICK]: 8,
  [Request.SET_VRING_CALL]: 8,
  [Request.SET_VRING_ERR]: 8,
  [Request.SET_PROTOCOL_FEATURES]: 8,
  [Request.SET_VRING_ENABLE]: 8,
  [Request.ADD_MEM_REG]: 40,
  [Request.REM_MEM_REG]: 40,
  [Request.SET_STATUS]: 8,
  [Request.SEND_RARP]: 8,
  [Request.SET_LOG_BASE]: 16,
};
