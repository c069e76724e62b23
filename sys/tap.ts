/**
 * TAP network interfaces through `/dev/net/tun`: open (or create) an interface with the
 * virtio-net header in front of every frame, and tell the kernel which offloads the reader copes
 * with. Needs CAP_NET_ADMIN.
 *
 * @module
 */

import { check, closeQuietly, cstring, Errno, errno, libc, O, SysError } from "./libc.ts";

/** TUNSETIFF: attach the fd to an interface, creating it if needed (`_IOW('T', 202, int)`). */
const TUNSETIFF = 0x400454can;
/** TUNSETOFFLOAD: offloads the reader accepts (`_IOW('T', 208, unsigned int)`, value argument). */
const TUNSETOFFLOAD = 0x400454d0n;
/** TUNSETVNETHDRSZ: size of the header in front of each frame (`_IOW('T', 216, int)`). */
const TUNSETVNETHDRSZ = 0x400454d8n;
/** TUNSETQUEUE: attach or detach one queue of a multi-queue interface (`_IOW('T', 217, int)`). */
const TUNSETQUEUE = 0x400454d9n;

/** A TAP device (Ethernet frames, not IP packets). */
const IFF_TAP = 0x0002;
/** Several fds, one per queue, on one interface. */
const IFF_MULTI_QUEUE = 0x0100;
/** TUNSETQUEUE: the queue takes frames again. */
const IFF_ATTACH_QUEUE = 0x0200;
/** TUNSETQUEUE: the queue stays open but the kernel no longer sends it frames. */
const IFF_DETACH_QUEUE = 0x0400;
/** No extra 4-byte packet information in front of frames. */
const IFF_NO_PI = 0x1000;
/** A virtio-net header in front of every frame, both ways. */
const IFF_VNET_HDR = 0x4000;

/** TUNSETOFFLOAD bits: the reader accepts frames with a partial checksum. */
export const TUN_F_CSUM = 0x01;
/** The reader accepts TCPv4 segmentation offload frames. */
export const TUN_F_TSO4 = 0x02;
/** The reader accepts TCPv6 segmentation offload frames. */
export const TUN_F_TSO6 = 0x04;
/** The reader accepts TSO frames with ECN (CWR) set. */
export const TUN_F_TSO_ECN = 0x08;

/** Longest interface name the kernel accepts (IFNAMSIZ - 1). */
export const MAX_IFNAME = 15;

/** An open TAP interface: one nonblocking fd per queue. */
export class TapDevice {
  /** The interface name. */
  readonly name: string;
  /** One fd per queue (a single-queue TAP has one). */
  readonly fds: number[];
  /**
   * Whether the interface is multi-queue. Only then can another process attach queues of its
   * own (a migration's destination daemon on the same host), and can this one detach its queues
   * while its guest is not running ({@link setQueuesAttached}).
   */
  readonly multiQueue: boolean;

  private constructor(name: string, fds: number[], multiQueue: boolean) {
    this.name = name;
    this.fds = fds;
    this.multiQueue = multiQueue;
  }

  /**
   * Opens interface `name` (created if it does not exist) with `queues` queues, each fd
   * nonblocking, with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and a 12-byte header. The interface is
   * made multi-queue, so that it can be shared; an existing one created without `multi_queue`
   * is opened as it is (one queue only).
   */
  static open(name: string, queues = 1): TapDevice {
    if (name.length === 0 || name.length > MAX_IFNAME || /[\s/:]/.test(name)) {
      throw new RangeError(`bad interface name "${name}" (1-${MAX_IFNAME} characters)`);
    }
    try {
      return new TapDevice(name, openQueues(name, queues, true), true);
    } catch (e) {
      // EINVAL: the interface exists without IFF_MULTI_QUEUE (made by `ip tuntap` without it).
      if (!(e instanceof SysError && e.errno === Errno.EINVAL && queues === 1)) throw e;
      return new TapDevice(name, openQueues(name, 1, false), false);
    }
  }

  /**
   * Attaches or detaches every queue (multi-queue interfaces only; a no-op otherwise). A
   * detached queue keeps its fd but the kernel sends it no frames: they go to the queues that
   * are attached (another daemon's, during a migration), or are dropped if there are none.
   */
  setQueuesAttached(attached: boolean): void {
    if (!this.multiQueue) return;
    for (const fd of this.fds) setQueueAttached(fd, attached);
  }

  /** Tells the kernel which offloads (TUN_F_* bits) every queue's reader accepts. */
  setOffload(flags: number): void {
    for (const fd of this.fds) setOffload(fd, flags);
  }

  /** Closes every fd (a TAP that vhostd created then disappears). */
  close(): void {
    for (const fd of this.fds) closeQuietly(fd);
    this.fds.length = 0;
  }
}

function openQueues(name: string, queues: number, multiQueue: boolean): number[] {
  const fds: number[] = [];
  try {
    for (let i = 0; i < queues; i++) {
      const fd = check(
        libc.open(cstring("/dev/net/tun"), O.RDWR | O.NONBLOCK | O.CLOEXEC, 0),
        "open",
        "/dev/net/tun",
      );
      fds.push(fd);
      const ifr = new Uint8Array(40); // struct ifreq: name[16], then flags (short)
      ifr.set(new TextEncoder().encode(name), 0);
      const flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (multiQueue ? IFF_MULTI_QUEUE : 0);
      new DataView(ifr.buffer).setUint16(16, flags, true);
      check(libc.ioctl(fd, TUNSETIFF, ifr), "ioctl(TUNSETIFF)", name);
      setVnetHeaderSize(fd, 12);
    }
  } catch (e) {
    for (const fd of fds) closeQuietly(fd);
    throw e;
  }
  return fds;
}

/** TUNSETQUEUE on one queue's fd of a multi-queue interface. */
export function setQueueAttached(fd: number, attached: boolean): void {
  const ifr = new Uint8Array(40);
  new DataView(ifr.buffer).setUint16(16, attached ? IFF_ATTACH_QUEUE : IFF_DETACH_QUEUE, true);
  if (libc.ioctl(fd, TUNSETQUEUE, ifr) < 0) {
    const err = errno();
    // EINVAL: already in the state asked for.
    if (err !== Errno.EINVAL) throw new SysError("ioctl(TUNSETQUEUE)", err);
  }
}

/** TUNSETVNETHDRSZ on one fd. */
export function setVnetHeaderSize(fd: number, size: number): void {
  const v = new Int32Array([size]);
  check(libc.ioctl(fd, TUNSETVNETHDRSZ, new Uint8Array(v.buffer)), "ioctl(TUNSETVNETHDRSZ)");
}

/** TUNSETOFFLOAD on one fd. */
export function setOffload(fd: number, flags: number): void {
  if (libc.ioctl_value(fd, TUNSETOFFLOAD, BigInt(flags)) < 0) {
    throw new SysError("ioctl(TUNSETOFFLOAD)", errno());
  }
}

/**
 * Reads one frame (header included) into `buf`; returns its length, 0 when none is waiting, or a
 * negative errno.
 */
export function readFrame(fd: number, buf: Uint8Array<ArrayBuffer>): number {
  const n = Number(libc.read(fd, buf, BigInt(buf.length)));
  if (n >= 0) return n;
  const err = errno();
  return err === Errno.EAGAIN ? 0 : -err;
}

/** Writes one frame (header included) from `buf[0..length)`; returns 0 or a negative errno. */
export function writeFrame(fd: number, buf: Uint8Array<ArrayBuffer>, length: number): number {
  const n = Number(libc.write(fd, buf, BigInt(length)));
  return n < 0 ? -errno() : 0;
}
