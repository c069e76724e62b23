/**
 * The libc functions vhostd calls through Deno FFI, and errno mapped to a typed error.
 *
 * Everything here is synchronous: a sync FFI call costs about 5 ns on top of the syscall, while a
 * `nonblocking` call hops to a thread pool and costs 10–40 µs (see the measurements in the
 * project's research notes). The data plane runs in workers that may block, so blocking is fine.
 *
 * 64-bit parameters take `bigint` (a `number` falls off V8's fast path); guest addresses are passed
 * as `usize` so that no pointer objects are created per request.
 *
 * @module
 */

const symbols = {
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  bind: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  listen: { parameters: ["i32", "i32"], result: "i32" },
  accept4: { parameters: ["i32", "pointer", "pointer", "i32"], result: "i32" },
  connect: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  getsockopt: { parameters: ["i32", "i32", "i32", "buffer", "buffer"], result: "i32" },
  setsockopt: { parameters: ["i32", "i32", "i32", "buffer", "u32"], result: "i32" },
  recvmsg: { parameters: ["i32", "buffer", "i32"], result: "isize" },
  sendmsg: { parameters: ["i32", "buffer", "i32"], result: "isize" },
  sendto: { parameters: ["i32", "buffer", "usize", "i32", "buffer", "u32"], result: "isize" },
  recv: { parameters: ["i32", "buffer", "usize", "i32"], result: "isize" },
  shutdown: { parameters: ["i32", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  open: { parameters: ["buffer", "i32", "u32"], result: "i32" },
  read: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  pread: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
  pwrite: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
  preadv: { parameters: ["i32", "buffer", "i32", "i64"], result: "isize" },
  pwritev: { parameters: ["i32", "buffer", "i32", "i64"], result: "isize" },
  readv: { parameters: ["i32", "buffer", "i32"], result: "isize" },
  writev: { parameters: ["i32", "buffer", "i32"], result: "isize" },
  lseek: { parameters: ["i32", "i64", "i32"], result: "i64" },
  fdatasync: { parameters: ["i32"], result: "i32" },
  sync_file_range: { parameters: ["i32", "i64", "i64", "u32"], result: "i32" },
  fsync: { parameters: ["i32"], result: "i32" },
  fallocate: { parameters: ["i32", "i32", "i64", "i64"], result: "i32" },
  ftruncate: { parameters: ["i32", "i64"], result: "i32" },
  fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
  fstatfs: { parameters: ["i32", "buffer"], result: "i32" },
  fstat: { parameters: ["i32", "buffer"], result: "i32" },
  fcntl_lock: { name: "fcntl", parameters: ["i32", "i32", "buffer"], result: "i32" },
  ioctl: { parameters: ["i32", "u64", "buffer"], result: "i32" },
  // ioctl with its argument by value (TUNSETOFFLOAD), which the pointer form above cannot pass.
  ioctl_value: { name: "ioctl", parameters: ["i32", "u64", "u64"], result: "i32" },
  mmap: { parameters: ["pointer", "usize", "i32", "i32", "i32", "i64"], result: "pointer" },
  munmap: { parameters: ["pointer", "usize"], result: "i32" },
  memfd_create: { parameters: ["buffer", "u32"], result: "i32" },
  eventfd: { parameters: ["u32", "i32"], result: "i32" },
  epoll_create1: { parameters: ["i32"], result: "i32" },
  epoll_ctl: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
  epoll_wait: { parameters: ["i32", "buffer", "i32", "i32"], result: "i32" },
  getpid: { parameters: [], result: "i32" },
  clock_gettime: { parameters: ["i32", "buffer"], result: "i32" },
  getuid: { parameters: [], result: "u32" },
  chmod: { parameters: ["buffer", "u32"], result: "i32" },
  fchmod: { parameters: ["i32", "u32"], result: "i32" },
  lchown: { parameters: ["buffer", "u32", "u32"], result: "i32" },
  renameat2: { parameters: ["i32", "buffer", "i32", "buffer", "u32"], result: "i32" },
  timerfd_create: { parameters: ["i32", "i32"], result: "i32" },
  timerfd_settime: { parameters: ["i32", "i32", "buffer", "pointer"], result: "i32" },
  getsockname: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  inet_pton: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  posix_openpt: { parameters: ["i32"], result: "i32" },
  grantpt: { parameters: ["i32"], result: "i32" },
  unlockpt: { parameters: ["i32"], result: "i32" },
  ptsname_r: { parameters: ["i32", "buffer", "usize"], result: "i32" },
  isatty: { parameters: ["i32"], result: "i32" },
  tcgetattr: { parameters: ["i32", "buffer"], result: "i32" },
  tcsetattr: { parameters: ["i32", "i32", "buffer"], result: "i32" },
  cfmakeraw: { parameters: ["buffer"], result: "void" },
  // glibc has no io_uring wrappers: syscall(2) with each call's argument list, the system call
  // number first (see io_uring.ts).
  io_uring_setup: { name: "syscall", parameters: ["i64", "u32", "buffer"], result: "i64" },
  io_uring_enter: {
    name: "syscall",
    parameters: ["i64", "i32", "u32", "u32", "u32", "pointer", "usize"],
    result: "i64",
  },
  io_uring_register: {
    name: "syscall",
    parameters: ["i64", "i32", "u32", "buffer", "u32"],
    result: "i64",
  },
  // Only the tests make pipes and socket pairs (tests/helpers/fds.ts); two symbols cost less than
  // a second binding.
  pipe2: { parameters: ["buffer", "i32"], result: "i32" },
  socketpair: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
  __errno_location: { parameters: [], result: "pointer" },
} as const;

// The one binding of libc: every `sys/` module (and every test that needs a raw call) uses these
// symbols rather than opening libc again.
const lib = Deno.dlopen("libc.so.6", symbols);

/** The raw libc symbols. Prefer the checked wrappers in the other `sys/` modules. */
export const libc = lib.symbols;

/** Reads the calling thread's errno; call it straight after the failing call. */
export function errno(): number {
  return new Deno.UnsafePointerView(libc.__errno_location()!).getInt32();
}

/** Linux errno values that vhostd looks at by name. */
export const Errno = {
  EPERM: 1,
  ENOENT: 2,
  EINTR: 4,
  EIO: 5,
  ENXIO: 6,
  EBADF: 9,
  EAGAIN: 11,
  ENOMEM: 12,
  EACCES: 13,
  EFAULT: 14,
  EBUSY: 16,
  EEXIST: 17,
  ENODEV: 19,
  ENOTDIR: 20,
  EISDIR: 21,
  EINVAL: 22,
  ENFILE: 23,
  EMFILE: 24,
  ENOSPC: 28,
  ESPIPE: 29,
  EROFS: 30,
  EPIPE: 32,
  ENAMETOOLONG: 36,
  ENOSYS: 38,
  ELOOP: 40,
  ENOTSOCK: 88,
  EOPNOTSUPP: 95,
  EADDRINUSE: 98,
  ECONNABORTED: 103,
  ECONNRESET: 104,
  ENOBUFS: 105,
  ENOTCONN: 107,
  ETIMEDOUT: 110,
  ECONNREFUSED: 111,
} as const;

const errnoNames = new Map<number, string>(
  Object.entries(Errno).map(([name, value]) => [value, name]),
);

/** A failed system call: the call's name, errno and its symbolic code (`"ENOENT"`). */
export class SysError extends Error {
  /** The errno value. */
  readonly errno: number;
  /** The symbolic errno name, or `E<number>` when vhostd has no name for it. */
  readonly code: string;
  /** The libc function that failed. */
  readonly syscall: string;

  /** Builds the error for `syscall` failing with `err`. */
  constructor(syscall: string, err: number, detail?: string) {
    const code = errnoNames.get(err) ?? `E${err}`;
    super(`${syscall}${detail ? ` ${detail}` : ""}: ${code} (errno ${err})`);
    this.name = "SysError";
    this.errno = err;
    this.code = code;
    this.syscall = syscall;
  }
}

/** Throws a {@link SysError} for a negative return value, otherwise returns it as a number. */
export function check(rc: number | bigint, syscall: string, detail?: string): number {
  const n = Number(rc);
  if (n < 0) throw new SysError(syscall, errno(), detail);
  return n;
}

/** Closes an fd, ignoring errors (used on cleanup paths). */
export function closeQuietly(fd: number): void {
  if (fd >= 0) libc.close(fd);
}

const encoder = new TextEncoder();

/** Encodes a string as a NUL-terminated C string. */
export function cstring(s: string): Uint8Array<ArrayBuffer> {
  const bytes = encoder.encode(s);
  const out = new Uint8Array(bytes.length + 1);
  out.set(bytes);
  return out;
}

/** Open flags and other constants from the Linux x86-64 ABI. */
export const O = {
  RDONLY: 0,
  WRONLY: 1,
  RDWR: 2,
  CREAT: 0o100,
  EXCL: 0o200,
  NOCTTY: 0o400,
  TRUNC: 0o1000,
  APPEND: 0o2000,
  NONBLOCK: 0o4000,
  DIRECT: 0o40000,
  DIRECTORY: 0o200000,
  NOFOLLOW: 0o400000,
  CLOEXEC: 0o2000000,
  PATH: 0o10000000,
} as const;

/** Opens a path and returns the fd, throwing {@link SysError} on failure. */
export function openFile(path: string, flags: number, mode = 0o644): number {
  return check(libc.open(cstring(path), flags | O.CLOEXEC, mode), "open", path);
}

/** fcntl commands from the Linux x86-64 ABI. */
export const F = {
  SETFD: 2,
  GETFL: 3,
  SETFL: 4,
  OFD_GETLK: 36,
  OFD_SETLK: 37,
  DUPFD_CLOEXEC: 1030,
} as const;

/** lseek's `whence`. */
export const SEEK = { SET: 0, END: 2 } as const;

/** Size in bytes of a regular file or block device, found with lseek(SEEK_END). */
export function fdSize(fd: number): number {
  return check(libc.lseek(fd, 0n, SEEK.END), "lseek");
}

/** The file status flags of an fd (fcntl F_GETFL): {@link O} bits such as `O.DIRECT`. */
export function statusFlags(fd: number): number {
  return check(libc.fcntl(fd, F.GETFL, 0), "fcntl(F_GETFL)");
}

/** `statfs.f_type` of file systems whose files live in memory (tmpfs, ramfs). */
export const MEMORY_FS_MAGIC: readonly number[] = [0x01021994, 0x858458f6];

/** The file system type of an fd (`fstatfs` `f_type`, e.g. one of {@link MEMORY_FS_MAGIC}). */
export function fileSystemType(fd: number): number {
  const buf = new BigInt64Array(15); // struct statfs is 120 bytes on 64-bit Linux
  check(libc.fstatfs(fd, new Uint8Array(buf.buffer)), "fstatfs");
  return Number(buf[0]);
}

/** Sets O_NONBLOCK on an fd. */
export function setNonBlocking(fd: number): void {
  check(libc.fcntl(fd, F.SETFL, statusFlags(fd) | O.NONBLOCK), "fcntl(F_SETFL)");
}
