/**
 * A console port's log file: every byte the guest wrote, appended, capped in size with one
 * rotation (`FILE` becomes `FILE.1`), and opened so that nobody can point it elsewhere.
 *
 * The guest decides how much it writes, so an uncapped log lets a guest fill the host's disk.
 * The file is opened without following a symlink (O_NOFOLLOW) and must be a regular file with no
 * other hard link: whoever can write the log's folder must not be able to make the daemon, often
 * more privileged, append guest output to a file of their choosing.
 *
 * @module
 */

import type { Logger } from "../../log/mod.ts";
import { closeQuietly, Errno, errno, O, openFile, SysError } from "../../sys/libc.ts";
import { writeAll } from "../../sys/io.ts";

/** Default size at which a log is rotated: 16 MiB, so at most 32 MiB per port with `FILE.1`. */
export const DEFAULT_LOG_MAX_BYTES = 16 << 20;
/** Smallest cap accepted (0 excepted: no cap): a rotation per burst of output would be noise. */
export const MIN_LOG_MAX_BYTES = 64 << 10;

/** A log file opened for appending. */
export interface OpenedLog {
  /** The fd (O_APPEND, close-on-exec). */
  fd: number;
  /** Its size when opened. */
  size: number;
}

/**
 * Opens `path` for appending, creating it (0640) if missing, or with `exclusive` only by creating
 * it. Refuses a symlink, anything but a regular file, and a file with another hard link; throws an
 * Error whose message names the path.
 */
export function openLogFile(path: string, exclusive = false): OpenedLog {
  let fd: number;
  try {
    // O_NONBLOCK: opening a FIFO put there for writing would otherwise wait for a reader.
    const flags = O.WRONLY | O.CREAT | O.APPEND | O.NOFOLLOW | O.NONBLOCK | O.NOCTTY;
    fd = openFile(path, flags | (exclusive ? O.EXCL : 0), 0o640);
  } catch (e) {
    if (e instanceof SysError && e.errno === Errno.ELOOP) {
      throw new Error(`${path} is a symbolic link; refusing to follow it`);
    }
    if (e instanceof SysError && e.errno === Errno.ENXIO) {
      throw new Error(`${path} is not a regular file`);
    }
    throw e;
  }
  let info: Deno.FileInfo;
  try {
    // The open file itself, not whatever the path names by now.
    info = Deno.statSync(`/proc/self/fd/${fd}`);
  } catch (e) {
    closeQuietly(fd);
    throw e;
  }
  if (!info.isFile || (info.nlink ?? 1) > 1) {
    closeQuietly(fd);
    throw new Error(
      `${path} is ${info.isFile ? "a file with other hard links" : "not a regular file"}; ` +
        "refusing to write a console log there",
    );
  }
  return { fd, size: info.size };
}

/** A port's log: appends, rotates at the cap, and stops (with one line) if writing fails. */
export class ConsoleLog {
  /** The log's path. */
  readonly path: string;
  /** Rotation size in bytes (0: never). */
  readonly maxBytes: number;
  readonly #log: Logger;
  #fd: number;
  #size: number;

  /**
   * Takes over `opened` (the fd is closed with the log, or when logging stops); `log` says what
   * happens to it and should be rate-limited, since the guest drives rotation.
   */
  constructor(path: string, opened: OpenedLog, maxBytes: number, log: Logger) {
    this.path = path;
    this.maxBytes = maxBytes;
    this.#fd = opened.fd;
    this.#size = opened.size;
    this.#log = log;
  }

  /** Whether the log is still being written. */
  get open(): boolean {
    return this.#fd >= 0;
  }

  /** Appends `data`, first rotating if it would take the file past the cap. */
  append(data: Uint8Array): void {
    if (this.#fd < 0) return;
    if (this.maxBytes > 0 && this.#size > 0 && this.#size + data.length > this.maxBytes) {
      this.#rotate();
      if (this.#fd < 0) return;
    }
    if (!writeAll(this.#fd, data, true)) {
      this.#stop("writing the log failed (errno {errno}); logging stops", { errno: errno() });
      return;
    }
    this.#size += data.length;
  }

  /** Closes the file. */
  close(): void {
    closeQuietly(this.#fd);
    this.#fd = -1;
  }

  /**
   * `FILE` becomes `FILE.1` (replacing the one before) and a new `FILE` is created. The new file
   * must not exist yet: one that appeared between the rename and the open was put there by
   * someone else.
   */
  #rotate(): void {
    try {
      Deno.renameSync(this.path, `${this.path}.1`);
    } catch (e) {
      this.#stop("cannot rotate {path}: {error}; logging stops", {
        path: this.path,
        error: (e as Error).message,
      });
      return;
    }
    closeQuietly(this.#fd);
    this.#fd = -1;
    try {
      ({ fd: this.#fd, size: this.#size } = openLogFile(this.path, true));
    } catch (e) {
      this.#stop("cannot start a new {path} after rotating it: {error}; logging stops", {
        path: this.path,
        error: (e as Error).message,
      });
      return;
    }
    this.#log.info("{path} reached {bytes} bytes: moved to {path}.1, a new log started", {
      path: this.path,
      bytes: this.maxBytes,
    });
  }

  #stop(message: string, properties: Record<string, unknown>): void {
    this.#log.error(message, properties);
    this.close();
  }
}
