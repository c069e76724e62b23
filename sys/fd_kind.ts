/**
 * What kind of file an fd refers to. A front-end hands the back-end fds (guest memory, eventfds,
 * an inflight buffer, a dirty log) that must each be of one kind: a pipe where an eventfd belongs
 * blocks a write forever once it fills, and a file smaller than its mapping is SIGBUS on access.
 *
 * @module
 */

import { check, libc } from "./libc.ts";

/** The kinds {@link fdStat} tells apart. */
export type FdKind =
  | "file"
  | "eventfd"
  | "anonymous inode"
  | "pipe"
  | "socket"
  | "character device"
  | "block device"
  | "directory"
  | "other";

/** An fd's kind and, for files, size. */
export interface FdStat {
  /** What the fd is. */
  kind: FdKind;
  /** st_size: bytes for a regular file (0 for most other kinds). */
  size: number;
}

const S_IFMT = 0o170000;
const TYPES: Record<number, FdKind> = {
  0o100000: "file",
  0o010000: "pipe",
  0o140000: "socket",
  0o020000: "character device",
  0o060000: "block device",
  0o040000: "directory",
};

// struct stat on x86-64: st_mode is a u32 at byte 24, st_size an i64 at byte 48; 144 bytes in all.
const statBuffer = new Uint8Array(144);
const statView = new DataView(statBuffer.buffer);

/** fstat's answer, as a kind and a size. Throws SysError for a closed or invalid fd. */
export function fdStat(fd: number): FdStat {
  check(libc.fstat(fd, statBuffer), "fstat");
  const type = statView.getUint32(24, true) & S_IFMT;
  const size = Number(statView.getBigInt64(48, true));
  let kind = TYPES[type];
  if (kind === undefined) {
    // Anonymous inodes (eventfd, epoll, timerfd...) have no file type; /proc names them.
    kind = type === 0 ? anonymousKind(fd) : "other";
  }
  return { kind, size };
}

function anonymousKind(fd: number): FdKind {
  try {
    return Deno.readLinkSync(`/proc/self/fd/${fd}`) === "anon_inode:[eventfd]"
      ? "eventfd"
      : "anonymous inode";
  } catch {
    return "anonymous inode";
  }
}
