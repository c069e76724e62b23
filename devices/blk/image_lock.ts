/**
 * Image locking that QEMU honours, so that two writers never share a disk image by accident.
 *
 * QEMU's file driver (block/file-posix.c) marks what a user of an image does, and what it lets
 * others do, with shared OFD locks on single bytes of the image file: byte 100 + p while it uses
 * permission p, byte 200 + p while it refuses p to others. Before it opens an image it checks
 * that nobody refuses what it wants (a lock on 200 + p) and that nobody uses what it refuses
 * (a lock on 100 + p). vhostd takes the same bytes as a QEMU guest disk would, so QEMU's
 * `-drive` (with its default `locking=auto`), qemu-img, qemu-storage-daemon and another vhostd all
 * see it, and it sees them.
 *
 * @module
 */

import { lockedByOthers, sharedLock, unlock } from "../../sys/file_lock.ts";

/** QEMU's permission bits (their bit numbers), as block-common.h defines them. */
export const ImagePermission = {
  /** Reads see what was written. */
  CONSISTENT_READ: 0,
  /** Writes. */
  WRITE: 1,
  /** Writes that leave the data as it was (metadata upkeep). */
  WRITE_UNCHANGED: 2,
  /** Changing the image's size. */
  RESIZE: 3,
} as const;

const NAMES = ["consistent read", "write", "write unchanged", "resize"];
/** Byte `USED_BASE + p` is locked while permission p is used. */
const USED_BASE = 100;
/** Byte `REFUSED_BASE + p` is locked while permission p is refused to others. */
const REFUSED_BASE = 200;

/** What an image user does and refuses, as permission bit numbers. */
export interface LockPermissions {
  /** Permissions used. */
  used: readonly number[];
  /** Permissions refused to every other user. */
  refused: readonly number[];
}

/**
 * What a guest disk takes, as QEMU's own virtio-blk does with `share-rw=off`: it reads
 * consistently, writes (unless read-only), and lets nobody else write or resize the image.
 */
export function diskPermissions(readOnly: boolean): LockPermissions {
  const P = ImagePermission;
  return {
    used: readOnly ? [P.CONSISTENT_READ] : [P.CONSISTENT_READ, P.WRITE, P.WRITE_UNCHANGED],
    refused: [P.WRITE, P.RESIZE],
  };
}

/** The lock of one open image. */
export class ImageLock {
  /** The image's path (for messages). */
  readonly path: string;
  readonly #fd: number;
  readonly #perms: LockPermissions;
  #held = false;

  /** The lock for image `path` open as `fd`, taking `perms`. */
  constructor(fd: number, path: string, perms: LockPermissions) {
    this.#fd = fd;
    this.path = path;
    this.#perms = perms;
  }

  /** Whether this device holds the lock. */
  get held(): boolean {
    return this.#held;
  }

  /**
   * Takes the lock: the bytes first, then the check, as QEMU does, so that of two users racing
   * for one image at least one sees the other. Returns null when held, else why not (one line
   * naming the image and, when the kernel tells, the holder).
   */
  acquire(): string | null {
    if (this.#held) return null;
    const fd = this.#fd;
    const { used, refused } = this.#perms;
    for (const p of used) sharedLock(fd, USED_BASE + p);
    for (const p of refused) sharedLock(fd, REFUSED_BASE + p);
    const conflict = this.conflict();
    if (conflict !== null) {
      this.#unlockAll();
      return conflict;
    }
    this.#held = true;
    return null;
  }

  /** Releases the lock (the image stays open). */
  release(): void {
    if (!this.#held) return;
    this.#unlockAll();
    this.#held = false;
  }

  /** Why another user would keep this one from taking the lock now, or null if none would. */
  conflict(): string | null {
    const fd = this.#fd;
    const { used, refused } = this.#perms;
    for (const p of used) {
      if (lockedByOthers(fd, REFUSED_BASE + p)) {
        return `image ${this.path} is in use: ${holderText(fd)} does not let others ${NAMES[p]} it`;
      }
    }
    for (const p of refused) {
      if (lockedByOthers(fd, USED_BASE + p)) {
        return `image ${this.path} is in use: ${holderText(fd)} has it open for ${NAMES[p]}`;
      }
    }
    return null;
  }

  #unlockAll(): void {
    const { used, refused } = this.#perms;
    for (const p of used) unlock(this.#fd, USED_BASE + p);
    for (const p of refused) unlock(this.#fd, REFUSED_BASE + p);
  }
}

/**
 * "pid N (command)" for a process other than this one that has the file behind `fd` open with a
 * lock on it, else "another process". /proc/locks cannot tell (it shows OFD locks with pid -1),
 * so the processes' open fds are searched for the same file whose fdinfo lists a lock. This runs
 * only when there is a conflict to report.
 */
function holderText(fd: number): string {
  try {
    const mine = Deno.statSync(`/proc/self/fd/${fd}`);
    let looked = 0;
    for (const proc of Deno.readDirSync("/proc")) {
      const pid = Number(proc.name);
      if (!Number.isInteger(pid) || pid === Deno.pid) continue;
      let fds: Iterable<Deno.DirEntry>;
      try {
        fds = Deno.readDirSync(`/proc/${pid}/fd`);
      } catch {
        continue; // gone, or not ours to read
      }
      for (const entry of fds) {
        if (++looked > 100_000) return "another process";
        try {
          const info = Deno.statSync(`/proc/${pid}/fd/${entry.name}`);
          if (info.ino !== mine.ino || info.dev !== mine.dev) continue;
          const fdinfo = Deno.readTextFileSync(`/proc/${pid}/fdinfo/${entry.name}`);
          if (!/^lock:/m.test(fdinfo)) continue;
          const command = Deno.readTextFileSync(`/proc/${pid}/comm`).trim();
          return `pid ${pid} (${command})`;
        } catch {
          // closed meanwhile
        }
      }
    }
  } catch {
    // /proc unreadable: say less
  }
  return "another process";
}
