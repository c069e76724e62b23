/**
 * Unix stream sockets through FFI, with file descriptors passed as SCM_RIGHTS.
 *
 * Deno's own Unix sockets cannot carry file descriptors, and vhost-user passes guest memory and
 * eventfds that way, so both ends of the control socket live here.
 *
 * @module
 */

import {
  check,
  closeQuietly,
  cstring,
  Errno,
  errno,
  F,
  libc,
  O,
  openFile,
  SysError,
} from "./libc.ts";

/** Address family of Unix sockets. */
export const AF_UNIX = 1;
/** Socket type: a byte stream. */
export const SOCK_STREAM = 1;
/** Socket type: datagrams. */
export const SOCK_DGRAM = 2;
/** Socket type: datagrams in order over a connection (one frame per read, as a TAP fd gives). */
export const SOCK_SEQPACKET = 5;
/** Socket type flag: the socket is nonblocking from the start (O_NONBLOCK). */
export const SOCK_NONBLOCK = O.NONBLOCK;
/** Socket type flag: the socket is close-on-exec from the start (O_CLOEXEC). */
export const SOCK_CLOEXEC = O.CLOEXEC;
const SOL_SOCKET = 1;
const SCM_RIGHTS = 1;
const SO_PEERCRED = 17;
const SO_RCVTIMEO = 20;
const SO_SNDTIMEO = 21;
const MSG_PEEK = 0x2;
/** Send or receive flag: do not block, whatever the socket's own mode. */
export const MSG_DONTWAIT = 0x40;
const MSG_CTRUNC = 0x8;
const MSG_WAITALL = 0x100;
const MSG_NOSIGNAL = 0x4000;
const MSG_CMSG_CLOEXEC = 0x40000000;

/** The most fds one received message may carry (SET_MEM_TABLE has up to 8; more is refused). */
export const MAX_FDS = 16;
/** The most fds {@link FdSocket.send} attaches (more than a receiver accepts, for tests). */
const MAX_SEND_FDS = 64;

const addressOf = (buf: BufferSource): bigint =>
  Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf as Uint8Array<ArrayBuffer>));

function sockaddrUn(path: string): Uint8Array<ArrayBuffer> {
  const name = cstring(path);
  if (name.length > 108) throw new SysError("bind", Errno.ENAMETOOLONG, path);
  const addr = new Uint8Array(2 + name.length);
  new DataView(addr.buffer).setUint16(0, AF_UNIX, true);
  addr.set(name, 2);
  return addr;
}

/** The credentials of the process at the other end of a Unix socket (SO_PEERCRED). */
export interface PeerCredentials {
  /** Process id. */
  pid: number;
  /** User id. */
  uid: number;
  /** Group id. */
  gid: number;
}

/** The mode and group a socket file has from the moment it appears at its path. */
export interface SocketFileMode {
  /** Permission bits, e.g. `0o600`. */
  mode: number;
  /** Group to give the file; the creator's when absent. */
  gid?: number;
}

const AT_FDCWD = -100;
const RENAME_NOREPLACE = 1;
/** The longest path a socket address holds (108 bytes with the terminating NUL). */
const MAX_SOCKET_PATH = 107;

/**
 * Creates the socket file at `path` so that nobody ever reaches it with another mode or group
 * than `file` says, and no symlink is ever followed.
 *
 * bind(2) creates the file with the process umask: a chmod after it leaves a window in which
 * anyone the umask lets in may connect, and a chmod or chown by path follows a symlink that
 * someone with write access to the folder put there meanwhile. So `bind` creates the file inside
 * a fresh directory beside `path` (mode 0700: nobody else can reach into it), the file gets its
 * mode there and its group through lchown, and it is then renamed into place with
 * RENAME_NOREPLACE, which replaces nothing that appeared at `path` meanwhile.
 *
 * `bind(at)` must bind (and listen on) the socket at `at`: inside the private directory, or the
 * same place reached through `/proc/self/fd` when that path is too long for a socket address.
 * `release` undoes a `bind` that succeeded when a later step fails.
 */
export function bindSocketFile<T>(
  path: string,
  file: SocketFileMode,
  bind: (at: string) => T,
  release: (bound: T) => void,
): T {
  const slash = path.lastIndexOf("/");
  const dir = slash < 0 ? "." : slash === 0 ? "/" : path.slice(0, slash);
  // mkdir(2) with mode 0700 (what Deno does): the directory is private from its first moment.
  const privateDir = Deno.makeTempDirSync({ dir, prefix: ".vhostd-" });
  // A random name: a listener that unlinks its bound path when closed (Deno's does) must not hit
  // anything else once the directory is gone.
  const name = `s${crypto.getRandomValues(new Uint32Array(1))[0].toString(16)}`;
  const inside = `${privateDir}/${name}`;
  let dirFd = -1;
  let bound: { value: T } | null = null;
  try {
    let at = inside;
    if (cstring(inside).length - 1 > MAX_SOCKET_PATH) {
      dirFd = openFile(privateDir, O.PATH | O.DIRECTORY);
      at = `/proc/self/fd/${dirFd}/${name}`;
    }
    bound = { value: bind(at) };
    check(libc.chmod(cstring(inside), file.mode), "chmod", inside);
    if (file.gid !== undefined) {
      check(libc.lchown(cstring(inside), 0xffffffff, file.gid), "lchown", inside);
    }
    const rc = libc.renameat2(AT_FDCWD, cstring(inside), AT_FDCWD, cstring(path), RENAME_NOREPLACE);
    check(rc, "rename", path);
    return bound.value;
  } catch (e) {
    if (bound !== null) release(bound.value);
    try {
      Deno.removeSync(inside);
    } catch {
      // never bound, or renamed into place
    }
    throw e;
  } finally {
    closeQuietly(dirFd);
    try {
      Deno.removeSync(privateDir);
    } catch {
      // not empty only if the rename failed and the removal above did too: leave it
    }
  }
}

/**
 * Creates a listening Unix socket at `path` with the given mode and group (0600 and the creator's
 * group by default; see {@link bindSocketFile}) and returns its fd.
 */
export function listenUnix(
  path: string,
  file: SocketFileMode = { mode: 0o600 },
  backlog = 4,
): number {
  return bindSocketFile(path, file, (at) => {
    const fd = check(libc.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), "socket");
    try {
      const addr = sockaddrUn(at);
      check(libc.bind(fd, addr, addr.length), "bind", path);
      check(libc.listen(fd, backlog), "listen", path);
    } catch (e) {
      closeQuietly(fd);
      throw e;
    }
    return fd;
  }, closeQuietly);
}

/** Connects to the Unix socket at `path` and returns the connected fd. */
export function connectUnix(path: string): number {
  const fd = check(libc.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), "socket");
  const addr = sockaddrUn(path);
  if (libc.connect(fd, addr, addr.length) < 0) {
    const err = errno();
    closeQuietly(fd);
    throw new SysError("connect", err, path);
  }
  return fd;
}

/**
 * Tells whether something is listening on the socket at `path`: `"live"` (a connect succeeded),
 * `"stale"` (a socket file nobody listens on), `"absent"`, or `"not-a-socket"`.
 */
export function probeSocketPath(path: string): "live" | "stale" | "absent" | "not-a-socket" {
  let info: Deno.FileInfo;
  try {
    info = Deno.lstatSync(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return "absent";
    throw e;
  }
  if (!info.isSocket) return "not-a-socket";
  try {
    closeQuietly(connectUnix(path));
    return "live";
  } catch (e) {
    if (e instanceof SysError && e.errno === Errno.ECONNREFUSED) return "stale";
    throw e;
  }
}

/**
 * Sends one datagram to the Unix datagram socket at `path` (a leading `@` names an abstract
 * socket, as in systemd's NOTIFY_SOCKET). This is all sd_notify needs.
 *
 * @example
 * ```ts
 * const target = Deno.env.get("NOTIFY_SOCKET");
 * if (target) sendDatagram(target, new TextEncoder().encode("READY=1"));
 * ```
 */
export function sendDatagram(path: string, data: Uint8Array<ArrayBuffer>): void {
  let addr: Uint8Array<ArrayBuffer>;
  if (path.startsWith("@")) {
    // Abstract: a NUL first byte, then the name; the length counts no terminator.
    const name = new TextEncoder().encode(path.slice(1));
    if (name.length > 107) throw new SysError("sendto", Errno.ENAMETOOLONG, path);
    addr = new Uint8Array(3 + name.length);
    new DataView(addr.buffer).setUint16(0, AF_UNIX, true);
    addr.set(name, 3);
  } else {
    addr = sockaddrUn(path);
  }
  const fd = check(libc.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0), "socket");
  try {
    const n = libc.sendto(fd, data, BigInt(data.length), MSG_NOSIGNAL, addr, addr.length);
    check(n, "sendto", path);
  } finally {
    closeQuietly(fd);
  }
}

/** Accepts one connection (blocking unless the listener is non-blocking); returns the fd. */
export function acceptUnix(listenFd: number): number {
  return check(libc.accept4(listenFd, null, null, SOCK_CLOEXEC), "accept4");
}

/** Reads SO_PEERCRED of a connected Unix socket. */
export function peerCredentials(fd: number): PeerCredentials {
  const cred = new Int32Array(3);
  const len = new Uint32Array([12]);
  check(libc.getsockopt(fd, SOL_SOCKET, SO_PEERCRED, cred, len), "getsockopt(SO_PEERCRED)");
  return { pid: cred[0], uid: cred[1] >>> 0, gid: cred[2] >>> 0 };
}

/** Sets receive and send time-outs so that a peer that stops mid-message cannot hang us. */
export function setSocketTimeouts(fd: number, ms: number): void {
  const tv = new BigInt64Array([BigInt(Math.floor(ms / 1000)), BigInt((ms % 1000) * 1000)]);
  check(libc.setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, tv, 16), "setsockopt(SO_RCVTIMEO)");
  check(libc.setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, tv, 16), "setsockopt(SO_SNDTIMEO)");
}

const SIOCOUTQ = 0x5411;
const outq = new Int32Array(1);

/**
 * Bytes written to a connected socket that its peer has not read yet (SIOCOUTQ; for a Unix
 * socket, the memory its unread messages still hold): 0 once the peer has read everything.
 */
export function unreadByPeer(fd: number): number {
  check(libc.ioctl(fd, BigInt(SIOCOUTQ), outq), "ioctl(SIOCOUTQ)");
  return outq[0];
}

/** Thrown when the peer closed the connection. */
export class PeerClosedError extends Error {
  constructor() {
    super("peer closed the connection");
    this.name = "PeerClosedError";
  }
}

/**
 * A connected stream socket that sends and receives messages with attached fds.
 *
 * All buffers (msghdr, iovec, control, the receive buffer) are allocated once; their addresses are
 * computed once and the buffers stay referenced by this object for as long as the kernel may use them.
 */
export class FdSocket {
  /** The connected socket's fd. */
  readonly fd: number;
  /** Receive buffer; {@link recv} fills it from offset 0. */
  readonly buffer: Uint8Array<ArrayBuffer>;
  readonly #bufferAddr: bigint;
  readonly #iov = new BigUint64Array(2);
  readonly #msghdr = new BigUint64Array(7);
  readonly #control = new Uint8Array(16 + MAX_FDS * 4);
  readonly #controlView: DataView;
  readonly #iovAddr: bigint;
  readonly #controlAddr: bigint;
  readonly #sendControl = new Uint8Array(16 + MAX_SEND_FDS * 4);
  readonly #sendControlAddr: bigint;

  /** Wraps a connected fd; `bufferSize` bounds the largest message that can be received. */
  constructor(fd: number, bufferSize = 4096) {
    this.fd = fd;
    this.buffer = new Uint8Array(bufferSize);
    this.#bufferAddr = addressOf(this.buffer);
    this.#iovAddr = addressOf(this.#iov);
    this.#controlAddr = addressOf(this.#control);
    this.#sendControlAddr = addressOf(this.#sendControl);
    this.#controlView = new DataView(this.#control.buffer);
  }

  /**
   * Receives exactly `length` bytes into `buffer[offset..]`, collecting any fds that arrive with
   * them into `fds`. Throws {@link PeerClosedError} on EOF, {@link SysError} on errors and time-outs.
   */
  recv(offset: number, length: number, fds: number[]): void {
    if (offset + length > this.buffer.length) throw new RangeError("message larger than buffer");
    let got = 0;
    while (got < length) {
      this.#iov[0] = this.#bufferAddr + BigInt(offset + got);
      this.#iov[1] = BigInt(length - got);
      const m = this.#msghdr;
      m[0] = 0n;
      m[1] = 0n;
      m[2] = this.#iovAddr;
      m[3] = 1n;
      m[4] = this.#controlAddr;
      m[5] = BigInt(this.#control.length);
      m[6] = 0n;
      const n = Number(libc.recvmsg(this.fd, m, MSG_CMSG_CLOEXEC | MSG_WAITALL));
      if (n < 0) {
        const err = errno();
        if (err === Errno.EINTR) continue;
        throw new SysError("recvmsg", err);
      }
      this.#collectFds(Number(m[5]), fds);
      if (Number(m[6] & 0xffffffffn) & MSG_CTRUNC) {
        throw new SysError("recvmsg", Errno.EINVAL, "(too many fds: control data truncated)");
      }
      if (n === 0) throw new PeerClosedError();
      got += n;
    }
  }

  /**
   * Receives whatever has arrived, up to `length` bytes, into `buffer[offset..]` without waiting;
   * fds that come with them go to `fds`. Returns the bytes received, or 0 when nothing is waiting.
   * Throws {@link PeerClosedError} on EOF, {@link SysError} on errors.
   */
  recvAvailable(offset: number, length: number, fds: number[]): number {
    if (offset + length > this.buffer.length) throw new RangeError("message larger than buffer");
    for (;;) {
      this.#iov[0] = this.#bufferAddr + BigInt(offset);
      this.#iov[1] = BigInt(length);
      const m = this.#msghdr;
      m[0] = 0n;
      m[1] = 0n;
      m[2] = this.#iovAddr;
      m[3] = 1n;
      m[4] = this.#controlAddr;
      m[5] = BigInt(this.#control.length);
      m[6] = 0n;
      const n = Number(libc.recvmsg(this.fd, m, MSG_CMSG_CLOEXEC | MSG_DONTWAIT));
      if (n < 0) {
        const err = errno();
        if (err === Errno.EINTR) continue;
        if (err === Errno.EAGAIN) return 0;
        throw new SysError("recvmsg", err);
      }
      this.#collectFds(Number(m[5]), fds);
      if (Number(m[6] & 0xffffffffn) & MSG_CTRUNC) {
        throw new SysError("recvmsg", Errno.EINVAL, "(too many fds: control data truncated)");
      }
      if (n === 0) throw new PeerClosedError();
      return n;
    }
  }

  #collectFds(controlLen: number, fds: number[]): void {
    const dv = this.#controlView;
    let off = 0;
    while (off + 16 <= controlLen) {
      const len = Number(dv.getBigUint64(off, true));
      if (len < 16 || off + len > controlLen) break;
      if (dv.getInt32(off + 8, true) === SOL_SOCKET && dv.getInt32(off + 12, true) === SCM_RIGHTS) {
        for (let p = off + 16; p + 4 <= off + len; p += 4) fds.push(dv.getInt32(p, true));
      }
      off += (len + 7) & ~7;
    }
  }

  /** Sends `data` with `fds` attached to its first byte; loops over partial sends. */
  send(data: Uint8Array<ArrayBuffer>, fds: readonly number[] = []): void {
    if (fds.length > MAX_SEND_FDS) throw new RangeError("too many fds");
    const dataAddr = addressOf(data);
    let sent = 0;
    while (sent < data.length) {
      this.#iov[0] = dataAddr + BigInt(sent);
      this.#iov[1] = BigInt(data.length - sent);
      const m = this.#msghdr;
      m[0] = 0n;
      m[1] = 0n;
      m[2] = this.#iovAddr;
      m[3] = 1n;
      if (sent === 0 && fds.length > 0) {
        const dv = new DataView(this.#sendControl.buffer);
        const cmsgLen = 16 + fds.length * 4;
        dv.setBigUint64(0, BigInt(cmsgLen), true);
        dv.setInt32(8, SOL_SOCKET, true);
        dv.setInt32(12, SCM_RIGHTS, true);
        fds.forEach((fd, i) => dv.setInt32(16 + i * 4, fd, true));
        m[4] = this.#sendControlAddr;
        m[5] = BigInt((cmsgLen + 7) & ~7);
      } else {
        m[4] = 0n;
        m[5] = 0n;
      }
      m[6] = 0n;
      const n = Number(libc.sendmsg(this.fd, m, MSG_NOSIGNAL));
      if (n < 0) {
        const err = errno();
        if (err === Errno.EINTR) continue;
        throw new SysError("sendmsg", err);
      }
      sent += n;
    }
  }

  /** Whether the peer has closed its end (EOF is next, with nothing unread before it). */
  peerClosed(): boolean {
    const n = Number(libc.recv(this.fd, this.#peek, 1n, MSG_PEEK | MSG_DONTWAIT));
    return n === 0 || (n < 0 && errno() !== Errno.EAGAIN && errno() !== Errno.EINTR);
  }

  readonly #peek = new Uint8Array(1);

  /** Closes the socket. */
  close(): void {
    closeQuietly(this.fd);
  }
}

const AF_INET = 2;
const AF_INET6 = 10;
const SO_REUSEADDR = 2;
const IPPROTO_TCP = 6;
const TCP_NODELAY = 1;

/** An IP address parsed for {@link listenTcp}. */
export interface IpAddress {
  /** 4 or 6. */
  family: 4 | 6;
  /** The address in network byte order (4 or 16 bytes). */
  bytes: Uint8Array<ArrayBuffer>;
}

/** Parses an IPv4 or IPv6 literal (no brackets, no host names), or returns null. */
export function parseIpAddress(text: string): IpAddress | null {
  const family = text.includes(":") ? 6 : 4;
  const bytes = new Uint8Array(family === 4 ? 4 : 16);
  const ok = libc.inet_pton(family === 4 ? AF_INET : AF_INET6, cstring(text), bytes);
  return ok === 1 ? { family, bytes } : null;
}

/** Whether `addr` is a loopback address (127.0.0.0/8, ::1, or ::ffff:127.x.y.z). */
export function isLoopback(addr: IpAddress): boolean {
  const b = addr.bytes;
  if (addr.family === 4) return b[0] === 127;
  if (b.subarray(0, 15).every((x) => x === 0)) return b[15] === 1;
  const mapped = b.subarray(0, 10).every((x) => x === 0) && b[10] === 0xff && b[11] === 0xff;
  return mapped && b[12] === 127;
}

function sockaddrIn(addr: IpAddress, port: number): Uint8Array<ArrayBuffer> {
  // sockaddr_in is 16 bytes, sockaddr_in6 28; the port is big-endian, the family native.
  const out = new Uint8Array(addr.family === 4 ? 16 : 28);
  const dv = new DataView(out.buffer);
  dv.setUint16(0, addr.family === 4 ? AF_INET : AF_INET6, true);
  dv.setUint16(2, port, false);
  out.set(addr.bytes, addr.family === 4 ? 4 : 8);
  return out;
}

/**
 * Creates a listening TCP socket on `addr`:`port` (port 0 lets the kernel choose) with
 * SO_REUSEADDR, so that a restarted daemon can bind while old connections sit in TIME_WAIT.
 * Returns the fd and the port actually bound.
 */
export function listenTcp(
  addr: IpAddress,
  port: number,
  backlog = 16,
): { fd: number; port: number } {
  const where = `${addr.family === 6 ? "[" : ""}${ipText(addr)}${
    addr.family === 6 ? "]" : ""
  }:${port}`;
  const fd = check(
    libc.socket(addr.family === 4 ? AF_INET : AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0),
    "socket",
  );
  try {
    const one = new Int32Array([1]);
    check(libc.setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, one, 4), "setsockopt(SO_REUSEADDR)");
    const sa = sockaddrIn(addr, port);
    check(libc.bind(fd, sa, sa.length), "bind", where);
    check(libc.listen(fd, backlog), "listen", where);
    const bound = new Uint8Array(28);
    const len = new Uint32Array([bound.length]);
    check(libc.getsockname(fd, bound, len), "getsockname");
    return { fd, port: new DataView(bound.buffer).getUint16(2, false) };
  } catch (e) {
    closeQuietly(fd);
    throw e;
  }
}

/** The usual text form of an address (for messages). */
export function ipText(addr: IpAddress): string {
  if (addr.family === 4) return addr.bytes.join(".");
  const words: string[] = [];
  const dv = new DataView(addr.bytes.buffer);
  for (let i = 0; i < 16; i += 2) words.push(dv.getUint16(i, false).toString(16));
  // Shorten the longest run of zero words to "::", as inet_ntop does.
  let best = -1, bestLen = 1;
  for (let i = 0; i < 8;) {
    let j = i;
    while (j < 8 && words[j] === "0") j++;
    if (j - i > bestLen) [best, bestLen] = [i, j - i];
    i = j === i ? i + 1 : j;
  }
  if (best < 0) return words.join(":");
  return `${words.slice(0, best).join(":")}::${words.slice(best + bestLen).join(":")}`;
}

/**
 * Turns Nagle's algorithm off on a connected TCP socket: a console sends single keystrokes, which
 * must not wait for the previous segment's acknowledgement.
 */
export function setTcpNoDelay(fd: number): void {
  const one = new Int32Array([1]);
  check(libc.setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, one, 4), "setsockopt(TCP_NODELAY)");
}

const SO_TYPE = 3;
const SO_ACCEPTCONN = 30;
const SO_DOMAIN = 39;

/**
 * Checks that `fd` is a listening Unix stream socket (one handed over by socket activation) and
 * returns the path it is bound to: null for an unnamed or abstract socket. Anything else is a
 * {@link SysError} (ENOTSOCK for a file or pipe) or a plain Error saying what the fd is instead.
 */
export function listeningUnixSocketPath(fd: number): string | null {
  const value = new Int32Array(1);
  const len = new Uint32Array(1);
  const option = (name: number, what: string): number => {
    len[0] = 4;
    check(libc.getsockopt(fd, SOL_SOCKET, name, value, len), `getsockopt(${what})`);
    return value[0];
  };
  const domain = option(SO_DOMAIN, "SO_DOMAIN");
  if (domain !== AF_UNIX) throw new Error(`a socket of address family ${domain}, not AF_UNIX`);
  const type = option(SO_TYPE, "SO_TYPE");
  if (type !== SOCK_STREAM) throw new Error(`a Unix socket of type ${type}, not SOCK_STREAM`);
  if (option(SO_ACCEPTCONN, "SO_ACCEPTCONN") !== 1) {
    throw new Error("a Unix stream socket that is not listening");
  }
  const addr = new Uint8Array(2 + 108);
  const addrLen = new Uint32Array([addr.length]);
  check(libc.getsockname(fd, addr, addrLen), "getsockname");
  const path = addr.subarray(2, Math.min(addrLen[0], addr.length));
  if (path.length === 0 || path[0] === 0) return null;
  const end = path.indexOf(0);
  return new TextDecoder().decode(end < 0 ? path : path.subarray(0, end));
}

const FD_CLOEXEC = 1;

/** A close-on-exec copy of `fd` (numbered 3 or above). */
export function duplicateFd(fd: number): number {
  return check(libc.fcntl(fd, F.DUPFD_CLOEXEC, 3), "fcntl(F_DUPFD_CLOEXEC)");
}

/** Marks `fd` close-on-exec: an inherited fd must not leak on into processes we start. */
export function setCloseOnExec(fd: number): void {
  check(libc.fcntl(fd, F.SETFD, FD_CLOEXEC), "fcntl(F_SETFD)");
}
