/**
 * Opening a disk image for the block device, with the checks a user needs to hear about before
 * QEMU ever connects.
 *
 * @module
 */

import { closeQuietly, fdSize, O, openFile, SysError } from "../../sys/libc.ts";
import { UsageError } from "../../sys/errors.ts";

/** An opened image. */
export interface OpenImage {
  /** The open fd. */
  fd: number;
  /** Size in bytes. */
  sizeBytes: number;
}

/** An image size for people: `1024 MiB`, `64.5 MiB` (banners, logs, `vhostd resize`). */
export function sizeText(bytes: number): string {
  return `${(bytes / 1048576).toFixed(bytes % 1048576 ? 1 : 0)} MiB`;
}

/**
 * Opens a raw image file or block device. A missing image, a directory, an image that cannot be
 * written (a read-only file system, or mode bits without any write permission) when
 * `readOnly` is false, and an image smaller than one sector all become {@link UsageError}.
 */
export function openImage(path: string, readOnly: boolean, direct: boolean): OpenImage {
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new UsageError(`image not found: ${path}`);
    throw new UsageError(`cannot read image ${path}: ${(e as Error).message}`);
  }
  if (!info.isFile && !info.isBlockDevice) {
    throw new UsageError(`image ${path} is not a regular file or block device`);
  }
  // Root ignores permission bits, so honour them explicitly: a file nobody may write was meant
  // to stay unchanged.
  if (!readOnly && info.isFile && info.mode !== null && (info.mode & 0o222) === 0) {
    throw new UsageError(
      `image ${path} is read-only (mode ${
        (info.mode & 0o777).toString(8)
      }); pass --read-only to serve it`,
    );
  }
  const flags = (readOnly ? O.RDONLY : O.RDWR) | (direct ? O.DIRECT : 0);
  let fd: number;
  try {
    fd = openFile(path, flags);
  } catch (e) {
    if (e instanceof SysError && !readOnly && ["EROFS", "EACCES", "EPERM"].includes(e.code)) {
      throw new UsageError(
        `image ${path} cannot be opened for writing (${e.code}); pass --read-only to serve it`,
      );
    }
    if (e instanceof SysError && direct && e.code === "EINVAL") {
      throw new UsageError(`image ${path} does not support O_DIRECT (--direct)`);
    }
    throw new UsageError(`cannot open image ${path}: ${(e as Error).message}`);
  }
  const sizeBytes = fdSize(fd);
  if (sizeBytes < 512) {
    closeQuietly(fd);
    throw new UsageError(`image ${path} is smaller than one 512-byte sector`);
  }
  return { fd, sizeBytes };
}
