/**
 * Open-file-description byte-range locks (`F_OFD_SETLK`): held by an open file rather than a
 * process, so they are not dropped when some other fd of the same file is closed, and released
 * by the kernel when the last fd of that open file goes (a crash included).
 *
 * @module
 */

import { errno, F, libc, SEEK, SysError } from "./libc.ts";

const F_RDLCK = 0;
const F_WRLCK = 1;
const F_UNLCK = 2;

// struct flock on x86-64: short l_type, short l_whence, (pad), off_t l_start, off_t l_len,
// pid_t l_pid, (pad): 32 bytes.
const flock = new Uint8Array(32);
const view = new DataView(flock.buffer);

function setFlock(type: number, start: number, length: number): void {
  flock.fill(0);
  view.setInt16(0, type, true);
  view.setInt16(2, SEEK.SET, true);
  view.setBigInt64(8, BigInt(start), true);
  view.setBigInt64(16, BigInt(length), true);
}

/** Takes a shared (read) lock on `length` bytes at `start`; false if another holder prevents it. */
export function sharedLock(fd: number, start: number, length = 1): boolean {
  setFlock(F_RDLCK, start, length);
  if (libc.fcntl_lock(fd, F.OFD_SETLK, flock) === 0) return true;
  const err = errno();
  if (err === 11 /* EAGAIN */ || err === 13 /* EACCES */) return false;
  throw new SysError("fcntl(F_OFD_SETLK)", err);
}

/** Releases the lock on `length` bytes at `start` (held or not). */
export function unlock(fd: number, start: number, length = 1): void {
  setFlock(F_UNLCK, start, length);
  libc.fcntl_lock(fd, F.OFD_SETLK, flock);
}

/**
 * Whether some other open file holds any lock on `length` bytes at `start` (asked as an exclusive
 * lock would be: any lock but ours conflicts). Locks of this fd's own open file never count.
 */
export function lockedByOthers(fd: number, start: number, length = 1): boolean {
  setFlock(F_WRLCK, start, length);
  if (libc.fcntl_lock(fd, F.OFD_GETLK, flock) !== 0) {
    throw new SysError("fcntl(F_OFD_GETLK)", errno());
  }
  return view.getInt16(0, true) !== F_UNLCK;
}
